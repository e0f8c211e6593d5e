"""`front` and `select` on a real (tiny) search: fronts read back from MLflow, a member picked under a
budget, rebuilt, re-measured, exported (ONNX, torch, model card), logged and registered."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import onnxruntime as ort
import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from autocompress.cli import main
from autocompress.compress.deploy import OrtModel
from autocompress.config import load_experiment
from autocompress.errors import AutocompressError
from autocompress.evaluators import count_parameters, evaluate
from autocompress.search import run_search
from autocompress.search.objectives import build_candidate, make_context, runnable
from autocompress.search.quality import QualityMetric
from autocompress.search.report import Row, format_table
from autocompress.search.select import Budget, BudgetNotMet, pick
from autocompress.search.store import load_search, open_client
from autocompress.spaces import Candidate
from autocompress.tasks import load_task
from autocompress.teacher import get_teacher
from tests.conftest import tiny_experiment_dict

MODEL_NAME = "tiny-selected"
ROW_RE = re.compile(r"^\s*(\d+)\s+(\d\.\d{4})\s")


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A finished tiny search and its experiment file."""
    root = tmp_path_factory.mktemp("select")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_experiment_dict(root / "tiny")))
    exp = load_experiment(path)
    result = run_search(exp, log=lambda _: None)
    assert result.finished == exp.search.n_trials and result.fronts["host"]
    return path, exp, result


def _members(text: str) -> list[int]:
    """Trial numbers of the front rows in a printed table (the teacher line does not match)."""
    return [int(m.group(1)) for line in text.splitlines() if (m := ROW_RE.match(line))]


def _dominates(a, b):
    """a, b = (accuracy, latency, size): accuracy up, the rest down."""
    return a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2] and (a[0] > b[0] or a[1] < b[1] or a[2] < b[2])


def _independent_front(exp, study_name):
    """(trial, accuracy, latency, size) of the non-dominated complete trials, straight from the study."""
    study = optuna.load_study(study_name=study_name, storage=exp.storage_url)
    points = {t.number: tuple(t.values) for t in study.get_trials(states=(TrialState.COMPLETE,))}
    return [(n, *p) for n, p in points.items() if not any(_dominates(q, p) for m, q in points.items() if m != n)]


def test_front_from_experiment_file_and_from_run_id_print_the_search_front(searched, capsys):
    path, exp, result = searched
    expected_table = format_table(result.fronts["host"], result.teacher, "host")
    expected = [r.trial for r in result.fronts["host"]]

    assert main(["front", str(path)]) == 0
    from_file = capsys.readouterr().out
    assert main(["front", result.parent_run_id, "--tracking-uri", exp.tracking_uri, "--profile", "host"]) == 0
    from_run = capsys.readouterr().out

    for out in (from_file, from_run):
        assert _members(out) == expected
        assert expected_table in out  # same figures, digit for digit
        assert result.study_name in out and result.parent_run_id in out
    # Recomputed from MLflow alone, the rows equal the search's (params typed back, metrics exact).
    search = load_search(open_client(exp.tracking_uri), result.parent_run_id, exp.tracking_uri)
    assert search.fronts == result.fronts
    assert search.teacher == pytest.approx(result.teacher)


def test_front_without_the_study_database_finds_the_newest_search_in_mlflow(searched, capsys, tmp_path):
    path, exp, result = searched
    # Another output_dir: no study.db there, so the parent run must come from MLflow's tags.
    assert main(["front", str(path), "--set", f"output_dir={tmp_path / 'elsewhere'}"]) == 0
    out = capsys.readouterr().out
    assert result.parent_run_id in out and _members(out) == [r.trial for r in result.fronts["host"]]
    assert not (tmp_path / "elsewhere").exists()  # reading creates nothing


def test_front_errors_are_one_line(searched, capsys):
    path, exp, result = searched
    cases = [
        (["front", str(path), "--profile", "pixel7"], "profile 'pixel7'"),
        (["front", "0" * 32, "--tracking-uri", exp.tracking_uri], "no MLflow run '" + "0" * 32),
        (["front", "not-a-run"], "neither an experiment file nor an MLflow run id"),
    ]
    trial_run = result.fronts["host"][0]
    client = MlflowClient(tracking_uri=exp.tracking_uri)
    child = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        filter_string=f"tags.trial = '{trial_run.trial}'",
    )[0]
    cases.append((["front", child.info.run_id, "--tracking-uri", exp.tracking_uri], "pass the search's (parent)"))
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)


def _row(trial, accuracy, latency, size=1000.0):
    return Row(trial, accuracy, latency, size, 10.0, 0.0, 1.0, 1.0, "", {})


