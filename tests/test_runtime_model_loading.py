"""The model-loading options of an Axolotl config in the runtime: revision_of_model, model_config (and the MoE
router's aux loss it switches on), model_quantization_config, quantize_moe_experts, tokenizer_use_mistral_common
and resize_token_embeddings_to_32x (runtime/pretrained.py, model.py, moe_quantization.py, router_loss.py,
mistral_tokenizer.py). Model plans come from the real compiler (plan_factory); the tiny models are built here.

MoE quantisation runs with bitsandbytes on a GPU only (the tests marked gpu); on the CPU its mechanics run with
a quantiser that stores each weight's bits as integers, so the results must equal the unquantised model's."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from helpers import require_module, run_cli
from plan_factory import make_plan
from runtime_bundles import compile_bundle, launch, metrics, safetensors, subprocess_env, workspace, write_config
from tunefile.compiler.render.config_yaml import build_run_plan, dataset_plan
from tunefile.compiler.spec import DatasetSpec
from tunefile.runtime import moe_quantization as moe
from tunefile.runtime.data.errors import DataError
from tunefile.runtime.data.formats import IGNORE, make_formatter
from tunefile.runtime.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from tunefile.runtime.merge import run_merge
from tunefile.runtime.model import ModelLoadError, load_base_model, load_model, match_vocabulary, quantization_config
from tunefile.runtime.pretrained import (
    PretrainedOptionError,
    build_quantization_config,
    dequantizing,
    embedding_rows,
    quantization_change,
    revision_decision,
    revision_kwargs,
)
from tunefile.runtime.router_loss import RouterAuxLoss, RouterLossError, aux_loss_weight
from tunefile.runtime.trained_model import fit_vocabulary
from tunefile.schemas.run_plan import ModelPlan, RunPlan

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def compiled(**spec: Any) -> RunPlan:
    return build_run_plan(make_plan("single", spec={"adapter": None, **spec}))


def model_plan(model_dir: Path, **changes: Any) -> ModelPlan:
    """The compiler's model section for a full fine-tune of ``model_dir`` in fp32, with ``changes``."""
    plan = replace(compiled().model, base_model=str(model_dir), tokenizer=str(model_dir), precision="fp32",
                   architecture=None, parameters=None)
    return replace(plan, **changes)


def tiny_moe(arch: str = "mixtral", *, vocab_size: int = 100, layers: int = 2, seed: int = 0,
             dtype: torch.dtype = torch.float32, **config: Any) -> torch.nn.Module:
    """A random MoE causal LM: hidden 32, ``layers`` layers, 4 experts (top 2), experts as 3-D parameters."""
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    common = {"vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_experts_per_tok": 2, "max_position_embeddings": 256, **config}
    if arch == "mixtral":
        settings = MixtralConfig(intermediate_size=64, num_local_experts=4, **common)
    else:
        settings = Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=48, num_experts=4, head_dim=8,
                                  **common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(settings, dtype=dtype)


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A tiny Mixtral saved like a hub checkpoint, with the tiny model's tokenizer."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny-moe") / "tiny-mixtral"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_moe(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# --- revision_of_model ----------------------------------------------------------------------------------------

def test_revision_applies_to_hub_ids_and_is_recorded_as_ignored_for_folders(tiny_model_dir: Path) -> None:
    assert revision_kwargs("acme/model", "v2") == {"revision": "v2"}
    assert revision_kwargs(str(tiny_model_dir), "v2") == {}
    assert revision_kwargs("acme/model", None) == {}
    local = model_plan(tiny_model_dir, revision="v2")
    assert revision_decision(local) == "ignored for base_model and tokenizer: a local folder has no revisions"
    assert revision_decision(replace(local, base_model="acme/model")) == "ignored for tokenizer: a local folder " \
                                                                         "has no revisions"
    assert revision_decision(replace(local, base_model="acme/model", tokenizer="acme/model")) == "v2 (from the Hub)"
    assert revision_decision(replace(local, revision=None)) is None
    decisions: dict[str, Any] = {}
    load_base_model(local, attn_implementation="sdpa", decisions=decisions)
    assert decisions == {"revision": "ignored for base_model and tokenizer: a local folder has no revisions"}


