"""A regression task (MSE loss, lower-is-better metric) through search, front and select, end to end."""

from __future__ import annotations

import json

import yaml

from autocompress.cli import main
from autocompress.config import load_experiment
from autocompress.search.objectives import HOST
from autocompress.search.store import load_experiment_search
from tests.conftest import ROOT


def test_regression_search_front_and_select_follow_a_lower_is_better_metric(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the example task module imports from the repository root, as the README runs it
    exp = yaml.safe_load((ROOT / "experiments" / "diabetes_regression.yaml").read_text())
    exp.update(output_dir=str(tmp_path / "out"), tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    exp["teacher"]["epochs"] = 30
    exp["finetune"]["epochs"] = 3
    exp["search"].update(n_trials=6, population_size=3)
    exp["latency"].update(repeats=5, warmup=2)
    path = tmp_path / "diabetes.yaml"
    path.write_text(yaml.safe_dump(exp))

    assert main(["search", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mse" in out and "minimized" in out

    _, search = load_experiment_search(load_experiment(path))
    assert not search.metric.higher_is_better and search.metric.name == "mse"
    front = search.front(HOST)
    assert front
    records = {r.number: r.metrics for r in search.records}
    # Non-dominated under (mse low, latency low, size low): no complete trial beats a member on all three.
    for row in front:
        for other in records.values():
            assert not (
                other["metric"] < row.metric
                and other[f"latency_ms.{HOST}"] < row.latency_ms
                and other["size_bytes"] < row.size_bytes
            )

    assert main(["front", str(path), "--profile", HOST]) == 0
    table = capsys.readouterr().out
    assert "mse" in table and "lower is better" in table

    # A bound on MSE: the fastest member whose MSE is at most the bound.
    bound = sorted(r.metric for r in front)[len(front) // 2]
    out_dir = tmp_path / "selected"
    assert main(["select", str(path), "--profile", HOST, "--max-metric", str(bound), "--out", str(out_dir)]) == 0
    card = json.loads((out_dir / "model_card.json").read_text())
    meeting = [r for r in front if r.metric <= bound]
    assert card["candidate"]["trial"] == min(meeting, key=lambda r: r.latency_ms).trial
    assert card["metrics"]["searched"]["metric"] <= bound
    assert card["metric"] == {"name": "mse", "direction": "minimize"}
