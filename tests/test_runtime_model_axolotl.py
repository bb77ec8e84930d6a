"""Three of Axolotl's model-loading options in the runtime (runtime/model.py, llama4_experts.py, train.py):

- model.half_precision_weights (Axolotl's bfloat16: true / float16: true): every weight in the run's half
  precision, a LoRA adapter's own weights in fp32 as peft's autocast_adapter_dtype keeps them, and float16
  weights trained without accelerate's fp16 mode (whose gradient scaler refuses float16 gradients);
- model.lora.loftq_bits (Axolotl's peft.loftq_config): peft's LoftQ initialisation, which quantises with
  bitsandbytes on a CUDA GPU, refused before any weight loads where that cannot run; its approximation
  property is checked on a GPU (marked gpu);
- model.llama4_linearized_experts: Llama 4's fused experts as one nn.Linear per expert and projection, computing
  what the fused module computes, from a fused checkpoint (converted after loading) or a linearized one (loaded
  straight into the linear layers), and reached by LoRA's target_linear.

Model plans come from the real compiler (plan_factory) with the fields under test replaced."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import require_module
from plan_factory import make_plan
from tunefile.compiler.render.config_yaml import build_run_plan
from tunefile.runtime import llama4_experts as l4
from tunefile.runtime.model import (
    ModelLoadError,
    check_loftq,
    load_model,
    lora_config,
    lora_init_options,
    weights_dtype,
)
from tunefile.runtime.tiny_model import model_config
from tunefile.runtime.train import mixed_precision
from tunefile.schemas.run_plan import LoraPlan, ModelPlan

VOCAB = 128


def model_plan(model_dir: Path, **changes: Any) -> ModelPlan:
    """The compiler's model section for a full fine-tune of ``model_dir`` in fp32, with ``changes``."""
    plan = build_run_plan(make_plan("single", spec={"adapter": None})).model
    return replace(plan, **{"base_model": str(model_dir), "tokenizer": str(model_dir), "precision": "fp32",
                            "architecture": None, "parameters": None, **changes})


def lora_plan(**changes: Any) -> LoraPlan:
    """The compiler's LoRA section (r 16, alpha 32, every linear layer), with ``changes``."""
    return replace(build_run_plan(make_plan("single")).model.lora, **changes)


def with_lora(plan: ModelPlan, **changes: Any) -> ModelPlan:
    return replace(plan, adapter="lora", lora=lora_plan(**changes))


def tiny_llama4(seed: int = 0) -> torch.nn.Module:
    """The tiny-model llama4 architecture (Llama4ForCausalLM: 2 MoE layers of 4 experts) with a small vocabulary,
    random weights from ``seed``, in fp32."""
    from transformers import AutoModelForCausalLM

    config = model_config("llama4", vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama 4 saved as Hugging Face stores Llama 4: experts fused."""
    directory = tmp_path_factory.mktemp("llama4") / "fused"
    tiny_llama4().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def linearized_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model saved after linearizing its experts: Axolotl's linearized checkpoints' layout."""
    directory = tmp_path_factory.mktemp("llama4") / "linearized"
    model = tiny_llama4()
    l4.linearize_experts(model)
    model.save_pretrained(directory)
    return directory


def token_ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- half_precision_weights ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_full_finetune_trains_every_weight_in_half_precision(tiny_model_dir: Path, precision: str,
                                                                           dtype: torch.dtype) -> None:
    plan = model_plan(tiny_model_dir, precision=precision, half_precision_weights=True)
    module = load_model(plan, attn_implementation="sdpa", vocab_size=1100)
    params = dict(module.named_parameters())
    assert {p.dtype for p in params.values()} == {dtype}
    assert all(p.requires_grad for p in params.values())  # trained in half precision: no fp32 master copy
    # The same plan without the option keeps fp32 master weights (autocast does the half-precision compute).
    mixed = load_model(replace(plan, half_precision_weights=False), attn_implementation="sdpa", vocab_size=1100)
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}


