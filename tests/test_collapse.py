"""`--stop-below`: a sequential run stops at the first curve point whose probe Edit Succ. is below
the threshold, scores and records the edits made; `knowbench superposition --collapse` turns such
runs into a collapse point per model, a scaling table and figure, and reuses them on a rerun."""

from __future__ import annotations

import json

import pytest

from knowbench import runner
from knowbench.cli import main
from knowbench.runner import RunConfig, RunError, run_all, write_results
from knowbench.validate import validate as validate_result


def _falling_curve(monkeypatch, start: float = 100.0, step: float = 10.0, every: int = 2):
    """Curve points whose probe Edit Succ. falls by ``step`` every ``every`` edits from ``start``
    at the first point (the real point's other numbers kept), so the stop is where the test says."""
    real = runner._curve_point
    calls = []

    def point(evaluator, probes, edited, ref, editor, n_edits):
        p = real(evaluator, probes, edited, ref, editor, n_edits)
        if n_edits:
            p["edit_succ"] = start - step * (n_edits // every - 1)
            calls.append(n_edits)
        return p

    monkeypatch.setattr(runner, "_curve_point", point)
    return calls


def _cfg(tmp_path, **kw) -> RunConfig:
    base = dict(editor="ft-m", task="zsre", model="random-gpt2", sequential=12, eval_timing="final",
                curve_every=2, curve_probes=3, stop_below=75.0, fluency=False, diagnostics=False,
                output=str(tmp_path / "r.json"))
    return RunConfig(**{**base, **kw})


def test_a_run_stops_at_the_first_point_below_and_records_the_edits_it_made(tmp_path, monkeypatch):
    calls = _falling_curve(monkeypatch)  # 100, 90, 80, 70 at 2, 4, 6, 8 edits: 70 < 75 stops at 8
    ((path, res),) = write_results(run_all(_cfg(tmp_path)), str(tmp_path / "r.json"))
    assert calls == [2, 4, 6, 8]
    p = res["protocol"]
    assert (p["sequential"], p["n_edits"], p["stop_below"], p["stopped_at"]) == (12, 8, 75.0, 8)
    assert len(res["records"]) == 8 and len(res["edits"]) == 8
    assert [c["edits"] for c in res["curve"]] == [0, 2, 4, 6, 8]
    assert res["timings"]["edit_ms_per_edit"] == pytest.approx(1000 * res["timings"]["edit_s"] / 8, rel=1e-3)
    assert validate_result(json.loads(path.read_text())).ok
    from knowbench.schema import protocol_key, ProtocolInfo

    assert ProtocolInfo.model_validate(p).key() == "sequential8-final-stopped"
    assert protocol_key(p).startswith("sequential8-final")


def test_a_run_that_never_falls_below_runs_all_edits_and_records_no_stop(tmp_path, monkeypatch):
    _falling_curve(monkeypatch, step=0.0)
    (res,) = run_all(_cfg(tmp_path, sequential=6))
    p = res["protocol"]
    assert (p["n_edits"], p["sequential"], p["stop_below"], p["stopped_at"]) == (6, 6, 75.0, None)
    assert len(res["records"]) == 6


@pytest.mark.parametrize("kw, why", [
    ({"curve_every": 0}, "needs --sequential T with a curve"),
    ({"sequential": None, "eval_timing": "each", "curve_every": None}, "needs --sequential T"),
    ({"stop_below": 0.0}, "percentage in"),
    ({"stop_below": 120.0}, "percentage in"),
])
def test_bad_stop_options_are_refused_before_anything_loads(tmp_path, kw, why):
    with pytest.raises(RunError, match=why):
        run_all(_cfg(tmp_path, **kw))


def test_a_tampered_stop_record_fails_validation(tmp_path, monkeypatch):
    _falling_curve(monkeypatch)
    ((path, res),) = write_results(run_all(_cfg(tmp_path)), str(tmp_path / "r.json"))
    body = json.loads(path.read_text())
    body["protocol"]["stopped_at"] = 5  # no longer n_edits
    report = validate_result(body)
    assert not report.ok and any("protocol.stopped_at" in e for e in map(str, report.errors))


def test_superposition_collapse_over_two_models_writes_table_figure_and_reuses_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("KNOWBENCH_CACHE", str(tmp_path / "cache"))
    _falling_curve(monkeypatch, step=30.0)  # 100, 70, 40 at 2, 4, 6 edits: stops at 6
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i} says that Zorb{i % 7} lives by the river near town {i}." for i in range(60)))
    data = tmp_path / "facts.json"
    data.write_text(json.dumps([{"prompt": f"Zorb{i} lives in", "subject": f"Zorb{i}"} for i in range(8)]))
    out = tmp_path / "out"
    args = ["superposition", "--model", "random-gpt2", "--model", "random-llama", "--data", str(data), "--n", "6",
            "--stats-corpus", str(corpus), "--stats-samples", "60", "--out", str(out),
            "--collapse", "ft-m", "--collapse-max", "8", "--collapse-every", "2", "--collapse-probes", "2"]
    assert main(args) == 0
    res = json.loads((out / "superposition.json").read_text())
    for m in res["models"]:
        (c,) = m["collapse"]
        assert (c["editor"], c["collapse_at"], c["survived"], c["max_edits"]) == ("ft-m", 6, False, 8)
        run = json.loads((out / "collapse" / f"ft-m_{m['model']['id']}.json").read_text())
        assert run["protocol"]["stopped_at"] == 6 and run["config"]["stop_below"] == 50.0
    assert (out / "scaling.png").stat().st_size > 1000
    assert "Scaling: kurtosis per layer and lifelong collapse point" in capsys.readouterr().out
    from knowbench.study import scaling_table

    table = scaling_table(res)
    assert "ft-m collapse" in table and "κ layer 0" in table
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["random-gpt2", "random-llama"] or \
        [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["random-llama", "random-gpt2"]
    # a second study with the same options reads the collapse runs instead of running them again
    monkeypatch.setattr(runner, "run_all", lambda *a, **k: pytest.fail("the collapse run was repeated"))
    assert main(args + ["--no-plots"]) == 0


def test_superposition_refuses_an_unknown_collapse_editor_before_the_long_part(tmp_path, monkeypatch, capsys):
    from knowbench import study

    monkeypatch.setattr(study, "run_study", lambda *a, **k: pytest.fail("the study started"))
    assert main(["superposition", "--model", "random-gpt2", "--no-plots", "--out", str(tmp_path),
                 "--collapse", "no-such-editor"]) == 2
    assert "unknown editor 'no-such-editor'" in capsys.readouterr().err


def test_a_stopped_run_is_not_a_leaderboard_entry(tmp_path, monkeypatch):
    from knowbench.leaderboard import LeaderboardError, submit

    _falling_curve(monkeypatch)
    ((path, _),) = write_results(run_all(_cfg(tmp_path)), str(tmp_path / "r.json"))
    with pytest.raises(LeaderboardError, match="stopped by --stop-below after 8 of 12 edits"):
        submit([path], tmp_path / "board")
    assert not (tmp_path / "board" / "results").exists()


def test_a_collapse_run_that_cannot_run_is_recorded_and_the_study_goes_on(tmp_path, monkeypatch):
    from knowbench import study

    def refuse(model, editor, cfg, out_dir):
        raise ValueError("alphaedit: no eigenvalue of C at layer 0 is below nullspace_threshold=0.1")

    monkeypatch.setattr(study, "collapse_point", refuse)
    got = study._collapse_or_error("random-gpt2", "alphaedit", study.StudyConfig(collapse=["alphaedit"]), tmp_path)
    assert got["error"].startswith("ValueError: alphaedit: no eigenvalue") and got["collapse_at"] is None
    table = study.scaling_table({"models": [{"model": {"id": "m", "n_params": 10}, "layers": [],
                                             "collapse": [got]}]})
    assert "error" in table.splitlines()[-1]
