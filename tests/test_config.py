"""Experiment validation: the shipped files load, and each bad input gets one named line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from autocompress.cli import main
from autocompress.config import Experiment, apply_overrides, load_experiment, parse_override
from autocompress.errors import ConfigError
from autocompress.runtimes import runtime_names
from tests.conftest import ROOT

EXAMPLES = sorted((ROOT / "experiments").glob("*.yaml"))


def test_there_are_example_experiments():
    assert any(p.name == "digits_cnn.yaml" for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_files_are_valid(path):
    exp = load_experiment(path)
    assert isinstance(exp, Experiment)
    assert exp.search.n_trials >= 1
    assert "metric" in exp.objectives


BASE = {"name": "ok", "task": {"name": "digits"}}

# (description, mutation of BASE, text that must appear in the one-line error)
MALFORMED = [
    ("unknown top-level key", {"nmae": "x"}, "nmae: unknown key"),
    ("unknown nested key", {"search": {"n_trails": 3}}, "search.n_trails: unknown key"),
    ("missing task", {"task": None}, "task"),
    ("unknown task", {"task": {"name": "imagenet"}}, "unknown task 'imagenet'"),
    ("negative trials", {"search": {"n_trials": -3}}, "search.n_trials"),
    ("trials not a number", {"search": {"n_trials": "many"}}, "search.n_trials"),
    ("bad sampler", {"search": {"sampler": "grid"}}, "search.sampler"),
    ("ratio out of range", {"space": {"prune": {"ratios": [0.5, 1.2]}}}, "pruning ratio 1.2 must be in [0, 1)"),
    ("unsupported bits", {"space": {"quantize": {"bits": [32, 16]}}}, "bit-width 16 is not supported"),
    ("no metric objective", {"objectives": ["latency", "size"]}, "must include 'metric'"),
    ("unknown objective", {"objectives": ["accuracy", "energy"]}, "objectives.1"),
    ("metric twice via its alias", {"objectives": ["metric", "accuracy", "size"]}, "repeat an entry"),
    (
        "old and new metric floor",
        {"search": {"constraints": {"min_accuracy": 0.9, "min_metric": 0.8}}},
        "set only min_metric",
    ),
    (
        "metric bounds that exclude everything",
        {"search": {"constraints": {"min_metric": 2.0, "max_metric": 1.0}}},
        "min_metric 2 > max_metric 1",
    ),
    ("negative margin", {"search": {"early_stop": {"margin": -0.1}}}, "search.early_stop.margin"),
    ("alpha above 1", {"space": {"distill": {"alpha": [1.5]}}}, "alpha 1.5 must be in [0, 1]"),
    ("zero temperature", {"space": {"distill": {"temperature": [0]}}}, "temperature 0"),
    ("bad storage", {"search": {"storage": "study.db"}}, "is not a database URL"),
    ("missing checkpoint", {"teacher": {"checkpoint": "/no/such/teacher.pt"}}, "does not exist"),
    ("bad name", {"name": "has space"}, "name"),
    (
        "nothing enabled",
        {"space": {"prune": {"enabled": False}, "quantize": {"enabled": False}}},
        "enable at least one",
    ),
    ("threads zero", {"latency": {"threads": 0}}, "latency.threads"),
    (
        "unknown runtime",
        {"latency": {"runtime": "tflite"}},
        "unknown runtime 'tflite': use one of torch-eager, onnxruntime",
    ),
]


def _write(tmp_path, data):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("desc,mutation,expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_experiment_gives_one_line_error(tmp_path, capsys, desc, mutation, expected):
    data = {**BASE, **mutation}
    if mutation.get("task", "") is None:
        del data["task"]
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message

    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err


@pytest.mark.parametrize(
    "text,expected",
    [("name: [unclosed", "not valid YAML (line "), ("", "the file is empty"), ("- a\n- b\n", "must be a mapping")],
)
def test_unparseable_files(tmp_path, text, expected):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML|empty|mapping") as info:
        load_experiment(path)
    assert expected in str(info.value)


def test_missing_file_is_one_line(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "no such experiment file" in capsys.readouterr().err


def test_cli_bad_input_has_no_traceback_in_a_real_process(tmp_path):
    path = _write(tmp_path, {**BASE, "search": {"n_trials": 0}})
    proc = subprocess.run(
        [sys.executable, "-m", "autocompress", "search", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "search.n_trials" in proc.stderr and "Traceback" not in proc.stderr


def test_overrides_apply_and_validate(tmp_path):
    path = _write(tmp_path, BASE)
    exp = load_experiment(path, {"search.n_trials": 7, "finetune.epochs": 1})
    assert exp.search.n_trials == 7 and exp.finetune.epochs == 1
    with pytest.raises(ConfigError, match="search.n_trials"):
        load_experiment(path, {"search.n_trials": -1})
    assert parse_override("space.quantize.bits=[32, 8]") == ("space.quantize.bits", [32, 8])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("search.n_trials")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"name": "x"}, {"name.sub": 1})


def test_defaults_are_sensible(tmp_path):
    exp = load_experiment(_write(tmp_path, BASE))
    assert exp.search.sampler == "nsga2"
    assert exp.space.prune.round_to == 8
    assert exp.latency.threads == 1
    assert exp.storage_url.startswith("sqlite:///") and exp.storage_url.endswith("runs/ok/study.db")
    assert exp.tracking_uri.endswith("runs/mlflow.db")


def test_the_metric_objective_and_its_budgets_take_any_units(tmp_path):
    exp = load_experiment(_write(tmp_path, BASE))
    assert exp.objectives == ["metric", "latency", "size"] and exp.search.early_stop.margin is None
    old = {**BASE, "objectives": ["accuracy", "latency"], "search": {"constraints": {"min_accuracy": 0.9}}}
    exp = load_experiment(_write(tmp_path, old))  # an experiment file written before 'metric'
    assert exp.objectives == ["metric", "latency"] and exp.search.constraints.min_metric == 0.9
    new = {"constraints": {"min_metric": -40.0, "max_metric": 250.0}, "early_stop": {"margin": 12.5}}
    exp = load_experiment(_write(tmp_path, {**BASE, "search": new}))  # no [0, 1] range: an MSE, a log-likelihood
    assert (exp.search.constraints.min_metric, exp.search.constraints.max_metric) == (-40.0, 250.0)
    assert exp.search.early_stop.margin == 12.5


def test_latency_runtime_choices_are_the_registered_runtimes(tmp_path):
    assert load_experiment(_write(tmp_path, BASE)).latency.runtime == "onnxruntime"
    for name in runtime_names():
        assert load_experiment(_write(tmp_path, {**BASE, "latency": {"runtime": name}})).latency.runtime == name
    with pytest.raises(ConfigError) as info:
        load_experiment(_write(tmp_path, {**BASE, "latency": {"runtime": "nope"}}))
    assert str(info.value).endswith(f"use one of {', '.join(runtime_names())}")


def test_old_runtime_spelling_torch_is_read_as_torch_eager(tmp_path):
    # Experiment files in the wild say "torch"; everything past validation sees the one name.
    exp = load_experiment(_write(tmp_path, {**BASE, "latency": {"runtime": "torch"}}))
    assert exp.latency.runtime == "torch-eager"
    assert exp.model_dump(mode="json")["latency"]["runtime"] == "torch-eager"
    assert load_experiment(_write(tmp_path, BASE), {"latency.runtime": "torch"}).latency.runtime == "torch-eager"
