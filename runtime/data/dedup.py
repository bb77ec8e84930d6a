"""Exact deduplication (Axolotl's dataset_exact_deduplication): an example whose tokens and labels repeat an
earlier example's exactly is dropped; the first one is kept.

Axolotl hashes each tokenised row (``str(row)`` of its input_ids, attention_mask and labels;
src/axolotl/utils/data/utils.py ``deduplicate_and_log_datasets``) of the merged datasets, after rows too long
for sequence_len are dropped and before the evaluation split is taken, so no held-out row repeats a training
row. Hashing tokens rather than text means rows that differ only in what the format ignores (an unused column)
are duplicates, and the same text formatted with different labels (another dataset's train_on_inputs) is not.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .examples import Example


class ExactDuplicates:
    """Remembers a 16-byte digest of every example seen, so memory grows by a few dozen bytes per example."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def is_repeat(self, example: Example) -> bool:
        """Whether an identical example (same input_ids, same labels) came before; records this one if not."""
        digest = hashlib.blake2b(digest_size=16)
        # Labels are as long as the ids, so the two arrays back to back cannot be read two ways.
        digest.update(np.asarray(example.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(example.labels, dtype=np.int64).tobytes())
        key = digest.digest()
        if key in self.seen:
            return True
        self.seen.add(key)
        return False