def hub_cache_repo(cache: Path, repo: str, snapshots: dict[str, Path]) -> None:
    """``repo`` in a Hugging Face cache folder as the hub client lays it out: each revision name a ref to a
    commit whose snapshot holds a copy of the folder given for it."""
    import shutil

    root = cache / f"models--{repo.replace('/', '--')}"
    for number, (revision, source) in enumerate(snapshots.items()):
        commit = f"{number + 1:040x}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / revision).write_text(commit, encoding="utf-8")
        shutil.copytree(source, root / "snapshots" / commit)


def test_revision_selects_the_snapshot_of_model_config_and_tokenizer(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Offline, from a hub cache where the revision v1 is another model than main: the model, its configuration
    (read for model_config overrides) and the tokenizer all come from v1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.num_hidden_layers = 1
    model.model.layers = model.model.layers[:1]
    model.save_pretrained(other)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<only-in-v1>"])
    tokenizer.save_pretrained(other)
    hub_cache_repo(tmp_path / "cache", "acme/tiny", {"main": tiny_model_dir, "v1": other})

    script = textwrap.dedent(f"""
        import json, sys
        from dataclasses import replace
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_runtime_model_loading import model_plan
        from tunefile.runtime.model import load_base_model
        from tunefile.runtime.data.tokenizer import load_tokenizer
        from tunefile.runtime.model import ModelLoadError
        plan = replace(model_plan("acme/tiny"), revision="v1", config_overrides={{"use_cache": True}})
        decisions = {{}}
        module = load_base_model(plan, attn_implementation="sdpa", decisions=decisions)
        tokenizer, _ = load_tokenizer(plan, offline=True)
        try:
            load_base_model(replace(plan, revision="v9"), attn_implementation="sdpa")
            missing = None
        except ModelLoadError as exc:
            missing = str(exc)
        print(json.dumps({{"layers": module.config.num_hidden_layers, "tokens": len(tokenizer),
                          "decisions": decisions, "missing": missing}}))
    """)
    env = subprocess_env({"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf-home")})
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["layers"] == 1 and report["tokens"] == 1025  # v1's model and tokenizer, not main's
    assert report["decisions"] == {"revision": "v1 (from the Hub)"}
    assert "acme/tiny at revision v9: not in the Hugging Face cache" in report["missing"]


# --- model_config overrides and the router's aux loss -------------------------------------------------------

def test_config_overrides_reach_the_model_and_unknown_ones_are_named(tiny_moe_dir: Path) -> None:
    plan = model_plan(tiny_moe_dir, config_overrides={"output_router_logits": True, "router_aux_loss_coef": 0.25})
    module = load_base_model(plan, attn_implementation="sdpa")
    assert module.config.output_router_logits is True and module.config.router_aux_loss_coef == 0.25
    assert module(torch.tensor([[1, 2, 3, 4]])).aux_loss is not None  # the router now reports its loss
    plain = load_base_model(model_plan(tiny_moe_dir), attn_implementation="sdpa")
    assert plain(torch.tensor([[1, 2, 3, 4]])).aux_loss is None
    with pytest.raises(PretrainedOptionError, match=r"MixtralConfig .* has no attribute no_such_key, "
                                                    r"output_router_logit;"):
        load_base_model(model_plan(tiny_moe_dir, config_overrides={"output_router_logit": True, "no_such_key": 1}),
                        attn_implementation="sdpa")


def aux_of(model: torch.nn.Module, catcher: RouterAuxLoss, ids: torch.Tensor) -> torch.Tensor:
    model(input_ids=ids)
    return catcher.caught