def test_half_precision_lora_keeps_the_adapter_in_fp32_as_peft_does(tiny_model_dir: Path) -> None:
    """Axolotl passes no autocast_adapter_dtype to peft (unless peft_autocast_adapter_dtype is set), so peft
    upcasts the adapter's bf16 weights to fp32 while the frozen base stays bf16."""
    plan = with_lora(model_plan(tiny_model_dir, precision="bf16", half_precision_weights=True))
    module = load_model(plan, attn_implementation="sdpa", vocab_size=1100)
    trainable = {n: p.dtype for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in module.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable) and set(trainable.values()) == {torch.float32}
    assert set(frozen.values()) == {torch.bfloat16}


def test_half_precision_weights_need_a_half_precision() -> None:
    plan = model_plan(Path("unused"), precision="fp32", half_precision_weights=True)
    with pytest.raises(ModelLoadError, match="half_precision_weights .* the precision is fp32"):
        weights_dtype(plan)


def test_float16_weights_train_without_accelerates_fp16_mode() -> None:
    """fp16 mode's GradScaler refuses to unscale float16 gradients; bf16 autocast is harmless on bf16 weights
    (Axolotl's trainer keeps its bf16 flag for bfloat16: true and clears fp16 for float16: true)."""
    assert mixed_precision("fp16", half_precision_weights=True) == "no"
    assert mixed_precision("bf16", half_precision_weights=True) == "bf16"
    assert mixed_precision("fp16", half_precision_weights=False) == "fp16"
    assert mixed_precision("fp32", half_precision_weights=False) == "no"


def test_float16_weights_cannot_go_through_a_grad_scaler() -> None:
    """Why fp16 weights train without accelerate's fp16 mode: torch's scaler refuses their gradients."""
    layer = torch.nn.Linear(4, 4).half()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(layer(torch.ones(2, 4, dtype=torch.float16)).float().sum()).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(optimizer)


# --- LoftQ -----------------------------------------------------------------------------------------------------

def test_loftq_bits_become_peft_loftq_initialisation() -> None:
    from peft import LoftQConfig

    options = lora_init_options(lora_plan(loftq_bits=4))
    # Axolotl's LoraConfig arguments: LoftQ init, the bits, and peft's one alternating iteration.
    assert options == {"init_lora_weights": "loftq", "loftq_config": LoftQConfig(loftq_bits=4, loftq_iter=1)}
    assert lora_init_options(lora_plan()) == {}
    plain = lora_config(lora_plan())
    assert plain.init_lora_weights is True and not plain.loftq_config


def loftq_runs_here() -> bool:
    from peft.import_utils import is_bnb_4bit_available

    return torch.cuda.is_available() and is_bnb_4bit_available()


def test_loftq_is_refused_before_loading_where_peft_cannot_run_it() -> None:
    """peft's LoftQ quantises with bitsandbytes on a CUDA device and has no CPU path: the run stops with one
    line before any weight is read (the base model here does not even exist)."""
    if loftq_runs_here():
        pytest.skip("this machine has CUDA and bitsandbytes: LoftQ runs here (see the gpu test)")
    plan = with_lora(model_plan(Path("/nonexistent/model")), loftq_bits=4)
    with pytest.raises(ModelLoadError, match="peft.loftq_config: .*(CUDA GPU|bitsandbytes)"):
        load_model(plan, attn_implementation="sdpa", vocab_size=VOCAB)


def test_loftq_needs_an_unquantised_base_and_peft_bit_widths() -> None:
    with pytest.raises(ModelLoadError, match="unquantised base"):
        check_loftq(lora_plan(loftq_bits=4), quantized=True)
    with pytest.raises(ModelLoadError, match="4 \\(nf4\\) or 8 \\(int8\\) bits, not 3"):
        check_loftq(lora_plan(loftq_bits=3), quantized=False)
    check_loftq(lora_plan(), quantized=True)  # no LoftQ: nothing to refuse
    check_loftq(lora_plan(loftq_bits=4, model_dir="adapter"), quantized=False)  # continued: peft's saved config


