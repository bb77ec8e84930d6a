"""Cross-field rules that need only the config (rules that need the hardware live in resolve/).

Each rule adds Problems to one of two lists, so that every broken rule is reported in one round.
Decisions recorded here (documented in the README):
- ``adapter: qlora`` implies 4-bit loading; ``load_in_4bit: false`` or ``load_in_8bit: true`` with it is an error.
- ``adapter: lora`` with ``load_in_4bit: true`` is QLoRA by another name: accepted with a warning.
- 4/8-bit loading without an adapter is an error: quantised weights cannot be trained in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .bundle import NAME_MAX, PATH_MAX
from .errors import Problem
from .models import parse_parameter_count
from .shell import breaks_line
from .spec import (
    BITSANDBYTES_OPTIMIZERS,
    CCE_PLUGIN,
    LIGER_PLUGIN,
    TORCHAO_OPTIMIZERS,
    Spec,
    optimizer_arguments,
)

_CHAT_ONLY_KEYS = ("field_messages", "message_property_mappings", "roles_to_train", "train_on_eos",
                   "chat_template", "field_thinking", "template_thinking_key", "drop_system_message")
_LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_linear", "lora_target_modules",
              "lora_modules_to_save", "lora_model_dir", "lora_target_parameters", "lora_fan_in_fan_out",
              "peft_use_rslora")


_LIGER_MODULE_KERNELS = ("liger_rms_norm", "liger_glu_activation", "liger_layer_norm", "liger_rope",
                         "liger_rms_norm_gated")
_FUSED_LOSSES = ("liger_fused_linear_cross_entropy", "cut_cross_entropy")


def _kernel_in_use(spec: Spec, key: str) -> tuple[str | int, ...] | None:
    """Where a kernel switch that takes effect is set (its key, or the plugin line that turns cut-cross-entropy on
    by default); None when it does not take effect (Axolotl's kernels need their plugin)."""
    plugins = list(spec.plugins or ())
    plugin = CCE_PLUGIN if key == "cut_cross_entropy" else LIGER_PLUGIN
    if not getattr(spec, key) or plugin not in plugins:
        return None
    return (key,) if key in spec.model_fields_set else ("plugins", plugins.index(plugin))


def _check_parallelism(spec: Spec, error: Callable[..., None], warn: Callable[..., None]) -> None:
    """Tensor and context parallelism with what tunefile can carry out beside them (the sizes against the GPU
    count, FSDP2 and the model's shape are checked in resolve/distribution.py)."""
    tp = (spec.tensor_parallel_size or 1) > 1
    cp = (spec.context_parallel_size or 1) > 1
    kernels = {key: _kernel_in_use(spec, key) for key in (*_LIGER_MODULE_KERNELS, *_FUSED_LOSSES)}
    if tp:
        if spec.adapter is not None or spec.load_in_4bit or spec.load_in_8bit:
            error("tensor_parallel_size", "tensor parallelism splits full 16/32-bit weights; tunefile does not "
                  "split LoRA/QLoRA adapters or quantised layers with it",
                  hint="for an adapter use FSDP2 (fsdp_version: 2, fsdp_config, dp_shard_size) without "
                  "tensor_parallel_size, or fine-tune fully")
        if spec.deepspeed:
            error("tensor_parallel_size", "tensor parallelism with DeepSpeed is DeepSpeed's AutoTP, which tunefile "
                  "does not run; tunefile's tensor parallelism runs inside FSDP2",
                  hint="replace `deepspeed:` with fsdp_version: 2 and an fsdp_config")
        for key in _LIGER_MODULE_KERNELS + ("liger_fused_linear_cross_entropy",):
            if kernels[key]:
                error(kernels[key], "Liger's kernels read whole weights; tensor parallelism leaves each GPU a slice "
                      "(Axolotl refuses liger_rms_norm and Liger's fused loss with it too)", hint=f"remove `{key}`")
        for key in ("qat", "fp8"):
            if getattr(spec, key):
                error(key, f"{key} swaps the linear layers for torchao's, which tensor parallelism does not split",
                      hint="remove tensor_parallel_size, or the line")
        if spec.tiled_mlp:
            error("tiled_mlp", "tiled MLP runs the MLP over slices of the sequence on whole weights; tunefile does "
                  "not combine it with tensor parallelism", hint="remove tensor_parallel_size, or tiled_mlp")
        if spec.optimizer in BITSANDBYTES_OPTIMIZERS:
            error("optimizer", f"{spec.optimizer} (bitsandbytes) cannot update tensor-parallel weights, as in "
                  "Axolotl", hint="use adamw_torch or adamw_torch_fused")
        if spec.fsdp_config is not None and spec.fsdp_config.cpu_ram_efficient_loading:
            error(("fsdp_config", "cpu_ram_efficient_loading"), "with tensor parallelism every GPU loads the "
                  "weights and keeps its slice; loading them on one GPU and scattering is not carried out",
                  hint="set cpu_ram_efficient_loading: false")
        if kernels["cut_cross_entropy"]:
            warn(kernels["cut_cross_entropy"], "cut-cross-entropy has no effect with tensor parallelism: the output "
                 "head is split, so the plain loss runs (the same loss, with the whole logits)")
    if cp:
        if spec.attn_implementation == "eager":
            error("context_parallel_size", "context parallelism runs its own attention: SDPA over the keys and "
                  "values gathered from the group, not eager attention",
                  hint="set attn_implementation: sdpa (or flash_attention_2, as Axolotl asks for)")
        for key in _FUSED_LOSSES:
            if kernels[key] and not tp:  # with tensor parallelism: refused, or warned about above
                warn(kernels[key], f"{key} has no effect with context parallelism: each GPU's loss is its slice's "
                     "against labels shifted before the split, and the plain loss runs (the same loss)")
    if (tp or cp or ((spec.dp_replicate_size or 1) > 1 and (spec.dp_shard_size or 1) > 1)) \
            and spec.fsdp_config is not None and spec.fsdp_version != 2:
        error("fsdp_version" if spec.fsdp_version is not None else "fsdp_config", "N-D parallelism (HSDP, tensor or "
              "context parallelism) runs on FSDP2; an fsdp_config without fsdp_version: 2 is FSDP1",
              hint="set `fsdp_version: 2`")


def _check_training_methods(spec: Spec, error: Callable[..., None], warn: Callable[..., None]) -> None:
    """LISA, ReLoRA and LoftQ, each with the conditions Axolotl puts on it."""
    if (spec.lisa_n_layers is None) != (spec.lisa_step_interval is None):
        present, missing = (("lisa_n_layers", "lisa_step_interval") if spec.lisa_step_interval is None
                            else ("lisa_step_interval", "lisa_n_layers"))
        error(present, f"LISA needs both lisa_n_layers and lisa_step_interval; {missing} is missing (Axolotl would "
              "silently train every layer)", hint=f"add `{missing}: N`")
    if spec.lisa_n_layers is not None and (spec.fsdp_config is not None or spec.deepspeed):
        error("lisa_n_layers", "LISA switches requires_grad on whole layers, which FSDP's and DeepSpeed's flattened "
              "or sharded parameters do not allow", hint="use DDP (leave out fsdp_config and deepspeed)")
    if spec.lisa_n_layers is not None and spec.adapter is not None:
        error("lisa_n_layers", "LISA trains whole decoder layers: it is a full fine-tuning method",
              hint="remove `adapter:`, or the lisa_* lines")
    if spec.relora:
        if spec.adapter is None:
            error("relora", "ReLoRA restarts a LoRA adapter: it needs adapter: lora or qlora",
                  hint="add `adapter: lora`")
        if spec.jagged_restart_steps is None:
            error("relora", "ReLoRA needs jagged_restart_steps, as in Axolotl", hint="add `jagged_restart_steps: N`")
        if spec.fsdp_config is not None or spec.deepspeed:
            error("relora", "ReLoRA merges into whole weights: it cannot run under FSDP or DeepSpeed, as in Axolotl",
                  hint="use DDP (leave out fsdp_config and deepspeed)")
        if spec.lora_model_dir:
            error("lora_model_dir", "ReLoRA merges and restarts the adapter; it cannot continue an existing one",
                  hint="remove lora_model_dir, or relora")
    elif spec.jagged_restart_steps is not None:
        error("jagged_restart_steps", "tunefile applies jagged learning-rate restarts with ReLoRA only",
              hint="add `relora: true` and an adapter, or remove the jagged_restart_* lines")
    if spec.lr_quadratic_warmup:
        if spec.lr_scheduler != "cosine":
            warn("lr_quadratic_warmup", f"no effect with lr_scheduler: {spec.lr_scheduler}: Axolotl warms up "
                 "quadratically only with cosine; the warm-up stays linear", hint="use lr_scheduler: cosine")
        elif spec.cosine_min_lr_ratio or spec.eta_min:
            warn("lr_quadratic_warmup", "Axolotl's cosine with quadratic warm-up decays to 0: cosine_min_lr_ratio "
                 "(eta_min) is dropped, as Axolotl does", hint="remove one of the two")
    if spec.fp8_enable_fsdp_float8_all_gather and not spec.fp8:
        error("fp8_enable_fsdp_float8_all_gather", "float8 all-gather needs fp8: true", hint="add `fp8: true`")
    recipe = spec.fp8_config.recipe if spec.fp8_config else "tensorwise"
    if spec.fp8_enable_fsdp_float8_all_gather and recipe != "tensorwise":
        error("fp8_enable_fsdp_float8_all_gather", f"float8 all-gather works with the tensorwise recipe only, not "
              f"{recipe}, as Axolotl says", hint="use fp8_config: {recipe: tensorwise}, or remove the line")
    if spec.fp8 and spec.fsdp_config is not None and spec.fsdp_config.cpu_ram_efficient_loading:
        error(("fsdp_config", "cpu_ram_efficient_loading"), "accelerate cannot convert a model to float8 that "
              "rank 0 alone loaded (cpu_ram_efficient_loading) for FSDP", hint="set it to false, or remove fp8")
    if spec.fp8 and (spec.fp16 or spec.float16 or spec.bf16 is False):
        warn("fp8", "FP8 training runs everything outside the float8 layers in bf16, whatever fp16/bf16 say",
             hint="set bf16: true to say so")
    if spec.fp8 and (spec.load_in_4bit or spec.load_in_8bit or spec.adapter == "qlora"):
        error("fp8", "FP8 training computes the linear layers in float8: it cannot run on a 4/8-bit base",
              hint="use a 16-bit base (adapter: lora or full fine-tuning)")
    if spec.ple_cpu_offload:
        if spec.fsdp_config is not None or spec.deepspeed:
            error("ple_cpu_offload", "ple_cpu_offload places parameters itself; FSDP and DeepSpeed would shard them, "
                  "as Axolotl says", hint="train on one GPU")
        if not ((spec.adapter == "qlora") or (spec.adapter == "lora" and (spec.load_in_8bit or spec.load_in_4bit))):
            error("ple_cpu_offload", "ple_cpu_offload needs a quantised base under an adapter (qlora, or lora with "
                  "load_in_8bit), as in Axolotl", hint="add `adapter: qlora`")
    if spec.llama4_linearized_experts and spec.adapter and spec.lora_target_linear:
        error("lora_target_linear", "with Llama 4, every linear layer includes the MoE router, an nn.Linear that "
              "returns a pair, which a LoRA layer cannot wrap (Axolotl's Llama 4 examples name their targets)",
              hint="name lora_target_modules, e.g. self_attn.q_proj, shared_expert.gate_proj and, for the experts, "
              "the regular expression .*experts\\.(gate|up|down)_projs\\.[0-9]+")
    if spec.float16 and spec.adapter is None and spec.optimizer in ("adamw_torch", "adamw_torch_fused", "muon"):
        warn("float16", f"{spec.optimizer} on float16 weights: AdamW's epsilon (1e-8) rounds to 0 in float16, so "
             "a parameter with a zero gradient turns NaN and the watchdog stops the run",
             hint="use bfloat16: true, fp16: true (mixed precision), or optimizer: adamw_bnb_8bit as Axolotl's "
             "float16 examples do")
    fsdp1 = spec.fsdp_config is not None and (spec.fsdp_version or 1) == 1
    if spec.optimizer == "muon" and (spec.deepspeed or fsdp1):
        error("optimizer", "muon orthogonalises whole weight matrices; " + ("DeepSpeed" if spec.deepspeed else "FSDP1")
              + " hands the optimizer flattened 1-D shards, as Axolotl says", hint="use fsdp_version: 2, or DDP")
    if spec.peft and spec.peft.loftq_config:
        if spec.adapter != "lora" or spec.load_in_4bit or spec.load_in_8bit:
            error(("peft", "loftq_config"), "LoftQ initialises a LoRA adapter on the unquantised base: it needs "
                  "adapter: lora without load_in_4bit/8bit, as in Axolotl", hint="use adapter: lora")


def check_rules(spec: Spec) -> tuple[list[Problem], list[Problem]]:
    errors: list[Problem] = []
    warnings: list[Problem] = []
    was_set = spec.model_fields_set

    def error(key: str | tuple, message: str, hint: str | None = None) -> None:
        errors.append(Problem(key if isinstance(key, tuple) else (key,), message, hint=hint))

    def warn(key: str | tuple, message: str, hint: str | None = None) -> None:
        warnings.append(Problem(key if isinstance(key, tuple) else (key,), message, hint=hint))

    # --- distribution ---
    if spec.deepspeed and spec.fsdp_config is not None:
        error("deepspeed", "deepspeed and fsdp_config cannot both be set: they are two ways to shard the model",
              hint="keep one: remove the `deepspeed:` line or the `fsdp_config:` block")
    if spec.strategy == "deepspeed" and not spec.deepspeed:
        error("strategy", "strategy: deepspeed needs a `deepspeed:` setting",
              hint="add `deepspeed: zero2` (or zero1, zero3, zero2_offload, zero3_offload, a JSON file)")
    if spec.strategy in ("ddp", "fsdp") and spec.deepspeed:
        error("strategy", f"strategy: {spec.strategy} contradicts `deepspeed:`",
              hint="remove one of the two lines")
    if spec.strategy == "ddp" and spec.fsdp_config is not None:
        error("strategy", "strategy: ddp contradicts `fsdp_config:`", hint="remove one of the two")

    # --- adapter and quantisation ---
    if spec.adapter == "qlora":
        if "load_in_4bit" in was_set and not spec.load_in_4bit:
            error("load_in_4bit", "adapter: qlora trains LoRA on a 4-bit base; load_in_4bit: false contradicts it",
                  hint="remove `load_in_4bit: false` (qlora implies 4-bit), or use adapter: lora")
        if spec.load_in_8bit:
            error("load_in_8bit", "adapter: qlora loads the base in 4-bit, not 8-bit",
                  hint="remove `load_in_8bit`, or use adapter: lora with load_in_8bit")
    if spec.load_in_4bit and spec.load_in_8bit:
        error("load_in_8bit", "load_in_4bit and load_in_8bit cannot both be true")
    if spec.adapter is None:
        for key in ("load_in_4bit", "load_in_8bit"):
            if getattr(spec, key):
                error(key, f"{key} without an adapter: quantised weights cannot be trained directly",
                      hint="add `adapter: qlora` (4-bit) or `adapter: lora` (8-bit), or remove the line")
        for key in _LORA_KEYS:
            if key in was_set:
                if key == "lora_model_dir":
                    error(key, "lora_model_dir needs `adapter: lora` or `adapter: qlora`")
                else:
                    warn(key, "ignored: no adapter is set, so this is a full fine-tune",
                         hint="add `adapter: lora` to train an adapter")
    elif spec.adapter == "lora" and spec.load_in_4bit:
        warn("load_in_4bit", "adapter: lora on a 4-bit base is QLoRA; it is compiled as adapter: qlora",
             hint="write `adapter: qlora` to say so")

    # --- kernels and memory (Axolotl's own rules) ---
    if spec.activation_offloading and not spec.gradient_checkpointing:
        error("activation_offloading", "activation_offloading needs gradient_checkpointing, as in Axolotl",
              hint="add `gradient_checkpointing: true`")
    if spec.gradient_checkpointing_every_n_layers > 1 and not spec.gradient_checkpointing:
        warn("gradient_checkpointing_every_n_layers", "no effect without gradient_checkpointing",
             hint="add `gradient_checkpointing: true`, or remove the line")
    if spec.unfrozen_parameters and spec.fsdp_config is not None and any(
            pattern.rstrip().endswith("]") and "[" in pattern for pattern in spec.unfrozen_parameters):
        error("unfrozen_parameters", "row ranges (name[start:end]) cannot be trained under FSDP: FSDP replaces "
              "the parameters, and the gradient hooks that keep the other rows frozen with them",
              hint="unfreeze whole parameters, or train without fsdp_config")
    if spec.unfrozen_parameters and spec.adapter is not None:
        warn("unfrozen_parameters", "no effect with an adapter: PEFT trains only the adapter (and "
             "lora_modules_to_save)", hint="use lora_modules_to_save to train whole modules beside the adapter")
    if spec.reinit_weights and (spec.load_in_4bit or spec.load_in_8bit or spec.adapter == "qlora"
                                or spec.model_quantization_config):
        error("reinit_weights", "fresh random weights cannot be loaded quantised", hint="train them in 16-bit")
    if spec.quantize_moe_experts and not (spec.adapter and (spec.load_in_4bit or spec.load_in_8bit
                                                            or spec.adapter == "qlora")):
        error("quantize_moe_experts", "quantize_moe_experts needs an adapter on a 4-bit or 8-bit base, as in "
              "Axolotl", hint="add `adapter: qlora`, or remove the line")
    if spec.fsdp_config and spec.fsdp_config.activation_checkpointing and spec.gradient_checkpointing:
        warn(("fsdp_config", "activation_checkpointing"), "gradient_checkpointing is turned off: FSDP's own "
             "activation checkpointing does the same job, and both would recompute twice",
             hint="keep one of the two")

    _check_training_methods(spec, error, warn)
    _check_parallelism(spec, error, warn)

    if spec.optim_args:
        unknown = sorted(set(optimizer_arguments(spec)) - {"bf16_stochastic_round"})
        if unknown or spec.optimizer not in TORCHAO_OPTIMIZERS:
            error("optim_args", "tunefile passes only bf16_stochastic_round, and only to adamw_torch_8bit and "
                  "adamw_torch_4bit" + (f" (got {', '.join(unknown)})" if unknown else ""),
                  hint="remove the other arguments, or the line")

    # --- quantisation-aware training (the pairs torchao fake-quantises; runtime/qat.py) ---
    if spec.qat is not None:
        _check_qat(spec, error)

    # --- schedule and cadence ---
    if spec.warmup_steps is not None and spec.warmup_ratio is not None:
        error("warmup_ratio", "warmup_steps and warmup_ratio cannot both be set", hint="keep one of them")
    if spec.save_steps is not None and spec.saves_per_epoch is not None:
        error("saves_per_epoch", "save_steps and saves_per_epoch cannot both be set", hint="keep one of them")
    if spec.eval_steps is not None and spec.evals_per_epoch is not None:
        error("evals_per_epoch", "eval_steps and evals_per_epoch cannot both be set", hint="keep one of them")
    if spec.val_set_size == 0:
        for key in ("eval_steps", "evals_per_epoch"):
            if getattr(spec, key) is not None:
                warn(key, "no evaluation will run: val_set_size is 0", hint="set val_set_size, e.g. 0.05")

    # --- precision and attention ---
    if spec.bf16 is True and spec.fp16:
        error("fp16", "bf16 and fp16 cannot both be true", hint="keep one (bf16 where the GPU supports it)")
    if (spec.bfloat16 or spec.float16) and spec.deepspeed:
        warn("bfloat16" if spec.bfloat16 else "float16", "DeepSpeed keeps fp32 master weights in its optimizer "
             "whatever the weights load as; only the dtype the model loads in changes",
             hint="use bf16: true (mixed precision) to say the same thing")
    if spec.bfloat16 and spec.float16:
        error("float16", "bfloat16 and float16 cannot both be true", hint="keep one")
    if spec.bfloat16 and spec.fp16:
        error("bfloat16", "bfloat16 weights contradict fp16: true", hint="keep one of the two")
    if spec.float16 and spec.bf16 is True:
        error("float16", "float16 weights contradict bf16: true", hint="keep one of the two")
    if spec.sample_packing and spec.attn_implementation == "eager":
        error("sample_packing", "sample_packing needs attention that isolates packed samples; eager attention "
              "does not take tunefile's varlen or block-mask paths",
              hint="use attn_implementation: flash_attention_2 or sdpa (the default)")

    # --- data ---
    if spec.streaming and not spec.pretraining_dataset:
        if spec.max_steps is None:
            error("streaming", "streamed datasets need max_steps, as in Axolotl: the row count is unknown until "
                  "the data has been read", hint="add `max_steps: N`")
        for key in ("val_set_size", "eval_steps", "evals_per_epoch"):
            if getattr(spec, key):
                warn(key, "ignored: streamed datasets have no held-out split to evaluate on")
        if spec.dataset_exact_deduplication:
            error("dataset_exact_deduplication", "streamed rows cannot be deduplicated: tunefile never holds "
                  "them all", hint="deduplicate the files beforehand, or stream without it")
    if spec.group_by_length and spec.sample_packing:
        warn("group_by_length", "no effect with sample_packing: packed rows are all sequence_len long, as in "
             "Axolotl", hint="remove the line, or turn sample_packing off")
    if spec.pretraining_dataset:
        if spec.datasets:
            error("pretraining_dataset", "pretraining_dataset and datasets cannot both be set",
                  hint="keep one: tunefile streams pretraining_dataset, or prepares datasets")
        if spec.max_steps is None:
            error("pretraining_dataset", "a streamed pretraining_dataset needs max_steps, as in Axolotl",
                  hint="add `max_steps: N`")
        for key in ("val_set_size", "eval_steps", "evals_per_epoch"):
            if getattr(spec, key):
                warn(key, "ignored: a streamed pretraining_dataset has no held-out split to evaluate on")
        if spec.saves_per_epoch is not None:
            warn("saves_per_epoch", "a streamed pretraining_dataset has no epochs: the whole run counts as one",
                 hint="use save_steps")
    if spec.chat_template_jinja and spec.chat_template not in (None, "jinja"):
        error("chat_template_jinja", "chat_template and chat_template_jinja are both set",
              hint="remove `chat_template:` or set it to jinja")
    for index, dataset in enumerate(spec.datasets):
        for key in dataset.model_fields_set:
            if key in _CHAT_ONLY_KEYS and dataset.type != "chat_template":
                error(("datasets", index, key), f"{key} applies only to type: chat_template datasets "
                      f"(this one is {dataset.type})", hint=f"remove `{key}` or change the type")
            if key == "field" and dataset.type != "completion":
                error(("datasets", index, key), f"field applies only to type: completion datasets "
                      f"(this one is {dataset.type})", hint="chat_template datasets use field_messages")
    reserved = sorted(set(spec.chat_template_kwargs or ()) & {"conversation", "messages", "chat_template", "tokenize",
                                                              "add_generation_prompt", "continue_final_message"})
    if reserved:
        error("chat_template_kwargs", f"{', '.join(reserved)}: set by tunefile when it renders a conversation",
              hint="remove these keys")
    if spec.train_on_inputs and not any(d.type == "alpaca" for d in spec.datasets):
        warn("train_on_inputs", "applies to alpaca datasets only; none is listed")

    # --- paths: refused here, before anything looks at the disk (a too-long name makes stat() raise) ---
    for path, text in _path_values(spec):
        problem = _path_length_problem(text)
        if problem:
            error(path, problem)

    # --- text that reaches scripts and comments ---
    for path, text in _strings(spec.model_dump(exclude={"chat_template_jinja"})):
        if breaks_line(text):
            error(path, "must be a single line (it is written into the bundle's scripts and comments)")

    # --- hints ---
    if spec.model_parameters is not None and parse_parameter_count(spec.model_parameters) is None:
        shown = repr(spec.model_parameters)
        shown = shown if len(shown) <= 40 else f"{shown[:37]}..."  # a 400-digit number stays one readable line
        error("model_parameters", f"cannot read a parameter count from {shown}",
              hint="write a number from 1 up to 1000T, or one with a suffix: 8B, 350M")
    return errors, warnings


# (weight, activation) → the group size it needs (None: any that divides the layers' widths; 0: ignored).
QAT_PAIRS: dict[tuple[str, str | None], int | None] = {
    ("int4", None): None, ("int4", "int8"): None, ("int8", None): None, ("int8", "int8"): None,
    ("int4", "float8_e4m3fn"): 128, ("float8_e4m3fn", "float8_e4m3fn"): 0, ("nvfp4", "nvfp4"): 16,
    ("mxfp4", "mxfp4"): 32, ("ternary", None): None, ("ternary", "int8"): None,
}


def _check_qat(spec: Spec, error: Callable[..., None]) -> None:
    qat = spec.qat
    assert qat is not None
    pair = (qat.weight_dtype, qat.activation_dtype)
    if pair not in QAT_PAIRS:
        known = ", ".join(f"{w}/{a or 'none'}" for w, a in QAT_PAIRS)
        error(("qat",), f"torchao cannot fake-quantise weights {qat.weight_dtype} with activations "
              f"{qat.activation_dtype or 'unquantised'}", hint=f"weight/activation pairs: {known}")
        return
    size = QAT_PAIRS[pair]
    if size and qat.group_size != size:
        error(("qat", "group_size"), f"{qat.weight_dtype}/{qat.activation_dtype} needs group_size: {size}")
    if qat.quantize_embedding and qat.weight_dtype not in ("int4", "int8", "ternary"):
        error(("qat", "quantize_embedding"), "only int4, int8 and ternary weights can quantise the embedding")
    if qat.fake_quant_after_n_steps and qat.weight_dtype in ("nvfp4", "mxfp4"):
        error(("qat", "fake_quant_after_n_steps"), f"torchao's {qat.weight_dtype} layers cannot be switched off "
              "for the first steps", hint="remove fake_quant_after_n_steps")
    if spec.adapter == "qlora" or spec.load_in_4bit or spec.load_in_8bit:
        error(("qat",), "quantisation-aware training needs 16-bit base weights, not a 4/8-bit base",
              hint="use adapter: lora without load_in_4bit/8bit, or full fine-tuning")


_PATH_KEYS = ("base_model", "tokenizer_config", "lora_model_dir", "dataset_prepared_path", "deepspeed", "target",
              "output_dir", "resume_from_checkpoint")


def _path_values(spec: Spec) -> list[tuple[tuple, str]]:
    """(key path, value) of every key that names a file or folder (a Hub id fits the same limits)."""
    found = [((key,), getattr(spec, key)) for key in _PATH_KEYS if isinstance(getattr(spec, key), str)]
    for list_key in ("datasets", "pretraining_dataset"):
        for index, dataset in enumerate(getattr(spec, list_key) or ()):
            found.append(((list_key, index, "path"), dataset.path))
            found += [((list_key, index, "data_files", number), name)
                      for number, name in enumerate(dataset.data_files or ())]
    return found


def _path_length_problem(text: str) -> str | None:
    """The usual file-system limits (those bundle.py falls back on where pathconf says nothing): this runs before
    anything looks at the disk, and the path may name a folder that does not exist yet."""
    longest_path = PATH_MAX - 1  # PATH_MAX counts the final NUL
    size = len(os.fsencode(text))
    if size > longest_path:
        return f"the path is {size:,} bytes long; a path holds at most {longest_path:,}"
    for name in text.split("/"):
        size = len(os.fsencode(name))
        if size > NAME_MAX:
            return (f"a name in the path ({name[:20]}...) is {size:,} bytes long; file systems allow at most "
                    f"{NAME_MAX} per name")
    return None


def _strings(value: object, path: tuple = ()) -> list[tuple[tuple, str]]:
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _strings(item, (*path, key))]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in _strings(item, (*path, index))]
    return []
