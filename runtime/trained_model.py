"""What training produced, loaded back for merging and inference: the tokenizer, the base model
unquantised, the vocabulary the run trained with, and the adapter from `output_dir` or a checkpoint.

Three layouts hold an adapter:
- a saved adapter (what training leaves in `output_dir`, or any peft folder): `adapter_config.json` and
  `adapter_model.safetensors`, whose embedding matrices are saved too when training resized the vocabulary
  (peft does that, or they were trained in full through `lora_modules_to_save`);
- a `checkpoint-<step>/` folder of a single-process or DDP run: accelerate's state, whose `model.safetensors`
  holds only the trainable tensors under their in-training names (see checkpoint.py);
- a `checkpoint-<step>/` folder of an FSDP or DeepSpeed run: the whole model in their own formats, from which
  sharded_checkpoints.py reads the adapter's tensors (and the embedding matrices when training resized them).
For both checkpoint kinds the adapter's shape comes from the run plan's ``model.lora``: it is rebuilt, then the
tensors loaded.

The base model is always loaded unquantised, even for QLoRA runs: merging needs real weights to add the
update to, and 4-bit weights cannot take it (see merge.py).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..schemas.run_plan import ModelPlan
from .checkpoint import CHECKPOINT, STATE_FILE
from .model import ModelLoadError, add_adapter, load_pretrained, match_vocabulary, require_loftq_machine
from .pretrained import build_quantization_config, dequantizing, embedding_rows
from .sharded_checkpoints import LAYOUTS_READ, CheckpointTensors, find_sharded_checkpoint

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
CHECKPOINT_WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
# The prefix peft puts before the base model's own module names.
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter's tensors are: ``layout`` is "adapter" (a peft folder), "checkpoint" (the trainable
    tensors in model.safetensors) or "sharded" (an FSDP or DeepSpeed checkpoint, read through ``tensors``)."""

    directory: Path
    layout: str
    weights: Path  # the file (or DCP folder) messages name
    tensors: CheckpointTensors | None = field(default=None, compare=False, repr=False)

    @property
    def has_tokenizer(self) -> bool:
        """Training saves its tokenizer (with the tokens it added) next to the final adapter only."""
        return any((self.directory / name).is_file() for name in TOKENIZER_FILES)


@dataclass
class TrainedModel:
    model: torch.nn.Module  # a PeftModel when an adapter was loaded, else the plain base model
    tokenizer: Any
    adapter: AdapterSource | None


def locate_adapter(directory: Path) -> AdapterSource:
    """The adapter in ``directory``: a peft folder or a complete checkpoint-<step> folder."""
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: no such directory; train first (`tunefile train CONFIG`) or point "
                             "--lora-dir at a folder holding adapter_config.json or at a checkpoint-<step> folder")
    if (directory / ADAPTER_CONFIG).is_file():
        for name in ADAPTER_WEIGHTS:
            if (directory / name).is_file():
                return AdapterSource(directory, "adapter", directory / name)
        raise ModelLoadError(f"{directory}: has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}")
    sharded = find_sharded_checkpoint(directory)
    if CHECKPOINT.match(directory.name) or (directory / STATE_FILE).is_file() or sharded is not None:
        if (directory / CHECKPOINT_WEIGHTS).is_file():
            return AdapterSource(directory, "checkpoint", directory / CHECKPOINT_WEIGHTS)
        if sharded is not None:
            return AdapterSource(directory, "sharded", sharded.path, tensors=sharded)
        names = sorted(p.name for p in directory.iterdir())
        held = ", ".join(names) if names else "nothing"
        raise ModelLoadError(f"{directory}: a checkpoint without model weights (it holds {held}); expected "
                             f"{LAYOUTS_READ}")
    if (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory}: holds a full model, not a LoRA adapter (no {ADAPTER_CONFIG})")
    raise ModelLoadError(f"{directory}: no {ADAPTER_CONFIG} here and not a checkpoint-<step> folder; "
                         "train first (`tunefile train CONFIG`) or point --lora-dir at the adapter")


def load_trained_tokenizer(model: ModelPlan, adapter: AdapterSource | None, *, offline: bool) -> Any:
    """The tokenizer training saved beside the adapter when there is one (it has the tokens training added);
    otherwise the plan's, built the way training built it. A mistral-common tokenizer cannot gain tokens, so the
    plan's is the one training used, loaded through the same backend."""
    if adapter is not None and adapter.has_tokenizer and model.tokenizer_backend == "huggingface":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(adapter.directory), local_files_only=True,
                                             trust_remote_code=model.trust_remote_code)
    from .data.tokenizer import load_tokenizer

    return load_tokenizer(model, offline=offline)[0]


def unquantised(model: ModelPlan) -> ModelPlan:
    """The run's model without quantisation: a QLoRA adapter is a LoRA adapter on the real weights, and a
    quantisation config that can dequantise (Mxfp4Config) reads the real weights too."""
    return replace(model, adapter="lora" if model.adapter is not None else None, load_in_4bit=False,
                   load_in_8bit=False, quantize_moe_experts=False,
                   quantization_config=dequantizing(model.quantization_config))


