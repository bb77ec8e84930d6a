"""Resolution: precision, attention, strategy, FSDP layer class, DeepSpeed, batch arithmetic."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from helpers import MINIMAL
from tunefile.compiler.errors import ConfigError
from tunefile.compiler.loader import load_document
from tunefile.compiler.plan import Plan
from tunefile.compiler.resolve import DeepSpeedInput, ResolveInputs, resolve
from tunefile.compiler.targets import Target, builtin_target
from tunefile.compiler.validate import validate_document


def gpus(name: str, per_node: int = 1, nodes: int = 1) -> Target:
    return replace(builtin_target(name), gpus_per_node=per_node, nodes=nodes)


def plan_for(text: str, target: Target | None = None, *, local_config: dict | None = None,
             deepspeed_data: Any = None) -> Plan:
    spec, warnings = validate_document(load_document(text, "c.yml"))
    inputs = ResolveInputs("c.yml", "0" * 64, "0" * 64, local_config,
                           DeepSpeedInput("ds.json", deepspeed_data) if deepspeed_data is not None else None)
    return resolve(spec, target or gpus("h100-80gb"), inputs, spec_warnings=warnings)


def errors_for(text: str, target: Target | None = None, **kwargs: Any) -> dict[tuple, str]:
    with pytest.raises(ConfigError) as caught:
        plan_for(text, target, **kwargs)
    return {problem.path: f"{problem.message} | {problem.hint}" for problem in caught.value.problems}


def decision(plan: Plan, topic: str) -> str:
    return next(d.value + " | " + d.reason for d in plan.decisions if d.topic == topic)


@pytest.mark.parametrize(
    "gpu, extra, precision",
    [("h100-80gb", "", "bf16"), ("a10g", "", "bf16"), ("v100-32gb", "", "fp16"), ("t4", "", "fp16"),
     ("cpu", "", "fp32"), ("h100-80gb", "bf16: false\n", "fp32"), ("h100-80gb", "bf16: false\nfp16: true\n", "fp16"),
     ("unspecified", "", "bf16")],
)
def test_precision(gpu: str, extra: str, precision: str) -> None:
    assert plan_for(MINIMAL + extra, gpus(gpu)).precision == precision


def test_bf16_true_on_a_gpu_without_it() -> None:
    assert "no bfloat16" in errors_for(MINIMAL + "bf16: true\n", gpus("t4"))[("bf16",)]


def test_fp16_on_the_cpu() -> None:
    assert "needs a GPU" in errors_for(MINIMAL + "fp16: true\nbf16: false\n", gpus("cpu"))[("fp16",)]


@pytest.mark.parametrize("gpu, attention", [("a100-80gb", "flash_attention_2"), ("rtx4090", "flash_attention_2"),
                                            ("v100-32gb", "sdpa"), ("t4", "sdpa"), ("cpu", "sdpa")])
def test_flash_attention_falls_back_before_ampere(gpu: str, attention: str) -> None:
    plan = plan_for(MINIMAL + "flash_attention: true\n", gpus(gpu))
    assert plan.attention == attention
    fell_back = attention == "sdpa"
    assert any(w.path == ("attn_implementation",) for w in plan.warnings) == fell_back
    assert ("flash-attn" in plan.required_packages) == (not fell_back)


@pytest.mark.parametrize("gpu, extra, packing", [
    ("h100-80gb", "flash_attention: true\n", "flash_varlen"),
    ("h100-80gb", "", "torch_varlen"),
    ("v100-32gb", "flash_attention: true\n", "block_mask"),
    ("cpu", "", "block_mask"),
])
def test_packing_always_isolates_samples(gpu: str, extra: str, packing: str) -> None:
    assert plan_for(MINIMAL + "sample_packing: true\n" + extra, gpus(gpu)).packing_attention == packing


def test_no_packing_no_packing_attention() -> None:
    assert plan_for(MINIMAL).packing_attention is None


def test_tf32_ignored_before_ampere() -> None:
    plan = plan_for(MINIMAL + "tf32: true\n", gpus("v100-32gb"))
    assert plan.tf32 is False and plan.warnings[0].path == ("tf32",)
    assert plan_for(MINIMAL + "tf32: true\n", gpus("a100-40gb")).tf32 is True


def test_deepspeed_on_one_gpu_tells_the_fix() -> None:
    message = errors_for(MINIMAL + "deepspeed: zero2\n", gpus("h100-80gb", 1))[("deepspeed",)]
    assert "at least 2 GPUs" in message and "remove the `deepspeed:` line" in message


def test_deepspeed_on_the_cpu() -> None:
    assert "needs GPUs" in errors_for(MINIMAL + "deepspeed: zero2\n", gpus("cpu", 2))[("deepspeed",)]


def test_bitsandbytes_on_the_cpu() -> None:
    found = errors_for(MINIMAL + "adapter: qlora\noptimizer: paged_adamw_8bit\n", gpus("cpu"))
    assert "bitsandbytes" in found[("adapter",)] and "bitsandbytes" in found[("optimizer",)]


def test_qlora_loads_in_4bit_and_needs_bitsandbytes() -> None:
    plan = plan_for(MINIMAL + "adapter: qlora\n")
    assert plan.load_in_4bit and not plan.load_in_8bit
    assert {"bitsandbytes", "peft"} <= set(plan.required_packages)


def test_optimizer_alias_is_canonical() -> None:
    assert plan_for(MINIMAL + "adapter: lora\noptimizer: adamw_bnb_8bit\n").optimizer == "adamw_8bit"


def test_batch_arithmetic() -> None:
    plan = plan_for(MINIMAL + "micro_batch_size: 2\ngradient_accumulation_steps: 8\nsequence_len: 4096\n",
                    gpus("h100-80gb", 8, nodes=2))
    assert plan.batch.effective_batch_size == 2 * 8 * 16
    assert "2 micro batch × 8 accumulation × 16 GPUs = 256 sequences" in plan.batch.explanation()


class TestStrategy:
    def test_one_gpu_is_single(self) -> None:
        assert plan_for(MINIMAL + "adapter: lora\n").distribution.strategy == "single"

    def test_lora_replica_fits_so_ddp(self) -> None:
        plan = plan_for(MINIMAL + "adapter: lora\ngradient_checkpointing: true\n", gpus("h100-80gb", 4))
        assert plan.distribution.strategy == "ddp"
        assert "replica fits" in decision(plan, "strategy")

    def test_full_8b_on_40gb_cards_shards(self) -> None:
        plan = plan_for(MINIMAL + "gradient_checkpointing: true\n", gpus("a100-40gb", 8))
        assert plan.distribution.strategy == "fsdp" and not plan.distribution.fsdp.offload_params
        assert plan.distribution.fsdp.layer_cls_to_wrap == "LlamaDecoderLayer"
        assert plan.memory is not None and plan.memory.fits

    def test_full_70b_offloads(self) -> None:
        text = MINIMAL.replace("Llama-3.1-8B", "Llama-3.1-70B") + "gradient_checkpointing: true\n"
        plan = plan_for(text, gpus("h100-80gb", 8))
        assert plan.distribution.fsdp is not None and plan.distribution.fsdp.offload_params
        assert "offloaded to CPU" in decision(plan, "strategy")

    def test_unknown_model_defaults_to_ddp_and_says_why(self) -> None:
        plan = plan_for(MINIMAL.replace("meta-llama/Llama-3.1-8B", "acme/secret-model"), gpus("h100-80gb", 2))
        assert plan.distribution.strategy == "ddp" and "model_parameters" in decision(plan, "strategy")
        assert plan.model.parameters is None

    def test_parameter_hint_feeds_the_estimate(self) -> None:
        text = MINIMAL.replace("meta-llama/Llama-3.1-8B", "acme/secret-model") + "model_parameters: 70B\n"
        plan = plan_for(text, gpus("h100-80gb", 8))
        assert plan.model.parameters == 70_000_000_000 and plan.model.parameters_source == "model_parameters hint"
        assert plan.distribution.strategy == "fsdp"

    def test_explicit_ddp_is_respected_with_a_warning_when_it_will_not_fit(self) -> None:
        text = MINIMAL.replace("Llama-3.1-8B", "Llama-3.1-70B") + "strategy: ddp\n"
        plan = plan_for(text, gpus("h100-80gb", 8))
        assert plan.distribution.strategy == "ddp"
        assert any("run out of memory" in w.message for w in plan.warnings)

    def test_single_gpu_too_small_warns(self) -> None:
        plan = plan_for(MINIMAL.replace("Llama-3.1-8B", "Llama-3.1-70B"), gpus("rtx4090"))
        assert any("run out of memory" in w.message for w in plan.warnings)

    def test_fsdp_on_one_gpu_without_offload_warns(self) -> None:
        plan = plan_for(MINIMAL + "adapter: lora\nfsdp_config:\n  offload_params: false\n")
        assert any("shards nothing" in w.message for w in plan.warnings)


@pytest.mark.parametrize(
    "model, layer",
    [("meta-llama/Llama-3.2-1B", "LlamaDecoderLayer"), ("mistralai/Mistral-7B-v0.3", "MistralDecoderLayer"),
     ("mistralai/Mixtral-8x7B-Instruct-v0.1", "MixtralDecoderLayer"), ("Qwen/Qwen2.5-7B", "Qwen2DecoderLayer"),
     ("Qwen/Qwen3-8B", "Qwen3DecoderLayer"), ("google/gemma-7b", "GemmaDecoderLayer"),
     ("google/gemma-2-9b-it", "Gemma2DecoderLayer"), ("google/gemma-3-4b-pt", "Gemma3DecoderLayer"),
     ("microsoft/Phi-3-mini-4k-instruct", "Phi3DecoderLayer")],
)
def test_fsdp_layer_class_from_the_architecture(model: str, layer: str) -> None:
    text = MINIMAL.replace("meta-llama/Llama-3.1-8B", model) + "adapter: lora\nfsdp_config: {}\n"
    plan = plan_for(text, gpus("h100-80gb", 2))
    assert plan.distribution.fsdp is not None and plan.distribution.fsdp.layer_cls_to_wrap == layer


def test_layer_class_from_a_local_config_json() -> None:
    local = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
             "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100}
    text = MINIMAL.replace("meta-llama/Llama-3.1-8B", "./my-model") + "adapter: lora\nfsdp_config: {}\n"
    plan = plan_for(text, gpus("h100-80gb", 2), local_config=local)
    assert plan.distribution.fsdp.layer_cls_to_wrap == "Qwen3DecoderLayer"
    assert plan.model.parameters_source == "local config.json"


def test_layer_class_from_model_type() -> None:
    text = MINIMAL.replace("meta-llama/Llama-3.1-8B", "acme/x") + "model_type: MistralForCausalLM\nfsdp_config: {}\n"
    assert plan_for(text, gpus("h100-80gb", 2)).distribution.fsdp.layer_cls_to_wrap == "MistralDecoderLayer"


def test_unknown_architecture_leaves_the_layer_to_accelerate_with_a_warning() -> None:
    text = MINIMAL.replace("meta-llama/Llama-3.1-8B", "acme/x") + "fsdp_config: {}\n"
    plan = plan_for(text, gpus("h100-80gb", 2))
    assert plan.distribution.fsdp.layer_cls_to_wrap is None
    assert any("decoder layer class" in w.message for w in plan.warnings)


def all_values(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [found for item in value.values() for found in all_values(item)]
    return [value]


class TestDeepSpeed:
    @pytest.mark.parametrize("preset, stage", [("zero1", 1), ("zero2", 2), ("zero2_offload", 2), ("zero3", 3),
                                               ("zero3_offload", 3)])
    def test_presets_are_concrete(self, preset: str, stage: int) -> None:
        text = MINIMAL + f"deepspeed: {preset}\nmicro_batch_size: 2\ngradient_accumulation_steps: 4\n"
        plan = plan_for(text, gpus("a100-80gb", 4))
        config = plan.distribution.deepspeed_config
        assert "auto" not in all_values(config)
        assert config["train_batch_size"] == 2 * 4 * 4 and config["zero_optimization"]["stage"] == stage
        assert config["bf16"]["enabled"] is True
        assert ("offload_optimizer" in config["zero_optimization"]) == preset.endswith("offload")
        if stage == 3:
            assert config["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)

    @pytest.mark.parametrize("preset, leaf", [("zero3", "LlamaDecoderLayer"), ("zero3_offload", "LlamaDecoderLayer"),
                                              ("zero2", None)])
    def test_zero3_gathers_a_whole_decoder_layer(self, preset: str, leaf: str | None) -> None:
        plan = plan_for(MINIMAL + f"deepspeed: {preset}\n", gpus("h100-80gb", 2))
        assert plan.distribution.deepspeed_leaf_module == leaf
        said = [d for d in plan.decisions if d.topic == "zero3 gathering"]
        assert [d.value for d in said] == ([f"a whole {leaf} at a time"] if leaf else [])

    def test_zero3_keeps_a_frozen_base_whole_where_it_fits(self) -> None:
        lora = MINIMAL + "adapter: lora\nlora_target_linear: true\ndeepspeed: zero3\n"
        plan = plan_for(lora, gpus("h100-80gb", 2))
        zero = plan.distribution.deepspeed_config["zero_optimization"]
        assert zero["stage3_param_persistence_threshold"] == 8_030_261_248  # Llama 3.1 8B's size: every parameter
        assert zero["memory_efficient_linear"] is False  # no weight is released between forward and backward
        assert plan.distribution.deepspeed_frozen_base_whole  # the runtime leaves the frozen base out of ZeRO-3
        assert decision(plan, "zero3 frozen base").startswith("whole on every GPU, outside ZeRO-3 | it fits (~")
        assert plan.memory is not None and plan.memory.weights > 14  # the bf16 base counted whole on each GPU
        assert plan.distribution.deepspeed_leaf_module == "LlamaDecoderLayer"

    @pytest.mark.parametrize("config, target, said", [
        ("adapter: lora\nlora_target_linear: true\nsequence_len: 8192\nmicro_batch_size: 4\n", "a10g",
         "partitioned | with it whole, the estimate is ~"),
        ("adapter: lora\nlora_target_linear: true\n", "unspecified", "partitioned | the GPU's memory is unknown"),
        ("", "h100-80gb", None),  # a full fine-tune: every weight trains
        ("adapter: qlora\nload_in_4bit: true\n", "h100-80gb", None)])
    def test_zero3_partitions_the_base_otherwise(self, config: str, target: str, said: str | None) -> None:
        plan = plan_for(MINIMAL + config + "deepspeed: zero3\n", gpus(target, 2))
        zero = plan.distribution.deepspeed_config["zero_optimization"]
        assert zero["stage3_param_persistence_threshold"] == 10 * 4096
        assert "memory_efficient_linear" not in zero and not plan.distribution.deepspeed_frozen_base_whole
        found = [d.value + " | " + d.reason for d in plan.decisions if d.topic == "zero3 frozen base"]
        assert [f[:len(said)] for f in found] == ([said] if said else [])

    def test_zero3_leaves_a_json_granularity_threshold_to_deepspeed(self) -> None:
        user = {"zero_optimization": {"stage": 3, "stage3_module_granularity_threshold": 0}}
        plan = plan_for(MINIMAL + "deepspeed: ds.json\n", gpus("h100-80gb", 2), deepspeed_data=user)
        assert plan.distribution.deepspeed_leaf_module is None
        assert decision(plan, "zero3 gathering") == ("stage3_module_granularity_threshold 0 | "
                                                     "set in the DeepSpeed JSON")

    def test_zero3_of_an_unknown_architecture_gathers_module_by_module(self) -> None:
        text = MINIMAL.replace("meta-llama/Llama-3.1-8B", "someone/unknown-model") + "deepspeed: zero3\n"
        plan = plan_for(text, gpus("h100-80gb", 2))
        assert plan.distribution.deepspeed_leaf_module is None
        assert decision(plan, "zero3 gathering").startswith("module by module (DeepSpeed's default) | the decoder "
                                                            "layer class of")

    def test_user_json_auto_values_are_filled(self) -> None:
        user = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}, "train_batch_size": "auto",
                "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto", "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}
        plan = plan_for(MINIMAL + "deepspeed: ds.json\n", gpus("h100-80gb", 2), deepspeed_data=user)
        config = plan.distribution.deepspeed_config
        assert "auto" not in all_values(config)
        assert config["zero_optimization"]["reduce_bucket_size"] == 4096 * 4096
        assert config["train_batch_size"] == 2 and plan.distribution.deepspeed_stage == 3

    def test_user_json_conflicts_and_leftovers_are_located_in_the_json(self) -> None:
        user = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW"},
                "zero_optimization": {"stage": 2, "sub_group_size": "auto"}}
        with pytest.raises(ConfigError) as caught:
            plan_for(MINIMAL + "deepspeed: ds.json\n", gpus("h100-80gb", 2), deepspeed_data=user)
        found = {problem.path: problem for problem in caught.value.problems}
        assert set(found) == {("train_micro_batch_size_per_gpu",), ("optimizer",),
                              ("zero_optimization", "sub_group_size")}
        assert all(problem.file == "ds.json" for problem in found.values())
        assert "contradicts the config's micro_batch_size (1)" in found[("train_micro_batch_size_per_gpu",)].message
