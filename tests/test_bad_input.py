"""Bad input is one line: every malformed experiment, override or profile ends as exit status 2 and one
``autocompress: error:`` line naming the key or the file, quickly, before any training.

Two kinds of test. Unit tests for each reported case (binary files, alias bombs, NaN, seeds, paths,
URLs, feature layers, ``--set``). And hypothesis tests that start from the shipped experiment files
(and the tiny test experiment) and mutate them into inputs that are invalid *by construction*: every
generated case knows why it is invalid and which key or file its error line must name. Each case runs
through the real CLI entry (``autocompress.cli.main``) in-process; ``test_enough_malformed_inputs``
reports how many were generated.
"""

from __future__ import annotations

import collections
import json
import math
import signal
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from autocompress.cli import main
from autocompress.config import MAX_EXPERIMENT_BYTES, MAX_SEED, STORAGE_SCHEMES, TRACKING_SCHEMES, Experiment
from autocompress.documents import MAX_DEPTH, MAX_NODES
from autocompress.hw_profiles.profile import shipped_profiles
from tests.conftest import ROOT, tiny_experiment_dict

CASE_LIMIT_S = 10.0
"""A malformed input must be refused within this (they take milliseconds; a hang or a bomb would not)."""
SHIPPED = {p.stem: p for p in sorted((ROOT / "experiments").glob("*.yaml"))}
PROFILE = shipped_profiles()["xeon-torch-eager-1t"]  # the smaller shipped profile (~240 kB)
GENERATED: collections.Counter[str] = collections.Counter()
"""Malformed inputs generated and checked, by hypothesis test (reported by the last test)."""
SLOWEST: dict[str, float] = {}

