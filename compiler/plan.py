"""The Plan: every choice the compiler made, explicit and frozen, each with its reason.

``resolve`` builds it; the renderers read the narrow pieces they need; ``tunefile explain``
prints its decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .errors import Problem
from .spec import Spec
from .targets import Target

Strategy = Literal["single", "ddp", "fsdp", "deepspeed"]
Precision = Literal["bf16", "fp16", "fp32"]


@dataclass(frozen=True)
class Decision:
    """One resolved choice, as ``explain`` shows it: ``precision = bf16  (h100-80gb supports bf16)``."""

    topic: str
    value: str
    reason: str


@dataclass(frozen=True)
class ModelInfo:
    architecture: str | None  # e.g. LlamaForCausalLM
    parameters: int | None  # total parameter count
    parameters_source: str  # "local config.json", "built-in table: llama-3 8B", "model_parameters hint", "unknown"
    hidden_size: int | None
    num_layers: int | None
    trainable_parameters: int | None  # adapter parameters for LoRA; all for full fine-tuning


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory in GiB for the chosen strategy, with the parts that make it up."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    available: float | None  # GPU memory; None when the GPU is unspecified

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available * 0.9


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    sequence_len: int
    # GPUs that share one micro batch (tensor × context parallelism): they train one sequence together.
    gpus_per_copy: int = 1
    on_cpu: bool = False  # the explanation then counts processes, not GPUs

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.gpus_per_copy

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.data_parallel

    @property
    def tokens_per_step(self) -> int:
        """Upper bound: every sample at sequence_len (exact with sample_packing)."""
        return self.effective_batch_size * self.sequence_len

    def explanation(self) -> str:
        if self.on_cpu:
            unit = "process" if self.world_size == 1 else "processes"
        else:
            unit = "GPU" if self.world_size == 1 else "GPUs"
        shares = (f"{self.world_size} {unit}" if self.gpus_per_copy == 1 else
                  f"{self.data_parallel} data-parallel group{'s' if self.data_parallel != 1 else ''} of "
                  f"{self.gpus_per_copy} GPUs")
        return (
            f"{self.micro_batch_size} micro batch × {self.gradient_accumulation_steps} accumulation × "
            f"{shares} = {self.effective_batch_size} "
            f"sequences per optimizer step (≤ {self.tokens_per_step:,} tokens at sequence_len {self.sequence_len})"
        )


@dataclass(frozen=True)
class FsdpPlan:
    version: int
    layer_cls_to_wrap: str | None
    auto_wrap_policy: str
    offload_params: bool
    state_dict_type: str
    reshard_after_forward: bool
    cpu_ram_efficient_loading: bool
    activation_checkpointing: bool


@dataclass(frozen=True)
class DistributionPlan:
    strategy: Strategy
    fsdp: FsdpPlan | None = None
    deepspeed_config: dict[str, Any] | None = None  # concrete, no "auto" left
    deepspeed_stage: int | None = None
    deepspeed_source: str | None = None  # "built-in zero3" or the user's file name
    deepspeed_leaf_module: str | None = None  # ZeRO-3: the decoder layer class gathered whole (DeepSpeedPlan)
    deepspeed_frozen_base_whole: bool = False  # ZeRO-3 under an adapter: the frozen base left out of partitioning


@dataclass(frozen=True)
class Plan:
    spec: Spec
    config_name: str  # the config file's base name, never an absolute path
    target: Target
    precision: Precision
    tf32: bool
    attention: str  # flash_attention_2 | sdpa | eager
    packing_attention: str | None  # flash_varlen | torch_varlen | block_mask, None without sample_packing
    kernels: dict[str, bool]  # KernelsPlan's fields: which fused kernels the runtime patches in
    load_in_4bit: bool
    load_in_8bit: bool
    optimizer: str  # canonical name (aliases resolved)
    distribution: DistributionPlan
    batch: BatchPlan
    model: ModelInfo
    memory: MemoryEstimate | None
    decisions: tuple[Decision, ...]
    warnings: tuple[Problem, ...]
    required_packages: tuple[str, ...]
    config_sha256: str
    target_sha256: str
    tunefile_version: str
