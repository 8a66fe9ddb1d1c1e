"""streams.yaml bytes -> Python data with the line of every key and list item, within bounds.

A config file is operator input, and a broken one (a stray byte, a tab, a paste of the wrong
file, a YAML alias bomb) must end in one line saying where, never in a traceback, a hang or
gigabytes of memory, whether it is read by `check-config`, at start or on a reload. So:

- at most MAX_BYTES are read, of a regular file (a FIFO would block), as UTF-8 text without
  control characters;
- the event stream is walked once before anything is built, refusing nesting deeper than
  MAX_DEPTH (PyYAML composes recursively: 5,000 levels raised RecursionError) and more than
  MAX_NODES nodes; libyaml parses when PyYAML has it (its pure-Python parser took ~100 us a node
  on the 2-core CI machine: 50 s for a 1 MiB flow list);
- the data is built here, not by PyYAML's constructor, to keep the lines, to count every value
  an alias expands to and stop past MAX_NODES (a 237-byte alias bomb is 531,441 strings: 6 s and
  165 MB before, a 267-byte one 12 s), to refuse recursive aliases, and to apply merge keys
  (`<<: *base`) by the YAML rule (keys written in the mapping win over merged ones, and earlier
  merged mappings over later ones) instead of reporting them as duplicates.

Keys must be strings: YAML 1.1 reads `yes:` as a boolean and `1:` as an integer, so such a key is
reported with the advice to quote it. Duplicate keys, which PyYAML would silently resolve to the
last one, are reported too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from codetr_stream.daemon.config.problems import KeyPath, Problem, dotted

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "read_yaml"]

MAX_BYTES = 1 << 20  # ~7,000 cameras at ~150 bytes each
MAX_DEPTH = 32  # the schema needs 6 (streams[i].roi.points[j][k])
MAX_NODES = 50_000  # ~5,000 cameras; 3,000 load in 0.5 s on the idle 2-core CI machine
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MAP, _SEQ, _STR, _MERGE = (f"tag:yaml.org,2002:{kind}" for kind in ("map", "seq", "str",
                                                                        "merge"))
_SCALAR_KINDS = {bool: "a boolean", int: "an integer", float: "a number", type(None): "null"}


class _Refused(Exception):
    """The file cannot be read at all; one problem says why (and where, when known)."""

    def __init__(self, line: int | None, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.line, self.message, self.hint = line, message, hint


def read_yaml(
    path: str | Path, file: str, problems: list[Problem]
) -> tuple[Any, dict[KeyPath, int]]:
    """The YAML document in `path` as Python data ({} when empty) and the line of every key and
    list item, keyed by path. Every problem found is appended to `problems` (the data is None
    when the file cannot be read at all)."""
    try:
        text = _read_text(Path(path))
        _scan(text)
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            return _Builder(loader, file, problems).document(root)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problems.append(Problem(file, mark.line + 1 if mark else None, "",
                                f"invalid YAML: {exc.problem or exc.context}"))
    except yaml.YAMLError as exc:  # no position: never seen, as the text is checked first
        problems.append(Problem(file, None, "", f"invalid YAML: {type(exc).__name__}"))
    except _Refused as exc:
        problems.append(Problem(file, exc.line, "", exc.message, exc.hint))
    return None, {}


def _read_text(path: Path) -> str:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise _Refused(None, "cannot read: not a regular file")
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise _Refused(None, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise _Refused(None, f"larger than {MAX_BYTES >> 10} KiB",
                       "a streams.yaml takes about 150 bytes a camera: is this the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refused(raw.count(b"\n", 0, exc.start) + 1,
                       f"not UTF-8 text (byte 0x{raw[exc.start]:02x})",
                       "save the file as UTF-8") from None
    if bad := yaml.reader.Reader.NON_PRINTABLE.search(text):
        raise _Refused(text.count("\n", 0, bad.start()) + 1,
                       f"control character U+{ord(bad.group()):04X} in the text",
                       "only printable text, tabs and line breaks belong in a YAML file")
    return text


def _scan(text: str) -> None:
    """Walk the events once: refuse deep nesting and huge documents before composing them."""
    loader = _Loader(text)
    try:
        depth = nodes = 0
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                continue
            if isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent, yaml.CollectionStartEvent)):
                nodes += 1
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
            line = event.start_mark.line + 1
            if depth > MAX_DEPTH:
                raise _Refused(line, f"nested deeper than {MAX_DEPTH} levels")
            if nodes > MAX_NODES:
                raise _Refused(line, f"more than {MAX_NODES:,} values",
                               "is this the right file? split a larger fleet across files")
    finally:
        loader.dispose()


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Builder:
    """Python data from a composed node graph, counting every value an alias expands to."""

    def __init__(self, loader: Any, file: str, problems: list[Problem]) -> None:
        self.loader = loader
        self.file = file
        self.problems = problems
        self.lines: dict[KeyPath, int] = {(): 1}
        self.budget = MAX_NODES
        self.building: set[int] = set()  # ids of the collections being built (cycle check)

    def document(self, root: yaml.Node | None) -> tuple[Any, dict[KeyPath, int]]:
        return ({} if root is None else self.value(root, ())), self.lines

    def problem(self, line: int, path: KeyPath, message: str, hint: str = "") -> None:
        self.problems.append(Problem(self.file, line, dotted(path), message, hint))

    def value(self, node: yaml.Node, path: KeyPath) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise _Refused(_line(node), f"more than {MAX_NODES:,} values once aliases are "
                           "expanded", "each *alias repeats its anchor's whole value")
        if len(path) > MAX_DEPTH:
            raise _Refused(_line(node), f"nested deeper than {MAX_DEPTH} levels through aliases")
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        if id(node) in self.building:
            raise _Refused(_line(node), "a recursive alias: this value contains itself")
        if node.tag not in (_MAP, _SEQ):
            self.problem(_line(node), path, f"the tag {node.tag} is not supported here",
                         "use a plain mapping or list")
            return None
        self.building.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path)
            return self.sequence(node, path)
        finally:
            self.building.discard(id(node))

    def scalar(self, node: yaml.ScalarNode, path: KeyPath) -> Any:
        if node.tag == _STR:  # most of a file: what PyYAML's constructor would return
            return node.value
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:  # an unknown tag such as !!python/object
            self.problem(_line(node), path, f"cannot read this value: {exc.problem}")
        except (ValueError, OverflowError) as exc:  # e.g. an integer of 5,000 digits
            self.problem(_line(node), path, f"cannot read this value ({type(exc).__name__})")
        return None

    def sequence(self, node: yaml.SequenceNode, path: KeyPath) -> list[Any]:
        items = []
        for i, item in enumerate(node.value):
            self.lines[(*path, i)] = _line(item)
            items.append(self.value(item, (*path, i)))
        return items

    def mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        merges = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merges.append(value_node)
                continue
            key = self.key(key_node, path)
            if key is None:
                continue
            if key in out:
                self.problem(_line(key_node), (*path, key),
                             f"duplicate key (first on line {self.lines[(*path, key)]})")
                continue
            self.lines[(*path, key)] = _line(key_node)
            out[key] = self.value(value_node, (*path, key))
        for merged in merges:
            self.merge(out, merged, path)
        return out

    def key(self, node: yaml.Node, path: KeyPath) -> str | None:
        """The key as a string, or None after reporting why it is not one."""
        if not isinstance(node, yaml.ScalarNode):
            kind = "mapping" if isinstance(node, yaml.MappingNode) else "list"
            self.problem(_line(node), path, f"a {kind} as a key", "keys are plain names")
            return None
        key = self.scalar(node, path)
        if isinstance(key, str):
            return key
        kind = _SCALAR_KINDS.get(type(key), f"a {type(key).__name__}")
        self.problem(_line(node), path, f"the key {node.value[:40]!r} reads as {kind}",
                     "quote it to make it a string")
        return None

    def merge(self, out: dict[str, Any], node: yaml.Node, path: KeyPath) -> None:
        """`<<: *a` or `<<: [*a, *b]`: the keys of those mappings that `out` lacks."""
        for source in node.value if isinstance(node, yaml.SequenceNode) else [node]:
            if not isinstance(source, yaml.MappingNode):
                self.problem(_line(source), path, "`<<` merges mappings only",
                             "write `<<: *anchor` where the anchor names a mapping")
                continue
            lines, self.lines = self.lines, {}
            merged = self.value(source, path)
            merged_lines, self.lines = self.lines, lines
            for key, value in (merged or {}).items():
                if key in out:
                    continue
                out[key] = value
                prefix = (*path, key)
                self.lines.update((p, n) for p, n in merged_lines.items()
                                  if p[:len(prefix)] == prefix)