def test_pick_applies_the_budget_and_breaks_ties():
    front = [_row(1, 0.90, 0.10), _row(2, 0.95, 0.20), _row(3, 0.95, 0.15, size=2000.0), _row(4, 0.99, 0.40)]
    assert pick(front, Budget(max_latency_ms=0.25), "host").trial == 3  # 0.95 twice: the faster
    assert pick(front, Budget(max_latency_ms=0.40), "host").trial == 4  # the bound is inclusive
    assert pick(front, Budget(min_metric=0.95), "host").trial == 3  # fastest at >= 0.95
    assert pick(front, Budget(min_metric=0.90), "host").trial == 1
    with pytest.raises(BudgetNotMet) as err:
        pick(front, Budget(max_latency_ms=0.05), "host")
    assert err.value.closest.trial == 1
    with pytest.raises(BudgetNotMet) as err:
        pick(front, Budget(min_metric=0.995), "host")
    assert err.value.closest.trial == 4 and "closest: trial 4" in str(err.value)


def test_pick_follows_a_lower_is_better_metric():
    mse = QualityMetric("mse", higher_is_better=False)
    # a front under MSE: the slower, the lower the error
    front = [_row(1, 0.40, 0.10), _row(2, 0.25, 0.20), _row(3, 0.25, 0.15, size=2000.0), _row(4, 0.05, 0.40)]
    assert pick(front, Budget(max_latency_ms=0.25), "host", mse).trial == 3  # the lowest MSE within it, faster
    assert pick(front, Budget(max_latency_ms=1.0), "host", mse).trial == 4
    assert pick(front, Budget(max_metric=0.30), "host", mse).trial == 3  # the fastest with MSE <= 0.30
    assert pick(front, Budget(max_metric=0.05), "host", mse).trial == 4  # the bound is inclusive
    with pytest.raises(BudgetNotMet) as err:
        pick(front, Budget(max_metric=0.01), "host", mse)
    assert err.value.closest.trial == 4 and "mse <= 0.01" in str(err.value) and "mse 0.0500" in str(err.value)
    # a floor is a floor whatever the direction: the fastest member with MSE >= 0.3
    assert pick(front, Budget(min_metric=0.3), "host", mse).trial == 1
    with pytest.raises(BudgetNotMet) as err:
        pick(front, Budget(max_latency_ms=0.05), "host", mse)
    assert err.value.closest.trial == 1


def test_budget_needs_exactly_one_bound_and_no_metric_range():
    assert Budget(min_metric=250.0).describe() == "accuracy >= 250"  # any unit: the metric is the task's
    assert Budget(max_metric=-3.5).describe(QualityMetric("loss", False)) == "loss <= -3.5"
    for kwargs in ({}, {"max_latency_ms": 1.0, "max_metric": 0.2}, {"min_metric": 0.1, "max_metric": 0.2}):
        with pytest.raises(AutocompressError, match="exactly one budget"):
            Budget(**kwargs)


@pytest.fixture(scope="module")
def selected(searched, tmp_path_factory):
    """``select --max-latency-ms`` (with --register) on a budget that leaves out part of the front."""
    path, exp, result = searched
    latencies = sorted(r.latency_ms for r in result.fronts["host"])
    budget = latencies[1] if len(latencies) > 1 else latencies[0]
    out = tmp_path_factory.mktemp("selected")
    # capsys is function-scoped: a module fixture captures by redirecting.
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(
            [
                "select",
                str(path),
                "--profile",
                "host",
                "--max-latency-ms",
                repr(budget),
                "--out",
                str(out),
                "--register",
                MODEL_NAME,
            ]
        )
    assert status == 0, stderr.getvalue()
    card = json.loads((out / "model_card.json").read_text())
    return budget, out, card, stdout.getvalue()


def test_select_picks_the_most_accurate_member_within_the_latency_budget(searched, selected):
    _, exp, result = searched
    budget, _, card, stdout = selected
    within = [p for p in _independent_front(exp, result.study_name) if p[2] <= budget]
    best = max(within, key=lambda p: (p[1], -p[2], -p[3]))
    assert card["provenance"]["trial"] == best[0]
    assert f"selected trial {best[0]} on profile 'host'" in stdout
    assert card["metrics"]["searched"]["metric"] == best[1]
    assert card["metric"] == {"name": "accuracy", "direction": "maximize"}
    assert card["metrics"]["searched"]["latency_ms"] == best[2] <= budget
    assert card["budget"] == {"max_latency_ms": budget} and card["profile"] == "host"


