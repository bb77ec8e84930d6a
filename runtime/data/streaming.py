"""Streaming data: sources read lazily, tokenised and made into rows as training goes. No cache, no evaluation
split; the run lasts ``schedule.max_steps`` steps. Two kinds of stream, told apart by the dataset types:

- completion text only (Axolotl's ``pretraining_dataset``): documents concatenated and cut into rows of exactly
  ``sequence_len`` tokens, every token trained (the steps below);
- any other type among the sources (``datasets`` with ``streaming: true``: alpaca and its variants,
  chat_template, …): each row is formatted by the same formatter as prepared data, its examples kept whole with
  their label masks and dropped by the same rules (too long, nothing to train, malformed), then, per window of
  ``EXAMPLE_WINDOW`` documents of the shuffled stream, packed best-fit-decreasing into rows of at most
  ``sequence_len`` tokens (with sample packing, as the prepared path packs) or one example per row (without).
  Completion sources in such a stream give their sequence_len chunks as whole examples too. (Axolotl's packed
  streaming SFT packs each buffer of rows with its multipack sampler, into one row of micro_batch_size ×
  sequence_len tokens; ours packs micro_batch_size rows of sequence_len tokens, the same tokens per step.)

The completion stream, for one rank:

1. A pass reads every row of the sources in the plan's order (a dataset's files in order; a Hub dataset through
   ``datasets.load_dataset(..., streaming=True)``), then shuffles them through a buffer of ``SHUFFLE_BUFFER``
   rows seeded by (seed, pass). Every rank reads the same sequence and takes its own share: rank r takes rows
   r, r + W, … So the shares are disjoint, together they cover every row, and all of it follows from the seed.
   (Every rank reads every row, which is cheap; it tokenises only its own share.)
2. Each document is tokenised as the completion format does (the tokenizer's bos, the text, eos), so
   consecutive documents are separated by eos; documents never start with padding (``strip_leading_padding``).
3. The documents are concatenated and cut into rows of ``sequence_len`` tokens; a document cut at a row's end
   continues at the next row's start, and no token is lost or padded (a row never starts with the pad token:
   one falling there is dropped, as a sample that starts with padding makes non-finite gradients).
4. When a rank's share runs out before max_steps, the next pass reads the sources again from the beginning,
   in that pass's own shuffled order.

Axolotl 0.19's scheme, for comparison: it fills a row with whole documents (each cut to sequence_len - 2
tokens, followed by eos and one pad token) and pads the rest of the row, so long documents lose their tail. We
keep the same document framing (bos … eos, all trained) and the same shuffle buffer (its
``streaming_multipack_buffer_size`` default), but cut the concatenation instead, so nothing is thrown away.

With sample packing (a packing attention in the plan) the pieces of documents in a row are isolated from each
other, as Axolotl's ``pretrain_multipack_attn`` does; without it a row is one causal sequence.

Both kinds read, shuffle and share the rows the same way (step 1 above). Exact deduplication needs every row at
once and is refused (so does Axolotl); group_by_length has no effect on a stream (Hugging Face's Trainer ignores
it for an iterable dataset too).

Resume is exact: ``StreamPosition`` (pass, documents of this rank's share already used up, then tokens of the
next document already emitted, or rows of the next packing window already emitted) is saved per rank in each
checkpoint; a resumed stream reads past those documents without tokenising them and continues from the same
token, or packs the same window again and skips the rows already trained.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import count, islice
from typing import Any

import numpy as np

from ...schemas.run_plan import DataPlan
from .batching import pack
from .errors import DataError
from .examples import Example, RowError, examples_to_keep, leading_padding_id, strip_leading_padding
from .formats import make_formatter
from .sources import Source, iter_rows

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 10_000  # rows held back for shuffling (Axolotl's streaming_multipack_buffer_size default)
TOKENISE_BATCH = 256  # documents tokenised per call
EXAMPLE_WINDOW = 1024  # documents whose examples are packed together (streams of whole examples)
MAX_PROBLEMS = 5  # malformed rows reported by name; the rest are counted

MicroBatch = list[list[int]]  # rows of item numbers in StreamedRows


@dataclass(frozen=True)
class StreamPosition:
    """Where one rank's stream stands between two rows: in pass ``passes``, the first ``documents`` documents
    of this rank's share are used up and ``tokens`` tokens of the next one are already in rows (completion
    streams), or ``rows`` rows of the packing window that starts there are (streams of whole examples)."""

    passes: int = 0
    documents: int = 0
    tokens: int = 0
    rows: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StreamPosition:
        # A position saved before streams of whole examples existed has no "rows": it was a completion stream's.
        return cls(passes=int(values["passes"]), documents=int(values["documents"]), tokens=int(values["tokens"]),
                   rows=int(values.get("rows", 0)))


@dataclass(frozen=True)
class Document:
    source: int  # the dataset's number in the plan
    row: int  # 0-based row of that dataset
    fields: dict[str, Any]


@dataclass(frozen=True)
class Piece:
    """Consecutive tokens of one document, all of them in one row: a cut of completion text (every token
    trained: ``labels`` None) or one whole example with its labels."""

    ids: np.ndarray
    source: int
    row: int
    labels: np.ndarray | None = None

    @property
    def trained_labels(self) -> np.ndarray:
        return self.ids if self.labels is None else self.labels


class SourceFiles:
    """Per dataset, the files read so far with the dataset row each starts at, for naming a row's file."""

    def __init__(self, count_of_sources: int) -> None:
        self.files: list[list[tuple[str, int]]] = [[] for _ in range(count_of_sources)]
        self.seen: set[tuple[int, str, int]] = set()  # every pass reads the same files again

    def note(self, source: int, label: str, first_row: int) -> None:
        if (source, label, first_row) not in self.seen:
            self.seen.add((source, label, first_row))
            self.files[source].append((label, first_row))

    def file_row(self, source: int, row: int) -> tuple[str, int]:
        """(file, row in that file) of row ``row`` of dataset ``source``: the last file starting at or before it
        (an empty file starts where the next one does)."""
        label, start = next((label, start) for label, start in reversed(self.files[source]) if start <= row)
        return label, row - start


