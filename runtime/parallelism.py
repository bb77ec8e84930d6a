"""N-D parallelism (the plan's distribution.parallelism: Axolotl's dp_replicate_size, dp_shard_size,
tensor_parallel_size and context_parallel_size) on accelerate's ParallelismConfig.

The ranks form accelerate's device mesh (dp_replicate, dp_shard, cp, tp), in that order, so that rank =
((replica × dp_shard + shard) × cp + slice) × tp + tp_rank. What each dimension means here:

- data: ranks with the same data-parallel index (replica, shard) are fed the same micro-batches; the data plan is
  cut into dp_replicate × dp_shard shares, not one per process;
- dp_replicate × dp_shard with FSDP2 is HSDP: accelerate shards every parameter within a group of dp_shard (× cp)
  ranks and keeps a replica of that group per dp_replicate; under DDP or DeepSpeed the data-parallel ranks are
  plain replicas (accelerate calls them dp_shard, the only name it lets context parallelism combine with);
- cp: context_parallel.py slices every row between the group's ranks;
- tp: tensor_parallel.py splits the model's layers between the group's ranks.

The loss stays the token-weighted mean of the whole optimizer step: ``Layout`` says how many ranks hold the same
label tokens (to count them once) and over how many ranks the data-parallel wrapper averages the gradients (which
the trainer's scale undoes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..schemas.run_plan import DistributionPlan, KernelsPlan, ParallelismPlan
from . import context_parallel, tensor_parallel
from .attention import AttentionDecision

log = logging.getLogger(__name__)

MicroBatch = list[list[int]]


@dataclass(frozen=True)
class Layout:
    """Where this rank sits and what that means for the data and the loss."""

    data_rank: int  # which share of the data plan this rank trains on
    data_world: int  # how many shares: dp_replicate × dp_shard
    tensor_parallel: int
    context_parallel: int
    processes: int

    @property
    def batch_copies(self) -> int:
        """Ranks fed the same micro-batch (whole, before any context-parallel slicing)."""
        return self.tensor_parallel * self.context_parallel

    @property
    def loss_copies(self) -> int:
        """Ranks that compute the same token losses: tensor-parallel ranks all see the whole logits."""
        return self.tensor_parallel

    @property
    def gradient_ranks(self) -> int:
        """Ranks the data-parallel wrapper averages gradients over (DDP, FSDP2 over (dp_replicate, dp_shard × cp),
        DeepSpeed): every rank but the tensor-parallel copies, whose gradients are parts of one whole."""
        return self.processes // self.tensor_parallel


def layout(parallelism: ParallelismPlan | None, *, rank: int, processes: int) -> Layout:
    if parallelism is None:
        return Layout(data_rank=rank, data_world=processes, tensor_parallel=1, context_parallel=1,
                      processes=processes)
    inner = parallelism.context_parallel_size * parallelism.tensor_parallel_size
    return Layout(data_rank=rank // inner, data_world=parallelism.dp_replicate_size * parallelism.dp_shard_size,
                  tensor_parallel=parallelism.tensor_parallel_size,
                  context_parallel=parallelism.context_parallel_size, processes=processes)


def accelerate_sizes(distribution: DistributionPlan) -> dict[str, int] | None:
    """accelerate's ParallelismConfig arguments for the plan; None without N-D parallelism. Under DDP and
    DeepSpeed the replicas go in as dp_shard_size: accelerate refuses dp_replicate_size beside context
    parallelism, and only FSDP2 reads the name (DDP and DeepSpeed average over every rank either way)."""
    parallelism = distribution.parallelism
    if parallelism is None:
        return None
    if distribution.strategy == "fsdp":
        replicate, shard = parallelism.dp_replicate_size, parallelism.dp_shard_size
    else:
        replicate, shard = 1, parallelism.dp_replicate_size * parallelism.dp_shard_size
    return {"dp_replicate_size": replicate, "dp_shard_size": shard, "tp_size": parallelism.tensor_parallel_size,
            "cp_size": parallelism.context_parallel_size}


def accelerate_config(distribution: DistributionPlan) -> Any:
    """The ParallelismConfig the Accelerator is built with; None without N-D parallelism, and on the CPU, where
    accelerate (1.15) refuses one (its check admits GPU-family process groups only; on gloo the run is plain data
    parallel over every rank, which is what context parallelism needs there, and the mesh is tunefile's own)."""
    sizes = accelerate_sizes(distribution)
    if sizes is None or distribution.device == "cpu":
        return None
    from accelerate.parallelism_config import ParallelismConfig

    return ParallelismConfig(**sizes)


def device_mesh(distribution: DistributionPlan, accelerator: Any) -> Any:
    """accelerate's mesh, or on the CPU the same mesh built by accelerate's ParallelismConfig without an
    Accelerator (same dimensions, same order)."""
    if accelerator.torch_device_mesh is not None:
        return accelerator.torch_device_mesh
    from accelerate.parallelism_config import ParallelismConfig

    return ParallelismConfig(**accelerate_sizes(distribution)).build_device_mesh(accelerator.device.type)


def adapt_accelerator(accelerator: Any) -> None:
    """Two steps of accelerate's prepare() that tunefile does itself, switched off on this accelerator:
    - _prepare_cp would put PyTorch's experimental context_parallel around every forward (SDPA ring attention,
      CUDA only); context_parallel.py slices the rows and gathers keys and values instead (Axolotl, too, turns
      accelerate's off and runs ring attention of its own);
    - _prepare_tp would make the remaining parameters replicated DTensors with a transformers class that
      transformers 5.18+ no longer has; tensor_parallel.py has already made every parameter a DTensor."""
    config = accelerator.parallelism_config
    if config is None:
        return
    accelerator._prepare_cp = lambda *args: args
    accelerator._prepare_tp = lambda *args: args


def mesh_coordinates(mesh: Any) -> dict[str, int]:
    """This rank's index along each dimension of the mesh (for the runtime decisions)."""
    return {name: mesh.get_local_rank(name) for name in mesh.mesh_dim_names}


class Parallelism:
    """What the trainer asks of the run's N-D parallelism. Without it every method is the identity."""

    def __init__(self, distribution: DistributionPlan, accelerator: Any) -> None:
        self.plan = distribution.parallelism
        self.accelerator = accelerator
        self.layout = layout(self.plan, rank=accelerator.process_index, processes=accelerator.num_processes)
        self.context: context_parallel.ContextSplit | None = None
        self._group: context_parallel.ContextGroup | None = None
        self.decisions: dict[str, Any] = {}
        self.mesh: Any = None
        self._layers_checked = False
        if self.plan is None:
            return
        self.mesh = mesh = device_mesh(distribution, accelerator)
        coordinates = mesh_coordinates(mesh)
        expected = self.layout.data_rank
        shards = dict(zip(mesh.mesh_dim_names, mesh.mesh.shape, strict=True)).get("dp_shard", 1)
        found = coordinates.get("dp_replicate", 0) * shards + coordinates.get("dp_shard", 0)
        if found != expected:  # accelerate's mesh order is not the one layout() assumes
            raise RuntimeError(f"rank {accelerator.process_index}: accelerate's mesh puts it at data-parallel index "
                               f"{found}, tunefile's layout at {expected}")
        self.decisions["parallelism"] = (f"mesh {dict(zip(mesh.mesh_dim_names, mesh.mesh.shape, strict=True))}; "
                                         f"this rank {coordinates}; data share {expected} of "
                                         f"{self.layout.data_world}")

    @property
    def tensor_parallel(self) -> bool:
        return self.layout.tensor_parallel > 1

    @property
    def context_parallel(self) -> bool:
        return self.layout.context_parallel > 1

    def kernels(self, kernels: KernelsPlan) -> KernelsPlan:
        """The plan's kernels less the fused losses, which compute from whole hidden states and a whole output
        head: under context parallelism the loss is the slice's against shifted labels, under tensor parallelism
        the head is split. The plain loss runs instead (the same numbers), and the decision says so."""
        fused = [name for name in ("liger_fused_linear_cross_entropy", "cut_cross_entropy") if getattr(kernels, name)]
        if not fused or not (self.tensor_parallel or self.context_parallel):
            return kernels
        why = "tensor parallelism splits the output head" if self.tensor_parallel else \
            "context parallelism computes each slice's loss against labels shifted before the split"
        self.decisions["fused_loss"] = f"{', '.join(fused)} not used: {why}; the plain loss runs (the same loss)"
        log.warning("kernels: %s", self.decisions["fused_loss"])
        return replace(kernels, liger_fused_linear_cross_entropy=False, cut_cross_entropy=False)

    def attention(self, decision: AttentionDecision) -> AttentionDecision:
        """Under context parallelism every attention layer runs context_parallel.py's gathered attention (the model
        loads with it), which isolates packed samples itself; otherwise the trainer's decision as it is."""
        if not self.context_parallel:
            return decision
        mesh = self.mesh["cp"]
        self._group = context_parallel.ContextGroup(group=mesh.get_group(), size=mesh.size(),
                                                    rank=mesh.get_local_rank())
        name = context_parallel.register(self._group)
        self.decisions["context_parallel"] = (
            f"slice {self._group.rank} of {self._group.size} of every row; keys and values gathered across the "
            f"group, SDPA with a causal{' packed-sample' if decision.packing else ''} mask (planned: "
            f"{decision.attn_implementation}{', packing ' + decision.packing if decision.packing else ''})")
        # Packed samples are kept apart by the slice's block-diagonal causal mask, whatever kernel was planned.
        return AttentionDecision(packing="block_mask" if decision.packing else None, attn_implementation=name,
                                 fallback=decision.fallback)

    def prepare_model(self, model: torch.nn.Module, *, pad_token_id: int, sliding_window: int | None) -> None:
        """After loading, before the optimizer: context parallelism refuses an attention it cannot reproduce and
        learns the model's sliding window; tensor parallelism splits the layers over the mesh's tp dimension."""
        if self.context_parallel:
            context_parallel.check_model(model.config)
            self.context = context_parallel.ContextSplit(group=self._group, pad_token_id=pad_token_id,
                                                         sliding_window=sliding_window)
        if self.tensor_parallel:
            tensor_parallel.apply_tensor_parallel(model, self.mesh["tp"],
                                                  device=self.accelerator.device)

    def forward_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     plain: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sum, label tokens) of a micro-batch on the device: this rank's slice under context parallelism,
        else ``plain(batch)``."""
        if self.context is None:
            return plain(batch)
        result = context_parallel.forward_loss(model, self.context, batch)
        if not self._layers_checked:
            context_parallel.check_layers(self.accelerator.unwrap_model(model).config)
            self._layers_checked = True
        return result

    def evaluate(self, model: torch.nn.Module, micro_batches: Sequence[MicroBatch],
                 batch_of: Callable[[MicroBatch], dict[str, torch.Tensor]], *, idle: Sequence[MicroBatch]) -> float:
        """evaluate.evaluate with each micro-batch's loss taken on this rank's slice (context parallelism only):
        the slices' sums and counts add up, over the group, to the rows'. Collective."""
        assert self.context is not None
        accelerator = self.accelerator
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        with torch.no_grad():
            for index, micro_batch in enumerate([*micro_batches, *idle]):
                batch = {k: v.to(accelerator.device) for k, v in batch_of(micro_batch).items()}
                loss_sum, count = context_parallel.forward_loss(model, self.context, batch)
                if index < len(micro_batches):  # idle passes keep every rank in step and count nothing
                    totals += torch.stack([loss_sum.double(), count.double()])
        model.train()
        loss_sum, count = accelerator.reduce(totals, reduction="sum").tolist()
        return loss_sum / max(1.0, count)

    def record(self) -> dict[str, Any]:
        return dict(self.decisions)
