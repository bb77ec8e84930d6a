"""`tunefile merge-lora --lora-dir checkpoint-<step>` for FSDP and DeepSpeed runs: the adapter read out of the
whole-model state they checkpoint merges to the same weights as the adapter saved the normal way.

accelerate drops FSDP and DeepSpeed to plain data parallel on a CPU, so the checkpoints are written here, in
this process, by the real writers on a 1-process gloo group, into what `accelerator.save_state` would name them:
- FSDP2 (`fully_shard` works on CPU): accelerate's own `save_fsdp_model`, called the way `save_state` calls it,
  with stand-ins for the plugin and the accelerator (it reads only the attributes given below);
- DeepSpeed ZeRO-2 and ZeRO-3 on DeepSpeed's CPU accelerator: `deepspeed.initialize`, one optimizer step, then
  `engine.save_checkpoint(dir, "pytorch_model", ...)`, which is `save_state`'s call (ckpt_id = MODEL_NAME), with
  the options training passes for adapter runs (frozen weights left out), and for ZeRO-2 also without them (a
  checkpoint that holds the whole model, as earlier versions and full fine-tunes write).
Each adapter grows the vocabulary by two tokens, as training does (random new rows that no adapter holds), so
the FSDP and whole-model ZeRO-2 cases also check that the embedding matrices come from the checkpoint; the
adapter-only DeepSpeed checkpoints train the embeddings through lora_modules_to_save, as such runs must."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from cpu_process_group import importable, one_process_group
from helpers import require_module, run_cli
from tunefile.runtime import checkpoint as checkpoint_module
from tunefile.runtime import sharded_checkpoints
from tunefile.runtime.merge import run_merge
from tunefile.runtime.model import ModelLoadError
from tunefile.runtime.trained_model import load_trained_model, locate_adapter

ADDED_TOKENS = ["<|tool|>", "<|result|>"]
DEEPSPEED_INSTALL = "pip install 'tunefile[deepspeed]'"
# layout → the adapter it checkpoints: "plain" (LoRA only) or "trained-embeddings" (lora_modules_to_save too).
LAYOUTS = {"fsdp-sharded": "plain", "fsdp-full": "plain", "zero2-whole": "plain", "zero2": "trained-embeddings",
           "zero3": "trained-embeddings"}
MODULES_TO_SAVE = {"plain": None, "trained-embeddings": ["embed_tokens", "lm_head"]}


def build_adapter(base_dir: Path, *, modules_to_save: list[str] | None) -> Any:
    """What training builds: two added tokens grow the embeddings (runtime.model.match_vocabulary, random new
    rows), then LoRA on every linear layer with random A and B (so the merge changes every weight)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(3)
    base.resize_token_embeddings(base.get_input_embeddings().num_embeddings + len(ADDED_TOKENS))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                            init_lora_weights=False, modules_to_save=modules_to_save))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:  # trained-in-full copies: make them differ from the base's
                param.add_(0.05 * torch.randn_like(param))
    return model


def write_fsdp(model: Any, checkpoint: Path, state_dict_type: str) -> None:
    """FSDP2 as accelerate applies it (each decoder layer, then the root), saved by accelerate's save_fsdp_model
    with the arguments save_state passes: (plugin, accelerator, model, output_dir, model_index 0)."""
    from accelerate.utils.fsdp_utils import save_fsdp_model
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.fully_sharded_data_parallel import (
        FullStateDictConfig,
        ShardedStateDictConfig,
        StateDictType,
    )

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight).__name__ == "DTensor"
    config = FullStateDictConfig() if state_dict_type == "FULL_STATE_DICT" else ShardedStateDictConfig()
    plugin = SimpleNamespace(state_dict_type=StateDictType[state_dict_type], fsdp_version=2,
                             state_dict_config=config, optim_state_dict_config=None)
    save_fsdp_model(plugin, SimpleNamespace(num_processes=1, process_index=0), model, str(checkpoint), 0)


def deepspeed_engine(model: Any, stage: int) -> Any:
    """A ZeRO engine in fp32 with a torch AdamW at lr 0, so a step creates the optimizer state (the fp32 master
    weights the reader takes) and leaves the weights as they were."""
    import deepspeed

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "fp16": {"enabled": False}, "bf16": {"enabled": False}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def write_deepspeed(model: Any, checkpoint: Path, stage: int, *, adapter_only: bool) -> None:
    """One step, then save_state's call with the options training passes."""
    engine = deepspeed_engine(model, stage)
    ids = torch.arange(3, 19).unsqueeze(0)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(str(checkpoint), sharded_checkpoints.DEEPSPEED_TAG,
                           **(checkpoint_module.DEEPSPEED_ADAPTER_SAVE if adapter_only else {}))