def test_select_exports_onnx_and_torch_models_that_run(searched, selected):
    _, exp, _ = searched
    _, out, card, _ = selected
    task = load_task(exp.task.name, exp.task.args)
    x = next(iter(task.loader("test", 7)))[0]
    deployed = ort.InferenceSession(str(out / card["deployment"]["onnx"]), providers=["CPUExecutionProvider"])
    y_deployed = deployed.run(None, {deployed.get_inputs()[0].name: x.numpy()})[0]
    assert y_deployed.shape == (7, task.num_classes)
    bits = {k.split("/", 1)[1]: v for k, v in card["candidate"]["params"].items() if k.startswith("bits/")}
    if any(b == 8 for b in bits.values()):
        assert card["deployment"]["onnx"] == "model.int8.onnx" and card["deployment"]["int8_layers"]
    else:
        assert card["deployment"]["onnx"] == "model.fp32.onnx" and card["deployment"]["int8_layers"] == []

    module = torch.load(out / "model.pt", weights_only=False).eval()
    fp32 = ort.InferenceSession(str(out / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        y_torch = module(x).numpy()
    y_fp32 = fp32.run(None, {fp32.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(y_torch, y_fp32, rtol=1e-4, atol=1e-4)
    state = torch.load(out / "state_dict.pt", weights_only=True)
    module.load_state_dict(state, strict=True)
    assert set(state) == set(module.state_dict())


def test_model_card_records_the_rebuilt_models_evaluation_and_provenance(searched, selected):
    _, exp, result = searched
    _, out, card, _ = selected
    assert {"name", "candidate", "profile", "budget", "metrics", "deployment", "provenance"} <= set(card)
    assert {"searched", "remeasured", "latency_source", "teacher"} <= set(card["metrics"])
    prov = card["provenance"]
    assert prov["experiment"] == exp.name and prov["study"] == result.study_name
    assert prov["mlflow"]["parent_run_id"] == result.parent_run_id
    assert {"python", "torch", "onnxruntime", "mlflow", "optuna", "autocompress"} <= set(prov["versions"])
    assert re.match(r"\d{4}-\d\d-\d\dT", prov["created"])
    assert card["candidate"]["summary"] == Candidate.from_params(card["candidate"]["params"]).describe()

    # Rebuild independently from teacher + candidate + seed and evaluate on the search's runtime.
    task = load_task(exp.task.name, exp.task.args)
    teacher = get_teacher(task, exp.task.args, exp.teacher, exp.seed, log=lambda _: None)
    ctx = make_context(exp, teacher.model, task)
    rebuilt = build_candidate(Candidate.from_params(card["candidate"]["params"]), ctx)
    executable = runnable(rebuilt.model, rebuilt.bits, ctx, out / "check")
    remeasured = card["metrics"]["remeasured"]
    assert remeasured["val_metric"] == evaluate(executable, task.loader("val", 256), task.metric)
    assert remeasured["test_metric"] == evaluate(executable, task.loader("test", 256), task.metric)
    # ... and the shipped file is the one those figures describe.
    shipped = OrtModel(out / card["deployment"]["onnx"])
    assert remeasured["val_metric"] == evaluate(shipped, task.loader("val", 256), task.metric)
    assert remeasured["latency_ms"] > 0 and "re-measured on this host" in card["metrics"]["latency_source"]
    assert remeasured["size_bytes"] == (out / card["deployment"]["onnx"]).stat().st_size  # the shipped file
    assert remeasured["params"] == count_parameters(rebuilt.model) == card["metrics"]["searched"]["params"]


def test_selected_run_holds_the_files_and_the_model_is_registered(searched, selected, tmp_path):
    _, exp, result = searched
    _, out, card, stdout = selected
    client = MlflowClient(tracking_uri=exp.tracking_uri)
    run = client.get_run(card["provenance"]["mlflow"]["selected_run_id"])
    assert run.info.run_name == "selected-host" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
    assert run.data.metrics["metric"] == card["metrics"]["remeasured"]["val_metric"]
    assert run.data.metrics["test_metric"] == card["metrics"]["remeasured"]["test_metric"]
    # ... and under the task's metric name, for people reading MLflow
    assert run.data.metrics["accuracy"] == run.data.metrics["metric"]
    assert run.data.metrics["test_accuracy"] == run.data.metrics["test_metric"]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    expected = {f"model/{n}" for n in ("model.fp32.onnx", "model.pt", "state_dict.pt", "model_card.json")}
    expected.add(f"model/{card['deployment']['onnx']}")
    assert logged == expected

    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id
    assert f"registered as version {versions[0].version} of model '{MODEL_NAME}'" in stdout
    client.download_artifacts(run.info.run_id, "model", str(tmp_path))
    assert json.loads((tmp_path / "model" / "model_card.json").read_text()) == card
    # The selected run is not a trial: the front read back from MLflow is unchanged.
    search = load_search(open_client(exp.tracking_uri), result.parent_run_id, exp.tracking_uri)
    assert search.fronts == result.fronts and search.trial_runs == exp.search.n_trials


def test_impossible_budget_names_the_closest_member_and_exits_1(searched, selected, capsys):
    path, exp, result = searched
    client = MlflowClient(tracking_uri=exp.tracking_uri)
    experiment_id = client.get_run(result.parent_run_id).info.experiment_id
    runs_before = len(client.search_runs([experiment_id]))
    fastest = min(result.fronts["host"], key=lambda r: (r.latency_ms, -r.metric))
    assert main(["select", str(path), "--profile", "host", "--max-latency-ms", "1e-6"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == ""
    assert (
        f"closest: trial {fastest.trial} (accuracy {fastest.metric:.4f}, latency {fastest.latency_ms:.3f} ms"
        in (lines[0])
    )
    most_accurate = max(result.fronts["host"], key=lambda r: (r.metric, -r.latency_ms))
    if most_accurate.metric < 1.0:
        floor = repr(most_accurate.metric + 1e-6)
        assert main(["select", str(path), "--profile", "host", "--min-accuracy", floor]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"closest: trial {most_accurate.trial} " in err
    assert len(client.search_runs([experiment_id])) == runs_before  # nothing logged
    assert not (exp.out_dir / result.study_name / "selected-host").exists()  # nothing written


def test_select_refuses_a_changed_experiment_and_an_unknown_profile(searched, capsys):
    path, _, _ = searched
    argv = ["select", str(path), "--max-latency-ms", "100"]
    assert main([*argv, "--profile", "host", "--set", "finetune.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "finetune.epochs is '2' now but was '1'" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--profile", "pixel7"]) == 2
    assert "profile 'pixel7'" in capsys.readouterr().err


def _stored_mse_search(tmp_path):
    """A search record as a lower-is-better task's search writes it (synthetic: no task is loaded to read it)."""
    from autocompress.search.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "tiny", tmp_path / "mlartifacts")
    parent = tracker.start_run("tiny-mse", tags={"autocompress.study": "tiny-mse"})
    tracker.log(
        parent,
        params={"objectives": "['metric', 'latency', 'size']", "metric.name": "mse", "metric.direction": "minimize"},
        metrics={"teacher.metric": 0.10, "teacher.size_bytes": 1000.0, "teacher.latency_ms.host": 1.0},
    )
    # (mse, latency): trial 0 is dominated by trial 1 (lower MSE, faster); 3 is the fastest
    for number, (mse, latency) in enumerate([(0.30, 0.8), (0.20, 0.6), (0.12, 0.9), (0.50, 0.2)]):
        run = tracker.start_run(f"trial-{number}", parent, tags={"trial": number, "state": "COMPLETE"})
        figures = {"metric": mse, "mse": mse, "size_bytes": 500.0, "params": 10.0, "latency_ms.host": latency}
        tracker.log(run, params={"prune/g": "0.5"}, metrics=figures)
        tracker.end_run(run)
    tracker.end_run(parent)
    return uri, parent


def test_a_stored_lower_is_better_search_is_fronted_and_selected_by_its_direction(tmp_path, capsys):
    uri, parent = _stored_mse_search(tmp_path)
    search = load_search(open_client(uri), parent, uri)
    assert search.metric == QualityMetric("mse", higher_is_better=False)
    assert [r.trial for r in search.front("host")] == [3, 1, 2]  # trial 0 (worse MSE, slower than 1) is off

    assert main(["front", parent, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "metric mse (lower is better)" in out and re.search(r"^\s*trial\s+mse\s+Δ pt", out, re.M)
    assert "accuracy" not in out

    path = tmp_path / "tiny.yaml"
    data = tiny_experiment_dict(tmp_path / "tiny")
    data["tracking"]["uri"] = uri
    path.write_text(yaml.safe_dump(data))
    # no member has an MSE of at most 0.1: exit 1 naming the lowest-MSE member, nothing rebuilt
    assert main(["select", str(path), "--profile", "host", "--max-metric", "0.1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mse <= 0.1" in err and "closest: trial 2 (mse 0.1200" in err
    # under a latency budget the lowest MSE within it is the one to build (picked before any rebuild)
    front = search.front("host")
    assert pick(front, Budget(max_latency_ms=0.7), "host", search.metric).trial == 1
    assert pick(front, Budget(max_metric=0.25), "host", search.metric).trial == 1  # fastest with MSE <= 0.25
