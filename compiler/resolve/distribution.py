"""Strategy (single, DDP, FSDP2, DeepSpeed ZeRO) and its settings, with the memory estimate behind it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from ..errors import Problem
from ..models import ModelShape, layer_class_for
from ..plan import BatchPlan, Decision, DistributionPlan, FsdpPlan, MemoryEstimate, ModelInfo
from ..spec import BITSANDBYTES_OPTIMIZERS, DEFAULT_LORA_TARGETS, FsdpConfig, Spec
from ..targets import Target
from . import deepspeed as ds
from .memory import SHARDING, estimate_memory, liger_bytes_saved, lora_input_bytes


@dataclass(frozen=True)
class DeepSpeedInput:
    """The user's DeepSpeed JSON file, already read and parsed by the CLI."""

    name: str
    data: Any


def resolve_distribution(
    spec: Spec, *, target: Target, batch: BatchPlan, precision: str, model: ModelInfo, shape: ModelShape | None,
    quantization_bits: int | None, deepspeed_file: DeepSpeedInput | None,
    errors: list[Problem], warnings: list[Problem], kernels: dict[str, bool] | None = None,
) -> tuple[DistributionPlan, MemoryEstimate | None, list[Decision]]:
    """The strategy (DDP, FSDP, DeepSpeed) and, on top of it, the N-D mesh the parallel sizes ask for.
    ``kernels``: the fused kernels the run patches in (they change what the activations take)."""
    plan, memory, decisions = _resolve_strategy(
        spec, target=target, batch=batch, precision=precision, model=model, shape=shape,
        quantization_bits=quantization_bits, deepspeed_file=deepspeed_file, errors=errors, warnings=warnings,
        kernels=kernels or {})
    mesh = resolve_mesh(spec, target=target, strategy=plan.strategy, errors=errors)
    if mesh is None:
        return plan, memory, decisions
    _check_mesh(spec, mesh, target=target, plan=plan, model=model, shape=shape, errors=errors)
    _warn_if_mask_is_big(mesh, batch, warnings)
    decisions.append(Decision("parallelism", mesh.words(), mesh.reason(plan.strategy)))
    return ParallelDistributionPlan(**{f.name: getattr(plan, f.name) for f in fields(plan)}, mesh=mesh), memory, \
        decisions


