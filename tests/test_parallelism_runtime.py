"""The runtime's half of N-D parallelism (runtime/parallelism.py, context_parallel.py, tensor_parallel.py).

Each parallel computation is compared with the same computation in one process: context parallelism (the row
sliced between gloo processes that gather keys and values) and tensor parallelism (the model's plan applied with
PyTorch's DTensor styles) must give the single process's loss and gradients. The data layout (which rank trains on
which share) is checked against accelerate's own mesh order, and two compiled bundles run end to end on the CPU:
context parallelism against one process, and context × data parallelism against plain DDP.

FSDP2 (HSDP, and tensor parallelism inside it) runs on GPUs only (accelerate starts no FSDP on gloo): the tests
marked `gpu` run there, and bench/gpu_parallelism.py compares whole runs on 2 or 4 GPUs.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from runtime_bundles import build_tiny_model, compile_bundle, launch, summary, train_losses, workspace, write_config
from tunefile.runtime import context_parallel, parallelism, tensor_parallel
from tunefile.runtime.attention import block_causal_mask
from tunefile.runtime.losses import token_loss_sum
from tunefile.schemas.run_plan import DistributionPlan, ParallelismPlan


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")


# --- running a function on N gloo processes -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, function: Any, args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        function(rank, world, *args)
    finally:
        dist.destroy_process_group()


def on_processes(world: int, function: Any, *args: Any) -> None:
    """``function(rank, world, *args)`` on ``world`` processes of one gloo group; a failure in any fails the test.
    Forked, so that the children start with torch and transformers already imported (seconds, not a minute)."""
    torch.multiprocessing.start_processes(_entry, args=(world, _free_port(), function, args), nprocs=world,
                                          join=True, start_method="fork")


def _load(model_dir: Path, attn_implementation: str = "sdpa") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn_implementation,
                                                dtype=torch.float32)


def packed_batch(length: int, *, rows: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """Rows of two packed samples, as batching.collate makes them (first label of each sample ignored)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 1000, (rows, length), generator=generator)
    first = length * 2 // 5
    positions = torch.cat([torch.arange(first), torch.arange(length - first)])[None].repeat(rows, 1)
    labels = input_ids.clone()
    labels[:, 0] = labels[:, first] = -100
    labels[:, 1:3] = -100  # a prompt that is not trained on
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def reference_loss_and_gradients(model_dir: Path, batch: dict[str, torch.Tensor],
                                 sliding_window: int | None = None) -> tuple[float, int, dict[str, torch.Tensor]]:
    """One process, the whole rows, the packing's block mask: the numbers the parallel runs must give."""
    model = _load(model_dir)
    mask = block_causal_mask(batch["position_ids"], sliding_window=sliding_window)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask).logits
    loss, count = token_loss_sum(logits, batch["labels"])
    loss.backward()
    return float(loss.detach()), int(count), {name: p.grad for name, p in model.named_parameters()}


# --- context parallelism ---------------------------------------------------------------------------------------

def _context_parallel_worker(rank: int, world: int, model_dir: Path, batch: dict[str, torch.Tensor],
                             sliding_window: int | None, out: Path) -> None:
    group = context_parallel.ContextGroup(group=dist.group.WORLD, size=world, rank=rank)
    model = _load(model_dir, context_parallel.register(group))
    split = context_parallel.ContextSplit(group=group, pad_token_id=0, sliding_window=sliding_window)
    loss, count = context_parallel.forward_loss(model, split, batch)
    context_parallel.check_layers(model.config)  # every layer went through the gathered attention
    loss.backward()
    totals = torch.stack([loss.detach(), count.float()])
    dist.all_reduce(totals)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    for grad in grads.values():
        dist.all_reduce(grad)  # each rank holds its slice's share of every gradient
    if rank == 0:
        torch.save({"loss": float(totals[0]), "count": int(totals[1]), "grads": grads}, out)