def load_deepspeed(model: Any, checkpoint: Path, stage: int) -> dict[str, torch.Tensor]:
    """Resume's call on a fresh engine whose adapter differs from the saved one; every weight afterwards.
    (Here, inside the fixture's process group: DeepSpeed keeps its groups for the process's lifetime.)"""
    import deepspeed

    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(1.0)
    engine = deepspeed_engine(model, stage)
    engine.load_checkpoint(str(checkpoint), sharded_checkpoints.DEEPSPEED_TAG,
                           **checkpoint_module.DEEPSPEED_ADAPTER_LOAD)
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        return {name: param.detach().clone() for name, param in params.items()}


def compile_config(root: Path, base_dir: Path, variant: str) -> Path:
    """The run's config: its lora_* keys rebuild the adapter the checkpoint holds."""
    values = {"base_model": str(base_dir), "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
              "output_dir": "out", "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
              "special_tokens": {"additional_special_tokens": ADDED_TOKENS}}
    if MODULES_TO_SAVE[variant]:
        values["lora_modules_to_save"] = MODULES_TO_SAVE[variant]
    (root / f"{variant}.yml").write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    code, _, err = run_cli("compile", str(root / f"{variant}.yml"), "--output", str(root / f"bundle-{variant}"),
                           "--target", "cpu", "--force")
    assert code == 0, err
    return root / f"bundle-{variant}" / "config.yaml"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> SimpleNamespace:
    """Per adapter variant: its config, its trainable tensors, the model merged from the adapter saved with
    save_pretrained; per layout: the checkpoint-1/ folder its writer filled."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("sharded")
    configs, trained, references, models = {}, {}, {}, {}
    for variant, modules_to_save in MODULES_TO_SAVE.items():
        models[variant] = build_adapter(tiny_model_dir, modules_to_save=modules_to_save)
        trained[variant] = {name: param.detach().clone() for name, param in models[variant].named_parameters()
                            if param.requires_grad}
        models[variant].save_pretrained(root / variant / "adapter")
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        tokenizer.add_special_tokens({"additional_special_tokens": ADDED_TOKENS}, replace_extra_special_tokens=False)
        tokenizer.save_pretrained(root / variant / "adapter")
        configs[variant] = compile_config(root, tiny_model_dir, variant)
        assert run_merge(configs[variant], lora_dir=str(root / variant / "adapter"),
                         output=str(root / variant / "merged")) == 0
        references[variant] = root / variant / "merged"

    checkpoints, loaded_back = {}, {}
    with one_process_group():
        for layout, variant in LAYOUTS.items():
            if layout.startswith("zero") and not importable("deepspeed"):
                continue  # the test asks for it (a skip on a laptop, a failure in CI)
            checkpoints[layout] = root / layout / "checkpoint-1"
            checkpoints[layout].mkdir(parents=True)
            model = copy.deepcopy(models[variant])
            if layout.startswith("fsdp"):
                write_fsdp(model, checkpoints[layout], "SHARDED_STATE_DICT" if layout == "fsdp-sharded"
                           else "FULL_STATE_DICT")
            else:
                write_deepspeed(model, checkpoints[layout], stage=int(layout[4]), adapter_only=layout != "zero2-whole")
                if layout != "zero2-whole":
                    loaded_back[layout] = load_deepspeed(copy.deepcopy(models[variant]), checkpoints[layout],
                                                         stage=int(layout[4]))
    return SimpleNamespace(configs=configs, trained=trained, references=references, checkpoints=checkpoints,
                           models=models, loaded_back=loaded_back)


def test_the_names_read_are_accelerates() -> None:
    from accelerate.utils.constants import FSDP_MODEL_NAME, MODEL_NAME

    assert sharded_checkpoints.FSDP_MODEL_NAME == FSDP_MODEL_NAME
    assert sharded_checkpoints.DEEPSPEED_TAG == MODEL_NAME


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_merge_from_a_sharded_checkpoint_equals_merge_from_the_saved_adapter(layout: str, written: SimpleNamespace,
                                                                              tmp_path: Path) -> None:
    from safetensors.torch import load_file

    if layout.startswith("zero"):
        require_module("deepspeed", DEEPSPEED_INSTALL)
    variant, checkpoint = LAYOUTS[layout], written.checkpoints[layout]
    expected_files = {"fsdp-sharded": "pytorch_model_fsdp_0/.metadata", "fsdp-full": "pytorch_model_fsdp.bin",
                      "zero2-whole": "pytorch_model/mp_rank_00_model_states.pt",
                      "zero2": "pytorch_model/mp_rank_00_model_states.pt",
                      "zero3": "pytorch_model/zero_pp_rank_0_mp_rank_00_model_states.pt"}
    assert (checkpoint / expected_files[layout]).is_file(), sorted(p.name for p in checkpoint.iterdir())

    adapter = locate_adapter(checkpoint)
    assert adapter.layout == "sharded"
    from tunefile.runtime.config import load_run_plan

    plan = load_run_plan(written.configs[variant])
    loaded = load_trained_model(plan.model, adapter, offline=plan.offline, device=torch.device("cpu"),
                                dtype=torch.float32, attn_implementation="sdpa")
    held = {name: param for name, param in loaded.model.named_parameters() if name in written.trained[variant]}
    assert held.keys() == written.trained[variant].keys()
    for name, tensor in written.trained[variant].items():
        torch.testing.assert_close(held[name], tensor, atol=0, rtol=0, msg=name)

    assert run_merge(written.configs[variant], lora_dir=str(checkpoint), output=str(tmp_path / "merged")) == 0
    reference = load_file(str(written.references[variant] / "model.safetensors"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert merged.keys() == reference.keys()
    assert merged["model.embed_tokens.weight"].shape[0] == 1024 + len(ADDED_TOKENS)
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize("layout", ["zero2", "zero3"])
def test_an_adapter_deepspeed_checkpoint_leaves_the_base_out_and_resumes(layout: str,
                                                                         written: SimpleNamespace) -> None:
    """What training writes for an adapter run under DeepSpeed (an 8B LoRA wrote 31 GB per ZeRO-2 checkpoint
    before): the model-state files hold no frozen weight, and a fresh engine over the base model loads it back
    with the options resume passes, ending with the trained adapter and the base untouched."""
    require_module("deepspeed", DEEPSPEED_INSTALL)
    variant, checkpoint = LAYOUTS[layout], written.checkpoints[layout]
    trainable = written.trained[variant]
    for states in (checkpoint / sharded_checkpoints.DEEPSPEED_TAG).glob("*model_states.pt"):
        saved = torch.load(states, map_location="cpu", weights_only=False)
        kept = {sharded_checkpoints.training_name(key) for key in saved["module"] or {}}
        assert kept <= trainable.keys(), sorted(kept - trainable.keys())[:3]
        assert not saved.get("frozen_param_fragments") and not saved.get("frozen_param_shapes")

    base = {name: param for name, param in written.models[variant].named_parameters() if not param.requires_grad}
    loaded = written.loaded_back[layout]
    assert loaded.keys() == trainable.keys() | base.keys()
    for name, tensor in (trainable | base).items():
        torch.testing.assert_close(loaded[name], tensor.detach(), atol=0, rtol=0, msg=name)


def test_a_checkpoint_with_no_weights_it_can_read_is_one_line(tmp_path: Path, written: SimpleNamespace) -> None:
    checkpoint = tmp_path / "out" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    for name in ("trainer_state.json", "optimizer.bin", "random_states_0.pkl", "COMPLETE"):
        (checkpoint / name).write_text("{}\n", encoding="utf-8")
    (checkpoint / "latest").write_text("pytorch_model\n", encoding="utf-8")  # a DeepSpeed save killed early
    with pytest.raises(ModelLoadError) as failure:
        run_merge(written.configs["plain"], lora_dir=str(checkpoint), output=str(tmp_path / "merged"))
    err = str(failure.value)
    assert "\n" not in err
    assert err.startswith(f"{checkpoint}: a checkpoint without model weights")
    assert "optimizer.bin" in err and "model.safetensors" in err and "pytorch_model_fsdp_0/" in err
    assert not (tmp_path / "merged").exists()


def test_a_deepspeed_checkpoint_without_deepspeed_names_the_install(written: SimpleNamespace,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    require_module("deepspeed", DEEPSPEED_INSTALL)
    monkeypatch.setitem(sys.modules, "deepspeed.utils.zero_to_fp32", None)  # import fails as if not installed
    adapter = locate_adapter(written.checkpoints["zero2"])
    with pytest.raises(ModelLoadError) as failure:
        adapter.tensors.shapes()
    message = str(failure.value)
    assert "\n" not in message and str(written.checkpoints["zero2"]) in message and DEEPSPEED_INSTALL in message


def test_a_changed_adapter_config_is_reported(tmp_path: Path, written: SimpleNamespace) -> None:
    plan = yaml.safe_load(written.configs["plain"].read_text(encoding="utf-8"))
    plan["model"]["lora"]["target_linear"], plan["model"]["lora"]["target_modules"] = False, ["q_proj", "v_proj"]
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(plan), encoding="utf-8")
    with pytest.raises(ModelLoadError) as failure:
        run_merge(changed, lora_dir=str(written.checkpoints["fsdp-sharded"]), output=str(tmp_path / "m"))
    err = str(failure.value)
    assert "holds 28 adapter tensors, the config's adapter has 8" in err and "lora_target_*" in err


@pytest.mark.parametrize(("key", "name"), [
    ("module.base_model.model.lm_head.lora_A.default.weight", "base_model.model.lm_head.lora_A.default.weight"),
    ("_orig_mod.base_model.model.model.layers.0._fsdp_wrapped_module.mlp.up_proj.lora_B.default.weight",
     "base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight"),
    ("base_model.model.model.layers.1._checkpoint_wrapped_module.self_attn.o_proj.base_layer.weight",
     "base_model.model.model.layers.1.self_attn.o_proj.base_layer.weight"),
])
def test_wrapper_prefixes_are_dropped(key: str, name: str) -> None:
    assert sharded_checkpoints.training_name(key) == name

