"""YAML text → Document: the values plus the line and column of every key and value.

Pure: takes text and a display name, never opens files. PyYAML's composer gives us the node
tree with marks; we build plain Python values from it ourselves so that we can also reject
duplicate keys (PyYAML silently keeps the last one) and read ``2e-4`` as a float (YAML 1.1
wants ``2.0e-4``; every Axolotl example writes the former).

Any text is read in bounded time and memory: before a node is built, one pass over the parser's
events refuses input past the bounds below (aliases counted as everything they name), and every
value YAML cannot build is a located problem, never a Python exception.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError, KeyPath, Problem

try:  # The C parser is several times faster; fall back where libyaml is missing.
    _BaseLoader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on the PyYAML build
    _BaseLoader = yaml.SafeLoader


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe loader that reads YAML 1.2 floats such as ``2e-4`` and ``1E5`` as numbers."""


_FLOAT_12 = re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


# Bounds on what one file may hold, far above any real config (the largest Axolotl example has about 150 values,
# nests 4 deep and lists a handful of datasets) and low enough that validate, resolve and render stay well under a
# second and 300 MB on anything inside them: YAML aliases can make a 550-byte file stand for billions of values.
MAX_TEXT_CHARS = 1024 * 1024
MAX_VALUES = 10_000  # scalars, mappings and lists, each alias counted as everything it names
MAX_DEPTH = 64
MAX_KEYS = 1_000  # in one mapping
MAX_LIST_ENTRIES = 1_000  # in one list
MAX_DATASETS = 256  # entries of `datasets:` / `test_datasets:`; each becomes a block of the rendered run plan
MAX_STRING_CHARS = 100_000  # in one value; an inline chat template is a few thousand
_DATASET_LISTS = {("datasets",), ("test_datasets",)}
_STR_TAG = "tag:yaml.org,2002:str"
_LINE_BREAK_CHARACTERS = "\n\r\x85\u2028\u2029"  # what YAML counts as the end of a line
_YAML_LINE_BREAK = re.compile(f"\r\n|[{_LINE_BREAK_CHARACTERS}]")

# What YAML 1.1 refuses to read (PyYAML's reader says so with a byte offset and no line): C0 controls other than
# tab and newlines, DEL, C1 controls other than NEL, lone surrogates (undecodable bytes) and U+FFFE/U+FFFF.
_NOT_YAML_CHARACTER = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class Mark:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class Document:
    """A loaded YAML file: ``data`` plus where each key and value sits in the text."""

    name: str
    data: Any
    value_marks: dict[KeyPath, Mark] = field(default_factory=dict)
    key_marks: dict[KeyPath, Mark] = field(default_factory=dict)
    # Keys rewritten into tunefile's spelling → the key as the file wrote it (compiler/dialect), so that a
    # problem is shown under the name the user knows.
    written_as: dict[KeyPath, KeyPath] = field(default_factory=dict)

    def shown_path(self, path: KeyPath) -> KeyPath:
        for new, old in self.written_as.items():
            if tuple(path[:len(new)]) == new:
                return (*old, *path[len(new):])
        return tuple(path)

    def locate(self, path: KeyPath, *, at_key: bool = False) -> Mark:
        """The best mark for a path: the key or value itself, else its nearest ancestor."""
        candidates = [self.key_marks, self.value_marks] if at_key else [self.value_marks, self.key_marks]
        probe = tuple(path)
        while True:
            for marks in candidates:
                if probe in marks:
                    return marks[probe]
            if not probe:
                return Mark(1, 1)
            probe = probe[:-1]


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


def load_document(text: str, name: str) -> Document:
    """Parse YAML text; raise ConfigError with located problems for syntax errors, duplicate keys, values that
    YAML cannot build (``2020-13-45``, ``!!int abc``) and input past the bounds above."""
    end = _end_of_text(text)
    try:
        document = _read_document(text, name)
    except ConfigError as exc:
        if end is None:
            raise
        raise ConfigError([_problem_within(problem, end) for problem in exc.problems]) from None
    if end is not None:
        for marks in (document.value_marks, document.key_marks):
            marks.update({path: end for path, mark in marks.items() if mark.line > end.line})
    return document