def _resolve_strategy(
    spec: Spec, *, target: Target, batch: BatchPlan, precision: str, model: ModelInfo, shape: ModelShape | None,
    quantization_bits: int | None, deepspeed_file: DeepSpeedInput | None,
    errors: list[Problem], warnings: list[Problem], kernels: dict[str, bool],
) -> tuple[DistributionPlan, MemoryEstimate | None, list[Decision]]:
    world = target.world_size
    estimate_for = _estimator(spec, target, batch, precision, model, shape, quantization_bits, kernels)
    decisions: list[Decision] = []

    if spec.deepspeed:
        if target.on_cpu:
            errors.append(Problem(("deepspeed",), "DeepSpeed needs GPUs; the target is the CPU",
                                  hint="remove the `deepspeed:` line"))
        elif world == 1:
            errors.append(Problem(("deepspeed",), "DeepSpeed needs at least 2 GPUs in total; this target has 1",
                                  hint="remove the `deepspeed:` line (one GPU trains without it), or pass "
                                  "--gpus-per-node 2 or more"))
        plan, reason = _deepspeed_plan(spec, batch, precision, shape, deepspeed_file, errors)
        preset = spec.deepspeed if spec.deepspeed in ds.BUILTIN_PRESETS else None
        stage = plan.deepspeed_stage or 0
        memory = estimate_for(preset if preset else (f"zero{stage}" if stage > 0 else "ddp"))
        decisions.append(Decision("strategy", f"deepspeed zero{plan.deepspeed_stage}", reason))
        if stage == 3:
            plan, gathering = ds.zero3_gathering(plan, model)
            decisions.append(gathering)
            if preset == "zero3" and spec.adapter and quantization_bits is None and shape is not None:
                # (ReLoRA and LISA, which change the frozen weights, are refused under DeepSpeed: rules.py.)
                plan, memory, base = ds.zero3_frozen_base(plan, shape, whole=estimate_for("zero2"),
                                                           partitioned=memory)
                decisions.append(base)
        _warn_if_too_big(memory, ("deepspeed",), warnings, "use zero3 or zero3_offload")
        return plan, memory, decisions

    if spec.fsdp_config is not None or spec.strategy == "fsdp":
        settings = spec.fsdp_config or FsdpConfig()
        memory = estimate_for("fsdp_offload" if settings.offload_params else "fsdp")
        if world == 1 and not settings.offload_params:
            warnings.append(Problem(("fsdp_config",) if spec.fsdp_config else ("strategy",),
                                    "FSDP on one GPU shards nothing", hint="set offload_params: true or drop FSDP"))
        _warn_if_too_big(memory, ("fsdp_config",), warnings, "set fsdp_config.offload_params: true")
        why = "fsdp_config is set" if spec.fsdp_config else "strategy: fsdp"
        version, version_reason = fsdp_version(spec)
        fsdp, layer_decision = _fsdp_plan(spec, settings, model, warnings, version)
        decisions += [Decision("strategy", f"fsdp{version}", f"{why}, across {world} GPU(s); {version_reason}"),
                      layer_decision]
        return DistributionPlan(strategy="fsdp", fsdp=fsdp), memory, decisions

    if world == 1:
        if spec.strategy == "ddp":
            warnings.append(Problem(("strategy",), "strategy: ddp with one process in total replicates nothing; "
                                    "it runs as a single process", hint="pass --gpus-per-node 2 or more"))
        memory = estimate_for("single")
        _warn_if_too_big(memory, ("base_model",), warnings,
                         "enable gradient_checkpointing, lower micro_batch_size or sequence_len, or use adapter: qlora")
        decisions.append(Decision("strategy", "single", "one GPU in total" if not target.on_cpu else "one process"))
        return DistributionPlan(strategy="single"), memory, decisions

    ddp = estimate_for("ddp")
    if spec.strategy == "ddp" or ddp is None or ddp.fits is None or ddp.fits:
        if spec.strategy == "ddp":
            reason = "strategy: ddp"
            _warn_if_too_big(ddp, ("strategy",), warnings, "use strategy: auto or fsdp")
        elif ddp is None:
            reason = "model size unknown (set model_parameters for a memory check): DDP, the default"
        elif ddp.fits is None:
            reason = "GPU memory unknown (pass --gpu for a memory check): DDP, the default"
        else:
            reason = f"a full replica fits: ~{ddp.total:.1f} GiB per GPU of {ddp.available:.0f} GiB"
        decisions.append(Decision("strategy", "ddp", reason))
        return DistributionPlan(strategy="ddp"), ddp, decisions

    sharded = estimate_for("fsdp")
    offload = bool(sharded and sharded.fits is False)
    memory = estimate_for("fsdp_offload") if offload else sharded
    reason = (f"a replica needs ~{ddp.total:.1f} GiB per GPU, more than 90% of {ddp.available:.0f} GiB; "
              + (f"sharded it still needs ~{sharded.total:.1f} GiB, so parameters are offloaded to CPU"
                 if offload and sharded else f"FSDP2 sharding brings it to ~{sharded.total:.1f} GiB"))
    fsdp, layer_decision = _fsdp_plan(spec, FsdpConfig(offload_params=offload), model, warnings, 2)
    decisions += [Decision("strategy", "fsdp2" + (" + offload" if offload else ""), reason), layer_decision]
    _warn_if_too_big(memory, ("base_model",), warnings, "lower micro_batch_size or sequence_len")
    return DistributionPlan(strategy="fsdp", fsdp=fsdp), memory, decisions


