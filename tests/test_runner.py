"""End to end through the runner on tiny random models: protocols, restore, selection, results."""

from __future__ import annotations

import json

import pytest

from knowbench.cli import main
from knowbench.runner import RunConfig, RunError, finish, run

FT = "ft-m"


def _run(zsre_file, **kw):
    kw.setdefault("model", "random-gpt2")
    kw.setdefault("fluency", False)
    return run(RunConfig(editor=FT, task="zsre", data=str(zsre_file), **kw))


def test_single_protocol_result_has_provenance(zsre_file):
    r = _run(zsre_file, limit=4, seed=3)
    assert r["protocol"]["name"] == "single" and r["protocol"]["n_edits"] == 4
    sel = r["task"]["selection"]
    assert sel["method"] == "seeded-sample" and len(sel["indices"]) == 4 and sel["indices"] == sorted(sel["indices"])
    assert r["task"]["data_files"][0]["sha256"] and r["editor"]["hparams_hash"]
    post = r["metrics"]["post"]
    for key in ("edit_succ", "rephrase", "portability", "portability.Reasoning", "locality", "locality.Relation_Specificity"):
        assert 0 <= post[key]["value"] <= 100 and post[key]["n"] == 4
    assert "locality" not in r["metrics"]["pre"]
    assert "fluency" not in post  # not measured -> absent, never 0
    assert len(r["_records"]) == 4


def test_same_seed_same_metrics(zsre_file):
    a = _run(zsre_file, limit=3, seed=1, fluency=True)
    b = _run(zsre_file, limit=3, seed=1, fluency=True)
    assert a["metrics"] == b["metrics"] and a["task"]["selection"] == b["task"]["selection"]
    c = _run(zsre_file, limit=3, seed=2)
    assert c["task"]["selection"]["indices"] != a["task"]["selection"]["indices"]


def test_single_restores_between_edits(tmp_path):
    """Each single edit starts from the original weights: an edit's scores do not depend on the edits before it."""
    from conftest import zsre_records

    recs = zsre_records(3)
    both, alone = tmp_path / "both.json", tmp_path / "alone.json"
    both.write_text(json.dumps(recs))
    alone.write_text(json.dumps(recs[2:]))
    a = _run(both)
    b = _run(alone)
    assert a["_records"][2]["post"] == b["_records"][0]["post"]


@pytest.mark.parametrize("timing", ["each", "final"])
def test_sequential_protocol_and_curve(zsre_file, timing):
    r = _run(zsre_file, sequential=6, eval_timing=timing, curve_every=2, curve_probes=3, model="random-llama")
    assert r["protocol"]["name"] == "sequential" and r["protocol"]["eval_timing"] == timing
    assert [pt["edits"] for pt in r["curve"]] == [0, 2, 4, 6]
    assert "edit_succ" not in r["curve"][0] and "locality" in r["curve"][0]
    assert r["curve"][0]["locality"] == 100.0
    assert r["metrics"]["post"]["edit_succ"]["n"] == 6


def test_batch_protocol(zsre_file):
    r = _run(zsre_file, limit=4, batch_size=2)
    assert r["protocol"]["name"] == "batch" and len(r["edits"]) == 2 and r["edits"][0]["records"] == r["task"]["selection"]["indices"][:2]


def test_bad_arguments_are_clear(zsre_file):
    with pytest.raises(RunError, match="fewer than the 100"):
        _run(zsre_file, limit=100)
    with pytest.raises(RunError, match="smaller than --sequential"):
        _run(zsre_file, sequential=5, limit=2)


def test_cli_run_writes_result_and_record_log(zsre_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    recs = tmp_path / "recs.jsonl"
    code = main(["run", "--editor", FT, "--task", "ZsRE", "--model", "random-gpt2", "--data", str(zsre_file),
                 "--limit", "2", "--output", str(out), "--log-records", str(recs), "--no-fluency"])
    assert code == 0
    result = json.loads(out.read_text())
    from knowbench.results import content_hash

    assert result["integrity"]["sha256"] == content_hash(result)
    rows = [json.loads(line) for line in recs.read_text().splitlines()]
    assert [r["index"] for r in rows] == result["task"]["selection"]["indices"]
    shown = capsys.readouterr().out
    assert "Edit Succ." in shown and "Portability" in shown


def test_cli_errors_are_messages_not_tracebacks(zsre_file, capsys):
    assert main(["run", "--editor", "nope", "--task", "zsre", "--model", "random-gpt2", "--data", str(zsre_file)]) == 2
    assert main(["run", "--editor", FT, "--task", "zsre", "--model", "random-gpt2", "--data", "/nonexistent/x.json"]) == 2


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for opt in ("--editor", "--task", "--model", "--data", "--limit", "--sequential", "--eval-timing", "--batch-size",
                "--seed", "--output", "--device", "--dtype", "--hparams", "--log-records", "--curve-every", "--stats-corpus"):
        assert opt in text


def test_ls_lists_plugins_with_distribution(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "zsre" in out and "ft-m" in out and "knowbench" in out