def _hub_stream(source: Source) -> Iterator[dict[str, Any]]:
    """A Hub dataset read lazily (``streaming=True``): nothing is downloaded whole."""
    import datasets

    entry = source.entry
    if source.offline or datasets.config.HF_HUB_OFFLINE:
        raise DataError(f"dataset {source.label}: streaming reads the Hugging Face Hub as training goes, and the hub "
                        "is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); use local files for an offline run")
    try:
        stream = datasets.load_dataset(entry.path, name=entry.name, split=entry.split, streaming=True,
                                       data_files=list(entry.data_files) if entry.data_files else None)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (connection, not found)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"dataset {source.label}: cannot be streamed from the Hugging Face Hub ({reason})") from None
    yield from stream


def read_pass(sources: list[Source], files: SourceFiles) -> Iterator[Document]:
    """Every row of every source, in the plan's order, numbered per dataset."""
    for number, source in enumerate(sources):
        row = 0
        for label, part in source.parts():
            files.note(number, label, row)
            for fields in (iter_rows(part) if part.is_local else _hub_stream(part)):
                yield Document(number, row, fields)
                row += 1


def shuffled(items: Iterator[Any], rng: np.random.Generator, buffer_size: int) -> Iterator[Any]:
    """``items`` in a random order drawn through a buffer of ``buffer_size``: each new item takes the place of
    a random one, which goes out."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        at = int(rng.integers(buffer_size))
        buffer[at], item = item, buffer[at]
        yield item
    for at in rng.permutation(len(buffer)).tolist():
        yield buffer[at]


class TokenStream:
    """One rank's rows, without end (see the module's description): rows of exactly sequence_len tokens cut
    from completion text, or rows of whole examples when any source has another type."""

    def __init__(self, data: DataPlan, tokenizer: Any, sources: list[Source], *, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = SHUFFLE_BUFFER) -> None:
        if data.exact_deduplication:
            raise DataError("exact deduplication needs every row before training starts, and a stream never holds "
                            "them all (Axolotl refuses it too); deduplicate the files beforehand")
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"rank {rank} of {world_size}")
        self.sources, self.seed, self.rank, self.world_size = sources, seed, rank, world_size
        self.sequence_len, self.micro_batch_size = data.sequence_len, data.micro_batch_size
        self.min_sample_len = data.min_sample_len
        self.shuffle_buffer = shuffle_buffer
        # Completion text alone is pretraining data, cut into full rows; anything else is kept in whole examples.
        self.whole_examples = any(source.entry.type != "completion" for source in sources)
        self.packed = data.packing_attention is not None
        if data.group_by_length:
            log.warning("stream: group_by_length has no effect: rows are made as the stream is read")
        self.formats = [make_formatter(source.entry, data, tokenizer) for source in sources]
        self.pad_id = leading_padding_id(tokenizer)
        self.files = SourceFiles(len(sources))
        self.malformed = 0
        self.dropped = 0  # rows dropped by examples_to_keep (too long, nothing to train, only padding)

    def documents(self, pass_number: int) -> Iterator[Document]:
        """This rank's share of one pass, in the pass's shuffled order."""
        rng = np.random.default_rng([self.seed, pass_number])
        every = shuffled(read_pass(self.sources, self.files), rng, self.shuffle_buffer)
        return islice(every, self.rank, None, self.world_size)

    def formatted(self, pass_number: int, *, skip: int) -> Iterator[tuple[Document, list[Example] | RowError]]:
        """Each document of this rank's share after the first ``skip`` (read, not tokenised) with what its
        format made of it: its examples, or the reason it is malformed."""
        documents = islice(self.documents(pass_number), skip, None)
        while chunk := list(islice(documents, TOKENISE_BATCH)):
            by_source: dict[int, list[int]] = {}
            for i, document in enumerate(chunk):
                by_source.setdefault(document.source, []).append(i)
            results: list[list[Example] | RowError] = [[] for _ in chunk]
            for source, members in by_source.items():
                for i, result in zip(members, self.formats[source].batch([chunk[i].fields for i in members]),
                                     strict=True):
                    results[i] = result
            yield from zip(chunk, results, strict=True)

    def tokenised(self, pass_number: int, *, skip: int) -> Iterator[tuple[Document, list[int]]]:
        """Token ids of each document (its examples back to back, leading padding stripped); a malformed row
        gives no tokens (it is counted and named in the log) but still counts as a document."""
        for document, result in self.formatted(pass_number, skip=skip):
            if isinstance(result, RowError):
                self._report(document, str(result))
                yield document, []
                continue
            whole = [token for example in result for token in example.input_ids]
            yield document, strip_leading_padding(Example(whole, whole), self.pad_id).input_ids

    def kept_examples(self, pass_number: int, *, skip: int) -> Iterator[tuple[Document, list[Example]]]:
        """Each document's examples as the prepared path stores them (``examples_to_keep``); a malformed or
        dropped row gives none (it is counted and named in the log) but still counts as a document."""
        for document, result in self.formatted(pass_number, skip=skip):
            if isinstance(result, RowError):
                self._report(document, str(result))
                yield document, []
                continue
            kept, reason, _ = examples_to_keep(result, pad_id=self.pad_id, sequence_len=self.sequence_len,
                                               min_sample_len=self.min_sample_len)
            if reason is not None:
                self.dropped += 1
                self._report(document, f"dropped ({reason.replace('_', ' ')})", count=False)
            yield document, kept

    def _report(self, document: Document, problem: str, *, count: bool = True) -> None:
        self.malformed += count
        if self.malformed + self.dropped <= MAX_PROBLEMS:
            label, row = self.files.file_row(document.source, document.row)
            log.warning("stream: %s row %d skipped: %s", label, row + 1, problem)  # counted from 1

    def rows(self, start: StreamPosition = StreamPosition()) -> Iterator[tuple[list[Piece], StreamPosition]]:
        """(the pieces of one row, the position after it), from ``start``."""
        return self._example_rows(start) if self.whole_examples else self._cut_rows(start)

    def _next_pass(self, pass_number: int, start: StreamPosition) -> bool:
        """Whether ``pass_number`` is the one being resumed; logs a fresh pass after the first."""
        resuming = pass_number == start.passes
        if pass_number > 0 and not resuming:
            log.info("stream: rank %d has read its whole share of the sources; pass %d reads them again",
                     self.rank, pass_number + 1)
        return resuming

    def _empty_pass(self, read: int) -> DataError:
        """A whole pass gave this rank nothing: reading again would loop for ever."""
        got = f"{read} rows and nothing to train on (every row was malformed or dropped)" if read else \
            "no rows (the sources hold fewer rows than there are processes)"
        return DataError(f"streaming: rank {self.rank} of {self.world_size} got {got} from a whole pass over "
                         f"{', '.join(source.label for source in self.sources)}")

    def _cut_rows(self, start: StreamPosition) -> Iterator[tuple[list[Piece], StreamPosition]]:
        """Completion text: rows of exactly sequence_len tokens, a document cut where a row ends."""
        length = self.sequence_len
        pieces: list[Piece] = []
        filled = 0
        for pass_number in count(start.passes):
            resuming = self._next_pass(pass_number, start)
            used = start.documents if resuming else 0
            skip_tokens = start.tokens if resuming else 0
            read = tokens_in_pass = 0
            for document, ids in self.tokenised(pass_number, skip=used):
                read += 1
                at, skip_tokens = skip_tokens, 0
                while at < len(ids):
                    if filled == 0 and ids[at] == self.pad_id:
                        at += 1  # a row never starts with padding
                        continue
                    take = min(length - filled, len(ids) - at)
                    pieces.append(Piece(np.asarray(ids[at:at + take], dtype=np.int64), document.source, document.row))
                    filled, at, tokens_in_pass = filled + take, at + take, tokens_in_pass + take
                    if filled == length:
                        finished = at == len(ids)
                        yield pieces, StreamPosition(pass_number, used + finished, 0 if finished else at)
                        pieces, filled = [], 0
                used += 1
            if not (resuming and start.documents) and not tokens_in_pass:
                raise self._empty_pass(read)

    def _example_rows(self, start: StreamPosition) -> Iterator[tuple[list[Piece], StreamPosition]]:
        """Whole examples: per window of EXAMPLE_WINDOW documents, packed rows (or one example per row)."""
        for pass_number in count(start.passes):
            resuming = self._next_pass(pass_number, start)
            used = start.documents if resuming else 0  # always the start of a window
            skip_rows = start.rows if resuming else 0
            read = rows_in_pass = 0
            documents = self.kept_examples(pass_number, skip=used)
            while window := list(islice(documents, EXAMPLE_WINDOW)):
                read += len(window)
                rows = self._window_rows(window, pass_number=pass_number, first=used)
                for number in range(skip_rows, len(rows)):
                    rows_in_pass += 1
                    last = number + 1 == len(rows)
                    yield rows[number], StreamPosition(pass_number, used + len(window) if last else used,
                                                       rows=0 if last else number + 1)
                used, skip_rows = used + len(window), 0
            if not (resuming and start.documents) and not rows_in_pass:
                raise self._empty_pass(read)

    def _window_rows(self, window: list[tuple[Document, list[Example]]], *, pass_number: int,
                     first: int) -> list[list[Piece]]:
        """The rows of one window's examples, a function of the window and its place in the stream alone (a
        resumed stream packs the same window into the same rows): with packing, best-fit-decreasing bins of at
        most sequence_len tokens in a shuffled order, as the prepared path packs; without, one example per row
        in the stream's order."""
        pieces = [Piece(np.asarray(example.input_ids, dtype=np.int64), document.source, document.row,
                        np.asarray(example.labels, dtype=np.int64))
                  for document, examples in window for example in examples]
        if not self.packed:
            return [[piece] for piece in pieces]
        lengths = np.array([len(piece.ids) for piece in pieces], dtype=np.int64)
        bins = pack(lengths, np.arange(len(pieces)), self.sequence_len)
        rng = np.random.default_rng([self.seed, pass_number, self.rank, first])
        return [[pieces[i] for i in bins[b]] for b in rng.permutation(len(bins)).tolist()]

    def micro_batches(self, start: StreamPosition = StreamPosition()) -> Iterator[
            tuple[list[list[Piece]], StreamPosition]]:
        """(micro_batch_size rows, the position after the last of them)."""
        rows = self.rows(start)
        while True:
            batch = list(islice(rows, self.micro_batch_size))
            yield [pieces for pieces, _ in batch], batch[-1][1]


