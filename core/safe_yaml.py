"""Reading untrusted YAML with limits: file size, nesting depth, and the size after aliases expand.

A 436-byte YAML of nested anchors ("billion laughs") expands to hundreds of millions of nodes, a list
nested 10,000 deep overflows Python's recursion in the composer, and a file that is not UTF-8 is a
decoding traceback. Every YAML that thali reads (``domain.yaml``, presets, ``--set`` values, a run's or an
export's ``config.yaml``) goes through :func:`parse_yaml` or :func:`read_yaml`, which refuse all of these
with a one-line :class:`ConfigError` naming the source and the limit. No torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MAX_YAML_BYTES = 1024 * 1024  # a real domain.yaml is a few KB
MAX_YAML_DEPTH = 64  # the schema nests 4 deep
MAX_YAML_NODES = 100_000  # after aliases expand; a domain.yaml has a few hundred, 10,000 classes fit


class _LimitError(Exception):
    """A limit was hit while composing; turned into a ConfigError naming the source."""


class _DepthLimitedLoader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deeper than ``max_depth`` before Python's recursion can."""

    max_depth = MAX_YAML_DEPTH

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                mark = self.peek_event().start_mark
                raise _LimitError(
                    f"line {mark.line + 1}: nested deeper than the limit of {self.max_depth} levels"
                )
            self._nodes += 1
            if self._nodes > MAX_YAML_NODES:  # stop early; aliases are counted after composing
                raise _LimitError(_too_many(MAX_YAML_NODES))
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _too_many(limit: int) -> str:
    return f"more than {limit:,} values once aliases are expanded (a YAML bomb?)"


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes in the document with every alias expanded; refuses cycles and more than ``limit``."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _LimitError(f"line {node.start_mark.line + 1}: an alias refers to itself (a cycle)")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        if total > limit:
            raise _LimitError(_too_many(limit))
        sizes[key] = total
        return total

    return size(root)


def parse_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """The data of one YAML document and its composed node (for line numbers), within the limits.

    Raises :class:`ConfigError` ``"{source}: ..."`` for invalid YAML or a limit hit (size, depth,
    expanded size, alias cycle). ``yaml.YAMLError`` never escapes.
    """
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: YAML is {len(text):,} characters, over the limit of {MAX_YAML_BYTES:,}")
    loader = _DepthLimitedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _expanded_size(node, MAX_YAML_NODES)
        return loader.construct_document(node), node
    except _LimitError as exc:
        raise ConfigError(f"{source}: YAML refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> tuple[Any, yaml.Node | None]:
    """:func:`parse_yaml` of a UTF-8 file, refusing one over the size limit before reading it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: YAML file is {size:,} bytes, over the limit of {MAX_YAML_BYTES:,}")
        with open(path, "rb") as handle:
            raw = handle.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_YAML_BYTES:  # grew while we read it
        raise ConfigError(f"{path}: YAML file is over the limit of {MAX_YAML_BYTES:,} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None
    return parse_yaml(text, str(path))