def load_base(model: ModelPlan, *, source: str, dtype: torch.dtype | str, device: torch.device,
              attn_implementation: str) -> Any:
    """The base weights in ``dtype`` ("auto": the dtype they are stored in), placed on ``device``, at the plan's
    revision and with its configuration overrides, as training read them."""
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    quant = build_quantization_config(model.quantization_config)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device.type == "cuda":
        # Load straight onto the GPU, never a CPU copy first.
        kwargs["device_map"] = {"": 0 if device.index is None else device.index}
    return load_pretrained(model, source, **kwargs)


def embedding_module_name(model: torch.nn.Module) -> str:
    embeddings = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embeddings)


def output_module_name(model: torch.nn.Module) -> str | None:
    head = model.get_output_embeddings()
    return next((name for name, module in model.named_modules() if module is head), None) if head else None


def saved_embedding_rows(adapter: AdapterSource, module_name: str) -> int | None:
    """Rows of the input embedding matrix the adapter holds (None when it holds none), read from file headers
    or checkpoint metadata without loading tensors. Keys look like base_model.model.model.embed_tokens.weight
    (saved adapter; FSDP/DeepSpeed checkpoints, which hold the whole model) or
    …embed_tokens.modules_to_save.default.weight (checkpoint; DDP adds ``module.``)."""
    prefix = PEFT_PREFIX + module_name + "."
    shapes = adapter.tensors.shapes() if adapter.tensors is not None else _tensor_shapes(adapter.weights)
    for key, shape in shapes.items():
        key = key.removeprefix("module.")
        if key.startswith(prefix) and key.endswith("weight") and "lora_" not in key:
            return int(shape[0])
    return None


def _tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    state = torch.load(str(weights), map_location="meta", weights_only=True)
    return {key: tuple(value.shape) for key, value in state.items()}


def fit_vocabulary(model: torch.nn.Module, *, tokenizer_size: int, saved_rows: int | None, shrink: bool,
                   adapter: AdapterSource | None, base_model: str, pad_to_multiple_of: int | None = None) -> None:
    """Give the base the embedding size the adapter was trained with.

    Without saved embeddings, training's own rule decides (grow to the tokenizer; shrink only with
    shrink_embeddings). With them, their row count decides, and it must cover every token of the tokenizer.
    An adapter saved with more rows than both the base and the tokenizer is Axolotl's "size mismatch when
    merging": training added tokens that this tokenizer lacks. ``pad_to_multiple_of``: training rounded the
    matrix up to it (resize_token_embeddings_to_32x), so that many rows are the tokenizer's too."""
    current = model.get_input_embeddings().num_embeddings
    if saved_rows is None:
        match_vocabulary(model, tokenizer_size, shrink=shrink, pad_to_multiple_of=pad_to_multiple_of)
        return
    where = adapter.weights if adapter is not None else base_model
    if saved_rows < tokenizer_size:
        raise ModelLoadError(
            f"{where}: size mismatch: the adapter's embeddings have {saved_rows} rows but the tokenizer has "
            f"{tokenizer_size} tokens; tokens were added to the config (special_tokens / tokens) after training. "
            "Remove them, or train again with them")
    if saved_rows > tokenizer_size and saved_rows not in (current, embedding_rows(tokenizer_size, pad_to_multiple_of)):
        raise ModelLoadError(
            f"{where}: size mismatch: the adapter was trained with a vocabulary of {saved_rows} tokens (its "
            f"embeddings have {saved_rows} rows), but the base model {base_model} has {current} and the tokenizer "
            f"{tokenizer_size}, so training added tokens this tokenizer lacks. Fix: give the config the same "
            "special_tokens and tokens as the training run, or keep the tokenizer files training saved beside "
            "the adapter (tokenizer.json, tokenizer_config.json)")
    if saved_rows != current:
        log.info("resizing token embeddings %d → %d to match the adapter", current, saved_rows)
        model.resize_token_embeddings(saved_rows, mean_resizing=False)  # the adapter brings the rows