def test_aux_loss_weight_makes_the_step_add_the_mean_of_its_micro_batches() -> None:
    """Accumulating each micro-batch's term as accelerate does (divided by the accumulation steps) gives the
    gradient of coef × mean(aux) over the step's micro-batches, a short final step included."""
    coef, accumulation = 0.3, 4
    batches = [torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = tiny_moe(output_router_logits=True, router_aux_loss_coef=coef).train()
    reference = copy.deepcopy(model)
    catcher, ref_catcher = RouterAuxLoss(model), RouterAuxLoss(reference)

    for ids in batches:  # the loop's way: one backward per micro-batch
        model(input_ids=ids)
        term = catcher.term(accumulation=accumulation, micro_batches=len(batches))
        (term / accumulation).backward()  # accelerate's division
    mean = torch.stack([aux_of(reference, ref_catcher, ids) for ids in batches]).mean()
    (coef * mean).backward()

    router = "model.layers.0.mlp.gate.weight"
    got, expected = dict(model.named_parameters())[router].grad, dict(reference.named_parameters())[router].grad
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert aux_loss_weight(accumulation=4, micro_batches=4) == 1.0


def test_router_aux_loss_counts_training_forwards_of_models_that_return_one() -> None:
    model = tiny_moe(output_router_logits=True)
    catcher = RouterAuxLoss(model)
    ids = torch.randint(0, 100, (1, 6))
    model.eval()
    model(input_ids=ids)
    assert catcher.term(accumulation=1, micro_batches=1) == 0.0  # evaluation forwards add nothing
    model.train()
    model(input_ids=ids)
    term = catcher.term(accumulation=2, micro_batches=1)
    assert isinstance(term, torch.Tensor) and term.requires_grad and term.item() > 0
    assert catcher.term(accumulation=1, micro_batches=1) == 0.0  # each forward's loss is used once

    dense = tiny_moe(output_router_logits=False)
    dense_catcher = RouterAuxLoss(dense)
    dense.train()
    dense(input_ids=ids)
    assert dense_catcher.term(accumulation=1, micro_batches=1) == 0.0

    catcher.config = SimpleNamespace()  # a configuration without the coefficient
    model(input_ids=ids)
    with pytest.raises(RouterLossError, match="router_aux_loss_coef"):
        catcher.term(accumulation=1, micro_batches=1)


def test_training_adds_the_router_aux_loss_and_logs_the_token_loss(tmp_path: Path, tiny_moe_dir: Path) -> None:
    """Two runs from the same weights and data, one with output_router_logits: only the aux loss can make
    them differ. The first logged loss (the token loss alone) is the same in both."""
    results = {}
    for name, overrides in (("plain", {}), ("aux", {"model_config": {"output_router_logits": True,
                                                                     "router_aux_loss_coef": 0.5}})):
        root = workspace(tmp_path / name, tiny_moe_dir)
        config = write_config(root, max_steps=1, micro_batch_size=2, gradient_accumulation_steps=2,
                              learning_rate=1e-2, **overrides)
        launch(compile_bundle(config))
        weights = safetensors(root / "out" / "model.safetensors")
        results[name] = (metrics(root / "out"), weights)
    (plain_metrics, plain), (aux_metrics, aux) = results["plain"], results["aux"]
    first = [next(r["loss"] for r in m if "loss" in r) for m in (plain_metrics, aux_metrics)]
    assert first[0] == pytest.approx(first[1], rel=1e-6)
    # transformers saves Mixtral under its original names: the router is block_sparse_moe.gate
    [router] = [key for key in plain if key.startswith("model.layers.0.") and key.endswith(".gate.weight")]
    assert not torch.equal(plain[router], aux[router])
    assert all(math.isfinite(r["loss"]) for r in aux_metrics if "loss" in r)


# --- model_quantization_config --------------------------------------------------------------------------------

def test_quantization_config_class_and_arguments_are_checked() -> None:
    built = build_quantization_config({"class": "Mxfp4Config", "kwargs": {"dequantize": True}})
    assert type(built).__name__ == "Mxfp4Config" and built.dequantize is True
    assert build_quantization_config(None) is None
    with pytest.raises(PretrainedOptionError, match="no quantisation config class 'NoSuchConfig'"):
        build_quantization_config({"class": "NoSuchConfig", "kwargs": {}})
    with pytest.raises(PretrainedOptionError, match="no quantisation config class 'LlamaConfig'"):
        build_quantization_config({"class": "LlamaConfig", "kwargs": {}})
    with pytest.raises(PretrainedOptionError, match="Mxfp4Config takes no dequantise"):
        build_quantization_config({"class": "Mxfp4Config", "kwargs": {"dequantise": True}})
    assert dequantizing({"class": "Mxfp4Config", "kwargs": {}}) == {"class": "Mxfp4Config",
                                                                    "kwargs": {"dequantize": True}}
    assert dequantizing(None) is None


def test_quantization_config_loads_with_the_base_and_conflicts_with_bitsandbytes(tiny_model_dir: Path) -> None:
    spec = {"class": "Mxfp4Config", "kwargs": {"dequantize": True}}
    module = load_base_model(model_plan(tiny_model_dir, quantization_config=spec), attn_implementation="sdpa")
    assert type(module.hf_quantizer.quantization_config).__name__ == "Mxfp4Config"
    with pytest.raises(ModelLoadError, match="cannot both be set"):
        quantization_config(model_plan(tiny_model_dir, quantization_config=spec, load_in_4bit=True))


def test_a_quantization_changed_by_transformers_is_one_sentence() -> None:
    from transformers import Mxfp4Config

    config = Mxfp4Config()
    before = dict(vars(config))
    config.dequantize = True  # what transformers does on a machine without the MXFP4 kernels
    assert quantization_change(config, before, SimpleNamespace()) == \
        "transformers changed Mxfp4Config on this machine (dequantize: False → True)"
    assert quantization_change(Mxfp4Config(), dict(vars(Mxfp4Config())), SimpleNamespace()) is None


# --- resize_token_embeddings_to_32x ---------------------------------------------------------------------------

def embeddings_after(rows: int, vocab_size: int, **options: Any) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    module = LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1))
    match_vocabulary(module, vocab_size, **options)
    assert module.get_output_embeddings().weight.shape[0] == module.get_input_embeddings().num_embeddings
    return module.get_input_embeddings().num_embeddings