HYPOTHESIS = settings(
    deadline=None,  # timed per case below, with a limit of its own
    derandomize=True,  # the same inputs on every run and in CI
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- running one case ----------------------------------------------------------------------------


class _TookTooLong(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _TookTooLong(f"no answer within {CASE_LIMIT_S} s")


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    """``main(argv)`` with a hard time limit: (exit status, stderr, seconds)."""
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
    started = time.monotonic()
    try:
        code = main(argv)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.monotonic() - started
    return code, capsys.readouterr().err, elapsed


def assert_one_line(code: int, err: str, elapsed: float, *names: str) -> None:
    """Exit 2, exactly one ``autocompress: error:`` line on stderr that contains every one of ``names``."""
    assert "Traceback" not in err, err
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert err.startswith("autocompress: error: "), err
    for name in names:
        assert name in err, f"{name!r} not in {err!r}"
    assert elapsed < CASE_LIMIT_S, f"{elapsed:.1f} s: {err}"


@dataclass
class Case:
    """A malformed input built to be invalid: the file's bytes, extra arguments, what the line must name.

    ``names`` may contain ``{file}``, replaced by the written file's path.
    """

    kind: str
    content: bytes
    names: tuple[str, ...]
    argv: tuple[str, ...] = ()
    suffix: str = ".yaml"


def check_case(case: Case, where: Path, capsys: pytest.CaptureFixture[str], counter: str) -> None:
    """Write ``case``, run ``autocompress validate`` on it, and check the one-line refusal."""
    GENERATED[counter] += 1
    path = where / f"{counter}-{GENERATED[counter]}{case.suffix}"
    path.write_bytes(case.content)
    code, err, elapsed = run_cli(["validate", str(path), *case.argv], capsys)
    SLOWEST[counter] = max(SLOWEST.get(counter, 0.0), elapsed)
    assert_one_line(code, err, elapsed, *(name.replace("{file}", str(path)) for name in case.names))
    path.unlink()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A scratch directory that is also the working directory (default output_dir runs/<name> lands here)."""
    where = tmp_path_factory.mktemp("bad-input")
    (where / "a-file").write_text("not a directory\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(where)
        yield where


# --- the valid starting points -------------------------------------------------------------------


def _bases() -> dict[str, dict[str, Any]]:
    bases = {name: yaml.safe_load(path.read_text()) for name, path in SHIPPED.items()}
    tiny = tiny_experiment_dict(Path("tiny-out"))
    del tiny["tracking"]  # its default store lies beside output_dir, in the working directory
    bases["tiny"] = tiny
    return bases


BASES = _bases()
BASE_NAMES = sorted(BASES)


def dump(data: Any) -> bytes:
    text = yaml.safe_dump(data, sort_keys=False)  # escapes anything outside ASCII
    assert text.isascii()
    return text.encode()


def base_text(name: str) -> bytes:
    """A valid experiment's bytes: the shipped file as written (comments included), or the tiny one dumped."""
    return SHIPPED[name].read_bytes() if name in SHIPPED else dump(BASES[name])


def test_the_starting_points_are_valid():
    for name, data in BASES.items():
        Experiment.model_validate(data)
        yaml.safe_load(base_text(name))


def with_value(data: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``data`` with ``path`` set (missing sections created)."""
    result = json.loads(json.dumps(data))
    node = result
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return result


def without(data: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    result = json.loads(json.dumps(data))
    node = result
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return result


# --- the schema, read from the models (every field, every technique section) ---------------------


@dataclass(frozen=True)
class SchemaField:
    path: tuple[str, ...]
    kind: str  # section, args, bool, int, float, str, path, literal, list[float], list[int], list[str], list[literal]
    bounds: dict[str, float]  # ge, gt, le, lt
    min_length: int | None


def _kind(annotation: Any) -> tuple[str, Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _kind(options[0])
    if origin is Literal:
        return "literal", annotation
    if origin is list:
        inner, _ = _kind(typing.get_args(annotation)[0])
        return f"list[{inner}]", annotation
    if origin is dict:
        return "args", annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section", annotation
    if annotation is Path:
        return "path", annotation
    return {bool: "bool", int: "int", float: "float", str: "str"}[annotation], annotation


def schema_fields(model: type[BaseModel] = Experiment, prefix: tuple[str, ...] = ()) -> list[SchemaField]:
    fields = []
    for name, info in model.model_fields.items():
        kind, annotation = _kind(info.annotation)
        bounds = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
        min_length = next((m.min_length for m in info.metadata if hasattr(m, "min_length")), None)
        fields.append(SchemaField(prefix + (name,), kind, bounds, min_length))
        if kind == "section":
            fields.extend(schema_fields(annotation, prefix + (name,)))
    return fields


FIELDS = schema_fields()
SECTIONS = [()] + [f.path for f in FIELDS if f.kind == "section"]
FLOATS = [f for f in FIELDS if f.kind in ("float", "list[float]")]
BOUNDED = [f for f in FIELDS if f.kind in ("int", "float") and f.bounds]
NON_EMPTY = [f for f in FIELDS if f.kind.startswith("list") and f.min_length]


def test_the_schema_walk_sees_every_section():
    names = {".".join(f.path) for f in FIELDS}
    assert {"space.prune.ratios", "space.distill.temperature", "search.constraints.min_metric", "seed"} <= names
    assert len(FLOATS) >= 15 and len(BOUNDED) >= 20


# Values no field of the kind accepts (lax pydantic turns "5" into 5, so strings are only for numbers).
WRONG_TYPE: dict[str, list[Any]] = {
    "section": ["a string", 5, [1, 2]],
    "args": ["a string", 5, [1, 2]],
    "bool": ["maybe", 2, {"a": 1}, [True]],
    "int": ["many", 1.5, {"a": 1}, [1]],
    "float": ["fast", {"a": 1}, [1.0]],
    "str": [{"a": 1}, [1, 2]],
    "path": [{"a": 1}, [1, 2]],
    "literal": ["x-not-a-choice", {"a": 1}, [1]],
    "list[float]": ["fast", 5, {"a": 1}, ["fast"], [{"a": 1}]],
    "list[int]": ["fast", 5, {"a": 1}, ["fast"], [8.5]],
    "list[str]": ["x", 5, {"a": 1}, [{"a": 1}], [[1]]],
    "list[literal]": [5, {"a": 1}, ["x-not-an-objective"]],
}
# Element values each list field's validator refuses.
BAD_ELEMENTS: dict[tuple[str, ...], st.SearchStrategy[float]] = {
    ("space", "prune", "ratios"): st.floats(1.0, 1e6) | st.floats(-1e6, -1e-9),
    ("space", "sparsity", "fractions"): st.floats(1.0, 1e6) | st.floats(-1e6, -1e-9),
    ("space", "lowrank", "fractions"): st.floats(1.0, 1e6, exclude_min=True) | st.floats(-1e6, 0.0),
    ("space", "distill", "temperature"): st.floats(-1e6, 0.0),
    ("space", "distill", "alpha"): st.floats(1.0, 1e6, exclude_min=True) | st.floats(-1e6, -1e-9),
    ("space", "quantize", "bits"): st.integers(9, 31) | st.integers(33, 2**40) | st.integers(-(2**40), 1),
}
KEY_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


def out_of_range(field: SchemaField) -> st.SearchStrategy[Any]:
    """Numbers beyond a field's declared bounds (every bound of every bounded field)."""
    options = []
    b = field.bounds
    if field.kind == "int":
        if "ge" in b:
            options.append(st.integers(-(2**70), int(b["ge"]) - 1))
        if "gt" in b:
            options.append(st.integers(-(2**70), int(b["gt"])))
        if "le" in b:
            options.append(st.integers(int(b["le"]) + 1, 2**70))
        if "lt" in b:
            options.append(st.integers(int(b["lt"]), 2**70))
    else:
        finite = {"allow_nan": False, "allow_infinity": False}
        if "ge" in b:
            options.append(st.floats(max_value=b["ge"], exclude_max=True, min_value=-1e300, **finite))
        if "gt" in b:
            options.append(st.floats(max_value=b["gt"], min_value=-1e300, **finite))
        if "le" in b:
            options.append(st.floats(min_value=b["le"], exclude_min=True, max_value=1e300, **finite))
        if "lt" in b:
            options.append(st.floats(min_value=b["lt"], max_value=1e300, **finite))
    return st.one_of(options)


@st.composite
def schema_mutation(draw: st.DrawFn) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    """(kind, mutated experiment, what its error must name): one schema rule broken on purpose."""
    base_name = draw(st.sampled_from(BASE_NAMES))
    base = BASES[base_name]
    kind = draw(
        st.sampled_from(
            ["wrong type", "out of range", "bad element", "not finite", "missing", "unknown key", "empty", "rule"]
        )
    )
    if kind == "wrong type":
        field = draw(st.sampled_from(FIELDS))
        value = draw(st.sampled_from(WRONG_TYPE[field.kind]))
        return kind, with_value(base, field.path, value), (".".join(field.path),)
    if kind == "out of range":
        field = draw(st.sampled_from(BOUNDED))
        return kind, with_value(base, field.path, draw(out_of_range(field))), (".".join(field.path),)
    if kind == "bad element":
        path = draw(st.sampled_from(sorted(BAD_ELEMENTS)))
        good = base.get(path[0], {}).get(path[1], {}).get(path[2]) or []
        values = list(good)
        values.insert(draw(st.integers(0, len(values))), draw(BAD_ELEMENTS[path]))
        return kind, with_value(base, path, values), (".".join(path),)
    if kind == "not finite":
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf, "nan", "-inf", "Infinity"]))
        if isinstance(bad, float) and draw(st.booleans()):  # the task's own arguments, at any depth
            args = {**base["task"].get("args", {}), "x_arg": draw(st.sampled_from([bad, [1.0, bad], {"deeper": bad}]))}
            return kind, with_value(base, ("task", "args"), args), ("task.args", "x_arg")
        field = draw(st.sampled_from(FLOATS))
        value = [bad] if field.kind == "list[float]" else bad
        return kind, with_value(base, field.path, value), (".".join(field.path), "finite")
    if kind == "missing":
        path = draw(st.sampled_from([("name",), ("task",), ("task", "name")]))
        return kind, without(base, path), (".".join(path), "required key is missing")
    if kind == "unknown key":
        section = draw(st.sampled_from(SECTIONS))
        key = "x_" + draw(KEY_TEXT)  # no field of any section starts with x_
        names = ("unknown key",) + ((".".join(section) + ".",) if section else ())
        return kind, with_value(base, section + (key,), 1), names
    if kind == "empty":
        field = draw(st.sampled_from(NON_EMPTY))
        return kind, with_value(base, field.path, []), (".".join(field.path),)
    rule = draw(st.sampled_from(sorted(CROSS_FIELD)))
    mutate, names = CROSS_FIELD[rule]
    return kind, mutate(base), names