class StreamedRows:
    """The rows of the steps in flight, numbered, in the shape the trainer reads prepared data: ``rows[i]`` is
    ``{"input_ids", "labels"}`` (the pieces' labels: every token of completion text, an example's own mask),
    ``lengths[i]`` its token count, ``source_rows(i)`` and ``file_row`` name where it came from (the watchdog's
    report). Packed, an item is a piece of one document (isolated by the packing attention); unpacked, an item
    is a whole row, one causal sequence."""

    def __init__(self, files: SourceFiles, *, packed: bool) -> None:
        self.files, self.packed = files, packed
        self.items: dict[int, tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]] = {}
        self.lengths: dict[int, int] = {}
        self.next_number = 0

    def add(self, rows: list[list[Piece]]) -> MicroBatch:
        """Store a micro-batch's rows; the item numbers of each row, for ``collate``."""
        micro_batch = []
        for pieces in rows:
            groups = [[piece] for piece in pieces] if self.packed else [pieces]
            numbers = []
            for group in groups:
                ids = np.concatenate([piece.ids for piece in group])
                labels = np.concatenate([piece.trained_labels for piece in group])
                self.items[self.next_number] = (ids, labels, [(piece.source, piece.row) for piece in group])
                self.lengths[self.next_number] = len(ids)
                numbers.append(self.next_number)
                self.next_number += 1
            micro_batch.append(numbers)
        return micro_batch

    def forget(self) -> None:
        """Drop every stored row: called between steps, once nothing reads the previous step's rows."""
        self.items.clear()
        self.lengths.clear()

    def __getitem__(self, number: int) -> dict[str, np.ndarray]:
        ids, labels, _ = self.items[number]
        return {"input_ids": ids, "labels": labels}

    def source_rows(self, number: int) -> list[tuple[int, int]]:
        return list(self.items[number][2])

    def file_row(self, source: int, row: int) -> tuple[str, int]:
        return self.files.file_row(source, row)