def _end_of_text(text: str) -> Mark | None:
    """Where TEXT ends, when its last line has no line break: libyaml reads such a line as if it had one and puts
    the end of the stream (an empty document, a missing value) on the line after it, a line the file does not have.
    None when the text ends with a line break, whose next line is where an editor shows the end."""
    if not text or text[-1] in _LINE_BREAK_CHARACTERS:
        return None
    lines = _YAML_LINE_BREAK.split(text)
    return Mark(len(lines), len(lines[-1]) + 1)


def _problem_within(problem: Problem, end: Mark) -> Problem:
    if problem.line is None or problem.line <= end.line:
        return problem
    return dataclasses.replace(problem, line=end.line, column=end.column)


def _read_document(text: str, name: str) -> Document:
    _check_text(text, name)
    loader = _Loader(text)
    try:
        _check_events(loader, name)  # before any node exists, so a hostile file costs no memory
        loader.dispose()
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            return Document(name=name, data={}, value_marks={(): Mark(1, 1)})
        own_keys = _check_scalars(loader, node, name)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(
            [Problem((), f"YAML syntax error: {problem}", file=name, line=line, column=column)]
        ) from None
    except yaml.YAMLError as exc:  # pragma: no cover - unmarked errors are rare (control characters are caught above)
        raise ConfigError([Problem((), f"YAML error: {exc}", file=name, line=1, column=1)]) from None
    finally:
        loader.dispose()

    document = Document(name=name, data=data)
    problems: list[Problem] = []
    _record_marks(node, (), document, problems, own_keys, visited=set())
    if problems:
        raise ConfigError(problems)
    return document


def decode_text(raw: bytes, name: str) -> str:
    """The text of a config read as bytes: UTF-8, or a ConfigError at the line and column of the first byte that
    is not (a BOM is dropped, as ``utf-8-sig`` does)."""
    if len(raw) > MAX_TEXT_CHARS * 4:  # no need to decode a file that cannot fit in the bound
        _refuse(name, 1, 1, f"the file is {len(raw):,} bytes; tunefile reads configs of at most {MAX_TEXT_CHARS:,} "
                "characters")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = raw[:exc.start].decode("utf-8-sig")
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        _refuse(name, line, column, f"the file is not UTF-8: byte 0x{raw[exc.start]:02x} cannot start or continue "
                "a character here; save the file as UTF-8")
    raise AssertionError("unreachable")  # pragma: no cover - _refuse always raises


def _refuse(name: str, line: int, column: int, message: str, path: KeyPath = ()) -> None:
    raise ConfigError([Problem(path, message, file=name, line=line, column=column)])