def _nothing_enabled(base: dict[str, Any]) -> dict[str, Any]:
    data = base
    for technique in ("prune", "quantize", "lowrank", "sparsity"):
        data = with_value(data, ("space", technique, "enabled"), False)
    return data


CROSS_FIELD: dict[str, tuple[Any, tuple[str, ...]]] = {
    "nothing to search": (_nothing_enabled, ("space: enable at least one",)),
    "no metric objective": (lambda b: with_value(b, ("objectives",), ["latency", "size"]), ("objectives",)),
    "one objective": (lambda b: with_value(b, ("objectives",), ["metric"]), ("objectives",)),
    "objective twice": (lambda b: with_value(b, ("objectives",), ["metric", "size", "size"]), ("objectives",)),
    "bounds exclude all": (
        lambda b: with_value(b, ("search", "constraints"), {"min_metric": 2.0, "max_metric": 1.0}),
        ("min_metric 2 > max_metric 1",),
    ),
    "old and new floor": (
        lambda b: with_value(b, ("search", "constraints"), {"min_accuracy": 0.5, "min_metric": 0.5}),
        ("min_accuracy",),
    ),
    "no latency at all": (
        lambda b: with_value(with_value(b, ("latency", "measure_host"), False), ("profiles",), []),
        ("latency.measure_host",),
    ),
    "unscored primary": (
        lambda b: with_value(b, ("search", "primary_profile"), "x-no-such-profile"),
        ("search.primary_profile",),
    ),
    "unknown task": (lambda b: with_value(b, ("task", "name"), "not a task!"), ("task.name",)),
    "empty task name": (lambda b: with_value(b, ("task", "name"), ""), ("task.name",)),
    "bad name": (lambda b: with_value(b, ("name",), "-starts with a dash"), ("name",)),
    "unknown runtime": (lambda b: with_value(b, ("latency", "runtime"), "x-tflite"), ("latency.runtime",)),
    "missing profile": (lambda b: with_value(b, ("profiles",), ["x-no-such-profile"]), ("profiles",)),
    "host as a profile": (lambda b: with_value(b, ("profiles",), ["host"]), ("profiles",)),
    "missing checkpoint": (
        lambda b: with_value(b, ("teacher", "checkpoint"), "x-no-such/teacher.pt"),
        ("teacher.checkpoint",),
    ),
    "top level is a list": (lambda b: [b], ("must be a mapping",)),
    "top level is a number": (lambda b: 42, ("must be a mapping",)),
}


@settings(HYPOTHESIS, max_examples=170)
@given(mutation=schema_mutation())
def test_schema_mutations_are_one_line(mutation, workdir, capsys):
    kind, data, names = mutation
    check_case(Case(kind, dump(data), ("{file}", *names)), workdir, capsys, "schema")


# --- the file itself: bytes, YAML structure, size ----------------------------------------------