@pytest.mark.parametrize("world, length, sliding_window", [
    (2, 32, None),
    (3, 31, None),  # 31 tokens on 3 ranks: the row is padded to 33, the padding trains nothing
    (2, 30, 5),  # a sliding window shorter than a slice
])
def test_context_parallel_loss_and_gradients_are_the_single_process_ones(
        tmp_path: Path, tiny_model: Path, world: int, length: int, sliding_window: int | None) -> None:
    batch = packed_batch(length)
    loss, count, grads = reference_loss_and_gradients(tiny_model, batch, sliding_window)
    on_processes(world, _context_parallel_worker, tiny_model, batch, sliding_window, tmp_path / "cp.pt")
    result = torch.load(tmp_path / "cp.pt")
    assert result["count"] == count == int((batch["labels"][:, 1:] != -100).sum())
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("size, length", [(2, 16), (3, 16), (4, 13)])
def test_each_slice_gets_its_rows_shifted_labels_and_mask(size: int, length: int) -> None:
    """Put back together, the slices are the padded row; each slice's mask is its rows of the whole row's
    block-causal mask, up to its own last token (later keys are invisible to it anyway)."""
    batch = packed_batch(length, seed=3)
    whole = -(-length // size) * size
    slices = [context_parallel.ContextSplit(group=context_parallel.ContextGroup(None, size, rank), pad_token_id=0,
                                            sliding_window=4).split(batch) for rank in range(size)]
    ids = torch.cat([s["input_ids"] for s in slices], dim=1)
    targets = torch.cat([s["targets"] for s in slices], dim=1)
    positions = torch.cat([s["position_ids"] for s in slices], dim=1)
    assert ids.shape[1] == whole and torch.equal(ids[:, :length], batch["input_ids"])
    assert (ids[:, length:] == 0).all() and (targets[:, length - 1:] == -100).all()
    assert torch.equal(targets[:, :length - 1], batch["labels"][:, 1:])  # token t predicts label t + 1
    full_mask = block_causal_mask(positions, sliding_window=4)
    piece = whole // size
    for rank, part in enumerate(slices):
        end = (rank + 1) * piece
        assert part["attention_mask"].shape == (2, 1, piece, end)
        assert torch.equal(part["attention_mask"], full_mask[:, :, rank * piece:end, :end])


def test_a_model_whose_layers_are_not_all_attention_is_refused() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=4)
    context_parallel._REGISTERED.calls = 2  # two of four layers went through the gathered attention
    with pytest.raises(context_parallel.ContextParallelError, match="ran attention in 2 of its 4 layers"):
        context_parallel.check_layers(config)


@pytest.mark.parametrize("overrides, message", [
    ({"model_type": "gemma2", "attn_logit_softcapping": 50.0}, "caps its attention logits"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "mixes sliding-window and full attention"),
])
def test_attention_the_gathered_sdpa_cannot_reproduce_is_refused(overrides: dict[str, Any], message: str) -> None:
    from transformers import PretrainedConfig

    config = PretrainedConfig(**{"model_type": "llama", **overrides})
    config.model_type = overrides.get("model_type", "llama")
    with pytest.raises(context_parallel.ContextParallelError, match=message):
        context_parallel.check_model(config)


# --- tensor parallelism ----------------------------------------------------------------------------------------

