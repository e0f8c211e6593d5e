"""Hardware profiles: file format, predictor arithmetic, interpolation, overhead fit, host checks, CLI errors."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

from autocompress.cli import main
from autocompress.hw_profiles import (
    OpSignature,
    Profile,
    ProfileError,
    ProfileMismatchWarning,
    UnpredictableSignature,
    fit_overhead,
    load_profile,
    predict_signatures,
    save_profile,
)
from autocompress.hw_profiles.host import cpu_model, runtime_version
from autocompress.hw_profiles.predictor import check_host
from autocompress.hw_profiles.probe import describe_drift, drift, read_probe
from autocompress.hw_profiles.profile import (
    CalibrationSample,
    Overhead,
    ProbeReading,
    ValidationRow,
    content_hash,
    parse_profile,
)
from autocompress.hw_profiles.validate import describe_reference_drift, reference_drift, summarize


def conv(cin: int, cout: int, size: int = 8, dtype: str = "fp32") -> OpSignature:
    return OpSignature(
        op="conv2d+bn+relu",
        in_channels=cin,
        out_channels=cout,
        kernel=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        input_size=(size, size),
        dtype=dtype,
        extra="bias=0,dil=1x1,inplace=1",
    )


def pool(channels: int) -> OpSignature:
    return OpSignature(op="maxpool2d", in_channels=channels, out_channels=channels, kernel=(2, 2), input_size=(8, 8))


def entry(sig: OpSignature, ms: float) -> dict:
    return {"signature": sig.model_dump(mode="json"), "median_ms": ms, "p90_ms": ms * 1.1, "repeats": 10}


def profile_dict(entries: list[dict], **overrides) -> dict:
    data = {
        "format_version": 1,
        "id": "hand-made",
        "description": "hand-made LUT for tests",
        "host": {"cpu": cpu_model(), "cores": 2, "threads": 1, "machine": "x86_64", "os": "Linux"},
        "runtime": {
            "name": "torch-eager",
            "version": runtime_version("torch-eager"),
            "dtypes": ["fp32"],
            "kernel_bits": [32],
        },
        "measured_at": "2026-01-01T00:00:00Z",
        "measurement": {"warmup_ms": 20.0, "repeats": 10, "min_sample_ms": 1.0, "pinned_cpu": 1},
        "lut": entries,
        "overhead": {"per_op_ms": 0.01, "constant_ms": {"pkg.Model": 0.5}, "default_constant_ms": 0.2},
    }
    data.update(overrides)
    return data


# Latency of conv(i, o) in this hand-made LUT: bilinear in (i, o), as a convolution's cost is.
def conv_ms(i: int, o: int) -> float:
    return 0.01 + 0.001 * i + 0.002 * o + 0.0001 * i * o


@pytest.fixture
def profile() -> Profile:
    entries = [entry(conv(i, o), conv_ms(i, o)) for i in (8, 16, 32) for o in (8, 16, 32)]
    entries += [entry(pool(c), 0.001 * c) for c in (8, 32)]
    return parse_profile(profile_dict(entries))


# --- format ----------------------------------------------------------------------------------


def test_round_trip(profile, tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_profile(profile, tmp_path / "p.json")
    finally:
        os.umask(previous)
    loaded = load_profile(path)
    assert loaded == profile
    assert loaded.table[conv(8, 16).key()].median_ms == pytest.approx(conv_ms(8, 16))
    assert json.loads(path.read_text())["format_version"] == 1
    assert path.stat().st_mode & 0o044 == 0o044  # readable by others, like any data file


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format_version=2), "format_version 2 is not supported"),
        (lambda d: d["host"].pop("cpu"), "host.cpu: required key is missing"),
        (lambda d: d.update(colour="red"), "colour: unknown key"),
        (lambda d: d["runtime"].update(name="tflite"), "runtime.name"),
        (lambda d: d["lut"][0].update(p90_ms=0.000001), "is below median_ms"),
        (lambda d: d["lut"].append(dict(d["lut"][0])), "appears twice"),
        (lambda d: d["lut"][0]["signature"].update(dtype="int8"), "not one of the runtime's dtypes"),
        (lambda d: d["runtime"].update(kernel_bits=[32, 8]), "do not match dtypes"),
        (lambda d: d["lut"][0]["signature"].update(in_channels=-1), "lut.0.signature.in_channels"),
    ],
)
def test_validation_errors_name_the_problem(mutate, message, tmp_path):
    data = profile_dict([entry(conv(8, 8), 0.1)])
    mutate(data)
    data["content_sha256"] = content_hash(data)  # signed: the schema, not the hash, must refuse it
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=message) as err:
        load_profile(path)
    assert str(path) in str(err.value)


def test_a_profile_changed_since_it_was_written_is_refused_until_rehashed(profile, tmp_path, capsys):
    path = save_profile(profile, tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["content_sha256"] == content_hash(data)
    data["lut"][0]["median_ms"] *= 0.5  # a corrupted (or hand-edited) entry that is still a valid profile
    path.write_text(json.dumps(data, indent=4))
    with pytest.raises(ProfileError, match="content_sha256 does not match its contents") as err:
        load_profile(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    data.pop("content_sha256")
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="no content_sha256"):
        load_profile(path)
    assert main(["profile", "rehash", str(path)]) == 0  # the user vouches for the change
    assert load_profile(path).lut[0].median_ms == pytest.approx(profile.lut[0].median_ms * 0.5)
    reindented = json.loads(path.read_text())
    path.write_text(json.dumps(reindented, indent=None, sort_keys=True))  # layout is not content: still loads
    assert load_profile(path).lut[0].median_ms == pytest.approx(profile.lut[0].median_ms * 0.5)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format_version": 1,\n "id": }')
    with pytest.raises(ProfileError, match=r"not valid JSON \(line 2, column 8\)"):
        load_profile(bad)


# --- predictor arithmetic --------------------------------------------------------------------


def test_sum_of_entries_plus_overhead(profile):
    sigs = [conv(8, 16), pool(8), conv(16, 32)]
    pred = predict_signatures(sigs, profile, "pkg.Model")
    lut = conv_ms(8, 16) + 0.008 + conv_ms(16, 32)
    assert pred.lut_ms == pytest.approx(lut)
    assert pred.overhead_ms == pytest.approx(0.5 + 3 * 0.01)
    assert pred.latency_ms == pytest.approx(lut + 0.53)
    assert pred.n_ops == 3 and pred.exact and pred.model_overhead
    # A model without its own fitted constant gets the profile's default, and says so.
    other = predict_signatures(sigs, profile, "pkg.Other")
    assert other.overhead_ms == pytest.approx(0.2 + 0.03) and not other.model_overhead


def test_bilinear_interpolation_over_channels_is_flagged(profile):
    pred = predict_signatures([conv(12, 24)], profile)
    assert pred.lut_ms == pytest.approx(conv_ms(12, 24))  # exact for the bilinear cost shape
    assert pred.interpolated == (conv(12, 24).key(),) and not pred.exact
    # One dimension measured: linear along the other.
    assert predict_signatures([conv(16, 20)], profile).lut_ms == pytest.approx(conv_ms(16, 20))


def test_channelwise_interpolation(profile):
    pred = predict_signatures([pool(20)], profile)
    assert pred.lut_ms == pytest.approx(0.020) and not pred.exact


def test_unpredictable_signatures_raise_naming_them(profile):
    outside = conv(64, 16)
    with pytest.raises(UnpredictableSignature, match=r"64->16\|conv2d\+bn\+relu.*outside the measured channels"):
        predict_signatures([outside], profile)
    other_size = conv(8, 8, size=4)
    with pytest.raises(UnpredictableSignature, match="in4x4.*no entry with this op"):
        predict_signatures([other_size], profile)


def test_interpolation_falls_back_to_a_fit_without_a_full_grid_cell():
    # Scattered points (no rectangle around 20->20), still exactly bilinear: the least-squares fit recovers it.
    points = [(8, 8), (8, 32), (32, 8), (16, 24), (24, 16), (32, 32)]
    data = profile_dict([entry(conv(i, o), conv_ms(i, o)) for i, o in points])
    prof = parse_profile(data)
    pred = predict_signatures([conv(20, 20)], prof)
    assert pred.lut_ms == pytest.approx(conv_ms(20, 20), rel=1e-6) and not pred.exact


def test_overhead_fit_recovers_constants_and_per_op():
    truth = {"a.A": 0.3, "b.B": 0.05}
    per_op = 0.004
    samples = [
        CalibrationSample(model=m, n_ops=n, lut_ms=lut, measured_ms=lut + truth[m] + per_op * n)
        for m in truth
        for n, lut in ((10, 1.0), (14, 1.5), (20, 2.5))
    ]
    fitted = fit_overhead(samples)
    assert fitted.per_op_ms == pytest.approx(per_op)
    assert fitted.constant_ms == pytest.approx(truth)
    assert fitted.residual_pct == pytest.approx(0.0, abs=1e-9)
    # Constant op count within every model: the per-op term is not identifiable and is left at 0.
    flat = [s.model_copy(update={"n_ops": 10}) for s in samples]
    assert fit_overhead(flat).per_op_ms == 0.0
    assert fit_overhead([]) == Overhead()


def test_overhead_fit_recovers_a_per_model_scale():
    # Inside the model the operators run 20% slower than alone (weights no longer hot in cache).
    samples = [
        CalibrationSample(model="a.A", n_ops=10, lut_ms=lut, measured_ms=1.2 * lut + 0.1) for lut in (1, 2, 3, 5, 8)
    ]
    fitted = fit_overhead(samples)
    assert fitted.scale["a.A"] == pytest.approx(1.2)
    assert fitted.constant_ms["a.A"] == pytest.approx(0.1)
    prof = parse_profile(profile_dict([entry(conv(8, 8), 4.0)], overhead=fitted.model_dump()))
    pred = predict_signatures([conv(8, 8)], prof, "a.A")
    assert pred.scale == pytest.approx(1.2) and pred.latency_ms == pytest.approx(1.2 * 4.0 + 0.1)
    # Too few samples of a model to fit a scale: it stays 1.
    assert fit_overhead(samples[:3]).scale["a.A"] == 1.0


def test_overhead_fit_gives_the_dominant_operator_kinds_their_own_scale():
    # Convolutions 1.3x slower in the model than alone, max-pools 0.7x, the small rest as measured.
    rows = [(c, p, r) for c in (0.2, 0.5, 0.9) for p in (0.1, 0.3) for r in (0.01, 0.02)]
    samples = [
        CalibrationSample(
            model="a.A",
            n_ops=10,
            lut_ms=c + p + r,
            measured_ms=1.3 * c + 0.7 * p + r + 0.05,
            lut_by_op={"conv2d+bn+relu": c, "maxpool2d": p, "linear": r},
        )
        for c, p, r in rows
    ]
    fitted = fit_overhead(samples)
    assert fitted.op_scale["a.A"] == pytest.approx({"conv2d+bn+relu": 1.3, "maxpool2d": 0.7})
    assert fitted.constant_ms["a.A"] == pytest.approx(0.05) and fitted.scale["a.A"] == 1.0
    assert fitted.residual_pct == pytest.approx(0.0, abs=1e-9)
    lut = [entry(conv(8, 8), 0.4), entry(pool(8), 0.2)]
    prof = parse_profile(profile_dict(lut, overhead=fitted.model_dump()))
    pred = predict_signatures([conv(8, 8), pool(8)], prof, "a.A")
    assert pred.latency_ms == pytest.approx(1.3 * 0.4 + 0.7 * 0.2 + 0.05)
    assert pred.scale == pytest.approx((1.3 * 0.4 + 0.7 * 0.2) / 0.6)
    # Four samples per scale are needed: with 8, only the larger kind keeps its own scale.
    few = fit_overhead(samples[:8])
    assert list(few.op_scale["a.A"]) == ["conv2d+bn+relu"]
    # Samples without the split (profiles from before it) fall back to one scale for the model.
    legacy = fit_overhead([s.model_copy(update={"lut_by_op": {}}) for s in samples])
    assert legacy.op_scale == {} and legacy.scale["a.A"] != 1.0


def test_overhead_fit_takes_a_kind_whose_scale_is_not_identifiable_back_into_one_scale():
    # The pools' LUT time barely varies and the noise runs against it: a free pool scale fits at -2.
    rows = [(0.1 * k, 0.2 + 0.01 * ((-1) ** k) * (k % 3)) for k in range(1, 13)]
    samples = [
        CalibrationSample(
            model="a.A",
            n_ops=10,
            lut_ms=c + p,
            measured_ms=1.2 * c + 0.1 - 2.0 * (p - 0.2) + 0.2,
            lut_by_op={"conv2d+bn+relu": c, "maxpool2d": p},
        )
        for c, p in rows
    ]
    unguarded = np.linalg.lstsq(
        np.array([[1.0, s.lut_by_op["conv2d+bn+relu"], s.lut_by_op["maxpool2d"]] for s in samples]),
        np.array([s.measured_ms for s in samples]),
        rcond=None,
    )[0]
    assert unguarded[2] == pytest.approx(-2.0)  # what a free per-kind fit would ship
    fitted = fit_overhead(samples)
    assert "maxpool2d" not in fitted.op_scale.get("a.A", {})
    assert all(v > 0 for v in fitted.op_scale.get("a.A", {}).values())
    assert fitted.scale["a.A"] > 0


def test_overhead_fit_holds_a_model_scale_that_fits_negative_at_one():
    # Four noisy samples whose measured time falls as their LUT sum rises (seen with 4 calibration
    # candidates of a tiny model): a free scale fits at -1 and would predict negative latencies.
    samples = [
        CalibrationSample(model="a.A", n_ops=10, lut_ms=lut, measured_ms=ms)
        for lut, ms in ((0.10, 0.50), (0.11, 0.49), (0.12, 0.48), (0.13, 0.47))
    ]
    free = np.linalg.lstsq(
        np.array([[1.0, s.lut_ms] for s in samples]), np.array([s.measured_ms for s in samples]), rcond=None
    )[0]
    assert free[1] == pytest.approx(-1.0)
    fitted = fit_overhead(samples)
    assert fitted.scale["a.A"] == 1.0 and fitted.default_scale == 1.0
    assert fitted.constant_ms["a.A"] == pytest.approx(0.48 - 0.115, rel=0.05)


def test_probe_drift_is_reported_against_the_profile_reading():
    reference = ProbeReading(dispatch_us=50.0, compute_ms=0.5)
    assert drift(reference, ProbeReading(dispatch_us=60.0, compute_ms=0.45)) == pytest.approx((20.0, -10.0))
    assert "steady" in describe_drift(reference, ProbeReading(dispatch_us=51.0, compute_ms=0.49))
    assert "DRIFTED" in describe_drift(reference, ProbeReading(dispatch_us=60.0, compute_ms=0.5))
    assert "no probe reading" in describe_drift(None, reference)
    reading = read_probe()
    assert reading.dispatch_us > 0 and reading.compute_ms > 0
    # A reading stored in a profile survives the file round trip.
    prof = parse_profile(profile_dict([entry(conv(8, 8), 1.0)], probe=reading.model_dump()))
    assert parse_profile(json.loads(prof.model_dump_json())).probe == reading


def test_same_model_drift_scales_the_predictions_by_the_median_reference_ratio(profile, tmp_path, capsys):
    # The machine runs 10% slower than at calibration: every candidate measures 1.1x its prediction.
    rows = [
        ValidationRow(candidate=f"c{i}", predicted_ms=p, measured_ms=p * 1.1, abs_error_pct=100 / 11)
        for i, p in enumerate([0.5, 1.0, 2.0])
    ]
    # Reference ratios 1.1, 1.1 and an outlier 1.5: the median ignores the outlier.
    drift = reference_drift(rows, then_ms=[1.0, 2.0, 1.0], now_ms=[1.1, 2.2, 1.5])
    assert drift.n == 3 and drift.ratio_median == pytest.approx(1.1)
    assert (drift.ratio_min, drift.ratio_max) == pytest.approx((1.1, 1.5))
    assert drift.median_abs_error_pct == pytest.approx(0.0, abs=1e-9)
    assert drift.max_abs_error_pct == pytest.approx(0.0, abs=1e-9)
    off = reference_drift(rows, then_ms=[1.0], now_ms=[1.0])  # no drift read: the error stays
    assert off.median_abs_error_pct == pytest.approx(100 / 11)
    with pytest.raises(ValueError, match="got 1 and 2"):
        reference_drift(rows, then_ms=[1.0, 2.0], now_ms=[1.0])
    line = describe_reference_drift(drift)
    assert "+10.0%" in line and "DRIFTED" in line and "median 0.00%" in line
    assert "not read" in describe_reference_drift(None)
    # Recorded with a validation, it survives the file round trip and `profile list` shows it.
    summary = summarize(rows, "pkg.Model", "e", drift=drift)
    recorded = profile.model_copy(update={"validation": [summary]})
    path = save_profile(recorded, tmp_path / "p.json")
    assert load_profile(path).validation[0].drift == drift
    assert main(["profile", "list", str(path)]) == 0
    assert "machine +10.0% vs calibration; scaled by it: median 0.00%" in capsys.readouterr().out


def test_profile_from_another_machine_warns(profile):
    moved = profile.model_copy(
        update={"id": "moved", "host": profile.host.model_copy(update={"cpu": "Some Other CPU 9000"})}
    )
    with pytest.warns(ProfileMismatchWarning, match="Some Other CPU 9000"):
        check_host(moved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_host(profile) == []


# --- command line errors ---------------------------------------------------------------------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("autocompress: error: ")
    return err[0]


def test_cli_missing_profile_is_one_line_exit_2(tmp_path, capsys):
    assert main(["profile", "list", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such profile file" in _one_error_line(capsys)


def test_cli_invalid_json_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    exp = tmp_path / "e.yaml"
    exp.write_text("name: e\ntask: {name: digits}\n")
    assert main(["profile", "validate", str(bad), "--experiment", str(exp), "--n", "1"]) == 2
    assert "not valid JSON" in _one_error_line(capsys)


def test_cli_unknown_runtime_is_one_line_exit_2(tmp_path, capsys):
    exp = tmp_path / "e.yaml"
    exp.write_text("name: e\ntask: {name: digits}\n")
    code = main(["profile", "measure", "--experiment", str(exp), "--out", str(tmp_path / "p.json"), "--runtime", "tpu"])
    assert code == 2
    assert "unknown runtime" in _one_error_line(capsys)


def test_cli_list_shows_profiles(profile, tmp_path, capsys):
    path = save_profile(profile, tmp_path / "p.json")
    assert main(["profile", "list", str(path)]) == 0
    out = capsys.readouterr().out
    assert "hand-made" in out and "torch-eager" in out and "11 LUT entries" in out