INVALID_UTF8 = [b"\xff", b"\xfe", b"\xc0\xaf", b"\xc1", b"\x80", b"\xbf", b"\xf5\x80\x80\x80", b"\xed\xa0\x80"]
YAML_BREAKERS = ["x_bad: [unclosed\n", 'x_bad: "unterminated\n', "x_bad:\n\t- tab\n", "x_bad: b: c\n",
                 "x_bad: *undefined\n", "x_bad: !!python/object:os.system x\n", "---\nname: second\n",
                 "? [1, 2]\n: unhashable key\n", "x_bad: {a: 1\n"]  # fmt: skip


def _bomb(width: int, levels: int) -> tuple[str, int]:
    """A billion-laughs value (flow style) and the number of nodes it expands to."""
    parts = [f"&l0 [{', '.join(['lol'] * width)}]"]
    size = 1 + width
    for level in range(1, levels):
        parts.append(f"&l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
        size = 1 + width * size
    return f"[{', '.join(parts)}]", size


def _recursive(depth: int, mapping: bool) -> str:
    inner = "*r"
    for _ in range(depth):
        inner = f"{{k: {inner}}}" if mapping else f"[1, {inner}]"
    return f"&r {inner}"


def _deep(depth: int, mapping: bool) -> str:
    return "{a: " * depth + "1" + "}" * depth if mapping else "[" * depth + "]" * depth


def _place(text: bytes, value: str, where: str) -> bytes:
    """``text`` (a valid experiment) with ``value`` added as a new top-level key or as a task argument."""
    data = yaml.safe_load(text)
    if where == "task.args":
        data = with_value(data, ("task", "args"), {"placeholder": "X_VALUE"})
    else:
        data = with_value(data, ("x_key",), "X_VALUE")
    return dump(data).replace(b"X_VALUE", value.encode())


@st.composite
def file_mutation(draw: st.DrawFn) -> Case:
    base_name = draw(st.sampled_from(BASE_NAMES))
    text = base_text(base_name)
    kind = draw(
        st.sampled_from(
            ["not utf-8", "binary", "control character", "bad yaml", "deep", "bomb", "recursive alias", "huge",
             "empty", "not a mapping"]
        )
    )  # fmt: skip
    if kind == "not utf-8":
        at = draw(st.integers(0, len(text)))
        return Case(kind, text[:at] + draw(st.sampled_from(INVALID_UTF8)) + text[at:], ("{file}", "not UTF-8"))
    if kind == "binary":
        junk = draw(st.binary(max_size=4096))
        at = draw(st.integers(0, len(junk)))
        return Case(kind, junk[:at] + b"\xff" + junk[at:], ("{file}", "not UTF-8"))  # 0xff is never UTF-8
    if kind == "control character":
        at = draw(st.integers(0, len(text)))
        char = draw(st.sampled_from([chr(c) for c in [*range(0, 9), 11, 12, *range(14, 32), 127]]))
        return Case(kind, text[:at] + char.encode() + text[at:], ("{file}", "not valid YAML"))
    if kind == "bad yaml":
        return Case(kind, text + b"\n" + draw(st.sampled_from(YAML_BREAKERS)).encode(), ("{file}", "not valid YAML"))
    where = draw(st.sampled_from(["top level", "task.args"]))
    if kind == "deep":
        mapping = draw(st.booleans())
        depth = draw(st.integers(MAX_DEPTH, 3000))
        return Case(kind, _place(text, _deep(depth, mapping), where), ("{file}", f"nested deeper than {MAX_DEPTH}"))
    if kind == "bomb":
        width = draw(st.integers(2, 12))
        levels = math.ceil(math.log(MAX_NODES) / math.log(width)) + draw(st.integers(0, 4))
        value, size = _bomb(width, levels)
        assert size > MAX_NODES
        return Case(kind, _place(text, value, where), ("{file}", f"expands to more than {MAX_NODES}"))
    if kind == "recursive alias":
        value = _recursive(draw(st.integers(1, 5)), draw(st.booleans()))
        return Case(kind, _place(text, value, where), ("{file}", "*r", "refers to a node that contains it"))
    if kind == "huge":
        extra = draw(st.integers(MAX_EXPERIMENT_BYTES - len(text) + 1, MAX_EXPERIMENT_BYTES))
        padding = draw(st.sampled_from([b"# ", b"x_padding: "])) + b"x" * extra
        return Case(kind, text + b"\n" + padding + b"\n", ("{file}", "larger than 1 MiB"))
    if kind == "empty":
        return Case(kind, draw(st.sampled_from([b"", b"# nothing\n", b"---\n", b"~\n", b"\n\n"])), ("{file}", "empty"))
    return Case(
        kind, draw(st.sampled_from([b"- a\n- b\n", b"42\n", b"just words\n", b"[1, 2]\n"])), ("{file}", "mapping")
    )


@settings(HYPOTHESIS, max_examples=110)
@given(case=file_mutation())
def test_file_mutations_are_one_line(case, workdir, capsys):
    check_case(case, workdir, capsys, "file")


# --- --set overrides --------------------------------------------------------------------------------


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("\n...\n").strip()


@st.composite
def override_mutation(draw: st.DrawFn) -> Case:
    text = base_text(draw(st.sampled_from(BASE_NAMES)))
    kind = draw(st.sampled_from(["unknown key", "not finite", "out of range", "syntax", "not a section", "bad value"]))
    if kind == "unknown key":
        section = draw(st.sampled_from([s for s in SECTIONS if s]))
        key = ".".join(section) + ".x_" + draw(st.from_regex(r"[a-z0-9_]{0,10}", fullmatch=True))
        return Case(kind, text, ("{file}", key, "unknown key"), ("--set", f"{key}=1"))
    if kind == "not finite":
        field = draw(st.sampled_from(FLOATS))
        bad = draw(st.sampled_from([".nan", ".inf", "-.inf", ".NaN", "nan", "-inf"]))
        value = f"[{bad}]" if field.kind == "list[float]" else bad
        key = ".".join(field.path)
        return Case(kind, text, ("{file}", key), ("--set", f"{key}={value}"))
    if kind == "out of range":
        field = draw(st.sampled_from(BOUNDED))
        key = ".".join(field.path)
        return Case(kind, text, ("{file}", key), ("--set", f"{key}={_flow(draw(out_of_range(field)))}"))
    if kind == "syntax":
        arg = draw(st.sampled_from(["no-equals-sign", "=5", " =5", "a..b=1", ".seed=1", "seed.=1", "search..n=1"]))
        return Case(kind, text, ("--set",), ("--set", arg))
    if kind == "not a section":
        arg = draw(st.sampled_from(["name.sub=1", "seed.x=1", "objectives.0=metric", "task.name.x.y=1"]))
        return Case(kind, text, ("override", "is not a section"), ("--set", arg))
    value = draw(st.sampled_from(["[1", "'open", "{a: 1", "&r [*r]", _bomb(10, 6)[0], _deep(MAX_DEPTH + 5, False)]))
    return Case(kind, text, ("--set", "seed"), ("--set", f"seed={value}"))


@settings(HYPOTHESIS, max_examples=60)
@given(case=override_mutation())
def test_override_mutations_are_one_line(case, workdir, capsys):
    check_case(case, workdir, capsys, "--set")


# --- where the search writes: output_dir, SQLite files, URLs ---------------------------------------


LOCATION_KINDS = ["output is a file", "output under a file", "store under a file", "store dir missing",
                  "tracking under a file", "tracking scheme", "storage scheme"]  # fmt: skip


@st.composite
def location_mutation(draw: st.DrawFn) -> Case:
    base = BASES[draw(st.sampled_from(BASE_NAMES))]
    tail = draw(st.from_regex(r"[a-z0-9_]{1,8}(/[a-z0-9_]{1,8}){0,2}", fullmatch=True))
    kind = draw(st.sampled_from(LOCATION_KINDS))
    if kind == "output is a file":
        return Case(kind, dump(with_value(base, ("output_dir",), "a-file")), ("output_dir", "a-file", "is a file"))
    if kind == "output under a file":
        data = with_value(base, ("output_dir",), f"a-file/{tail}")
        return Case(kind, dump(data), ("output_dir", "a-file", "which is a file"))
    if kind == "store under a file":
        data = with_value(base, ("search", "storage"), f"sqlite:///a-file/{tail}.db")
        return Case(kind, dump(data), ("search.storage", "which is a file"))
    if kind == "store dir missing":
        data = with_value(base, ("search", "storage"), f"sqlite:///x-missing/{tail}.db")
        return Case(kind, dump(data), ("search.storage", "does not exist"))
    if kind == "tracking under a file":
        data = with_value(base, ("tracking", "uri"), f"sqlite:///a-file/{tail}/mlflow.db")
        return Case(kind, dump(data), ("tracking.uri", "which is a file"))
    key, schemes = ("tracking", "uri"), TRACKING_SCHEMES
    if kind == "storage scheme":
        key, schemes = ("search", "storage"), STORAGE_SCHEMES
    scheme = draw(st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True))
    url = draw(
        st.sampled_from(
            [f"x{scheme}://host/{tail}", "file:///tmp/mlruns", "sqlite://", "sqlite:///", "sqlite:relative.db",
             "http://", "https:///path", "postgresql://", "mysql+pymysql://"]
            + ([f"http://host/{tail}", f"https://host/{tail}"] if key == ("search", "storage") else [])
        )
    )  # fmt: skip
    if key == ("tracking", "uri") and draw(st.booleans()):
        url = draw(st.sampled_from(["mlruns", "./runs/mlruns", "/tmp/mlruns", "databricks"]))  # no scheme at all
    names = ("{file}", ".".join(key))
    if url.startswith("x"):
        names += ("unsupported scheme", *(f"{s}://" for s in schemes))
    return Case(kind, dump(with_value(base, key, url)), names)


