"""Batch plans (determinism, ranks, packing bins) and collation (padding, position ids, labels at boundaries)."""

from __future__ import annotations

from typing import Any

import pytest

from helpers import require_module

require_module("torch", "make install")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tunefile.runtime.data.batching import collate, packing_efficiency, plan_batches  # noqa: E402

LENGTHS = np.random.default_rng(0).integers(5, 120, size=203)


def plan(**overrides: Any) -> list[list[list[int]]]:
    options = {"micro_batch_size": 4, "sequence_len": 128, "sample_packing": False, "seed": 1, "epoch": 0}
    options.update(overrides)
    return plan_batches(LENGTHS, **options)


def indices(micro_batches: list[list[list[int]]]) -> list[int]:
    return [index for micro_batch in micro_batches for row in micro_batch for index in row]


@pytest.mark.parametrize("packing", [False, True])
def test_plan_is_a_function_of_seed_and_epoch(packing: bool) -> None:
    assert plan(sample_packing=packing) == plan(sample_packing=packing)
    assert plan(sample_packing=packing) != plan(sample_packing=packing, epoch=1)
    assert plan(sample_packing=packing) != plan(sample_packing=packing, seed=2)


def test_single_process_sees_every_example_once() -> None:
    micro_batches = plan()
    assert sorted(indices(micro_batches)) == list(range(len(LENGTHS)))
    assert all(len(row) == 1 for micro_batch in micro_batches for row in micro_batch)
    assert [len(mb) for mb in micro_batches] == [4] * 50 + [3]


@pytest.mark.parametrize("packing", [False, True])
def test_ranks_are_disjoint_and_in_step(packing: bool) -> None:
    world = 3
    per_rank = [plan(sample_packing=packing, world_size=world, rank=rank) for rank in range(world)]
    # The same number of micro-batches of the same sizes everywhere.
    assert len({tuple(len(mb) for mb in p) for p in per_rank}) == 1
    seen = [set(indices(p)) for p in per_rank]
    assert all(not seen[a] & seen[b] for a in range(world) for b in range(a + 1, world))
    # Every rank holds the same rows' worth: only the ragged tail (fewer than world rows) is dropped.
    total_rows = sum(len(mb) for mb in plan(sample_packing=packing))
    assert [sum(len(mb) for mb in p) for p in per_rank] == [total_rows // world] * world
    if not packing:
        assert len(set().union(*seen)) == len(LENGTHS) - len(LENGTHS) % world


def test_packing_bins_fit_and_hold_every_example_once() -> None:
    micro_batches = plan(sample_packing=True)
    rows = [row for micro_batch in micro_batches for row in micro_batch]
    assert all(int(LENGTHS[row].sum()) <= 128 for row in rows)
    assert sorted(indices(micro_batches)) == list(range(len(LENGTHS)))
    assert any(len(row) > 1 for row in rows)
    efficiency = packing_efficiency(LENGTHS, micro_batches, 128)
    assert efficiency == pytest.approx(LENGTHS.sum() / (len(rows) * 128))
    assert efficiency > 0.9  # best-fit decreasing on this spread of lengths


def test_an_example_longer_than_sequence_len_is_refused() -> None:
    with pytest.raises(ValueError, match="more than sequence_len=64"):
        plan(sequence_len=64)


def example(ids: list[int], labels: list[int] | None = None) -> dict[str, np.ndarray]:
    return {"input_ids": np.array(ids, dtype=np.int32), "labels": np.array(labels or ids, dtype=np.int32)}


DATASET = [
    example([11, 12, 13], [-100, 12, 13]),
    example([21, 22]),
    example([31, 32, 33, 34], [-100, -100, 33, 34]),
]


def test_collate_without_packing_pads_right_and_masks_padding() -> None:
    batch = collate(DATASET, [[0], [2]], pad_token_id=0, sequence_len=64, pad_to_sequence_len=False)
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert all(t.dtype == torch.long and t.shape == (2, 8) for t in batch.values())  # 4 rounded up to 8
    assert batch["input_ids"].tolist() == [[11, 12, 13, 0, 0, 0, 0, 0], [31, 32, 33, 34, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 12, 13] + [-100] * 5, [-100, -100, 33, 34] + [-100] * 4]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [list(range(8))] * 2  # padding continues counting


def test_collate_packed_restarts_positions_and_masks_each_sample_start() -> None:
    batch = collate(DATASET, [[0, 1, 2], [1]], pad_token_id=0, sequence_len=16, pad_to_sequence_len=True)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == [11, 12, 13, 21, 22, 31, 32, 33, 34] + [0] * 7
    assert batch["labels"][0].tolist() == [-100, 12, 13, -100, 22, -100, -100, 33, 34] + [-100] * 7
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert batch["labels"][1].tolist() == [-100, 22] + [-100] * 14
    assert batch["position_ids"][1].tolist() == list(range(16))


def test_collate_packed_flag_keeps_keys_fixed_for_single_sample_rows() -> None:
    batch = collate(DATASET, [[1]], pad_token_id=0, sequence_len=16, pad_to_sequence_len=False, packed=True)
    assert "attention_mask" not in batch and batch["labels"][0].tolist()[:2] == [-100, 22]


def test_collate_width_never_rounds_past_sequence_len() -> None:
    long_example = [example(list(range(1, 11)))]
    batch = collate(long_example, [[0]], pad_token_id=0, sequence_len=10, pad_to_sequence_len=False)
    assert batch["input_ids"].shape == (1, 10)


@pytest.mark.parametrize("geometry", [{"micro_batch_size": 0}, {"world_size": 0}, {"rank": 2, "world_size": 2},
                                      {"rank": -1}])
def test_a_bad_batch_geometry_is_refused(geometry: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="bad batch geometry"):
        plan(**geometry)
