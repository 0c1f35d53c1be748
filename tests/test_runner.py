"""End to end through the runner on tiny random models: protocols, restore, selection, results."""

from __future__ import annotations

import json

import pytest
import torch

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


# -- records that do not fit the model's context -----------------------------------------------------
def _write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def _long(rec: dict, n_chars: int = 5000) -> dict:
    rec = dict(rec)
    rec["prompt"] = "blah " * (n_chars // 5) + rec["prompt"]
    return rec


def test_an_over_long_prompt_is_dropped_not_fatal(tmp_path):
    """A 5,000-character prompt (beyond random-gpt2's 512 positions) drops its record, listed in the result;
    the other records score exactly as in a run without it."""
    from conftest import zsre_records

    recs = zsre_records(3)
    with_long = _write(tmp_path, "with.json", [recs[0], _long(recs[1]), recs[2]])
    without = _write(tmp_path, "without.json", [recs[0], recs[2]])
    a = _run(with_long, limit=3)
    b = _run(without)
    bad = a["task"]["bad_records"]
    assert len(bad) == 1 and bad[0]["index"] == 1 and bad[0]["record_dropped"]
    assert bad[0]["source"].endswith("with.json")
    assert "more than the model's context of 512" in bad[0]["reason"]
    sel = a["task"]["selection"]
    assert sel["n_selected"] == 2 and sel["indices"] == [0, 2] and a["protocol"]["n_edits"] == 2
    assert a["task"]["n_records_usable"] == sel["n_available"] == 2
    assert [r["post"] for r in a["_records"]] == [r["post"] for r in b["_records"]]
    assert [r["pre"] for r in a["_records"]] == [r["pre"] for r in b["_records"]]
    assert a["metrics"] == b["metrics"]
    from knowbench.validate import validate

    assert validate(finish(a)).ok


@pytest.mark.parametrize("editor", ["rome", "ft-m"])
def test_over_long_prompt_through_the_cli_on_the_embedded_model(tmp_path, editor, capsys):
    """The reported case: `knowbench run --editor rome|ft-m --task zsre --data FILE --limit 3` with a
    5,000-character prompt on the embedded model (128 positions)."""
    from knowbench.world import default_task_file

    recs = json.loads(default_task_file("zsre").read_text())[:3]
    data = _write(tmp_path, "long.json", [_long(recs[0])] + recs[1:])
    out = tmp_path / "r.json"
    args = ["run", "--editor", editor, "--task", "zsre", "--data", str(data), "--limit", "3", "--output", str(out),
            "--no-fluency", "--no-diagnostics"]
    if editor == "rome":
        args += ["--stats-samples", "200"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    (bad,) = result["task"]["bad_records"]
    assert bad["index"] == 0 and "context of 128" in bad["reason"]
    assert result["protocol"]["n_edits"] == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "long.json record 0: prompt and target_new are" in err and "fewer than the 3 selected" in err


def test_an_over_long_answer_skips_only_its_item(tmp_path):
    from conftest import zsre_records

    recs = zsre_records(2)
    recs[1]["locality"]["Relation_Specificity"].append({"prompt": "The rank is", "ground_truth": ["x " * 600]})
    r = _run(_write(tmp_path, "zsre.json", recs))
    (bad,) = r["task"]["bad_records"]
    assert (bad["index"], bad["item"], bad["record_dropped"]) == (1, "locality.Relation_Specificity[1]", False)
    assert "answer" in bad["reason"] and "context of 512" in bad["reason"]
    assert r["protocol"]["n_edits"] == 2 and r["metrics"]["post"]["locality"]["n"] == 2


def test_no_record_left_says_so(tmp_path):
    from conftest import zsre_records

    data = _write(tmp_path, "all_long.json", [_long(r) for r in zsre_records(2)])
    with pytest.raises(RunError, match=r"all_long.json: none of the 2 selected records can be run on random-gpt2 "
                                       r"\(context of 512 tokens\); first: .*record 0"):
        _run(data)


def test_an_edit_the_editor_refuses_is_listed_not_fatal(tmp_path):
    """A record the editor cannot edit (ROME needs a subject; Sanitation records may lack one) is
    dropped with the editor's reason; the run goes on."""
    data = _write(tmp_path, "trivia_qa_test.json", {
        "success": [{"question": "Who founded Zorbia?", "ground_truth": ["Quix"], "subject": "Zorbia"},
                    {"question": "Who wrote Mirvo?", "ground_truth": ["Talen"]}],
        "locality": [{"question": "What is the capital of Vell?", "ground_truth": ["Ost"]}],
    })
    from kb_locate import toy_corpus

    r = run(RunConfig(editor="rome", task="sanitation", data=str(data), model="random-gpt2", fluency=False,
                      diagnostics=False, extra={"stats": {"corpus": toy_corpus(64), "samples": 64}}))
    (bad,) = r["task"]["bad_records"]
    assert bad["index"] == 1 and "rome could not edit it" in bad["reason"] and "no subject" in bad["reason"]
    assert r["protocol"]["n_edits"] == 1 and r["task"]["selection"]["indices"] == [0]


# -- progress, interruption, file modes ----------------------------------------------------------------
def test_plain_progress_lines_every_tenth_or_thirty_seconds():
    from knowbench.progress import PlainProgress

    now = [0.0]
    lines: list[str] = []
    p = PlainProgress("rome · single", 100, clock=lambda: now[0], emit=lines.append)
    for _ in range(100):
        now[0] += 0.5
        p.advance(1)
    p.finish()
    assert len(lines) == 10  # 10 %, 20 %, ..., 90 % and the last line
    assert lines[0].startswith("rome · single: 10/100 (10%), 2.00/s, ") and lines[0].endswith("45s left")
    assert lines[-1] == "rome · single: 100/100 (100%), 2.00/s, done in 50s"
    slow, lines = PlainProgress("slow", 1000, clock=lambda: now[0], emit=lines.append), []
    slow.emit = lines.append
    for _ in range(3):
        now[0] += 31
        slow.advance(1)
    assert len(lines) == 3 and lines[0].startswith("slow: 1/1000 (0%)")  # every 30 s when 10 % takes longer


def test_progress_bar_is_plain_lines_when_stderr_is_not_a_terminal(monkeypatch, caplog):
    import logging

    from knowbench.progress import progress_bar

    monkeypatch.setenv("KNOWBENCH_PROGRESS", "plain")
    caplog.set_level(logging.INFO, logger="knowbench.progress")
    with progress_bar("editing", 20) as advance:
        for _ in range(20):
            advance(1)
    msgs = [r.getMessage() for r in caplog.records if r.name == "knowbench.progress"]
    assert msgs[0].startswith("editing: 2/20 (10%)") and msgs[-1].startswith("editing: 20/20 (100%)")


def test_interrupted_message_says_what_was_finished():
    from knowbench.runner import RunProgress

    p = RunProgress(stage="editing", edits_done=412, edits_total=1000)
    assert p.interrupted("SIGTERM") == ("interrupted (SIGTERM) after 412 of 1000 edits; nothing was written: "
                                        "the result file is written only at the end")
    p.stage = "evaluating the unedited model"
    assert p.interrupted("SIGINT").startswith("interrupted (SIGINT) while evaluating the unedited model, "
                                              "before the first of 1000 edits; nothing was written")


def test_sigterm_ends_a_run_with_what_was_done(tmp_path):
    """SIGTERM to a running `knowbench run` (stderr a pipe, so progress comes as plain lines): exit 143
    and one message saying how many edits were done and that nothing was written."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import zsre_records

    data = _write(tmp_path, "many.json", zsre_records(400))
    out = tmp_path / "r.json"
    env = {**os.environ, "KNOWBENCH_PROGRESS": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "knowbench", "run", "--editor", "ft-m", "--task", "zsre", "--model", "random-gpt2",
         "--data", str(data), "--no-fluency", "--no-diagnostics", "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    seen = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "ft-m · single: " in line and "/400" in line:  # a plain progress line: editing is under way
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    err = " ".join(("".join(seen) + rest).split())
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted (SIGTERM) after " in err and " of 400 edits; nothing was written: the result file is " \
        "written only at the end" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_result_files_follow_the_umask(tmp_path):
    import os
    import stat

    from knowbench.results import write_json_atomic, write_jsonl_atomic

    old = os.umask(0o022)
    try:
        a = write_json_atomic(tmp_path / "a.json", {"x": 1})
        b = write_jsonl_atomic(tmp_path / "b.jsonl", [{"x": 1}])
        assert stat.S_IMODE(a.stat().st_mode) == 0o644 and stat.S_IMODE(b.stat().st_mode) == 0o644
        os.umask(0o077)
        c = write_json_atomic(tmp_path / "c.json", {"x": 1})
        assert stat.S_IMODE(c.stat().st_mode) == 0o600
        os.umask(0o002)
        d = write_json_atomic(tmp_path / "sub" / "d.json", {"x": 1})
        assert stat.S_IMODE(d.stat().st_mode) == 0o664
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def _post(r):
    return [(x["index"], x["post"]) for x in r["records"]]


@pytest.mark.parametrize("rng_in_eval", [False, True])
def test_eval_timing_both_equals_the_two_runs(zsre_file, monkeypatch, rng_in_eval):
    """--eval-timing both: one stream of edits, two results. Here every FT-M edit draws its learning
    rate from torch's random state, so the final model is a final-timing run's only if scoring between
    edits leaves that state as it found it; with an evaluation that draws random numbers itself
    (rng_in_eval), the final result must still equal the final-timing run's."""
    import dataclasses

    from knowbench.editors.ft import FTM
    from knowbench.runner import run_all

    apply = FTM.apply

    def random_lr(self, requests):
        self.hparams = dataclasses.replace(self.hparams, lr=self.hparams.lr * float(0.5 + torch.rand(())))
        return apply(self, requests)

    monkeypatch.setattr(FTM, "apply", random_lr)
    if rng_in_eval:
        from knowbench.evaluation import Evaluator

        evaluate = Evaluator.evaluate

        def drawing(self, *a, **kw):
            torch.rand(3)  # an evaluation that consumes randomness
            return evaluate(self, *a, **kw)

        monkeypatch.setattr(Evaluator, "evaluate", drawing)
    kw = dict(editor=FT, task="zsre", data=str(zsre_file), model="random-gpt2", fluency=False,
              sequential=5, curve_every=2, curve_probes=2)
    each, final = run_all(RunConfig(eval_timing="both", **kw))
    assert (each["protocol"]["eval_timing"], final["protocol"]["eval_timing"]) == ("each", "final")
    assert each["config"]["eval_timing"] == "each" and final["config"]["extra"]["eval_timing_both"]
    alone_final = run(RunConfig(eval_timing="final", **kw))
    assert _post(final) == _post(alone_final) and final["metrics"] == alone_final["metrics"]
    assert final["curve"] == alone_final["curve"]
    if not rng_in_eval:  # scoring draws nothing: the each-timing run is the same stream too
        alone_each = run(RunConfig(eval_timing="each", **kw))
        assert _post(each) == _post(alone_each) and each["metrics"] == alone_each["metrics"]
    assert _post(each) != _post(final)  # the two timings really are different measurements
    with pytest.raises(RunError, match="run_all"):
        run(RunConfig(eval_timing="both", **kw))


def test_eval_timing_both_through_the_cli_writes_two_files(zsre_file, tmp_path):
    out = tmp_path / "out" / "r.json"
    assert main(["run", "--editor", FT, "--task", "zsre", "--model", "random-gpt2", "--data", str(zsre_file),
                 "--sequential", "3", "--eval-timing", "both", "--no-fluency", "--output", str(out)]) == 0
    files = sorted(p.name for p in out.parent.glob("*.json"))
    assert files == ["r-each.json", "r-final.json"]
    for name, timing in (("r-each.json", "each"), ("r-final.json", "final")):
        assert json.loads((out.parent / name).read_text())["protocol"]["eval_timing"] == timing
    assert main(["run", "--editor", FT, "--task", "zsre", "--model", "random-gpt2", "--data", str(zsre_file),
                 "--limit", "2", "--eval-timing", "both"]) == 2  # needs --sequential


def test_a_nan_in_a_free_form_block_is_written_as_null(zsre_file, caplog):
    """A result file is strict JSON: a NaN an editor reports (MEND's validation locality on a split
    without locality items was one) must not make the written file invalid."""
    from knowbench.validate import validate

    r = _run(zsre_file, limit=2)
    r["editor"]["provenance"]["curve"] = [{"locality": float("nan"), "edit": 1.0}, {"inf": float("inf")}]
    sealed = finish(r)
    assert sealed["editor"]["provenance"]["curve"] == [{"locality": None, "edit": 1.0}, {"inf": None}]
    assert json.loads(json.dumps(sealed, allow_nan=False)) == sealed
    assert validate(sealed).ok
    assert "editor.provenance.curve[0].locality" in caplog.text