@settings(HYPOTHESIS, max_examples=40)
@given(case=location_mutation())
def test_location_mutations_are_one_line(case, workdir, capsys):
    check_case(case, workdir, capsys, "locations")
    assert not (workdir / "runs").exists(), "validate must not create the output directory"


# --- hardware-profile files named by an experiment -----------------------------------------------


@st.composite
def profile_mutation(draw: st.DrawFn) -> Case:
    text = PROFILE.read_bytes()
    data = json.loads(text)
    kind = draw(st.sampled_from(["not utf-8", "truncated", "not finite", "deep", "wrong version", "unknown key",
                                 "out of range", "not an object"]))  # fmt: skip
    if kind == "not utf-8":
        at = draw(st.integers(0, len(text)))
        content = text[:at] + draw(st.sampled_from(INVALID_UTF8)) + text[at:]
        names = ("not UTF-8",)
    elif kind == "truncated":
        content = text[: draw(st.integers(0, text.rindex(b"}") - 1))]  # any proper prefix of an object
        names = ("not valid JSON",)
    elif kind == "not finite":
        entry = draw(st.integers(0, len(data["lut"]) - 1))
        field = draw(st.sampled_from(["median_ms", "p90_ms"]))
        marker = -1234.5  # a unique number, replaced in the text by a non-finite literal
        data["lut"][entry][field] = marker
        bad = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]))
        content = json.dumps(data).replace(str(marker), bad).encode()
        names = ("lut",) if "e999" in bad else ("not a finite number",)
    elif kind == "deep":
        data["description"] = "X_DEEP"
        deep = _deep(draw(st.integers(MAX_DEPTH, 100_000)), False)
        content = json.dumps(data).replace('"X_DEEP"', deep).encode()
        names = ("nested deeper than",)
    elif kind == "wrong version":
        data["format_version"] = draw(st.sampled_from([0, 2, "1", None, 1.5]))
        content, names = json.dumps(data).encode(), ("format_version",)
    elif kind == "unknown key":
        section = draw(st.sampled_from(["", "host", "runtime", "measurement", "overhead"]))
        node = data[section] if section else data
        node["x_" + draw(KEY_TEXT)] = 1
        content, names = json.dumps(data).encode(), ("unknown key",)
    elif kind == "out of range":
        entry = draw(st.integers(0, len(data["lut"]) - 1))
        data["lut"][entry]["repeats"] = draw(st.integers(-(2**40), 0))
        content, names = json.dumps(data).encode(), (f"lut.{entry}.repeats",)
    else:
        content, names = json.dumps(draw(st.sampled_from([[data], 42, "profile", None]))).encode(), ("JSON object",)
    return Case(kind, content, ("{file}", *names), suffix=".json")