@pytest.mark.gpu
def test_loftq_start_approximates_the_weights_better_than_their_quantisation(tiny_model_dir: Path) -> None:
    """LoftQ's promise (with lora_alpha = r, as peft does not scale its start): each target weight W becomes its
    4-bit quantisation Q, and Q + B·A is closer to W than Q alone."""
    require_module("bitsandbytes", "pip install 'tunefile[qlora]'")
    require_module("scipy", "pip install scipy")  # peft's LoraConfig asks for it with LoftQ
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA; deselect them with -m 'not gpu'")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    original = {name: param.detach().clone() for name, param in base.named_parameters()}
    plan = with_lora(model_plan(tiny_model_dir), loftq_bits=4, r=8, alpha=8)
    module = load_model(plan, attn_implementation="sdpa", vocab_size=1100)
    checked = 0
    for name, layer in module.named_modules():
        if not hasattr(layer, "lora_A") or "default" not in layer.lora_A:
            continue
        w = original[name.removeprefix("base_model.model.") + ".weight"].float()
        q = layer.get_base_layer().weight.detach().float().cpu()
        ba = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().float().cpu()
        assert not torch.equal(q, w)  # the base now holds the quantised weights
        assert torch.linalg.norm(w - (q + layer.scaling["default"] * ba)) < torch.linalg.norm(w - q)
        checked += 1
    assert checked == 2 * 7  # every linear layer of both decoder layers


# --- Llama 4 linearized experts ---------------------------------------------------------------------------------

def test_linearized_experts_compute_what_the_fused_experts_compute() -> None:
    fused = tiny_llama4().model.layers[0].feed_forward.experts
    rows = torch.randn(fused.num_experts * 5, fused.hidden_size, generator=torch.Generator().manual_seed(0))
    linear = l4.LinearizedLlama4Experts.from_fused(fused)
    assert [len(linear.gate_projs), linear.gate_projs[0].weight.shape, linear.down_projs[0].weight.shape] == \
        [4, (32, 64), (64, 32)]
    with torch.no_grad():
        torch.testing.assert_close(linear(rows), fused(rows), rtol=0, atol=1e-5)
    # Exactly the fused tensors, transposed: gate first, then up, in gate_up_proj's last dimension.
    assert torch.equal(linear.up_projs[2].weight, fused.gate_up_proj[2, :, 32:].t())
    assert torch.equal(linear.down_projs[3].weight, fused.down_proj[3].t())


def test_linearizing_a_model_keeps_its_logits() -> None:
    model, ids = tiny_llama4(), token_ids()
    expected = logits(model, ids)
    assert l4.linearize_experts(model) == 2
    assert not any(type(m).__name__ == "Llama4TextExperts" for m in model.modules())
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)


def test_checkpoint_layouts_are_told_apart(fused_dir: Path, linearized_dir: Path, tiny_model_dir: Path) -> None:
    def layout(directory: Path) -> str | None:
        return l4.checkpoint_layout(l4.checkpoint_tensor_names(str(directory), revision={}))

    assert (layout(fused_dir), layout(linearized_dir), layout(tiny_model_dir)) == ("fused", "linearized", None)
    assert l4.checkpoint_tensor_names(str(fused_dir.parent), revision={}) is None  # no checkpoint there


