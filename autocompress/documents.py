"""Reading user documents at the boundary: experiment YAML, ``--set`` values, hardware-profile JSON.

Whatever a file holds, reading it ends in a value or in one :class:`~autocompress.errors.AutocompressError`
line naming the file: a size cap checked before reading, UTF-8 decoding, and YAML whose *expanded*
size and nesting are bounded before anything is built from it. The size is counted on the parser's
event stream with every alias counted at its full expanded size, so a "billion laughs" document of a
kilobyte is refused after a few hundred events instead of growing without bound in whatever first
walks it (an error message's ``repr``, a JSON hash of task arguments). A recursive alias is refused
too: no schema can validate a value that contains itself.

:func:`short_repr` is what error messages use to show a bad value: bounded in length and depth
whatever the value is. :func:`atomic_write` is how the files autocompress itself keeps (teacher
caches, profiles) are written: whole or not at all.
"""

from __future__ import annotations

import json
import os
import reprlib
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    DocumentStartEvent,
    NodeEvent,
)

from autocompress.errors import AutocompressError

MiB = 1 << 20
MAX_DEPTH = 50
"""Nesting deeper than this is refused (experiments need about 5 levels, profiles 5)."""
MAX_NODES = 20_000
"""Expanded YAML nodes (every alias counted at the size of what it stands for) allowed in a document."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, fsynced, then a rename: readers and
    a process killed mid-write see the old file whole or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600; these are ordinary data files that others on the machine read.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's loader when PyYAML has it (much faster); its composer recurses in C, so depth is checked first."""

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 3, 40, 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for an error message: at most ``limit`` characters and a few levels, never slow."""
    try:
        text = _repr.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr raises is still shown as something
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text(path: Path, *, what: str, max_bytes: int, error: type[AutocompressError] = AutocompressError) -> str:
    """The text of the regular file ``path`` (UTF-8), refusing files over ``max_bytes``.

    ``what`` names the kind of file in messages (``"experiment file"``); every problem raises
    ``error`` with one line starting with the path.
    """
    try:
        if not path.is_file():
            raise error(f"{path}: no such {what}")
        # Read one byte past the cap rather than trust st_size alone (pipes and /proc report 0).
        with path.open("rb") as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as err:
        raise error(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    if len(raw) > max_bytes:
        raise error(f"{path}: the {what} is larger than {_size(max_bytes)}; is it the right file?")
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not an error
    except UnicodeDecodeError as err:
        raise error(
            f"{path}: the {what} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "is it a binary file?"
        ) from None


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n} bytes"


def load_yaml(
    text: str,
    source: str,
    *,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
    error: type[AutocompressError] = AutocompressError,
) -> Any:
    """Parse one YAML document with the safe loader after bounding its nesting and expanded size.

    Raises ``error`` with one line ``"<source>: ..."`` for invalid YAML (with line and column), a
    document nested deeper than ``max_depth``, one that expands to more than ``max_nodes`` nodes,
    or a recursive alias.
    """
    try:
        _check_events(text, source, max_depth, max_nodes, error)
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        if "maximum nesting depth" in _problem(err):  # libyaml's own limit, met while it scans ahead
            raise error(f"{source}: nested deeper than {max_depth} levels{_where(err)}") from None
        raise error(f"{source}: not valid YAML{_where(err)}: {_problem(err)}") from None
    except RecursionError:  # defensive: the depth check above keeps the composer well inside the stack
        raise error(f"{source}: nested too deeply (more than {max_depth} levels)") from None


def _check_events(text: str, source: str, max_depth: int, max_nodes: int, error: type[AutocompressError]) -> None:
    # The parser emits events without recursion, whatever the nesting; nothing is built here.
    expanded = 0  # nodes of the document as the constructor would build it
    open_starts: list[tuple[str | None, int]] = []  # (anchor, count at its start) of the open collections
    sizes: dict[str, int] = {}  # anchor -> expanded nodes of the node it names
    for event in yaml.parse(text, Loader=_SafeLoader):
        if isinstance(event, DocumentStartEvent):
            sizes.clear()
        elif isinstance(event, AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_starts):
                raise error(f"{source}: the alias *{event.anchor}{_at(event)} refers to a node that contains it")
            expanded += sizes.get(event.anchor, 1)  # an undefined alias is the loader's error
        elif isinstance(event, CollectionStartEvent):
            expanded += 1
            open_starts.append((event.anchor, expanded))
            if len(open_starts) > max_depth:
                raise error(f"{source}: nested deeper than {max_depth} levels{_at(event)}")
        elif isinstance(event, CollectionEndEvent):
            anchor, start = open_starts.pop()
            if anchor is not None:
                sizes[anchor] = expanded - start + 1
        elif isinstance(event, NodeEvent):  # a scalar
            expanded += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        if expanded > max_nodes:
            raise error(
                f"{source}: the document expands to more than {max_nodes} values{_at(event)} "
                "(YAML aliases repeating large nodes?)"
            )


def _at(event: yaml.Event) -> str:
    mark = event.start_mark
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _where(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        return f" (line {mark.line + 1}, column {mark.column + 1})"
    position = getattr(err, "position", None)  # a ReaderError: an unacceptable character
    return f" (character {position})" if position is not None else ""


def _problem(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None)
    if problem:
        context = getattr(err, "context", None)  # "while parsing a flow sequence", "found duplicate anchor"
        return " ".join(f"{problem} ({context})".split() if context else str(problem).split())
    if isinstance(err, yaml.reader.ReaderError):
        return f"unacceptable character {err.character!r}" if isinstance(err.character, str) else err.reason
    return "invalid YAML"


def load_json(
    text: str, source: str, *, max_depth: int = MAX_DEPTH, error: type[AutocompressError] = AutocompressError
) -> Any:
    """Parse JSON, refusing ``NaN``/``Infinity`` (not JSON; Python writes them) and deep nesting."""

    def constant(name: str) -> float:
        raise ValueError(f"{name} is not a finite number")

    try:
        data = json.loads(text, parse_constant=constant)
    except json.JSONDecodeError as err:
        raise error(f"{source}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None
    except ValueError as err:
        raise error(f"{source}: not valid JSON: {err}") from None
    except RecursionError:
        raise error(f"{source}: nested deeper than {max_depth} levels") from None
    stack = [(data, 1)]
    while stack:  # iterative: the depth is what is being checked
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise error(f"{source}: nested deeper than {max_depth} levels")
            stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return data


def format_validation_error(source: str, err: ValidationError) -> str:
    """One line for a pydantic error: ``"<source>: <key.path>: <problem> (got <value>)"``, the first
    problem only, with a count of the others; every part is bounded in length."""
    problems = err.errors()
    first = problems[0]
    loc = ".".join(_loc_part(part) for part in first["loc"]) or "(top level)"
    kind = first["type"]
    msg = " ".join(first["msg"].removeprefix("Value error, ").split())
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "finite_number":
        msg = "must be a finite number, not NaN or infinity"
    if kind not in ("value_error", "assertion_error", "extra_forbidden", "missing") and "input" in first:
        msg = f"{msg} (got {short_repr(first['input'])})"
    if len(msg) > 300:
        msg = msg[:297] + "..."
    more = len(problems) - 1
    suffix = f" [+{more} more problem{'s' if more > 1 else ''}]" if more else ""
    return f"{source}: {loc}: {msg}{suffix}"


def _loc_part(part: Any) -> str:
    # Keys are the user's text: shown as written when they look like keys, else quoted and bounded.
    text = str(part)
    if len(text) <= 60 and text.isprintable() and " " not in text and text:
        return text
    return short_repr(text, 40)