@settings(HYPOTHESIS, max_examples=30)
@given(case=profile_mutation())
def test_profile_mutations_are_one_line(case, workdir, capsys):
    """A corrupt profile named in ``profiles`` is refused by validate (the profile is read before training)."""
    GENERATED["profile"] += 1
    profile = workdir / f"profile-{GENERATED['profile']}.json"
    profile.write_bytes(case.content)
    experiment = workdir / "with-profile.yaml"
    experiment.write_bytes(dump({**BASES["tiny"], "profiles": [str(profile)]}))
    code, err, elapsed = run_cli(["validate", str(experiment)], capsys)
    SLOWEST["profile"] = max(SLOWEST.get("profile", 0.0), elapsed)
    assert_one_line(code, err, elapsed, *(n.replace("{file}", str(profile)) for n in case.names))


# --- finetune.feature_layers: checked where the model is known (preflight, on the tiny model) ----


@settings(HYPOTHESIS, max_examples=12)
@given(
    layers=st.lists(st.sampled_from(["features", "features.conv1", "fc1", ""]), max_size=2),
    bad=st.from_regex(r"x_[a-z0-9_.]{0,12}", fullmatch=True),
    at=st.integers(0, 2),
)
def test_feature_layer_mutations_are_one_line(layers, bad, at, workdir, capsys):
    at = min(at, len(layers))
    layers = layers[:at] + [bad] + layers[at:]
    data = with_value(BASES["tiny"], ("finetune", "feature_layers"), layers)
    check_case(Case("feature layer", dump(data), (f"finetune.feature_layers.{at}", bad)), workdir, capsys, "layers")


def test_enough_malformed_inputs(capsys):
    """How many malformed inputs the hypothesis tests above generated (all must have run)."""
    expected = {"schema", "file", "--set", "locations", "profile", "layers"}
    if set(GENERATED) != expected:
        pytest.skip("run the whole module to count the generated inputs")
    total = sum(GENERATED.values())
    with capsys.disabled():
        detail = ", ".join(f"{k} {v} (slowest {SLOWEST[k]:.2f} s)" for k, v in GENERATED.items())
        print(f"\n{total} malformed inputs refused in one line: {detail}")
    assert total >= 300


# --- unit tests: each reported case --------------------------------------------------------------

OK = {"name": "ok", "task": {"name": "digits"}}


def _validate(tmp_path: Path, capsys, content: bytes | str, *argv: str, name: str = "exp.yaml") -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err, elapsed = run_cli(["validate", str(path), *argv], capsys)
    assert_one_line(code, err, elapsed)
    return err


def _ok_text(**changes: Any) -> str:
    return yaml.safe_dump({**OK, **changes})


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"name: ok\ntask: {name: digits}\nx: \xff\xfe\n", "not UTF-8 text (byte 0xff at offset 33)"),
        (bytes(range(256)) * 4, "not UTF-8"),
        (b"\x7fELF\x02\x01\x01\x00", "not valid YAML (character 0): control characters are not allowed"),
        ("name: ok\ntask: {name: digits}\nx: " + "[" * 600 + "]" * 600, "nested deeper than 50 levels"),
        ("name: ok\nx:\n" + "".join("  " * i + "- \n" for i in range(1, 80)), "nested deeper than 50 levels"),
        (b"\xef\xbb\xbf" + _ok_text(seed=-1).encode(), "seed: Input should be greater than or equal to 0"),
    ],
    ids=["non-utf8", "binary", "elf-header", "deep-flow", "deep-block", "bom-is-fine"],
)
def test_unreadable_files_are_one_line(tmp_path, capsys, content, expected):
    assert expected in _validate(tmp_path, capsys, content)