def _check_text(text: str, name: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        _refuse(name, 1, 1, f"the file is {len(text):,} characters; tunefile reads configs of at most "
                f"{MAX_TEXT_CHARS:,}")
    found = _NOT_YAML_CHARACTER.search(text)
    if found:
        before = text[:found.start()]
        line = before.count("\n") + 1
        column = found.start() - (before.rfind("\n") + 1) + 1
        character = found.group()
        shown = f"U+{ord(character):04X}" + (" (not valid UTF-8 in the file)" if 0xD800 <= ord(character) < 0xE000
                                              else "")
        _refuse(name, line, column, f"control character {shown} is not allowed in YAML; remove it, or write it "
                "as an escape such as \\t inside double quotes")


@dataclass
class _OpenCollection:
    """A mapping or sequence whose end event has not come yet, while _check_events walks the stream."""

    path: KeyPath
    is_mapping: bool
    anchor: str | None
    start: Mark
    expanded_at_start: int
    children: int = 0
    key: str | int = "?"


def _check_events(loader: Any, name: str) -> None:
    """Walk the event stream once, holding only the open collections, and refuse input past the bounds: nesting,
    keys in one mapping, entries in one list, characters in one value, and values after alias expansion (each
    alias counts as the whole of the node it names; an alias inside the node it names is refused)."""
    open_collections: list[_OpenCollection] = []
    expanded_sizes: dict[str, int] = {}
    expanded = 0
    while loader.check_event():
        event = loader.get_event()
        if not isinstance(event, (yaml.NodeEvent, yaml.CollectionEndEvent)):
            continue
        where = Mark(event.start_mark.line + 1, event.start_mark.column + 1)
        if isinstance(event, yaml.CollectionEndEvent):
            closed = open_collections.pop()
            if closed.anchor is not None:
                expanded_sizes[closed.anchor] = expanded - closed.expanded_at_start
            continue
        path = _child_path(open_collections[-1]) if open_collections else ()
        if isinstance(event, yaml.AliasEvent):
            if any(collection.anchor == event.anchor for collection in open_collections):
                _refuse(name, where.line, where.column, f"alias *{event.anchor} is used inside the node it names "
                        "(a recursive alias); tunefile configs are trees, write the value out", path)
            expanded += expanded_sizes.get(event.anchor, 1)  # an unknown anchor is the composer's error to report
            if expanded > MAX_VALUES:
                _refuse(name, where.line, where.column, f"aliases expand this file past {MAX_VALUES:,} values (the "
                        f"most tunefile reads); alias *{event.anchor} alone stands for "
                        f"{expanded_sizes.get(event.anchor, 1):,}", path)
        else:
            expanded += 1
            if expanded > MAX_VALUES:
                _refuse(name, where.line, where.column, f"more than {MAX_VALUES:,} values in one file (the most "
                        "tunefile reads)", path)
            if isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_STRING_CHARS:
                _refuse(name, where.line, where.column, f"a value of {len(event.value):,} characters; tunefile reads "
                        f"at most {MAX_STRING_CHARS:,} in one value", path)
        if open_collections:
            _count_child(open_collections[-1], event, name, where)
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_collections) >= MAX_DEPTH:
                _refuse(name, where.line, where.column, f"nested more than {MAX_DEPTH} levels deep (the most "
                        "tunefile reads)", path)
            open_collections.append(_OpenCollection(path, isinstance(event, yaml.MappingStartEvent), event.anchor,
                                                    where, expanded - 1))


def _child_path(parent: _OpenCollection) -> KeyPath:
    """The key path of the node about to be added to ``parent`` (a mapping's key is shown at its mapping)."""
    if not parent.is_mapping:
        return (*parent.path, parent.children)
    return (*parent.path, parent.key) if parent.children % 2 else parent.path


def _count_child(parent: _OpenCollection, event: Any, name: str, where: Mark) -> None:
    if parent.is_mapping and parent.children % 2 == 0:
        parent.key = event.value if isinstance(event, yaml.ScalarEvent) else "?"
    parent.children += 1
    if parent.is_mapping:
        if (parent.children + 1) // 2 > MAX_KEYS:
            _refuse(name, where.line, where.column, f"more than {MAX_KEYS:,} keys in one mapping (the most "
                    "tunefile reads)", parent.path)
        return
    limit, what = (MAX_DATASETS, "dataset entries") if parent.path in _DATASET_LISTS else (MAX_LIST_ENTRIES,
                                                                                          "entries in one list")
    if parent.children > limit:
        _refuse(name, parent.start.line, parent.start.column, f"more than {limit:,} {what} (the most tunefile "
                "reads)", parent.path)