def attach_adapter(model: torch.nn.Module, adapter: AdapterSource, plan: ModelPlan, *,
                   resized_modules: Collection[str] = ()) -> torch.nn.Module:
    """The base with the adapter's weights in place, ready to merge or generate. ``resized_modules``: base
    modules (the embeddings) whose whole weights a sharded checkpoint replaces, because training resized them."""
    from peft import PeftModel

    if plan.lora is not None and plan.lora.loftq_bits is not None:
        require_loftq_machine(plan.lora.loftq_bits)  # peft re-runs LoftQ to rebuild the base it trained against
    if adapter.layout == "adapter":
        try:
            return PeftModel.from_pretrained(model, str(adapter.directory), is_trainable=False)
        except RuntimeError as exc:  # peft's "size mismatch for …" when a shape differs
            raise ModelLoadError(f"{adapter.directory}: the adapter does not fit the base model "
                                 f"{plan.base_model}: {str(exc).strip().splitlines()[-1]}") from None
    # A checkpoint: rebuild the adapter training built (from the plan's model.lora, or the lora_model_dir it
    # continued), then load the checkpointed trainable tensors into it.
    if plan.lora is None:
        raise ModelLoadError(f"{adapter.directory}: a checkpoint of an adapter run, but the run plan has no adapter "
                             "(model.lora) to rebuild it from; use the config that trained it")
    peft_model = add_adapter(model, plan.lora)
    expected = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    if adapter.tensors is None:
        from safetensors.torch import load_file

        state = {key.removeprefix("module."): value for key, value in load_file(str(adapter.weights)).items()}
        held = set(state)
    else:  # the whole model is there; the adapter's part is what the config's adapter trains
        held = {name for name in adapter.tensors.shapes() if is_adapter_tensor(name)}
    if held != expected:
        raise ModelLoadError(f"{adapter.weights}: holds {len(held)} adapter tensors, the config's adapter has "
                             f"{len(expected)}; were lora_r, lora_target_* or lora_modules_to_save changed since "
                             "training?")
    if adapter.tensors is not None:
        state = read_sharded_adapter(peft_model, adapter.tensors, expected, resized_modules)
    try:
        peft_model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelLoadError(f"{adapter.weights}: does not fit the config's adapter: "
                             f"{str(exc).strip().splitlines()[-1]}") from None
    peft_model.eval()
    return peft_model


def is_adapter_tensor(name: str) -> bool:
    """What a LoRA run trains: lora_A/lora_B (lora_embedding_*, DoRA's lora_magnitude_vector) and the full copies
    of lora_modules_to_save; everything else in an FSDP/DeepSpeed checkpoint is the frozen base."""
    return ".lora_" in name or ".modules_to_save." in name


def read_sharded_adapter(peft_model: torch.nn.Module, tensors: CheckpointTensors, adapter_names: set[str],
                         resized_modules: Collection[str]) -> dict[str, torch.Tensor]:
    """The adapter's tensors, plus the whole weights of ``resized_modules`` (the new rows training initialised
    are in no adapter), in the dtypes of the rebuilt adapter's parameters."""
    targets = peft_model.state_dict()
    prefixes = tuple(PEFT_PREFIX + module + "." for module in resized_modules)
    held = tensors.shapes()
    embeddings = {name for name in targets if prefixes and name.startswith(prefixes) and name in held
                  and not is_adapter_tensor(name)}
    state = tensors.read(sorted(adapter_names | embeddings))
    log.info("read %d adapter tensors%s from %s (%s)", len(adapter_names),
             f" and {len(embeddings)} resized embedding matrices" if embeddings else "", tensors.path, tensors.kind)
    return {name: value.to(targets[name].dtype) for name, value in state.items()}


def load_trained_model(model: ModelPlan, adapter: AdapterSource | None, *, offline: bool, device: torch.device,
                       dtype: torch.dtype | str, attn_implementation: str,
                       base_source: str | None = None) -> TrainedModel:
    """Tokenizer, base (unquantised, ``dtype``, on ``device``) resized to the trained vocabulary, and the
    adapter on it. ``base_source`` replaces model.base_model (a full fine-tune's output_dir); ``offline`` is the
    plan's (the tokenizer's hub lookups)."""
    plan = unquantised(model)
    tokenizer = load_trained_tokenizer(plan, adapter, offline=offline)
    source = plan.base_model if base_source is None else base_source
    module = load_base(plan, source=source, dtype=dtype, device=device, attn_implementation=attn_implementation)
    saved_rows = saved_embedding_rows(adapter, embedding_module_name(module)) if adapter else None
    base_rows = module.get_input_embeddings().num_embeddings
    fit_vocabulary(module, tokenizer_size=len(tokenizer), saved_rows=saved_rows, shrink=plan.shrink_embeddings,
                   adapter=adapter, base_model=plan.base_model, pad_to_multiple_of=plan.pad_embeddings_to_multiple_of)
    rows = module.get_input_embeddings().num_embeddings
    if adapter is not None and adapter.layout != "adapter" and saved_rows is None and rows > base_rows:
        log.warning("%s holds only trainable tensors, not the embeddings of the tokens training added: they are "
                    "re-initialised here, so text with those tokens differs from training. Use the final adapter "
                    "in output_dir, or train with lora_modules_to_save: [embed_tokens, lm_head]", adapter.directory)
    module.config.use_cache = True  # generation wants the KV cache that training switched off
    if adapter is not None:
        # FSDP and DeepSpeed checkpoints hold the whole model: when training resized the vocabulary, the
        # embedding matrices come from there, with the new rows as training initialised them.
        resized = (embedding_module_name(module), output_module_name(module)) \
            if adapter.tensors is not None and saved_rows is not None and rows != base_rows else ()
        module = attach_adapter(module, adapter, plan, resized_modules=[name for name in resized if name])
    module.eval()
    return TrainedModel(model=module, tokenizer=tokenizer, adapter=adapter)