BILLION_LAUGHS = """\
name: ok
task: {name: digits}
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
"""


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (BILLION_LAUGHS, "expands to more than 20000 values (line 7"),
        (BILLION_LAUGHS.replace("task: {name: digits}\n", "task:\n  name: digits\n  args:\n    x: *g\n"), "expands"),
        ("name: ok\ntask: {name: digits}\nseed: &x [*x]\n", "the alias *x (line 3, column 11) refers to a node"),
        ("name: ok\ntask: {name: digits, args: &x {me: *x}}\n", "refers to a node that contains it"),
    ],
    ids=["bomb", "bomb-in-task-args", "self-reference", "self-reference-in-args"],
)
def test_yaml_alias_bombs_and_recursion_are_refused_when_read(tmp_path, capsys, content, expected):
    assert expected in _validate(tmp_path, capsys, content)


def test_a_few_aliases_are_still_fine(tmp_path):
    from autocompress.config import load_experiment

    path = tmp_path / "exp.yaml"
    path.write_text(
        "name: ok\ntask: {name: digits}\nspace:\n  prune: {ratios: &r [0.0, 0.5]}\n  sparsity: {fractions: *r}\n"
    )
    assert load_experiment(path).space.sparsity.fractions == [0.0, 0.5]


def test_error_messages_never_show_a_huge_value(tmp_path, capsys):
    err = _validate(tmp_path, capsys, _ok_text(seed="x" * 500_000))
    assert "seed:" in err and len(err) < 400
    err = _validate(tmp_path, capsys, _ok_text(space={"include": {"k" * 10_000: 1}}))
    assert len(err) < 400


def test_oversized_files_are_refused_unread(tmp_path, capsys, monkeypatch):
    big = _ok_text() + "# " + "x" * MAX_EXPERIMENT_BYTES
    assert "larger than 1 MiB" in _validate(tmp_path, capsys, big)
    import autocompress.hw_profiles.profile as profile_module

    monkeypatch.setattr(profile_module, "MAX_PROFILE_BYTES", 1000)
    err = _validate(tmp_path, capsys, _ok_text(profiles=[str(PROFILE)]))
    assert str(PROFILE) in err and "larger than 1000 bytes" in err


def test_the_profile_cap_is_well_above_the_shipped_profiles():
    from autocompress.hw_profiles.profile import MAX_PROFILE_BYTES

    assert max(p.stat().st_size for p in shipped_profiles().values()) * 20 < MAX_PROFILE_BYTES


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"space": {"distill": {"temperature": [float("nan")]}}}, "space.distill.temperature.0: must be a finite"),
        ({"space": {"distill": {"temperature": [float("inf")]}}}, "space.distill.temperature.0"),
        ({"finetune": {"feature_weight": float("inf")}}, "finetune.feature_weight: must be a finite"),
        ({"space": {"prune": {"ratios": [0.0, "nan"]}}}, "space.prune.ratios.1"),
        ({"search": {"timeout": float("inf")}}, "search.timeout"),
        ({"search": {"constraints": {"min_metric": float("-inf")}}}, "search.constraints.min_metric"),
        ({"task": {"name": "digits", "args": {"noise": [0.1, float("nan")]}}}, "task.args: noise.1 is nan"),
    ],
    ids=["temperature-nan", "temperature-inf", "feature-weight-inf", "ratio-string-nan", "timeout-inf",
         "min-metric-minus-inf", "task-args-nan"],
)  # fmt: skip
def test_non_finite_numbers_are_refused(tmp_path, capsys, changes, expected):
    assert expected in _validate(tmp_path, capsys, _ok_text(**changes))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("space.distill.temperature=[.nan]", "space.distill.temperature.0"),
        ("finetune.feature_weight=.inf", "finetune.feature_weight"),
        ("seed=-1", "seed: Input should be greater than or equal to 0"),
        (f"seed={2**40}", "seed: Input should be less than or equal to 4294967295"),
        ("search.seed=-5", "search.seed"),
        ("nmae=x", "nmae: unknown key"),
        ("name.sub=1", "'name' is not a section"),
        ("a..b=1", "has an empty part"),
        ("=5", "expected KEY=VALUE"),
        ("seed=[1", "--set 'seed': not valid YAML"),
        ("seed=&r [*r]", "--set 'seed': the alias *r"),
        ("tracking.uri=bogus://x", "tracking.uri: 'bogus://x' has an unsupported scheme"),
    ],
)
def test_override_problems_are_one_line(tmp_path, capsys, override, expected):
    assert expected in _validate(tmp_path, capsys, _ok_text(), "--set", override)


def test_seeds_are_bounded_and_derived_seeds_stay_in_range():
    from autocompress.config import SearchConfig
    from autocompress.search.samplers import make_sampler

    assert Experiment.model_validate({**OK, "seed": MAX_SEED}).search_seed == MAX_SEED
    sampler = make_sampler(SearchConfig(sampler="random"), MAX_SEED + 7919 * 3 + 40)  # a worker's derived seed
    assert sampler is not None


