"""Plans built by hand, so renderer tests do not depend on resolve().

``make_plan("fsdp", spec={"sample_packing": True}, precision="fp16")``: a variant, then changes to
the Spec's dict, then any Plan field replaced outright.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tunefile.compiler.errors import Problem
from tunefile.compiler.plan import (
    BatchPlan,
    Decision,
    DistributionPlan,
    FsdpPlan,
    MemoryEstimate,
    ModelInfo,
    Plan,
)
from tunefile.compiler.spec import Spec
from tunefile.compiler.targets import SlurmSettings, Target, builtin_target

VARIANTS = ("single", "ddp", "fsdp", "deepspeed", "slurm", "cpu")

BASE_SPEC: dict[str, Any] = {
    "base_model": "meta-llama/Llama-3.1-8B",
    "datasets": [
        {"path": "data/alpaca.jsonl", "type": "alpaca"},
        {"path": "data/chat.jsonl", "type": "chat_template"},
        {"path": "data/text.jsonl", "type": "completion"},
    ],
    "sequence_len": 2048,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 4,
    "output_dir": "./outputs/test",
}

ZERO3_CONFIG: dict[str, Any] = {
    "bf16": {"enabled": True},
    "fp16": {"enabled": False},
    "gradient_accumulation_steps": 4,
    "gradient_clipping": 1.0,
    "train_batch_size": 16,
    "train_micro_batch_size_per_gpu": 2,
    "zero_optimization": {"stage": 3, "overlap_comm": True, "stage3_gather_16bit_weights_on_model_save": True},
}

SLURM = SlurmSettings(partition="gpu", account="ml-research", qos="high", time="2-00:00:00", cpus_per_task=96,
                      mem="0", constraint="h100", job_name="llama8b-full", log_dir="logs",
                      modules=("cuda/12.4", "nccl/2.21"), setup=('source "$HOME/venvs/tunefile/bin/activate"',))


def _fsdp(version: int = 2, **changes: Any) -> FsdpPlan:
    fsdp = FsdpPlan(version=version, layer_cls_to_wrap="LlamaDecoderLayer", auto_wrap_policy="TRANSFORMER_BASED_WRAP",
                    offload_params=False, state_dict_type="FULL_STATE_DICT", reshard_after_forward=True,
                    cpu_ram_efficient_loading=True, activation_checkpointing=False)
    return replace(fsdp, **changes)


def _variant(name: str) -> tuple[dict[str, Any], Target, DistributionPlan]:
    """Spec changes, target and distribution of one variant."""
    h100 = builtin_target("h100-80gb")
    if name == "single":
        return ({"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True},
                h100, DistributionPlan("single"))
    if name == "ddp":
        return ({"adapter": "lora"}, replace(builtin_target("a100-80gb"), name="a100-80gb-x4", gpus_per_node=4),
                DistributionPlan("ddp"))
    if name == "fsdp":
        return ({"fsdp_config": {}}, replace(h100, name="h100-x4", gpus_per_node=4),
                DistributionPlan("fsdp", fsdp=_fsdp()))
    if name == "deepspeed":
        return ({"deepspeed": "zero3"}, replace(builtin_target("a100-80gb"), name="a100-80gb-x2", gpus_per_node=2),
                DistributionPlan("deepspeed", deepspeed_config=ZERO3_CONFIG, deepspeed_stage=3,
                                 deepspeed_source="built-in zero3"))
    if name == "slurm":
        target = replace(h100, name="slurm-h100", nodes=2, gpus_per_node=8, slurm=SLURM,
                         env=(("HF_HOME", "/scratch/hf-cache"), ("NCCL_DEBUG", "WARN")))
        return ({"fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}}, target,
                DistributionPlan("fsdp", fsdp=_fsdp(state_dict_type="SHARDED_STATE_DICT")))
    if name == "cpu":
        return ({"adapter": "lora", "bf16": False}, replace(builtin_target("cpu"), gpus_per_node=2),
                DistributionPlan("ddp"))
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


def make_plan(variant: str = "single", *, spec: dict[str, Any] | None = None, **overrides: Any) -> Plan:
    """A realistic Plan for one of VARIANTS; ``spec`` changes the config dict, ``overrides`` the Plan."""
    spec_changes, target, distribution = _variant(variant)
    spec_model = Spec.model_validate({**BASE_SPEC, **spec_changes, **(spec or {})})
    target = overrides.pop("target", target)
    distribution = overrides.pop("distribution", distribution)
    on_cpu = target.on_cpu
    batch = BatchPlan(micro_batch_size=spec_model.micro_batch_size,
                      gradient_accumulation_steps=spec_model.gradient_accumulation_steps,
                      world_size=target.world_size, sequence_len=spec_model.sequence_len, on_cpu=on_cpu)
    precision = "fp32" if on_cpu else "bf16"
    plan = Plan(
        spec=spec_model,
        config_name=f"{variant}.yml",
        target=target,
        precision=precision,
        tf32=False,
        attention="sdpa",
        packing_attention="torch_varlen" if spec_model.sample_packing else None,
        kernels=dict.fromkeys(("liger_rms_norm", "liger_glu_activation", "liger_layer_norm", "liger_rope",
                               "liger_rms_norm_gated", "liger_fused_linear_cross_entropy", "cut_cross_entropy"), False),
        load_in_4bit=spec_model.adapter == "qlora" or spec_model.load_in_4bit,
        load_in_8bit=spec_model.load_in_8bit,
        optimizer="adamw_torch" if on_cpu else spec_model.optimizer,
        distribution=distribution,
        batch=batch,
        model=ModelInfo(architecture="LlamaForCausalLM", parameters=8_030_261_248,
                        parameters_source="built-in table: llama-3 8B", hidden_size=4096, num_layers=32,
                        trainable_parameters=None),
        memory=None if on_cpu else MemoryEstimate(
            weights=14.96, gradients=0.08, optimizer=0.16, activations=9.5, overhead=1.5,
            available=target.gpu.memory_gib if target.gpu else None),
        decisions=(
            Decision("precision", precision, "bf16: auto and the GPU supports bfloat16" if not on_cpu else "CPU"),
            Decision("strategy", distribution.strategy, "chosen by the test's plan factory | with a pipe"),
            Decision("batch", f"{batch.effective_batch_size} sequences per step", batch.explanation()),
        ),
        warnings=(Problem(("datasets", 0, "path"), "file not found on this machine",
                          hint="it may exist on the cluster"),),
        required_packages=tuple(sorted({"accelerate", "datasets", "torch", "transformers", "tunefile", "safetensors"}
                                       | ({"peft"} if spec_model.adapter else set())
                                       | ({"deepspeed"} if distribution.strategy == "deepspeed" else set()))),
        config_sha256="0" * 64,
        target_sha256="1" * 64,
        tunefile_version="0.1.0",
    )
    return replace(plan, **overrides)


AWKWARD = "it's \"quoted\" $HOME `date` ; echo pwned  two  spaces"  # a value every script must keep as one word


def render(variant: str = "single", **kwargs: object) -> dict[str, str]:
    """The bundle's files (name → text) for one of the VARIANTS, with optional plan overrides."""
    from tunefile.compiler.render import render_bundle

    return render_bundle(make_plan(variant, **kwargs))  # type: ignore[arg-type]


def slurm_plan(**slurm: object):
    """The slurm variant with some SLURM settings replaced."""
    plan = make_plan("slurm")
    return replace(plan, target=replace(plan.target, slurm=replace(plan.target.slurm, **slurm)))