def test_embeddings_round_up_to_the_multiple_as_axolotl_does() -> None:
    assert embedding_rows(1027, 32) == 1056 and embedding_rows(1024, 32) == 1024 and embedding_rows(1027, None) == 1027
    assert embeddings_after(1024, 1027, shrink=False, pad_to_multiple_of=32) == 1056  # grew: to the next multiple
    assert embeddings_after(1024, 1027, shrink=False) == 1027
    # The tokenizer fits, but the matrix is no multiple of 32: Axolotl still rounds it up.
    assert embeddings_after(1000, 1000, shrink=False, pad_to_multiple_of=32) == 1024
    assert embeddings_after(1100, 1030, shrink=True, pad_to_multiple_of=32) == 1056  # a shrink stops at the multiple
    assert embeddings_after(1100, 1030, shrink=False, pad_to_multiple_of=32) == 1100


def test_load_model_pads_the_grown_vocabulary(tiny_model_dir: Path) -> None:
    module = load_model(model_plan(tiny_model_dir, pad_embeddings_to_multiple_of=32), attn_implementation="sdpa",
                        vocab_size=1027)
    assert module.get_input_embeddings().num_embeddings == 1056 and module.config.vocab_size == 1056


def test_merging_accepts_an_adapter_trained_with_a_padded_vocabulary(tmp_path: Path, tiny_model_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Training rounded 1024 + 3 tokens up to 1056 rows and saved them with the adapter; the merge rebuilds that
    size instead of calling it a size mismatch, and computes what base + adapter did."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    added = ["<|a|>", "<|b|>", "<|c|>"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=32)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "out")
    tokenizer.save_pretrained(tmp_path / "out")
    config = {"base_model": str(tiny_model_dir), "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
              "output_dir": "out", "adapter": "lora", "resize_token_embeddings_to_32x": True,
              "special_tokens": {"additional_special_tokens": added}}
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    code, _, err = run_cli("compile", str(tmp_path / "cfg.yml"), "--output", str(tmp_path / "bundle"), "--force",
                           "--target", "cpu")
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    assert run_merge(tmp_path / "bundle" / "config.yaml") == 0

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", dtype=torch.float32).eval()
    assert merged.get_input_embeddings().num_embeddings == 1056 == merged.config.vocab_size
    ids = torch.tensor([tokenizer("Say red.").input_ids + tokenizer.convert_tokens_to_ids(added)])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)