@pytest.mark.parametrize(
    ("key", "url", "expected"),
    [
        ("tracking", "bogus://x", "use one of sqlite://, http://, https://, postgresql://, mysql://"),
        ("tracking", "file:///tmp/mlruns", "tracking.uri: 'file:///tmp/mlruns' has an unsupported scheme"),
        ("tracking", "mlruns", "tracking.uri"),
        ("tracking", "sqlite://", "a SQLite URL names a file"),
        ("tracking", "http://", "names no host"),
        ("storage", "http://host/db", "search.storage: 'http://host/db' has an unsupported scheme; use one of sqlite"),
        ("storage", "redis://host", "search.storage"),
    ],
)
def test_unsupported_urls_are_one_line(tmp_path, capsys, key, url, expected):
    changes = {"tracking": {"uri": url}} if key == "tracking" else {"search": {"storage": url}}
    assert expected in _validate(tmp_path, capsys, _ok_text(**changes))


@pytest.mark.parametrize(
    "accepted",
    ["sqlite:///runs/x.db", "http://localhost:5000", "https://mlflow.example.org", "postgresql+psycopg2://u@h/db",
     "mysql://u@h/db"],
)  # fmt: skip
def test_supported_tracking_urls_are_accepted(accepted):
    assert Experiment.model_validate({**OK, "tracking": {"uri": accepted}}).tracking.uri == accepted


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"output_dir": "{tmp}/a-file"}, "output_dir: {tmp}/a-file is a file, not a directory"),
        ({"output_dir": "{tmp}/a-file/sub"}, "output_dir: {tmp}/a-file/sub lies under {tmp}/a-file, which is a file"),
        ({"search": {"storage": "sqlite:///{tmp}/a-file/s.db"}}, "search.storage: {tmp}/a-file/s.db lies under"),
        ({"search": {"storage": "sqlite:///{tmp}/missing/s.db"}}, "the directory {tmp}/missing does not exist"),
        ({"search": {"storage": "sqlite:///{tmp}"}}, "search.storage: {tmp} is a directory, not a file"),
        ({"tracking": {"uri": "sqlite:///{tmp}/a-file/x/m.db"}}, "tracking.uri: {tmp}/a-file/x/m.db lies under"),
    ],
)
def test_unusable_locations_are_one_line_and_nothing_is_created(tmp_path, capsys, changes, expected):
    (tmp_path / "a-file").write_text("x")
    text = _ok_text(**{"output_dir": str(tmp_path / "out"), **changes}).replace("{tmp}", str(tmp_path))
    assert expected.replace("{tmp}", str(tmp_path)) in _validate(tmp_path, capsys, text)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a-file", "exp.yaml"]  # validate created nothing


def test_unwritable_locations_are_one_line(tmp_path, capsys, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Tests run as root here, where permission bits do not stop writes: the check's answer is faked.
    monkeypatch.setattr(os, "access", lambda p, *a, **k: Path(p) != locked and real_access(p, *a, **k))
    err = _validate(tmp_path, capsys, _ok_text(output_dir=str(locked / "out")))
    assert f"output_dir: cannot create {locked / 'out'}: {locked} is not writable" in err
    err = _validate(tmp_path, capsys, _ok_text(output_dir=str(locked)))
    assert f"output_dir: {locked} is not writable" in err


def test_search_refuses_a_bad_output_dir_before_creating_anything(tmp_path, capsys, isolated_cache):
    (tmp_path / "a-file").write_text("x")
    path = tmp_path / "exp.yaml"
    path.write_text(_ok_text(output_dir=str(tmp_path / "a-file" / "out")))
    before = sorted(isolated_cache.rglob("*")), sorted(tmp_path.rglob("*"))
    code, err, elapsed = run_cli(["search", str(path)], capsys)
    assert_one_line(code, err, elapsed, "output_dir", "which is a file")
    assert (sorted(isolated_cache.rglob("*")), sorted(tmp_path.rglob("*"))) == before  # nothing trained or created


def test_unknown_feature_layers_are_refused_by_preflight(tmp_path, capsys):
    data = with_value(tiny_experiment_dict(tmp_path / "out"), ("finetune", "feature_layers"), ["no_such_layer"])
    err = _validate(tmp_path, capsys, yaml.safe_dump(data))
    assert "finetune.feature_layers.0: the model has no layer 'no_such_layer'" in err
    assert "features.conv1" in err  # a few names that do exist
    data["finetune"]["feature_layers"] = ["features.conv1"]
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 0


def test_corrupt_profiles_are_refused_before_training(tmp_path, capsys):
    profile = tmp_path / "p.json"
    for content, expected in [
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8"),
        (PROFILE.read_text().replace('"median_ms": ', '"median_ms": NaN, "x": ', 1).encode(), "NaN is not a finite"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper than"),
    ]:
        profile.write_bytes(content)
        data = {**tiny_experiment_dict(tmp_path / "out"), "profiles": [str(profile)]}
        err = _validate(tmp_path, capsys, yaml.safe_dump(data))
        assert str(profile) in err and expected in err
