"""`knowbench validate`: schema, provenance, metric ranges and the integrity hash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from kb_results import make_result, reseal

from knowbench.cli import main
from knowbench.schema import SCHEMA_VERSION
from knowbench.validate import ValidationError, check_file, validate, validate_file


# a real result file of schema 1.0 (FT-M, 100 sequential edits; from the leaderboard before its re-seeding)
LEADERBOARD_FILE = Path(__file__).resolve().parent / "data" / "result-schema-1.0.json"


def errors(result) -> list[str]:
    return [str(p) for p in validate(result).errors]


def test_sample_result_is_valid():
    rep = validate(make_result())
    assert rep.ok, rep.describe()
    assert rep.errors == [] and rep.warnings == []
    conv = validate(make_result(task="convsent", kind="convsent"))
    assert conv.ok, conv.describe()


def test_number_edited_by_hand_is_detected(tmp_path):
    r = make_result()
    path = tmp_path / "r.json"
    path.write_text(json.dumps(r, indent=1))
    assert validate_file(path).ok
    # edit one digit in the file, as a person would in an editor
    text = path.read_text().replace('"value": 97.25', '"value": 99.25', 1)
    assert '"value": 99.25' in text
    path.write_text(text)
    rep = validate_file(path)
    assert not rep.ok
    assert [p.where for p in rep.errors] == ["integrity.sha256"]
    assert "content hash mismatch" in rep.errors[0].message and "edited by hand" in rep.errors[0].message


def test_reformatting_the_file_keeps_it_valid(tmp_path):
    """The hash covers content, not layout: indentation and key order do not matter."""
    r = make_result()
    path = tmp_path / "r.json"
    path.write_text(json.dumps(dict(reversed(list(r.items()))), indent=4))
    assert validate_file(path).ok


def test_integrity_block_missing_or_unknown():
    r = make_result()
    del r["integrity"]
    assert errors(r) == ["integrity: required block is missing"]
    r = make_result()
    r["integrity"]["algorithm"] = "md5"
    assert any("integrity.algorithm" in e and "md5" in e for e in errors(r))


@pytest.mark.parametrize("block, key", [
    ("editor", "version"), ("editor", "hparams"), ("model", "n_params"), ("model", "revision"),
    ("task", "data_files"), ("protocol", "seed"), ("knowbench", "git_commit"),
])
def test_missing_provenance_names_the_key(block, key):
    r = make_result()
    del r[block][key]
    reseal(r)  # a consistent hash: the missing key alone must make the file invalid
    errs = errors(r)
    assert f"{block}.{key}: required key is missing" in errs


def test_missing_block_and_wrong_types():
    r = make_result()
    del r["environment"]
    r["model"]["n_params"] = "big"
    r["protocol"]["n_edits"] = True
    reseal(r)
    errs = errors(r)
    assert "environment: required block is missing" in errs
    assert "model.n_params: must be int, not a string" in errs
    assert "protocol.n_edits: must be int, not a boolean" in errs


def test_metric_ranges():
    r = make_result(post={"edit_succ": 101.0, "locality": -3.0, "fluency": -1.0, "portability": 50.0})
    errs = errors(r)
    assert "metrics.post.edit_succ.value: 101.0 is outside [0, 100] (KnowEdit's ×100 scale)" in errs
    assert any(e.startswith("metrics.post.locality.value: -3.0 is outside") for e in errs)
    assert any(e.startswith("metrics.post.fluency.value: -1.0 is negative") for e in errs)
    assert not any("portability" in e for e in errs)
    # fluency has no upper bound (entropy ×100 is ~500 on real text)
    assert validate(make_result(post={"edit_succ": 50.0, "fluency": 612.3})).ok


def test_convsent_locality_is_a_divergence():
    ok = make_result(task="convsent", kind="convsent", post={"edit_succ": 60.0, "locality": 3.5})
    assert validate(ok).ok  # a KL above 1 is fine, and it is not a percentage
    bad = make_result(task="convsent", kind="convsent", post={"edit_succ": 60.0, "locality": 0.3})
    bad["metrics"]["post"]["locality"]["higher_is_better"] = True
    reseal(bad)
    assert errors(bad) == ["metrics.post.locality.higher_is_better: ConvSent locality is a KL divergence: lower is better"]
    qa = make_result()
    qa["metrics"]["post"]["locality"]["higher_is_better"] = False
    reseal(qa)
    assert errors(qa) == ["metrics.post.locality.higher_is_better: locality is higher-is-better for a qa task"]


def test_nan_and_null_metric_values(tmp_path):
    r = make_result()
    r["metrics"]["post"]["rephrase"]["value"] = None
    reseal(r)
    assert any("metrics.post.rephrase.value: must be a number, not null" in e for e in errors(r))
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(make_result()).replace("97.25", "NaN"))
    rep = validate_file(path)
    assert not rep.ok and "NaN is not allowed" in rep.errors[0].message


def test_unmeasured_metric_must_be_absent_not_zero():
    r = make_result(fluency=False)
    assert validate(r).ok
    r["metrics"]["post"]["fluency"] = {"value": 0.0, "n": 4, "higher_is_better": True}
    reseal(r)
    assert errors(r) == ["metrics.post.fluency: present although the run had fluency off (protocol.fluency "
                         "is false): an unmeasured metric must be absent"]
    r = make_result(post={"rephrase": 50.0})
    assert errors(r) == ["metrics.post.edit_succ: required metric is missing (every task reports Edit Succ.)"]
    r = make_result()
    r["metrics"]["post"]["edit_succ"]["n"] = 0
    reseal(r)
    assert errors(r) == ["metrics.post.edit_succ.n: 0: a reported metric was measured on at least one item"]


def test_hparams_changed_after_the_run():
    r = make_result()
    r["editor"]["hparams"]["lr"] = 0.1
    reseal(r)
    errs = errors(r)
    assert len(errs) == 1 and errs[0].startswith("editor.hparams_hash:") and "changed after the run" in errs[0]


def test_protocol_consistency():
    r = make_result(protocol="sequential", n_edits=4)
    assert validate(r).ok
    r["protocol"]["sequential"] = 3
    reseal(r)
    assert errors(r) == ["protocol.sequential: 3: a sequential run records T = n_edits (4)"]
    r = make_result(protocol="batch", batch_size=1)
    assert errors(r) == ["protocol.batch_size: 1: a batch run edits at least 2 facts per update"]
    r = make_result(protocol="lifelong")
    assert "protocol.name: 'lifelong' is not a protocol (one of single, batch, sequential)" in errors(r)
    r = make_result(n_edits=4)
    r["task"]["selection"]["indices"] = [0, 2, 2, 4]
    reseal(r)
    assert errors(r) == ["task.selection.indices: a record index appears twice"]
    r = make_result(n_edits=4)
    r["protocol"]["n_edits"] = 5
    reseal(r)
    assert errors(r) == ["protocol.n_edits: 5 edits but task.selection.n_selected is 4"]


def test_data_file_hash_and_schema_version():
    r = make_result()
    r["task"]["data_files"][0]["sha256"] = "abc"
    reseal(r)
    assert errors(r) == ["task.data_files[0].sha256: 'abc' is not a sha256 hex digest (64 lower-case hex digits)"]
    r = make_result()
    r["schema_version"] = "2.0"
    reseal(r)
    assert errors(r) == ["schema_version: '2.0' is not a schema this knowbench reads (it reads 1.x); upgrade "
                         "knowbench or re-run with this version"]


def test_warnings_do_not_invalidate():
    r = make_result()
    r["knowbench"]["git_commit"] += "-dirty"
    r["model"]["source"] = "local"
    del r["metrics"]["post"]["fluency"]  # protocol.fluency is true
    reseal(r)
    rep = validate(r)
    assert rep.ok and len(rep.warnings) == 3
    assert "uncommitted changes" in rep.describe()


def test_unknown_keys_are_errors_where_the_schema_is_closed():
    """Top level and core blocks are closed; free-form blocks (edits, config, provenance) are open."""
    r = make_result()
    r["future_block"] = {}
    r["protocol"]["warmup"] = 3
    r["metrics"]["post"]["edit_succ"]["stderr"] = 0.1
    r["edits"][0]["my_editor_stat"] = 1.5
    r["config"]["anything"] = {"goes": True}
    r["editor"]["provenance"] = {"free": "form"}
    reseal(r)
    errs = errors(r)
    assert sorted(e.split(":")[0] for e in errs) == ["future_block", "metrics.post.edit_succ.stderr",
                                                     "protocol.warmup"]
    assert all("unknown key" in e for e in errs)
    r = make_result()
    r["_records"] = []
    reseal(r)
    assert errors(r) == ["_records: the per-record log belongs in its own file (runner.finish() drops it)"]


def test_schema_1_0_files_validate_by_migration(tmp_path):
    """A 1.0 file (a real leaderboard file, and a synthetic one) validates; its hash is checked on the
    file as written, and the typed model is the migrated 1.1 one."""
    rep = validate_file(LEADERBOARD_FILE)
    assert rep.ok, rep.describe()
    assert rep.result["schema_version"] == "1.0" and "kind" not in rep.result["editor"]  # as written
    assert rep.model.schema_version == SCHEMA_VERSION and rep.model.editor.kind == "weights"
    assert rep.model.protocol.metrics.name == "knowbench"  # 1.0 and 1.1 metrics were computed with every fix
    assert rep.model.task.metric_family.name == "qa" and rep.model.diagnostics.kind == "weights"
    old = make_result(schema_version="1.0", task="convsent", kind="convsent")
    rep = validate(old)
    assert rep.ok, rep.describe()
    assert rep.model.task.metric_family.spec("locality").unit == "kl"
    # a 1.0 file of a kind 1.0 did not know
    odd = reseal({**make_result(schema_version="1.0"), "task": {**old["task"], "kind": "poetry"}})
    assert errors(odd) == ["task.kind: 'poetry' is not a task kind (one of qa, wikibio, convsent, sanitation)"]


def test_schema_1_0_file_with_an_edited_number_fails_the_hash(tmp_path):
    path = tmp_path / "old.json"
    text = LEADERBOARD_FILE.read_text()
    edited = text.replace('"value": 29.45', '"value": 99.45', 1)
    assert edited != text
    path.write_text(edited)
    rep = validate_file(path)
    assert [p.where for p in rep.errors] == ["integrity.sha256"]
    assert "content hash mismatch" in rep.errors[0].message


def test_not_a_result(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("[1, 2]")
    assert "one JSON object, not a list" in validate_file(p).describe()
    p.write_text("{not json")
    assert "not valid JSON" in validate_file(p).describe()
    assert "no such file" in validate_file(tmp_path / "missing.json").describe()
    with pytest.raises(ValidationError, match="INVALID"):
        check_file(p)


def test_cli_validate(tmp_path, capsys):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(make_result()))
    tampered = make_result()
    tampered["metrics"]["post"]["locality"]["value"] = 99.0
    bad.write_text(json.dumps(tampered))
    assert main(["validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert "valid — ft-m on zsre, model embedded, single protocol, 4 edits, seed 0" in out
    assert main(["validate", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "bad.json: INVALID — 1 problem" in out and "integrity.sha256: content hash mismatch" in out
    assert "1 of 2 files valid" in out
    dirty = make_result()
    dirty["knowbench"]["git_commit"] += "-dirty"
    good.write_text(json.dumps(reseal(dirty)))
    assert main(["validate", str(good)]) == 0
    assert main(["validate", "--strict", str(good)]) == 1


def test_validate_imports_no_torch():
    code = "import sys, knowbench.validate, knowbench.leaderboard; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_runner_output_validates(zsre_file, tmp_path):
    """The runner's own result, as written by `knowbench run`, passes validation with no warning but
    the checkout's state and the random model's (this guards against runner and validator drifting apart)."""
    import torch

    from knowbench.results import write_json_atomic
    from knowbench.runner import RunConfig, finish, run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only contend on a shared machine
    try:
        result = finish(run(RunConfig(editor="ft-m", task="zsre", model="random-gpt2", data=str(zsre_file),
                                      sequential=2, curve_every=1, curve_probes=2, fluency=True, seed=1)))
    finally:
        torch.set_num_threads(threads)
    path = write_json_atomic(tmp_path / "r.json", result)
    rep = validate_file(path)
    assert rep.ok, rep.describe()
    assert [p.where for p in rep.warnings if p.where != "knowbench.git_commit"] == ["model.id"]
    assert "fluency" in result["metrics"]["post"]
