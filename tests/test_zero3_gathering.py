"""ZeRO-3 under an adapter (runtime/zero3_gathering.py), on DeepSpeed's CPU engine.

The compiler names the decoder layer class in the run plan (distribution.deepspeed.leaf_module_class); the runtime
flags those layers as DeepSpeed leaf modules before the engine is built. Where the base fits, the plan says
frozen_base_whole: the runtime loads the base whole and turns its frozen weights into buffers, out of ZeRO-3.
What that must and must not change:
- fewer gathers: one per decoder layer instead of one per module that holds parameters (the speed-up measured on
  GPUs in bench/vs_hf.py, workload Z), and none of the frozen base at all where it is kept whole;
- the same training: losses and the trained adapter equal those of DeepSpeed's per-module gathering.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from cpu_process_group import one_process_group
from helpers import require_module
from tunefile.runtime.errors import RuntimeUserError
from tunefile.runtime.lora_dropout import recompute_lora_dropout
from tunefile.runtime.zero3_gathering import gather_layers_whole, keep_frozen_base_whole, loading_whole

STEPS = 3


def lora_model(base_dir: Path, dropout: float = 0.0) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                           task_type="CAUSAL_LM", init_lora_weights=False))


def train(model: Any, *, leaf_class: str | None, replay_dropout: bool = False,
          whole_base_saved_to: Path | None = None) -> tuple[list[float], dict[str, torch.Tensor], int, int]:
    """(losses, the trained adapter, decoder layers flagged, gathers per forward) of STEPS ZeRO-3 steps; with
    ``replay_dropout`` the runtime's LoRA dropout that keeps lora_A's weight for its backward; with
    ``whole_base_saved_to`` the compiler's whole frozen base (the frozen weights buffers outside ZeRO-3, the
    adapter's persistent, torch's own linear), and a checkpoint written there after the first step."""
    import deepspeed
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    if replay_dropout:
        assert recompute_lora_dropout(model, strategy="deepspeed", zero_stage=3,
                                      layers_gathered_whole=leaf_class is not None)["lora_dropout_recompute"] > 0
    flagged = gather_layers_whole(model, leaf_class)
    torch.manual_seed(5)  # the dropout masks
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if whole_base_saved_to:
        frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
        assert keep_frozen_base_whole(model, torch.device("cpu")) == len(frozen) > 0
        zero |= {"stage3_param_persistence_threshold": 10**12, "memory_efficient_linear": False}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero,
              "zero_allow_untested_optimizer": True, "fp16": {"enabled": False}, "bf16": {"enabled": False}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if whole_base_saved_to:  # ZeRO-3 holds the adapter alone
        assert all(p.requires_grad and hasattr(p, "ds_id") for p in engine.module.parameters())
    gathers = 0
    fetch = PartitionedParameterCoordinator.fetch_sub_module

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal gathers
        gathers += 1
        return fetch(self, *args, **kwargs)

    losses = []
    generator = torch.Generator().manual_seed(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PartitionedParameterCoordinator, "fetch_sub_module", counted)
        for step in range(STEPS):
            ids = torch.randint(3, 200, (1, 24), generator=generator)
            if step == STEPS - 1:
                gathers = 0  # count one forward, after the first steps have traced the module order
                loss = engine(input_ids=ids, labels=ids).loss
                per_forward = gathers
            else:
                loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            if whole_base_saved_to and step == 0:  # partitions every parameter, then gathers the trained ones
                engine.save_checkpoint(str(whole_base_saved_to), "step1")
    if whole_base_saved_to:  # the frozen base, untouched and whole, is not in the checkpoint
        buffers = dict(engine.module.named_buffers())
        for name, tensor in frozen.items():
            assert torch.equal(buffers[name], tensor), name
        saved = torch.load(next(whole_base_saved_to.glob("step1/*model_states.pt")), weights_only=False)
        assert not set(saved["module"]) & set(frozen)
    params = dict(engine.module.named_parameters())
    trained = {name: p for name, p in params.items() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(trained.values())):
        adapter = {name: p.detach().clone() for name, p in trained.items()}
    return losses, adapter, flagged, per_forward


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every training of this file, in one process group: DeepSpeed keeps its groups for the process's life."""
    require_module("deepspeed", "pip install 'tunefile[deepspeed]'")
    plain, with_dropout = lora_model(tiny_model_dir), lora_model(tiny_model_dir, dropout=0.1)
    with one_process_group():
        return {"per module": train(copy.deepcopy(plain), leaf_class=None),
                "per layer": train(copy.deepcopy(plain), leaf_class="LlamaDecoderLayer"),
                "peft dropout per module": train(copy.deepcopy(with_dropout), leaf_class=None),
                "replayed dropout per layer": train(copy.deepcopy(with_dropout), leaf_class="LlamaDecoderLayer",
                                                    replay_dropout=True),
                "whole base per layer": train(copy.deepcopy(with_dropout), leaf_class="LlamaDecoderLayer",
                                              replay_dropout=True,
                                              whole_base_saved_to=tmp_path_factory.mktemp("checkpoint")),
                "layers": plain.config.num_hidden_layers}