def _estimator(spec: Spec, target: Target, batch: BatchPlan, precision: str, model: ModelInfo,
               shape: ModelShape | None, quantization_bits: int | None,
               kernels: dict[str, bool]) -> Callable[[str], MemoryEstimate | None]:
    """Per-GPU memory under a strategy. With N-D sizes a GPU holds 1/context_parallel_size of each sequence, and a
    sharded model is divided within one replica's GPUs (dp_replicate_size replicas hold copies); tensor
    parallelism's split of the activations is left out (the estimate errs high)."""
    replicas = spec.dp_replicate_size or 1
    tokens_per_gpu = -(-batch.sequence_len // (spec.context_parallel_size or 1))

    def estimate(sharding: str) -> MemoryEstimate | None:
        if target.on_cpu or shape is None or not model.parameters or model.trainable_parameters is None:
            return None
        return estimate_memory(
            parameters=model.parameters,
            trainable=model.trainable_parameters,
            shape=shape,
            full_finetune=spec.adapter is None,
            quantization_bits=quantization_bits,
            precision=precision,
            eight_bit_optimizer=spec.optimizer in BITSANDBYTES_OPTIMIZERS and spec.optimizer != "paged_adamw_32bit",
            micro_batch_size=batch.micro_batch_size,
            sequence_len=tokens_per_gpu,
            gradient_checkpointing=spec.gradient_checkpointing
            or bool(spec.fsdp_config and spec.fsdp_config.activation_checkpointing),
            checkpoint_every_n_layers=spec.gradient_checkpointing_every_n_layers
            if spec.gradient_checkpointing else 1,
            adapter_bytes_per_token=0.0 if spec.adapter is None else lora_input_bytes(
                shape, targets=None if spec.lora_target_linear else _lora_targets(spec), dropout=spec.lora_dropout,
                replayed=spec.lora_dropout_recompute and _dropout_replayed(sharding, model), precision=precision),
            fused_loss=bool(kernels.get("cut_cross_entropy") or kernels.get("liger_fused_linear_cross_entropy")),
            liger_saved_per_token=liger_bytes_saved(shape, kernels),
            sharding=SHARDING[sharding],
            world_size=max(target.world_size // replicas, 1),
            gpu_memory_gib=target.gpu.memory_gib if target.gpu and target.gpu_known else None,
        )
    return estimate


def _dropout_replayed(sharding: str, model: ModelInfo) -> bool:
    """Whether the runtime replays LoRA dropout under this sharding (runtime/lora_dropout.py): where the weights
    stay for a whole decoder layer, as under ZeRO-3 only when it gathers whole layers (deepspeed.zero3_gathering)."""
    if sharding.startswith("zero3"):
        return layer_class_for(model.architecture) is not None
    return sharding in ("single", "ddp") or sharding.startswith(("zero1", "zero2"))


# Candidates of gradient_checkpointing: auto, from the least recomputation to the most.
AUTO_CHECKPOINTING = (None, 16, 8, 4, 3, 2, 1)


def resolve_auto_checkpointing(spec: Spec, *, target: Target, batch: BatchPlan, precision: str, model: ModelInfo,
                               shape: ModelShape | None, quantization_bits: int | None,
                               kernels: dict[str, bool]) -> tuple[Spec, Decision | None]:
    """gradient_checkpointing: auto. The least checkpointing whose memory estimate for one replica (DDP, or one
    GPU) fits in 90 % of the GPU: none, else every n-th layer for the largest n, else every layer. Without a
    known GPU or model size there is nothing to fit: none. Returns the spec with the choice written in."""
    if spec.gradient_checkpointing != "auto":
        return spec, None

    def with_checkpointing(every_n: int | None) -> Spec:
        return spec.model_copy(update={"gradient_checkpointing": every_n is not None,
                                       "gradient_checkpointing_every_n_layers": every_n or 1})

    def choose(every_n: int | None, reason: str) -> tuple[Spec, Decision]:
        words = "off" if every_n is None else _layers(every_n)
        return with_checkpointing(every_n), Decision("gradient checkpointing", f"{words} (auto)", reason)

    sharding = "single" if target.world_size == 1 else "ddp"
    estimates = {}
    for every_n in AUTO_CHECKPOINTING:
        estimate = _estimator(with_checkpointing(every_n), target, batch, precision, model, shape, quantization_bits,
                              kernels)
        memory = estimate(sharding)
        if memory is None or memory.fits is None:
            return choose(None, "no memory estimate (GPU memory or model size unknown): none, as without auto")
        estimates[every_n] = memory
        if memory.fits:
            if every_n is None:
                return choose(None, f"the run fits without it: ~{memory.total:.1f} GiB per GPU of "
                                    f"{memory.available:.0f} GiB")
            return choose(every_n, f"without it ~{estimates[None].total:.1f} GiB per GPU, more than 90% of "
                                   f"{memory.available:.0f} GiB; recomputing {_layers(every_n)} brings it "
                                   f"to ~{memory.total:.1f} GiB (more layers recompute more, and run slower)")
    full = estimates[1]
    return choose(1, f"even with every layer recomputed ~{full.total:.1f} GiB per GPU, more than 90% of "
                     f"{full.available:.0f} GiB: every layer, and the strategy shards what it can")


def _layers(every_n: int) -> str:
    """"every layer", "every 2nd layer", "every 16th layer"."""
    if every_n == 1:
        return "every layer"
    suffix = {2: "nd", 3: "rd"}.get(every_n % 10 if every_n > 20 else every_n, "th")
    return f"every {every_n}{suffix} layer"


def _lora_targets(spec: Spec) -> tuple[str, ...] | None:
    """The module names LoRA adapts, as far as the estimate can tell (None: every linear layer, or a regular
    expression it does not evaluate: the estimate then errs high)."""
    if isinstance(spec.lora_target_modules, str):
        return None
    return tuple(spec.lora_target_modules or DEFAULT_LORA_TARGETS)


def _warn_if_too_big(memory: MemoryEstimate | None, path: tuple, warnings: list[Problem], fix: str) -> None:
    if memory is not None and memory.fits is False:
        warnings.append(Problem(path, f"estimated ~{memory.total:.1f} GiB per GPU exceeds 90% of the "
                                f"{memory.available:.0f} GiB available; the run will likely run out of memory",
                                hint=fix))


def fsdp_version(spec: Spec) -> tuple[int, str]:
    """FSDP's generation and why: the config's fsdp_version; Axolotl's FSDP1 for an fsdp_config without one;
    FSDP2 when tunefile chose FSDP itself."""
    if spec.fsdp_version is not None:
        return spec.fsdp_version, f"fsdp_version: {spec.fsdp_version}"
    if spec.fsdp_config is not None:
        return 1, "an fsdp_config without fsdp_version is FSDP1, as in Axolotl (add fsdp_version: 2 for FSDP2)"
    return 2, "FSDP chosen by tunefile is FSDP2 (per-parameter sharding)"


def _fsdp_plan(spec: Spec, settings: FsdpConfig, model: ModelInfo,
               warnings: list[Problem], version: int) -> tuple[FsdpPlan, Decision]:
    derived = layer_class_for(model.architecture)
    chosen = settings.transformer_layer_cls_to_wrap
    if chosen:
        reason = "fsdp_config.transformer_layer_cls_to_wrap"
        if derived and derived != chosen:
            warnings.append(Problem(("fsdp_config", "transformer_layer_cls_to_wrap"),
                                    f"{model.architecture} models are made of {derived}, not {chosen}",
                                    hint=f"use {derived} or leave the key out to derive it"))
    elif derived:
        chosen, reason = derived, f"derived from the architecture {model.architecture}"
    elif settings.auto_wrap_policy == "TRANSFORMER_BASED_WRAP":
        reason = "architecture unknown: accelerate uses the model's _no_split_modules at launch"
        warnings.append(Problem(("fsdp_config",) if spec.fsdp_config else ("base_model",),
                                "cannot tell the decoder layer class to wrap from the base model",
                                hint="set fsdp_config.transformer_layer_cls_to_wrap (e.g. LlamaDecoderLayer)"))
    else:
        reason = f"not needed with {settings.auto_wrap_policy}"
    plan = FsdpPlan(
        version=version,
        layer_cls_to_wrap=chosen,
        auto_wrap_policy=settings.auto_wrap_policy,
        offload_params=settings.offload_params,
        state_dict_type=settings.state_dict_type,
        # FSDP1 spells "reshard after forward" as its sharding strategy: FULL_SHARD does, SHARD_GRAD_OP does not.
        reshard_after_forward=settings.reshard_after_forward if settings.sharding_strategy is None
        else settings.sharding_strategy == "FULL_SHARD",
        cpu_ram_efficient_loading=settings.cpu_ram_efficient_loading,
        activation_checkpointing=settings.activation_checkpointing,
    )
    return plan, Decision("fsdp layer", chosen or "(from the model)", reason)


def _deepspeed_plan(spec: Spec, batch: BatchPlan, precision: str, shape: ModelShape | None,
                    user_file: DeepSpeedInput | None, errors: list[Problem]) -> tuple[DistributionPlan, str]:
    name = spec.deepspeed or ""
    if name in ds.BUILTIN_PRESETS:
        config = ds.builtin_config(name, batch=batch, precision=precision, max_grad_norm=spec.max_grad_norm,
                                   shape=shape)
        reason = f"deepspeed: {name} (built-in preset)" + (_UNSIZED_BUCKETS if shape is None else "")
        return (DistributionPlan("deepspeed", deepspeed_config=config, deepspeed_stage=ds.zero_stage(config),
                                 deepspeed_source=f"built-in {name}"), reason)
    if user_file is None or not isinstance(user_file.data, dict):
        if user_file is not None:
            errors.append(Problem((), "a DeepSpeed config must be a JSON object", file=user_file.name))
        return DistributionPlan("deepspeed", deepspeed_config={}, deepspeed_stage=0, deepspeed_source=name), name
    config, problems = ds.concretize_user_config(user_file.data, file=user_file.name, batch=batch,
                                                 precision=precision, max_grad_norm=spec.max_grad_norm, shape=shape)
    errors.extend(problems)
    source = user_file.name if user_file.name.startswith("Axolotl ") else "your file"
    reason = f"deepspeed: {name} ({source}, 'auto' values filled in){_offload_words(config)}"
    if shape is None and _has_auto_buckets(user_file.data):
        reason += _UNSIZED_BUCKETS
    return (DistributionPlan("deepspeed", deepspeed_config=config, deepspeed_stage=ds.zero_stage(config),
                             deepspeed_source=name), reason)


_UNSIZED_BUCKETS = ("; its bucket sizes are DeepSpeed's defaults, since the model's hidden size is unknown (a local "
                    "base_model or one in the built-in table sizes them)")


def _offload_words(config: dict) -> str:
    zero = config.get("zero_optimization") if isinstance(config.get("zero_optimization"), dict) else {}
    parts = [what for key, what in (("offload_optimizer", "optimizer state"), ("offload_param", "parameters"))
             if isinstance(zero.get(key), dict) and zero[key].get("device") == "cpu"]
    return f"; offloads {' and '.join(parts)} to the CPU" if parts else ""


def _has_auto_buckets(user: dict) -> bool:
    zero = user.get("zero_optimization")
    return isinstance(zero, dict) and any(zero.get(key) == "auto" for key in
                                          ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                                           "stage3_param_persistence_threshold"))


# --- N-D parallelism ----------------------------------------------------------------------------------------

PARALLEL_KEYS = ("dp_replicate_size", "dp_shard_size", "tensor_parallel_size", "context_parallel_size")
# Architectures whose layers mix tokens outside attention (state-space, linear attention, convolutions), or whose
# attention context parallelism's gathered SDPA does not reproduce: the reason, as the error says it.
CONTEXT_PARALLEL_REFUSED: dict[str, str] = {
    **dict.fromkeys(("NemotronHForCausalLM", "FalconH1ForCausalLM", "GraniteMoeHybridForCausalLM", "JambaForCausalLM",
                     "Zamba2ForCausalLM", "BambaForCausalLM", "Qwen3NextForCausalLM", "Lfm2ForCausalLM",
                     "MambaForCausalLM", "Mamba2ForCausalLM"),
                    "has layers that mix tokens outside attention (state-space, linear attention or convolution), "
                    "which would see only their own slice of a sequence"),
    "Gemma2ForCausalLM": "caps its attention logits and mixes sliding-window and full layers",
    "Gemma3ForCausalLM": "mixes sliding-window and full attention layers",
    "Gemma3ForConditionalGeneration": "mixes sliding-window and full attention layers",
}


@dataclass(frozen=True)
class MeshSizes:
    """The ranks' mesh: dp_replicate × dp_shard × context_parallel × tensor_parallel = the world size. Under DDP
    and DeepSpeed the data-parallel ranks are replicas (dp_shard 1); only FSDP shards."""

    dp_replicate: int
    dp_shard: int
    tensor_parallel: int
    context_parallel: int

    @property
    def n_dimensional(self) -> bool:
        """Anything beyond plain data parallelism: tensor or context parallelism, or HSDP."""
        return self.tensor_parallel > 1 or self.context_parallel > 1 or (self.dp_replicate > 1 and self.dp_shard > 1)

    @property
    def data_parallel(self) -> int:
        return self.dp_replicate * self.dp_shard

    def words(self) -> str:
        return (f"dp_replicate {self.dp_replicate} × dp_shard {self.dp_shard} × context_parallel "
                f"{self.context_parallel} × tensor_parallel {self.tensor_parallel}")

    def reason(self, strategy: str) -> str:
        parts = []
        if self.dp_replicate > 1 and self.dp_shard > 1:
            parts.append(f"HSDP: {self.dp_replicate} replicas of an FSDP2 group sharding over {self.dp_shard} GPUs")
        elif self.data_parallel > 1:
            parts.append(f"{self.data_parallel} data-parallel " + ("shards" if self.dp_shard > 1 else "replicas"))
        if self.context_parallel > 1:
            parts.append(f"each sequence split across {self.context_parallel} GPUs that gather each other's keys and "
                         "values")
        if self.tensor_parallel > 1:
            parts.append(f"each layer split across {self.tensor_parallel} GPUs by the model's tensor-parallel plan")
        return f"{'; '.join(parts)} (strategy {strategy}; {self.data_parallel} different micro-batches per step)"


@dataclass(frozen=True)
class ParallelDistributionPlan(DistributionPlan):
    """A DistributionPlan with its N-D mesh (the Plan's DistributionPlan has no field for it)."""

    mesh: MeshSizes | None = None


def mesh_of(distribution: DistributionPlan) -> MeshSizes | None:
    return distribution.mesh if isinstance(distribution, ParallelDistributionPlan) else None


def _size(spec: Spec, key: str) -> int | None:
    """A parallel size as set; 1 (Axolotl's default: no such dimension) reads as unset."""
    value = getattr(spec, key)
    return None if value is None or value == 1 else value


def resolve_mesh(spec: Spec, *, target: Target, strategy: str, errors: list[Problem]) -> MeshSizes | None:
    """The mesh the sizes ask for on this target, filled in as Axolotl fills it: the GPUs tensor and context
    parallelism leave are data-parallel, shards under FSDP (dp_shard_size) and replicas otherwise, and a
    dp_shard_size that leaves GPUs over makes them replicas (HSDP). None when only plain data parallelism results."""
    if not any(_size(spec, key) for key in PARALLEL_KEYS):
        return None
    world, fsdp = target.world_size, strategy == "fsdp"
    tp, cp = _size(spec, "tensor_parallel_size") or 1, _size(spec, "context_parallel_size") or 1
    replicate, shard = _size(spec, "dp_replicate_size"), _size(spec, "dp_shard_size")
    key = next(k for k in PARALLEL_KEYS if _size(spec, k))

    def mismatch(what: str) -> None:
        errors.append(Problem((key,), f"{what}; the target has {world} GPU(s) ({target.nodes} node(s) × "
                              f"{target.gpus_per_node}), and dp_replicate_size × dp_shard_size × tensor_parallel_size "
                              "× context_parallel_size must be that count",
                              hint="change the sizes, or pass --nodes / --gpus-per-node to match them"))

    if world % (tp * cp):
        mismatch(f"tensor_parallel_size {tp} × context_parallel_size {cp} does not divide the GPUs")
        return None
    data = world // (tp * cp)
    if shard is not None and not fsdp:
        errors.append(Problem(("dp_shard_size",), f"dp_shard_size {shard} shards the model with FSDP, and this "
                              f"config trains with {strategy}", hint="add fsdp_version: 2 and an fsdp_config (or "
                              "strategy: fsdp), or remove dp_shard_size"))
        return None
    if replicate is None and shard is None:
        replicate, shard = (1, data) if fsdp else (data, 1)
    elif shard is None:
        if data % replicate:
            mismatch(f"dp_replicate_size {replicate} does not divide the {data} GPU(s) tensor and context "
                     "parallelism leave")
            return None
        shard = data // replicate
        if shard > 1 and not fsdp:
            errors.append(Problem(("dp_replicate_size",), f"dp_replicate_size {replicate} leaves groups of {shard} "
                                  f"GPUs, which FSDP would shard, and this config trains with {strategy}",
                                  hint=f"add fsdp_version: 2 and an fsdp_config, or set dp_replicate_size: {data}"))
            return None
    elif replicate is None:
        if data % shard:
            mismatch(f"dp_shard_size {shard} does not divide the {data} GPU(s) tensor and context parallelism leave")
            return None
        replicate = data // shard
    elif replicate * shard != data:
        mismatch(f"dp_replicate_size {replicate} × dp_shard_size {shard} × tensor_parallel_size {tp} × "
                 f"context_parallel_size {cp} = {replicate * shard * tp * cp} GPUs")
        return None
    mesh = MeshSizes(dp_replicate=replicate, dp_shard=shard, tensor_parallel=tp, context_parallel=cp)
    return mesh if mesh.n_dimensional else None


def _check_mesh(spec: Spec, mesh: MeshSizes, *, target: Target, plan: DistributionPlan, model: ModelInfo,
                shape: ModelShape | None, errors: list[Problem]) -> None:
    """What each dimension needs from the strategy, the hardware and the model (the config-only rules are in
    rules.py)."""
    tp_key, cp_key = ("tensor_parallel_size",), ("context_parallel_size",)
    # FSDP1 with any N-D size is refused in rules.py (at fsdp_version).
    fsdp2 = plan.strategy == "fsdp" and plan.fsdp is not None and plan.fsdp.version == 2
    if mesh.tensor_parallel > 1:
        if target.on_cpu:
            errors.append(Problem(tp_key, "tensor parallelism runs inside FSDP2, which accelerate starts on GPUs "
                                  "only; the target is the CPU", hint="pass a GPU target, or remove the line"))
        elif plan.strategy != "fsdp" and not spec.deepspeed:  # DeepSpeed with TP is refused in rules.py
            errors.append(Problem(tp_key, "tunefile runs tensor parallelism inside FSDP2 (FSDP2 shards over "
                                  "dp_shard_size × context_parallel_size, tensor parallelism splits each layer)",
                                  hint="add fsdp_version: 2 and an fsdp_config"))
        elif fsdp2 and mesh.dp_shard == 1 and mesh.context_parallel == 1:
            errors.append(Problem(tp_key, f"tensor_parallel_size {mesh.tensor_parallel} leaves FSDP2 no GPUs to "
                                  "shard across (dp_shard_size × context_parallel_size is 1); tunefile runs tensor "
                                  "parallelism inside FSDP2", hint="use more GPUs, or a smaller "
                                  "tensor_parallel_size with dp_shard_size 2 or more"))
        if shape is not None and shape.architecture not in ("unknown", ""):
            dims = {"attention heads": shape.num_heads, "key/value heads": shape.num_kv_heads,
                    "MLP width (intermediate_size)": shape.intermediate_size}
            bad = [f"{value} {name}" for name, value in dims.items() if value % mesh.tensor_parallel]
            if bad:
                errors.append(Problem(tp_key, f"tensor_parallel_size {mesh.tensor_parallel} does not divide the "
                                      f"model's {', '.join(bad)}", hint="choose a size that divides them"))
            if shape.tie_embeddings:
                errors.append(Problem(tp_key, "tensor parallelism cannot split a model whose input and output "
                                      "embeddings are tied (tie_word_embeddings), as in Axolotl",
                                      hint="remove tensor_parallel_size"))
    if fsdp2 and mesh.dp_replicate > 1 and mesh.dp_shard == 1 and (mesh.tensor_parallel > 1 or
                                                                   mesh.context_parallel > 1):
        errors.append(Problem(("dp_replicate_size",), "accelerate composes tensor and context parallelism with "
                              "FSDP2 shards (dp_shard_size), not with plain replicas (dp_replicate_size)",
                              hint="use dp_shard_size instead of dp_replicate_size"))
    if mesh.context_parallel > 1 and model.architecture in CONTEXT_PARALLEL_REFUSED:
        errors.append(Problem(cp_key, f"context parallelism: {model.architecture} "
                              f"{CONTEXT_PARALLEL_REFUSED[model.architecture]}",
                              hint="remove context_parallel_size"))


MASK_WARNING_GIB = 4.0


def _warn_if_mask_is_big(mesh: MeshSizes, batch: BatchPlan, warnings: list[Problem]) -> None:
    """Context parallelism's attention takes a dense mask: the last slice's queries against the whole row, one
    boolean each, which SDPA's kernels turn into a 16-bit additive mask (3 bytes an entry in all)."""
    if mesh.context_parallel == 1:
        return
    gib = batch.micro_batch_size * -(-batch.sequence_len // mesh.context_parallel) * batch.sequence_len * 3 / 2**30
    if gib > MASK_WARNING_GIB:
        warnings.append(Problem(("context_parallel_size",), f"context parallelism's attention mask needs ~{gib:.0f} "
                                f"GiB per GPU at sequence_len {batch.sequence_len} (tunefile gathers keys and values "
                                "and runs SDPA with a dense mask; it has no flash-attention ring kernel)",
                                hint="lower sequence_len or micro_batch_size, or raise context_parallel_size"))