def _check_scalars(loader: Any, root: yaml.Node, name: str) -> dict[int, set[int]]:
    """Build every scalar once, so that a value YAML cannot build (``2020-13-45`` read as a date, ``!!int abc``,
    ``!!bool maybe``) is reported at its own line instead of escaping as a Python error; each node is visited once
    however many aliases name it. Returns, for each mapping, the ids of the key nodes written in it (not merged
    in with ``<<``), which tell a duplicate key from a merge override."""
    problems: list[Problem] = []
    own_keys: dict[int, set[int]] = {}
    visited: set[int] = set()
    pending: list[tuple[yaml.Node, KeyPath]] = [(root, ())]
    while pending:
        node, path = pending.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            problem = _unbuildable(loader, node, path, name)
            if problem:
                problems.append(problem)
        elif isinstance(node, yaml.MappingNode):
            own_keys[id(node)] = set()
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    pending.append((value_node, path))
                    continue
                own_keys[id(node)].add(id(key_node))
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _STR_TAG:
                    problems.append(_not_a_name(key_node, (*path, key), name))
                pending.extend([(key_node, path), (value_node, (*path, key))])
        elif isinstance(node, yaml.SequenceNode):
            pending.extend((item, (*path, index)) for index, item in enumerate(node.value))
    if problems:
        raise ConfigError(sorted(problems, key=lambda problem: (problem.line or 0, problem.column or 0)))
    return own_keys


def _not_a_name(key_node: yaml.ScalarNode, path: KeyPath, name: str) -> Problem:
    """A key that YAML reads as another type than text (``0:``, ``true:``, ``null:``, ``1.5:``): every key of a
    config, a target or a DeepSpeed file is a name, and the rest of the compiler (and the JSON Schema, whose keys
    are strings) relies on that."""
    kind = key_node.tag.rsplit(":", 1)[-1]
    shown = key_node.value if len(key_node.value) <= 40 else key_node.value[:40] + "…"
    return Problem(path, f"the key {shown!r} is read as a YAML {kind}, but keys are names; quote it if it is meant "
                   "as one", at_key=True, file=name, line=_mark(key_node).line, column=_mark(key_node).column)


def _unbuildable(loader: Any, node: yaml.ScalarNode, path: KeyPath, name: str) -> Problem | None:
    try:
        loader.construct_object(node)
    except yaml.MarkedYAMLError:
        raise  # an unknown tag and the like: reported as a YAML error with PyYAML's own words
    # What PyYAML's scalar constructors raise on text their tag does not fit (int(), datetime(), a dict lookup of
    # the boolean words, a regex that did not match).
    except (ValueError, KeyError, AttributeError, TypeError, OverflowError, IndexError) as exc:
        kind = node.tag.rsplit(":", 1)[-1]
        detail = f" ({exc})" if isinstance(exc, ValueError) and str(exc) else ""
        shown = node.value if len(node.value) <= 40 else node.value[:40] + "…"
        return Problem(path, f"{shown!r} is not a valid YAML {kind}{detail}; quote it if it is meant as text",
                       file=name, line=_mark(node).line, column=_mark(node).column)
    return None


def _record_marks(node: yaml.Node, path: KeyPath, doc: Document, problems: list[Problem],
                  own_keys: dict[int, set[int]], visited: set[int]) -> None:
    """Record where each key and value sits and report duplicate keys. Each node is walked once: a node that
    aliases reach again keeps the marks of its first path (later paths fall back to the alias's key)."""
    doc.value_marks[path] = _mark(node)
    if id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        written_here = own_keys.get(id(node), set())
        seen: dict[Any, yaml.Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged from an anchor keep the anchor's marks
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            child = (*path, key)
            first = seen.get(key)
            if first is not None and id(first) in written_here and id(key_node) in written_here:
                problems.append(
                    Problem(
                        child,
                        f"duplicate key (first set on line {_mark(first).line}); YAML would silently keep the last",
                        at_key=True,
                        file=doc.name,
                        line=_mark(key_node).line,
                        column=_mark(key_node).column,
                    )
                )
                continue
            seen[key] = key_node  # a key written after a `<<` merge of the same key overrides it: marks follow
            doc.key_marks[child] = _mark(key_node)
            _record_marks(value_node, child, doc, problems, own_keys, visited)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_marks(item, (*path, index), doc, problems, own_keys, visited)