def test_a_real_size_mismatch_is_still_one(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    module = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1))
    fit_vocabulary(module, tokenizer_size=1027, saved_rows=1056, shrink=False, adapter=None, base_model="base",
                   pad_to_multiple_of=32)
    assert module.get_input_embeddings().num_embeddings == 1056
    with pytest.raises(ModelLoadError, match="size mismatch"):
        fit_vocabulary(module, tokenizer_size=1027, saved_rows=1088, shrink=False, adapter=None, base_model="base",
                       pad_to_multiple_of=32)


# --- quantize_moe_experts: discovery and mechanics (CPU) ---------------------------------------------------------

class BitcastQuantizer:
    """Stores a weight's bits as int32 (another dtype, like real quantised data) and reads them back exactly;
    counts the reads."""

    name = "bitcast"

    def __init__(self) -> None:
        self.reads = 0

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return weight.view(torch.int32).clone(), weight.dtype

    def dequantize(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        self.reads += 1
        return stored.view(dtype)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_expert_weights_are_the_3d_parameters_of_experts(arch: str) -> None:
    model = tiny_moe(arch)
    found = {name: tuple(module.get_parameter(parameter).shape) for name, module, parameter
             in moe.find_expert_weights(model)}
    intermediate = 64 if arch == "mixtral" else 48
    assert found == {f"model.layers.{layer}.mlp.experts.{name}": shape for layer in range(2)
                     for name, shape in (("gate_up_proj", (4, 2 * intermediate, 32)),
                                         ("down_proj", (4, 32, intermediate)))}


def quantized_with_lora(model: torch.nn.Module, quantizer: Any, targets: list[str] | None) -> tuple[Any, Any]:
    """``model`` through the loader's order: quantise, adapter, dequantise on access (same random LoRA as
    ``lora_of``)."""
    experts = moe.quantize_expert_weights(model, quantizer)
    wrapped = lora_of(model, targets)
    experts.dequantize_on_access(wrapped)
    return wrapped, experts


def lora_of(model: torch.nn.Module, targets: list[str] | None) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], target_parameters=targets,
                                               init_lora_weights=False))
    return wrapped


def experts_module(model: torch.nn.Module, layer: int = 0) -> torch.nn.Module:
    module = model.get_submodule(f"base_model.model.model.layers.{layer}.mlp.experts")
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def test_quantized_experts_compute_what_the_model_computed_with_lora_on_top() -> None:
    """Exact storage, so everything equals the unquantised model with the same adapter: outputs, every LoRA
    gradient (the inner of two nested wrappers too), the adapter's layout; and peft's per-forward updates do
    not pile up on the dequantised weights."""
    from peft import get_peft_model_state_dict

    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    reference = lora_of(tiny_moe(), EXPERT_TARGETS)
    quantized, experts = quantized_with_lora(tiny_moe(), BitcastQuantizer(), EXPERT_TARGETS)
    assert experts.count == 4

    inner = experts_module(quantized)
    for name in ("gate_up_proj", "down_proj"):
        stored = inner.parametrizations[name].original
        assert stored.dtype == torch.int32 and not stored.requires_grad
        assert isinstance(inner.parametrizations[name][0], moe.DequantizedWeight)
    shapes = {key: tuple(value.shape) for key, value in get_peft_model_state_dict(quantized).items()}
    assert shapes == {key: tuple(value.shape) for key, value in get_peft_model_state_dict(reference).items()}

    for _ in range(3):  # a forward more than once: nothing may accumulate between them
        got, expected = quantized(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert [len(inner.parametrizations[name]) for name in ("gate_up_proj", "down_proj")] == [1, 1]

    got.square().mean().backward()
    expected.square().mean().backward()
    grads = {name: p.grad for name, p in quantized.named_parameters() if p.grad is not None}
    reference_grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == reference_grads.keys()
    assert sum(".experts." in name for name in grads) == 2 * 2 * 2  # lora_A and lora_B of 2 wrappers, 2 layers
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)