@pytest.mark.parametrize("checkpoint", ["fused", "linearized"])
def test_either_checkpoint_loads_into_linear_experts_with_the_fused_models_logits(
        checkpoint: str, fused_dir: Path, linearized_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A fused checkpoint is converted after loading; a linearized one loads straight into the linear layers
    (built so by the loader, then put back as it was). Both give the original model's logits."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    constructor = Llama4TextMoe.__init__
    directory = fused_dir if checkpoint == "fused" else linearized_dir
    plan = model_plan(directory, llama4_linearized_experts=True)
    with caplog.at_level(logging.INFO, logger="tunefile.runtime.llama4_experts"):
        module = load_model(plan, attn_implementation="sdpa", vocab_size=VOCAB).eval()
    assert l4.linearized_count(module) == 2
    assert ("split into per-expert linear layers" in caplog.text) == (checkpoint == "fused")
    assert ("loaded straight into linear layers" in caplog.text) == (checkpoint == "linearized")
    assert Llama4TextMoe.__init__ is constructor
    ids = token_ids()
    torch.testing.assert_close(logits(module, ids), logits(tiny_llama4(), ids), rtol=0, atol=1e-5)


EXPERT_LINEARS = {f"model.layers.{layer}.feed_forward.experts.{proj}.{e}" for layer in range(2)
                  for proj in ("gate_projs", "up_projs", "down_projs") for e in range(4)}


def adapted_modules(module: torch.nn.Module) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, m in module.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_lora_target_linear_reaches_every_expert(fused_dir: Path) -> None:
    """What linearizing is for: target_linear (peft's all-linear) finds the experts once they are nn.Linear.
    (It also finds Llama 4's router, an nn.Linear whose forward returns a pair, which peft's LoRA layer cannot
    wrap in a forward; Axolotl's target_linear picks it too, and its Llama 4 examples name their targets.)"""
    plan = with_lora(model_plan(fused_dir, llama4_linearized_experts=True), r=4, alpha=8)
    assert EXPERT_LINEARS <= adapted_modules(load_model(plan, attn_implementation="sdpa", vocab_size=VOCAB))
    plain = load_model(replace(plan, llama4_linearized_experts=False), attn_implementation="sdpa", vocab_size=VOCAB)
    assert not any(".experts." in name for name in adapted_modules(plain))  # fused: out of LoRA's reach


def test_lora_on_the_expert_linears_trains_each_expert(fused_dir: Path) -> None:
    """The experts named as Axolotl's Llama 4 examples name them (experts.gate_projs.<e> …): a backward reaches
    every expert's adapter."""
    plan = with_lora(model_plan(fused_dir, llama4_linearized_experts=True), r=4, alpha=8, target_linear=False,
                     target_modules_regex=r".*\.experts\.(gate|up|down)_projs\.[0-9]+")
    module = load_model(plan, attn_implementation="sdpa", vocab_size=VOCAB)
    assert adapted_modules(module) == EXPERT_LINEARS
    ids = token_ids()
    module.train()
    module(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if "lora_B" in n}
    assert len(grads) == len(EXPERT_LINEARS) and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_linearized_experts_on_a_model_without_them_is_an_error(tiny_model_dir: Path) -> None:
    plan = model_plan(tiny_model_dir, llama4_linearized_experts=True)
    with pytest.raises(l4.Llama4ExpertsError, match="has no Llama 4 MoE experts"):
        load_model(plan, attn_implementation="sdpa", vocab_size=1100)


@pytest.mark.gpu
def test_qlora_quantises_converted_experts_as_loading_a_linearized_checkpoint_does(fused_dir: Path,
                                                                                   linearized_dir: Path) -> None:
    """load_in_4bit reaches only nn.Linear while loading: experts converted from a fused checkpoint afterwards are
    quantised with the same bitsandbytes settings, giving the model bitsandbytes loads from a linearized
    checkpoint of the same weights."""
    bnb = require_module("bitsandbytes", "pip install 'tunefile[qlora]'")
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA; deselect them with -m 'not gpu'")

    def load(directory: Path) -> torch.nn.Module:
        lora = lora_plan(r=4, alpha=8, target_linear=False, target_modules_regex=r".*\.experts\.gate_projs\.0")
        plan = replace(model_plan(directory, llama4_linearized_experts=True), precision="bf16", load_in_4bit=True,
                       adapter="qlora", lora=lora)
        return load_model(plan, attn_implementation="sdpa", vocab_size=VOCAB, device_index=0).eval()

    converted, loaded = load(fused_dir), load(linearized_dir)
    for module in (converted, loaded):
        experts = [m for m in module.modules() if isinstance(m, l4.LinearizedLlama4Experts)]
        assert len(experts) == 2
        for layer in experts:
            for linear in [*layer.gate_projs, *layer.up_projs, *layer.down_projs]:
                base = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
                assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8
    ids = token_ids().cuda()
    torch.testing.assert_close(logits(converted, ids), logits(loaded, ids))