def assert_same_training(run: tuple, reference: tuple) -> None:
    losses, adapter = run[0], run[1]
    assert all(torch.isfinite(torch.tensor(losses)))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[0]), atol=1e-6, rtol=0)
    assert adapter.keys() == reference[1].keys()
    for name, tensor in adapter.items():
        # Float rounding only (1e-6 seen, in the first layer alone: its backward now also computes its input's
        # gradient, the leaf hooks' need; runtime/zero3_gathering.py), against entries of about 0.5.
        torch.testing.assert_close(tensor, reference[1][name], atol=5e-6, rtol=1e-5, msg=name)


def test_zero3_gathers_each_decoder_layer_once_and_trains_the_same(trained: dict) -> None:
    per_module, per_layer, layers = trained["per module"], trained["per layer"], trained["layers"]
    assert per_layer[2] == layers and per_module[2] == 0
    # Hooks fire on the wrappers (peft's two, the causal LM, the decoder), the embedding, the rotary embedding, the
    # final norm and the head, and then per module inside each layer (each projection, its dropout, A and B, the
    # norms, …: 41 in this model) or once per layer.
    gathers, gathers_per_module = per_layer[3], per_module[3]
    assert gathers <= layers + 8 and gathers_per_module >= gathers + 30 * layers, (gathers, gathers_per_module)
    assert_same_training(per_layer, per_module)


def test_replayed_lora_dropout_under_whole_layers_trains_as_peft_dropout_by_module(trained: dict) -> None:
    """The runtime's dropout keeps lora_A's weight in a custom function, which DeepSpeed's per-module hooks would
    release under it; gathered a layer at a time it is there for the backward, and in fp32 its masks are peft's."""
    assert_same_training(trained["replayed dropout per layer"], trained["peft dropout per module"])


def test_a_whole_frozen_base_outside_zero3_trains_the_same(trained: dict) -> None:
    """The compiler's whole frozen base (its frozen weights buffers outside ZeRO-3, the adapter persistent, torch's
    own linear) with a checkpoint in between: the same training as per module. (train checks that ZeRO-3 holds
    no frozen weight, and that the base comes out of training untouched and out of the checkpoint.)"""
    assert_same_training(trained["whole base per layer"], trained["peft dropout per module"])


def test_a_frozen_base_kept_whole_keeps_tied_weights_one_tensor(tiny_model_dir: Path) -> None:
    model = lora_model(tiny_model_dir)
    base = model.get_base_model()
    base.lm_head.weight = base.model.embed_tokens.weight  # tie them, as tie_word_embeddings does
    base.lm_head.weight.requires_grad_(False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    keep_frozen_base_whole(model, torch.device("cpu"))
    assert base.lm_head.weight is base.model.embed_tokens.weight
    assert {name for name, _ in model.named_parameters()} == trainable  # only the adapter is a parameter now
    assert "base_model.model.lm_head.weight" not in model.state_dict()  # not carried by checkpoints


def test_loading_whole_lifts_zero_init_for_the_load_only() -> None:
    """accelerate's DeepSpeed plugin registers its ZeRO-3 configuration with transformers, which then builds any
    model under zero.Init, partitioned: a base kept whole must load outside it."""
    from types import SimpleNamespace

    require_module("deepspeed", "pip install 'tunefile[deepspeed]'")
    from transformers.integrations.deepspeed import (
        HfDeepSpeedConfig,
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    registered = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(dschf=registered)))
    try:
        assert is_deepspeed_zero3_enabled()
        with loading_whole(accelerator):
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()


def test_a_layer_class_the_model_lacks_is_one_line(tiny_model_dir: Path) -> None:
    model = lora_model(tiny_model_dir)
    with pytest.raises(RuntimeUserError) as failure:
        gather_layers_whole(model, "MistralDecoderLayer")
    assert str(failure.value) == ("config.yaml: distribution.deepspeed.leaf_module_class: the model has no "
                                  "MistralDecoderLayer; compile the bundle again against this base model")
    assert gather_layers_whole(model, None) == 0


def test_a_quantised_frozen_weight_is_refused_in_one_line(tiny_model_dir: Path) -> None:
    """The compiler keeps quantised bases partitioned; a plan that says otherwise stops before DeepSpeed starts."""
    model = lora_model(tiny_model_dir)
    model.get_base_model().lm_head.weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8),
                                                               requires_grad=False)
    with pytest.raises(RuntimeUserError) as failure:
        keep_frozen_base_whole(model, torch.device("cpu"))
    assert str(failure.value) == ("config.yaml: distribution.deepspeed.frozen_base_whole: "
                                  "base_model.model.lm_head.weight is torch.int8, not a floating-point weight; "
                                  "compile the bundle again")
    assert isinstance(model.get_base_model().model.embed_tokens.weight, torch.nn.Parameter)  # nothing half done