def test_each_expert_weight_is_dequantised_once_per_forward() -> None:
    quantizer = BitcastQuantizer()
    model = tiny_moe()
    reference = copy.deepcopy(model)
    experts = moe.quantize_expert_weights(model, quantizer)
    experts.dequantize_on_access(model)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    quantizer.reads = 0
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    assert quantizer.reads == 4  # 2 weights × 2 layers, though each layer reads its stacks once per expert


def test_non_reentrant_checkpointing_leaves_no_cache_behind() -> None:
    """Non-reentrant checkpointing stops recomputing a layer by raising once it has what backward needs: the
    parametrization cache must still close."""
    from torch.nn.utils import parametrize

    quantized, _ = quantized_with_lora(tiny_moe(), BitcastQuantizer(), EXPERT_TARGETS)
    quantized.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    quantized.train()
    ids = torch.randint(0, 100, (2, 7))
    quantized(input_ids=ids, labels=ids).loss.backward()
    assert parametrize._cache_enabled == 0 and not parametrize._cache
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in quantized.named_parameters()
               if ".experts." in n)


def test_placeholders_survive_kbit_preparation_without_memory() -> None:
    """peft's k-bit preparation copies bf16 parameters to fp32; the expert placeholders stay one number each."""
    from peft import prepare_model_for_kbit_training

    model = tiny_moe(dtype=torch.bfloat16)
    experts = moe.quantize_expert_weights(model, BitcastQuantizer())
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for weight in experts.weights:
        held = getattr(weight.module, weight.name)
        assert held.shape == weight.shape and held.stride() == (0, 0, 0)
    assert next(model.model.layers[0].self_attn.parameters()).dtype == torch.float32  # the rest was upcast
    experts.dequantize_on_access(model)
    assert experts_module_plain(model).gate_up_proj.dtype == torch.bfloat16