class StreamSteps:
    """Optimizer steps for the trainer's loop, as ``schedule.optimizer_steps`` yields them: (pass, number of
    micro-batches before this step, the step's micro-batches). ``position`` is this rank's stream position
    after the last step yielded, for the checkpoint."""

    def __init__(self, stream: TokenStream, rows: StreamedRows, *, accumulation: int, start: StreamPosition,
                 micro_batches_done: int) -> None:
        self.stream, self.rows, self.accumulation = stream, rows, accumulation
        self.position, self.micro_batches_done = start, micro_batches_done

    def __iter__(self) -> Iterator[tuple[int, int, list[MicroBatch]]]:
        batches = self.stream.micro_batches(self.position)
        while True:
            self.rows.forget()
            group = []
            for _ in range(self.accumulation):
                rows, self.position = next(batches)
                group.append(self.rows.add(rows))
            yield self.position.passes, self.micro_batches_done, group
            self.micro_batches_done += len(group)


class StreamedData:
    """What the trainer reads in place of prepared data when streaming: ``train`` (the rows in flight), no
    ``eval``, and ``steps``, the loop's optimizer steps."""

    def __init__(self, stream: TokenStream, *, packed: bool) -> None:
        self.stream = stream
        self.train = StreamedRows(stream.files, packed=packed)
        self.eval = None

    def steps(self, *, accumulation: int, start: StreamPosition, micro_batches_done: int) -> StreamSteps:
        return StreamSteps(self.stream, self.train, accumulation=accumulation, start=start,
                           micro_batches_done=micro_batches_done)


