"""The technique registry: parameter names and types, and stored runs whose parameters no technique claims."""

from __future__ import annotations

import math

import pytest
import yaml

from autocompress.cli import main
from autocompress.search.tracking import Tracker
from autocompress.spaces import Candidate
from autocompress.techniques import ParameterError, get, parse_params, split_param, techniques
from tests.conftest import tiny_experiment_dict


def test_registry_order_is_the_parameter_order_and_names_are_unique():
    names = [t.name for t in techniques()]
    assert names[:3] == ["prune", "bits", "rank"] and names[-1] == "kd"
    assert len(set(names)) == len(names)
    assert len({t.config_key for t in techniques()}) == len(names)
    with pytest.raises(KeyError, match="unknown technique 'width'"):
        get("width")


def test_stored_values_get_their_types_back_and_wrong_ones_are_named():
    params = parse_params({"bits/fc1": "8", "bits/fc2": 4.0, "prune/g": "0.25", "kd/alpha": 1})
    assert params == {"bits/fc1": 8, "bits/fc2": 4, "prune/g": 0.25, "kd/alpha": 1.0}
    assert type(params["bits/fc1"]) is int and type(params["kd/alpha"]) is float
    for bad, message in [
        ({"bits/fc1": "8.5"}, "bits/fc1='8.5' is not a whole number"),
        ({"bits/fc1": "eight"}, "bits/fc1='eight' is not a number"),
        ({"prune/g": math.nan}, "prune/g=nan is not a finite number"),
        ({"prune/g": True}, "prune/g=True is not a finite number"),
        ({"width/fc1": 3}, "unknown candidate parameter 'width/fc1'"),
        ({"prune": 0.5}, "unknown candidate parameter 'prune'"),
    ]:
        with pytest.raises(ParameterError, match=message.replace("(", r"\(")):
            parse_params(bad)
    technique, key = split_param("rank/features.conv1.conv")
    assert technique.name == "rank" and key == "features.conv1.conv"


def test_candidate_keywords_name_techniques_and_round_trip():
    candidate = Candidate(prune={"g": 0.5}, bits={"fc1": 8}, kd={"temperature": 2.0, "alpha": 0.5})
    assert list(candidate.to_params()) == ["prune/g", "bits/fc1", "kd/temperature", "kd/alpha"]
    assert Candidate.from_params(candidate.to_params()) == candidate
    assert candidate.describe() == "prune 0.5-0.5 (1/1) | int8x1 | T=2 a=0.5"
    with pytest.raises(KeyError, match="unknown technique 'width'"):
        Candidate(width={"fc1": 3})


def _stored_search(tmp_path, extra_param: dict[str, str]) -> tuple[str, str, str]:
    """A search record as the search writes it: a parent run with teacher figures, two trial runs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "tiny", tmp_path / "mlartifacts")
    parent = tracker.start_run("tiny-1", tags={"autocompress.study": "tiny-1"})
    tracker.log(
        parent,
        params={"objectives": "['accuracy', 'latency', 'size']"},
        metrics={"teacher.accuracy": 0.9, "teacher.size_bytes": 1000.0, "teacher.latency_ms.host": 1.0},
    )
    runs = []
    for number, params in enumerate([{"prune/g": "0.5", "bits/fc1": "8"}, {"prune/g": "0.25", **extra_param}]):
        run = tracker.start_run(f"trial-{number}", parent, tags={"trial": number, "state": "COMPLETE"})
        tracker.log(
            run,
            params=params,
            metrics={"accuracy": 0.85, "size_bytes": 500.0, "params": 10.0, "latency_ms.host": 0.5 + number},
        )
        tracker.end_run(run)
        runs.append(run)
    tracker.end_run(parent)
    return uri, parent, runs[1]


@pytest.mark.parametrize(
    "extra,message",
    [({"width/fc1": "3"}, "unknown candidate parameter 'width/fc1'"), ({"bits/fc1": "8.5"}, "is not a whole number")],
)
def test_front_and_select_refuse_a_stored_parameter_no_technique_claims(tmp_path, capsys, extra, message):
    uri, parent, bad_run = _stored_search(tmp_path, extra)
    assert main(["front", parent, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and bad_run in err, err

    path = tmp_path / "tiny.yaml"
    data = tiny_experiment_dict(tmp_path / "tiny")
    data["tracking"]["uri"] = uri
    path.write_text(yaml.safe_dump(data))
    assert main(["select", str(path), "--profile", "host", "--max-latency-ms", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
