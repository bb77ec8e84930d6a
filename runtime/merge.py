"""`merge-lora CONFIG [--lora-dir DIR] [--output DIR] [--cpu]`: fold the adapter into the base weights and
save a plain Hugging Face model (safetensors shards, tokenizer, chat template) that any runtime can load
without peft: vLLM, TGI, llama.cpp's converter, transformers.

How the merge stays exact:
- the base is loaded unquantised in the dtype its checkpoint is stored in, even for QLoRA: a 4-bit weight
  cannot absorb an update, so the adapter goes into the real weights (peft computes the update B·A·alpha/r in
  fp32 and adds it once), and the merged model has the base's dtype and size;
- the vocabulary is the one training used (trained_model.fit_vocabulary): embeddings the adapter saved
  (resized vocabulary, or lora_modules_to_save) replace the base's; `shrink_embeddings: true` then trims
  the matrices to the tokenizer's length (base checkpoints often pad them to a multiple of 64 or 128);
- the result is written into a temporary folder and renamed into place, so a failed merge leaves no model.

Problems the user fixes (no adapter in the plan, a wrong --lora-dir or --output, a full disk, a GPU too small)
are raised as ModelLoadError, a RuntimeUserError: the entry point prints it as one line and exits 2.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ..schemas.run_plan import DataPlan, ModelPlan
from .config import load_run_plan
from .model import ModelLoadError
from .pretrained import embedding_rows

log = logging.getLogger(__name__)

# Shards of at most this size: what the Hub's own checkpoints use, small enough for any loader to map
# one at a time (an 8B bf16 model becomes 4 files), large enough that a tiny model stays one file.
MAX_SHARD_SIZE = "5GB"
MERGED_DIR = "merged"
# Merging runs no forward pass, so the attention kernel only has to load: PyTorch's SDPA loads everywhere
# (the plan's flash-attn would not load on a CPU, where merges also run).
MERGE_ATTENTION = "sdpa"


def run_merge(config_path: str | Path, *, lora_dir: str | None = None, output: str | None = None,
              cpu: bool = False) -> int:
    """Merge, save, print what was written; 0. A problem the user fixes raises a RuntimeUserError."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    plan = load_run_plan(config_path)
    output_dir = Path(plan.checkpointing.output_dir).expanduser()
    if plan.model.adapter is None:
        raise ModelLoadError(f"the config has no `adapter:`: it trains the full model, so {output_dir} already "
                             "holds a full model; there is no adapter to merge")
    if plan.model.relora is not None and lora_dir is None:
        raise ModelLoadError(f"ReLoRA merges its adapter into the base at every restart and at the end, so "
                             f"{output_dir} already holds the merged model; there is no adapter to merge")
    source = Path(lora_dir) if lora_dir is not None else output_dir
    target = Path(output) if output is not None else output_dir / MERGED_DIR
    check_output_dir(target, source)
    device = merge_device(cpu)
    try:
        merged, tokenizer = merge_adapter(plan.model, source, offline=plan.offline, device=device)
        write_merged(merged, tokenizer, target, chat_template=training_chat_template(plan.data, tokenizer))
    except torch.cuda.OutOfMemoryError:
        raise ModelLoadError("the GPU ran out of memory while merging; rerun with --cpu (needs host memory for the "
                             "base model in its stored dtype)") from None
    shards = len(list(target.glob("*.safetensors")))
    print(f"Merged the adapter in {source} into {plan.model.base_model} on {device.type} → {target}/ ({shards} "
          f"safetensors shard{'s' if shards != 1 else ''}, vocabulary {merged.get_input_embeddings().num_embeddings}, "
          f"{str(merged.dtype).removeprefix('torch.')})")
    return 0


def merge_device(cpu: bool) -> torch.device:
    """The GPU when there is one (merging an 8B model on the CPU takes minutes), unless --cpu."""
    return torch.device("cuda", 0) if torch.cuda.is_available() and not cpu else torch.device("cpu")


def merge_adapter(model: ModelPlan, source: Path, *, offline: bool, device: torch.device) -> tuple[Any, Any]:
    """(the merged plain transformers model, its tokenizer)."""
    from .trained_model import load_trained_model, locate_adapter

    trained = load_trained_model(model, locate_adapter(source), offline=offline, device=device, dtype="auto",
                                 attn_implementation=MERGE_ATTENTION)
    merged = trained.model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaNs instead of saving them
    if model.shrink_embeddings:  # down to the tokenizer, or to the multiple training rounded its matrix up to
        shrink_to_tokenizer(merged, embedding_rows(len(trained.tokenizer), model.pad_embeddings_to_multiple_of))
    return merged, trained.tokenizer


def shrink_to_tokenizer(model: Any, vocab_size: int) -> None:
    """Drop embedding (and output head) rows past the tokenizer's last token: no text can produce them."""
    rows = model.get_input_embeddings().num_embeddings
    if rows > vocab_size:
        log.info("shrink_embeddings: %d → %d rows", rows, vocab_size)
        model.resize_token_embeddings(vocab_size)


def training_chat_template(data: DataPlan, tokenizer: Any) -> str | None:
    """The template the first chat_template dataset trained with, so the merged model's tokenizer formats
    conversations the way the model learnt them (a named template such as chatml is not in the base's)."""
    from .data.chat import dataset_chat_template

    for entry in data.datasets:
        if entry.type == "chat_template":
            return dataset_chat_template(entry, data, tokenizer)
    return None


def is_write_failure(exc: BaseException) -> bool:
    """OSError from Python's own writes; safetensors reports its I/O errors (a full disk) as SafetensorError,
    which is no OSError, with "I/O error" in the message."""
    return isinstance(exc, OSError) or "I/O error" in str(exc)


def model_size(model: Any) -> str:
    """What the weights take on disk, in GiB (MiB below one)."""
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def check_output_dir(target: Path, source: Path) -> None:
    """Refuse to write over the adapter or anything that is not an earlier merged model."""
    if target.resolve() == source.resolve():
        raise ModelLoadError(f"--output {target}: is the adapter folder itself; choose another folder")
    if target.is_dir() and any(target.iterdir()):
        names = {path.name for path in target.iterdir()}
        if "config.json" not in names or "adapter_config.json" in names or any(n.startswith("checkpoint-")
                                                                                for n in names):
            raise ModelLoadError(f"--output {target}: exists and is not a merged model; choose an empty or new "
                                 "folder")


def write_merged(model: Any, tokenizer: Any, target: Path, *, chat_template: str | None) -> None:
    """Save into a temporary sibling folder, then replace ``target`` with it. A write that fails (a full
    disk: an 8B model is 16 GB more) removes the partial folder and says how much was needed."""
    staging = target.parent / f".{target.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # left by a merge that was killed
    try:
        staging.mkdir(parents=True)
        model.config.use_cache = True
        model.save_pretrained(str(staging), max_shard_size=MAX_SHARD_SIZE)
        if chat_template:
            tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(str(staging))
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot write the merged model to {target}: {reason}; it needs about "
                             f"{model_size(model)} free there (--output picks another place)") from None
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