def open_stream(data: DataPlan, tokenizer: Any, *, seed: int, offline: bool, rank: int = 0,
                world_size: int = 1) -> TokenStream:
    """The plan's streaming sources for this rank; local paths are checked now, Hub datasets when first read."""
    from .build import resolve_sources

    sources = resolve_sources(data.datasets, offline=offline)  # the HF_* offline environment counts too
    return TokenStream(data, tokenizer, sources, seed=seed, rank=rank, world_size=world_size)


def open_streamed_data(data: DataPlan, tokenizer: Any, *, seed: int, offline: bool, rank: int, world_size: int,
                       packed: bool) -> StreamedData:
    """``packed``: the plan has a packing attention, so a row's document pieces are isolated from each other."""
    return StreamedData(open_stream(data, tokenizer, seed=seed, offline=offline, rank=rank, world_size=world_size),
                        packed=packed)


def resume_position(saved: dict[str, Any] | None, *, resuming: bool,
                    world_size: int) -> tuple[StreamPosition, str | None]:
    """Where this rank's stream starts, and, when resuming, what was decided in words (a runtime decision).
    ``saved`` is what this rank saved in the checkpoint (``checkpoint.load_rank_state``). The saved position when
    the checkpoint was written by as many processes, else the beginning: each rank's share depends on the number
    of processes, so another count cannot continue the same shares."""
    if not resuming:
        return StreamPosition(), None
    if saved is None or "stream" not in saved:
        return StreamPosition(), "restarted from the beginning: the checkpoint holds no stream position"
    if saved["world_size"] != world_size:  # checkpoint.save_checkpoint writes it beside every rank's state
        return StreamPosition(), (f"restarted from the beginning: the checkpoint's stream was shared by "
                                  f"{saved['world_size']} processes, this run has {world_size}")
    position = StreamPosition.from_dict(saved["stream"])
    within = f"{position.rows} rows into the next packing window" if position.rows else \
        f"{position.tokens} tokens into the next"
    return position, (f"resumed exactly: pass {position.passes + 1}, the first {position.documents} source rows "
                      f"of this rank's share skipped, {within}")