def experts_module_plain(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.layers[0].mlp.experts


def test_quantize_moe_experts_needs_bitsandbytes_on_a_gpu(tiny_model_dir: Path) -> None:
    with pytest.raises(moe.ExpertQuantizationError, match="bitsandbytes"):
        moe.quantize_moe_experts(tiny_moe(), bits=4)  # on the CPU: no bitsandbytes here, or no CUDA tensor
    with pytest.raises(ModelLoadError, match="quantize_moe_experts"):
        load_model(model_plan(tiny_model_dir, quantize_moe_experts=True), attn_implementation="sdpa",
                   vocab_size=1024)


# --- tokenizer_use_mistral_common ---------------------------------------------------------------------------------

CONTROL_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                  "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]
# The pre-tokenisation pattern of Mistral's tekken tokenizers.
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                  r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")


def write_tekken(directory: Path, merges: list[bytes]) -> Path:
    """A small tekken tokenizer (version v7): every byte, then ``merges`` (each made of tokens before it)."""
    import base64

    vocab = [bytes([i]) for i in range(256)] + merges
    data = {"config": {"pattern": TEKKEN_PATTERN, "num_vocab_tokens": len(vocab),
                       "default_vocab_size": len(vocab) + len(CONTROL_TOKENS),
                       "default_num_special_tokens": len(CONTROL_TOKENS), "version": "v7"},
            "vocab": [{"rank": i, "token_bytes": base64.b64encode(b).decode(), "token_str": None}
                      for i, b in enumerate(vocab)],
            "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(CONTROL_TOKENS)],
            "version": 1, "type": "Tekken"}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tekken.json").write_text(json.dumps(data), encoding="utf-8")
    return directory


MERGES = [b"th", b"he", b" t", b"the", b" the", b"in", b"er", "é".encode(), b"an", b" an", b"sw", b"swer"]


@pytest.fixture()
def tekken_dir(tmp_path: Path) -> Path:
    require_module("mistral_common", "pip install 'tunefile[mistral]'")
    return write_tekken(tmp_path / "tekken", MERGES)


def mistral_plan(directory: Path, **changes: Any) -> ModelPlan:
    return model_plan(directory, tokenizer_backend="mistral_common", **changes)


def test_missing_mistral_common_is_an_error_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mistral_common", None)  # `import mistral_common` now fails
    with pytest.raises(DataError, match=r"needs the mistral-common package: pip install 'tunefile\[mistral\]'"):
        load_tokenizer(mistral_plan(write_tekken(tmp_path / "tekken", [])), offline=True)


def test_mistral_common_tokenizer_gives_its_own_ids_with_offsets(tekken_dir: Path) -> None:
    tokenizer, added = load_tokenizer(mistral_plan(tekken_dir), offline=True)
    backend = tokenizer._backend  # transformers' own wrapper, to compare with
    assert added == 0 and len(tokenizer) == 256 + len(MERGES) + len(CONTROL_TOKENS)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("</s>", 2, 11)

    text = "the thin héllo [INST] answer"  # a control token's text is text to mistral-common
    encoding = tokenizer([text], add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"][0], encoding["offset_mapping"][0]
    assert ids == [1, *backend.encode(text, add_special_tokens=False)]
    assert 3 not in ids  # [INST] from text is never the control token
    assert offsets[0] == (0, 0)  # bos is not in the text
    pieces = [text[start:end] for start, end in offsets[1:]]
    assert "".join(pieces) == text and "é" in pieces  # a two-byte character, one token, one character
    assert [backend.decode([i]) for i in ids[1:]] == pieces

    fingerprint = tokenizer_fingerprint(tokenizer)
    assert fingerprint == tokenizer_fingerprint(load_tokenizer(mistral_plan(tekken_dir), offline=True)[0])
    write_tekken(tekken_dir, MERGES[:-1])  # another vocabulary in the same folder
    assert tokenizer_fingerprint(load_tokenizer(mistral_plan(tekken_dir), offline=True)[0]) != fingerprint


def formatter(tokenizer: Any, **dataset: Any) -> Any:
    entry = dataset_plan(DatasetSpec(path="rows.jsonl", **dataset))
    data = replace(compiled().data, datasets=(entry,), sequence_len=256)
    return make_formatter(entry, data, tokenizer)


def test_chat_datasets_train_on_mistral_commons_own_rendering(tekken_dir: Path) -> None:
    """The ids are mistral-common's own for the conversation, control tokens included, and the label mask
    covers the assistant's reply and its </s>, found through the offsets of the rendered text."""
    tokenizer, _ = load_tokenizer(mistral_plan(tekken_dir), offline=True)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the question"},
                {"role": "assistant", "content": "the answer"}, {"role": "user", "content": "in there"},
                {"role": "assistant", "content": "then"}]
    [example] = formatter(tokenizer, type="chat_template")({"messages": messages})
    assert example.input_ids == tokenizer._backend.apply_chat_template(messages, tokenize=True, return_dict=False)
    trained = [token for token, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]
    answer, then = (tokenizer.encode(text, add_special_tokens=False) for text in ("the answer", "then"))
    assert trained == [*answer, 2, *then, 2]  # each reply, then its </s>

    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>[SYSTEM_PROMPT]be brief[/SYSTEM_PROMPT][INST]the question[/INST]"
    assert tokenizer([prompt], add_special_tokens=False)["input_ids"][0][-1] == 4  # [/INST], the control token


def test_alpaca_rows_tokenise_as_mistral_common_does(tekken_dir: Path) -> None:
    tokenizer, _ = load_tokenizer(mistral_plan(tekken_dir), offline=True)
    [example] = formatter(tokenizer, type="alpaca")({"instruction": "Say the answer.", "output": "then"})
    response = tokenizer.encode("then", add_special_tokens=False)
    assert example.input_ids[0] == 1 and example.input_ids[-len(response) - 1:] == [*response, 2]
    assert [label for label in example.labels if label != IGNORE] == [*response, 2]


def test_mistral_common_tokenizers_cannot_gain_tokens(tekken_dir: Path) -> None:
    with pytest.raises(Exception, match="cannot add tokens, and the config adds <new>"):
        load_tokenizer(mistral_plan(tekken_dir, tokens=("<new>",)), offline=True)
    with pytest.raises(Exception, match="keep their own special tokens"):
        load_tokenizer(mistral_plan(tekken_dir, special_tokens={"pad_token": "</s>"}), offline=True)
    # What the vocabulary has already is no change.
    _, added = load_tokenizer(mistral_plan(tekken_dir, special_tokens={"eos_token": "</s>",
                                                                       "additional_special_tokens": ["[INST]"]}),
                              offline=True)
    assert added == 0


# --- quantize_moe_experts with bitsandbytes (GPU) -----------------------------------------------------------------

def cuda_moe(**config: Any) -> torch.nn.Module:
    """A random Qwen3-MoE big enough that its expert weights dominate memory, in bf16 on the GPU."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    settings = Qwen3MoeConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
                              num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                              num_experts=16, num_experts_per_tok=2, max_position_embeddings=256, **config)
    return AutoModelForCausalLM.from_config(settings, dtype=torch.bfloat16).cuda().eval()


@pytest.mark.gpu
# Measured on an H200: 3.87x and a logits cosine of 0.9998 at 4 bits, 1.98x and 0.99998 at 8.
@pytest.mark.parametrize(("bits", "min_ratio", "min_cosine"), [(4, 3.5, 0.995), (8, 1.9, 0.9995)])
def test_bitsandbytes_quantizes_experts_to_a_fraction_of_their_memory(bits: int, min_ratio: float,
                                                                      min_cosine: float) -> None:
    require_module("bitsandbytes", "pip install 'tunefile[qlora]'")
    model = cuda_moe()
    ids = torch.randint(0, 512, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
    expert_bytes = sum(module.get_parameter(name).nbytes for _, module, name in moe.find_expert_weights(model))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    experts = moe.quantize_moe_experts(model, bits=bits)
    experts.dequantize_on_access(model)
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    assert experts.count == 4
    assert expert_bytes / (expert_bytes - freed) >= min_ratio  # what the expert weights take now
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cosine >= min_cosine, cosine
    stored = model.model.layers[0].mlp.experts.parametrizations.gate_up_proj.original
    assert stored.dtype == (torch.uint8 if bits == 4 else torch.int8) and not stored.requires_grad


@pytest.mark.gpu
def test_qlora_on_quantized_experts_trains_the_expert_adapters(tmp_path: Path) -> None:
    """The loader's whole path on the GPU: 4-bit base, quantised experts, LoRA on the expert parameters; a
    step's gradients reach every expert adapter and peft's updates do not pile up."""
    require_module("bitsandbytes", "pip install 'tunefile[qlora]'")
    model = cuda_moe()
    model.save_pretrained(tmp_path / "moe")
    lora = replace(build_run_plan(make_plan("single", spec={"adapter": "qlora", "lora_r": 4, "lora_alpha": 8,
                                                            "lora_target_modules": ["q_proj"],
                                                            "lora_target_parameters": EXPERT_TARGETS})).model.lora)
    plan = replace(model_plan(tmp_path / "moe"), precision="bf16", load_in_4bit=True, adapter="qlora", lora=lora,
                   quantize_moe_experts=True)
    module = load_model(plan, attn_implementation="sdpa", vocab_size=512, device_index=0)
    inner = experts_module(module)
    assert inner.parametrizations.gate_up_proj.original.dtype == torch.uint8
    ids = torch.randint(0, 512, (2, 32), device="cuda")
    module.train()
    for _ in range(2):
        module.zero_grad(set_to_none=True)
        module(input_ids=ids, labels=ids).loss.backward()
    expert_grads = {n: p.grad for n, p in module.named_parameters() if ".experts." in n and p.requires_grad}
    assert len(expert_grads) == 2 * 2 * 2 and all(g is not None and torch.isfinite(g).all() for g in
                                                  expert_grads.values())
    assert sum(g.abs().sum() > 0 for g in expert_grads.values()) >= 4  # lora_B of every wrapper, at least
    assert [len(inner.parametrizations[name]) for name in ("gate_up_proj", "down_proj")] == [1, 1]