def _tensor_parallel_worker(rank: int, world: int, build: Any, batch: dict[str, torch.Tensor], out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    model = build()
    tensor_parallel.apply_tensor_parallel(model, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))["tp"],
                                          device=torch.device("cpu"))
    assert all(isinstance(p, DTensor) for p in model.parameters()), "every parameter is a DTensor of the tp mesh"
    logits = model(input_ids=batch["input_ids"]).logits
    loss, _ = token_loss_sum(logits, batch["labels"])
    loss.backward()
    # The full gradient of each parameter (a collective: every rank gathers), and the clipped norm over all of them.
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    shards = {name: tuple(p.to_local().shape) for name, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    if rank == 0:
        torch.save({"logits": logits.detach(), "loss": float(loss.detach()), "grads": grads, "shards": shards,
                    "norm": float(norm)}, out)


def _llama(model_dir: Path) -> Any:
    return lambda: _load(model_dir)


def _qwen3() -> torch.nn.Module:
    """Qwen3's plan has per-head q_norm/k_norm (replicated_with_grad_allreduce), the tiny models have none."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1: make them differ per element, so a wrong gradient shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def _qwen3_builder(_: Path) -> Any:
    return _qwen3


@pytest.mark.parametrize("builder", [_llama, _qwen3_builder], ids=["llama", "qwen3"])
def test_tensor_parallel_logits_and_gradients_are_the_single_process_ones(tmp_path: Path, tiny_model: Path,
                                                                          builder: Any) -> None:
    build = builder(tiny_model)
    batch = packed_batch(24)
    batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"].clone()}
    reference = build()
    logits = reference(input_ids=batch["input_ids"]).logits
    loss, _ = token_loss_sum(logits, batch["labels"])
    loss.backward()
    on_processes(2, _tensor_parallel_worker, build, batch, tmp_path / "tp.pt")
    result = torch.load(tmp_path / "tp.pt")
    torch.testing.assert_close(result["logits"], logits.detach(), rtol=1e-4, atol=1e-5)
    assert result["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(result["grads"][name], param.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert result["norm"] == pytest.approx(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9)),
                                           rel=1e-5)
    # The plan's layers really are split: half of q_proj's output rows and of down_proj's input columns per rank.
    q = next(n for n in result["shards"] if n.endswith("layers.0.self_attn.q_proj.weight"))
    down = next(n for n in result["shards"] if n.endswith("layers.0.mlp.down_proj.weight"))
    assert result["shards"][q] == (32, 64) and result["shards"][down] == (64, 64)


def test_tensor_parallelism_refuses_what_it_cannot_split(tiny_model: Path) -> None:
    model = _load(tiny_model)
    with pytest.raises(tensor_parallel.TensorParallelError, match="does not divide the model's "
                                                                  "num_key_value_heads 2"):
        tensor_parallel.check_model(model, 4)
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(tensor_parallel.TensorParallelError, match="tied"):
        tensor_parallel.check_model(model, 2)
    model.config.base_model_tp_plan = {"layers.*.mlp.experts": "moe_experts"}
    with pytest.raises(tensor_parallel.TensorParallelError, match="uses moe_experts, which tunefile does not"):
        tensor_parallel.check_model(model, 2)


# --- the layout: which rank trains on which data, and what the loss counts once ---------------------------------

@pytest.mark.parametrize("sizes", [(2, 2, 2, 2), (1, 2, 1, 2), (1, 2, 1, 3), (3, 2, 2, 1)])
def test_the_data_share_is_the_ranks_data_parallel_index_in_accelerates_mesh(sizes: tuple[int, ...]) -> None:
    from accelerate.parallelism_config import ParallelismConfig

    replicate, shard, tp, cp = sizes
    plan = ParallelismPlan(dp_replicate_size=replicate, dp_shard_size=shard, tensor_parallel_size=tp,
                           context_parallel_size=cp)
    config = ParallelismConfig(dp_replicate_size=replicate, dp_shard_size=shard, tp_size=tp, cp_size=cp)
    names, shape = config._get_mesh()  # accelerate's order; init_device_mesh lays ranks out row-major in it
    world = replicate * shard * tp * cp
    for rank in range(world):
        coordinates = dict(zip(names, np.unravel_index(rank, shape), strict=True))
        data_index = coordinates.get("dp_replicate", 0) * shard + coordinates.get("dp_shard", 0)
        layout = parallelism.layout(plan, rank=rank, processes=world)
        assert (layout.data_rank, layout.data_world) == (data_index, replicate * shard)
        assert (layout.batch_copies, layout.loss_copies, layout.gradient_ranks) == (tp * cp, tp, world // tp)


def test_without_parallelism_every_process_is_a_data_share() -> None:
    layout = parallelism.layout(None, rank=3, processes=4)
    assert (layout.data_rank, layout.data_world, layout.batch_copies, layout.gradient_ranks) == (3, 4, 1, 4)


def _distribution(strategy: str, device: str, sizes: tuple[int, int, int, int] | None) -> DistributionPlan:
    world = int(np.prod(sizes)) if sizes else 4
    mesh = ParallelismPlan(*sizes) if sizes else None
    return DistributionPlan(strategy=strategy, device=device, num_nodes=1, processes_per_node=world,
                            world_size=world, parallelism=mesh)


def test_accelerate_gets_ddp_replicas_as_dp_shard_and_nothing_on_the_cpu() -> None:
    # accelerate refuses dp_replicate_size beside context parallelism; DDP averages over every rank either way.
    assert parallelism.accelerate_sizes(_distribution("ddp", "cuda", (2, 1, 1, 2))) == \
        {"dp_replicate_size": 1, "dp_shard_size": 2, "tp_size": 1, "cp_size": 2}
    assert parallelism.accelerate_sizes(_distribution("fsdp", "cuda", (2, 2, 2, 1))) == \
        {"dp_replicate_size": 2, "dp_shard_size": 2, "tp_size": 2, "cp_size": 1}
    assert parallelism.accelerate_sizes(_distribution("ddp", "cuda", None)) is None
    assert parallelism.accelerate_config(_distribution("ddp", "cpu", (1, 1, 1, 2))) is None
    assert parallelism.accelerate_config(_distribution("ddp", "cuda", (1, 1, 1, 2))).cp_size == 2


def test_fused_losses_are_switched_off_and_the_decision_says_why() -> None:
    from tunefile.schemas.run_plan import KernelsPlan

    class FakeAccelerator:
        process_index, num_processes, torch_device_mesh = 0, 1, None

    runner = parallelism.Parallelism(_distribution("ddp", "cpu", None), FakeAccelerator())
    kernels = KernelsPlan(liger_rms_norm=True, liger_glu_activation=False, liger_layer_norm=False, liger_rope=False,
                          liger_rms_norm_gated=False, liger_fused_linear_cross_entropy=False, cut_cross_entropy=True)
    assert runner.kernels(kernels) is kernels  # no tensor or context parallelism: as planned
    runner.layout = replace(runner.layout, context_parallel=2)
    assert runner.kernels(kernels) == replace(kernels, cut_cross_entropy=False)
    assert "cut_cross_entropy not used: context parallelism" in runner.record()["fused_loss"]


# --- whole runs: compiled bundles launched on CPU processes ----------------------------------------------------

def _run(root: Path, name: str, gpus: int, *, target: str = "cpu", **overrides: Any) -> Path:
    values = {"max_steps": 4, "sample_packing": True, "micro_batch_size": 2, "gradient_accumulation_steps": 2,
              "val_set_size": 0.1, "eval_steps": 2} | overrides
    config = write_config(root, f"{name}.yml", output_dir=f"out-{name}", **values)
    launch(compile_bundle(config, f"bundle-{name}", gpus_per_node=gpus, target=target))
    return root / f"out-{name}"


def _eval_losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [record["eval_loss"] for record in map(json.loads, lines) if "eval_loss" in record]


def test_context_parallel_training_is_the_single_process_training(tmp_path: Path, tiny_model: Path) -> None:
    root = workspace(tmp_path, tiny_model)
    # With gradient checkpointing: the backward recomputes each layer, its all-gathers included.
    single = _run(root, "single", 1, gradient_checkpointing=True)
    sliced = _run(root, "cp", 2, context_parallel_size=2, gradient_checkpointing=True)
    assert train_losses(sliced) == pytest.approx(train_losses(single), rel=2e-5)
    assert _eval_losses(sliced) == pytest.approx(_eval_losses(single), rel=2e-5)
    decisions = summary(sliced)["runtime_decisions"]
    assert decisions["attn_implementation"] == "tunefile_context_parallel"
    assert decisions["parallelism"].startswith("mesh {'cp': 2}")


def test_context_times_data_parallel_training_is_data_parallel_training(tmp_path: Path, tiny_model: Path) -> None:
    """4 processes: two data shares, each sliced between two ranks, against 2 processes of plain DDP with the
    same two shares."""
    root = workspace(tmp_path, tiny_model)
    ddp = _run(root, "ddp", 2, strategy="ddp")
    mixed = _run(root, "cpdp", 4, strategy="ddp", context_parallel_size=2)
    assert train_losses(mixed) == pytest.approx(train_losses(ddp), rel=2e-5)
    assert _eval_losses(mixed) == pytest.approx(_eval_losses(ddp), rel=2e-5)
    digests = summary(mixed)["rank_weight_digests"]
    assert len(set(digests)) == 1  # every rank holds the same weights afterwards


# --- on GPUs: FSDP2 (HSDP, tensor parallelism inside it) and context parallelism over NCCL -------------------

FSDP2 = {"fsdp_version": 2, "fsdp_config": {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                            "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}}
# fp32 without TF32 and without packing (the one-GPU reference would pack through a bf16 varlen kernel): a layout
# and its reference then differ only by the order of floating-point sums.
EXACT = {"bf16": False, "tf32": False, "sample_packing": False, "attn_implementation": "sdpa", "max_steps": 6}


@pytest.mark.gpu
@pytest.mark.parametrize("gpus, keys, reference_gpus, reference_keys", [
    (2, {"context_parallel_size": 2}, 1, {}),
    (4, {**FSDP2, "dp_replicate_size": 2, "dp_shard_size": 2}, 4, {"strategy": "ddp"}),
    (4, {**FSDP2, "tensor_parallel_size": 2}, 2, {"strategy": "ddp"}),
    (4, {**FSDP2, "tensor_parallel_size": 2, "context_parallel_size": 2}, 1, {}),
], ids=["cp2", "hsdp2x2", "tp2-fsdp2", "tp2-cp2-fsdp2"])
def test_on_gpus_a_parallel_layout_trains_as_its_data_parallel_reference(
        tmp_path: Path, tiny_model: Path, gpus: int, keys: dict[str, Any], reference_gpus: int,
        reference_keys: dict[str, Any]) -> None:
    """bench/gpu_parallelism.py runs the same comparisons for 20 steps, and with resumes."""
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs, this machine has {torch.cuda.device_count()}")
    root = workspace(tmp_path, tiny_model)
    reference = _run(root, "reference", reference_gpus, target="h100-80gb", **EXACT, **reference_keys)
    layout = _run(root, "layout", gpus, target="h100-80gb", **EXACT, **keys)
    assert train_losses(layout) == pytest.approx(train_losses(reference), abs=2e-3)
    assert _eval_losses(layout) == pytest.approx(_eval_losses(reference), abs=2e-3)
