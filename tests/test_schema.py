"""knowbench.schema: the one typed result model, its JSON Schema, protocol keys and migration."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from kb_results import make_result, reseal

from knowbench.cli import main
from knowbench.pytest_plugin import protocol_of_run
from knowbench.schema import (
    KNOWEDIT_COLUMNS,
    SCHEMA_VERSION,
    STANDARD_FAMILIES,
    LEGACY_FIXES,
    MetricsInfo,
    ProtocolInfo,
    Result,
    migrate,
    protocol_key,
    protocol_sort,
)
from knowbench.validate import validate, validate_file

LEADERBOARD_FILES = sorted((Path(__file__).resolve().parents[1] / "leaderboard" / "results").rglob("*.json"))
BLOCKS = ["schema_version", "knowbench", "editor", "model", "task", "protocol", "metrics", "curve", "edits",
          "timings", "environment", "config", "integrity"]


def errors(result) -> list[str]:
    return [str(p) for p in validate(result).errors]


def _refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for v in node.values():
            yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_cli_prints_the_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert schema["required"] == BLOCKS  # diagnostics and records are optional
    assert set(BLOCKS) | {"diagnostics", "records"} == set(schema["properties"])
    for ref in _refs(schema):  # every reference resolves inside the document
        assert ref.startswith("#/$defs/") and ref.split("/")[-1] in schema["$defs"]
    defs = schema["$defs"]
    assert set(defs["EditorInfo"]["properties"]["kind"]["enum"]) == {"weights", "modules", "prompts", "memory"}
    assert "metric_family" in defs["TaskInfo"]["required"]
    assert defs["ProtocolInfo"]["additionalProperties"] is False
    assert defs["Diagnostics"]["additionalProperties"] is True  # free-form, like edits and config
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(make_result(), schema)


@pytest.mark.parametrize("options, key", [
    ({}, "single"),
    ({"batch_size": 1}, "single"),
    ({"batch_size": 16}, "batch16"),
    ({"sequential": 100}, "sequential100-each"),
    ({"sequential": 100, "eval_timing": "final"}, "sequential100-final"),
    ({"sequential": 100, "batch_size": 10}, "sequential100-each-b10"),
    ({"batch_size": 4, "eval_timing": "final"}, "batch4"),  # timing only matters for sequential runs
])
def test_protocol_keys_from_run_options(options, key):
    assert ProtocolInfo.from_run(**options).key() == key
    assert protocol_of_run(options) == key  # the pytest plugin's baseline cases use the same key


def test_protocol_key_and_label_of_a_result_block():
    p = ProtocolInfo(name="sequential", n_edits=1000, sequential=1000, eval_timing="final", batch_size=8, seed=0,
                     curve_every=50, curve_probes=50, fluency=True, metrics={"name": "knowedit", "fixes": []})
    assert p.key() == "sequential1000-final-b8" == protocol_key(p.model_dump())
    assert p.label() == "sequential T=1000 (all on the final model), B=8"
    # a metric protocol other than KnowEdit's is part of the key: never ranked with knowedit runs
    fixed = p.model_copy(update={"metrics": MetricsInfo(name="knowbench", fixes=["padding_safe"])})
    assert fixed.key() == "sequential1000-final-b8+knowbench" == protocol_key(fixed.model_dump())
    assert fixed.label() == "sequential T=1000 (all on the final model), B=8 · metrics: knowbench"
    assert sorted([fixed, p], key=lambda x: protocol_sort(x.model_dump())) == [p, fixed]
    single = ProtocolInfo.from_run(n_edits=200)
    assert (single.name, single.n_edits, single.key(), single.label()) == ("single", 200, "single", "single")
    assert ProtocolInfo.from_run(batch_size=16).label() == "batch B=16"
    assert sorted([p, single], key=lambda x: protocol_sort(x.model_dump())) == [single, p]


def test_migrate_1_0():
    old = json.loads((Path(__file__).resolve().parent / "data" / "result-schema-1.0.json").read_text())
    assert old["schema_version"] == "1.0"
    before = copy.deepcopy(old)
    new = migrate(old)
    assert old == before  # a copy: the file's content (and its hash) stay as written
    assert new["schema_version"] == SCHEMA_VERSION == "1.2"
    assert new["protocol"]["metrics"] == {"name": "knowbench", "fixes": list(LEGACY_FIXES)}
    assert new["editor"]["kind"] == "weights"
    assert new["task"]["metric_family"] == STANDARD_FAMILIES[old["task"]["kind"]].model_dump()
    assert new["environment"]["torch_threads"] is None
    assert new["diagnostics"]["kind"] == "weights"
    Result.model_validate(new)
    no_diag = make_result(schema_version="1.0")
    assert "diagnostics" not in migrate(no_diag)
    current = make_result()
    assert migrate(current) == current
    v11 = make_result(schema_version="1.1")
    del v11["protocol"]["metrics"]
    assert migrate(v11)["protocol"]["metrics"]["name"] == "knowbench"
    Result.model_validate(migrate(v11) | {"schema_version": SCHEMA_VERSION})


def test_standard_families():
    assert KNOWEDIT_COLUMNS == ("edit_succ", "rephrase", "portability", "locality", "fluency")
    assert STANDARD_FAMILIES["qa"].names() == list(KNOWEDIT_COLUMNS)
    assert STANDARD_FAMILIES["wikibio"].names() == STANDARD_FAMILIES["sanitation"].names() == \
        ["edit_succ", "locality", "fluency"]
    conv = STANDARD_FAMILIES["convsent"]
    assert (conv.spec("locality").unit, conv.spec("locality").higher_is_better) == ("kl", False)
    qa = STANDARD_FAMILIES["qa"]
    assert qa.spec("portability.Reasoning") == qa.spec("portability")  # sub-keys inherit the parent's spec
    assert qa.spec("edit_succ.Foo") is None and qa.spec("bleu") is None
    assert all(m.higher_is_better for f in ("qa", "wikibio", "sanitation") for m in STANDARD_FAMILIES[f].metrics)


@pytest.mark.parametrize("path", LEADERBOARD_FILES, ids=lambda p: "/".join(p.parts[-3:]))
def test_every_leaderboard_file_validates(path):
    rep = validate_file(path)
    assert rep.ok, rep.describe()
    assert isinstance(rep.model, Result)
    from knowbench.leaderboard import relative_path

    assert path.as_posix().endswith(relative_path(rep.result).as_posix())


def test_unknown_metric_for_the_family_is_reported():
    r = make_result(task="wikibio", kind="wikibio", post={"edit_succ": 50.0, "rephrase": 40.0, "locality": 70.0},
                    pre={"edit_succ": 1.0})
    assert errors(r) == ["metrics.post.rephrase: unknown metric name 'rephrase': a wikibio task reports edit_succ, "
                         "locality, fluency, locality.<Key>"]
    r = make_result(task="convsent", kind="convsent", post={"edit_succ": 60.0, "locality.Topic": 0.5})
    assert [e.split(":")[0] for e in errors(r)] == ["metrics.post.locality.Topic"]  # no sub-keys on KL locality
    r = make_result(post={"edit_succ": 60.0, "edit_succ.Extra": 60.0, "portability.New_Key": 10.0})
    assert [e.split(":")[0] for e in errors(r)] == ["metrics.post.edit_succ.Extra"]


def test_declared_family_must_match_the_standard_one():
    r = make_result(task="convsent", kind="convsent")
    locality = next(m for m in r["task"]["metric_family"]["metrics"] if m["name"] == "locality")
    locality["higher_is_better"] = True  # a KL divergence made "higher is better"
    for entry in (r["metrics"]["post"]["locality"],):
        entry["higher_is_better"] = True
    reseal(r)
    assert errors(r) == ["task.metric_family: differs from knowbench's standard 'convsent' family in its metrics, "
                         "their directions or units"]
    r = make_result()
    r["task"]["metric_family"] = STANDARD_FAMILIES["wikibio"].model_dump()
    reseal(r)
    errs = errors(r)
    assert "task.metric_family.name: 'wikibio', but a qa task reports the 'qa' family" in errs


def test_new_1_1_fields_are_required():
    r = make_result()
    del r["editor"]["kind"]
    del r["task"]["metric_family"]
    r["diagnostics"] = {"edits": [], "summary": {}}
    reseal(r)
    assert sorted(errors(r)) == ["diagnostics.kind: required key is missing", "editor.kind: required key is missing",
                                 "task.metric_family: required block is missing"]
    r = make_result()
    r["editor"]["kind"] = "neurons"
    reseal(r)
    assert errors(r) == ["editor.kind: 'neurons' is not an editor kind (one of weights, modules, prompts, memory)"]


def test_schema_imports_no_torch():
    code = "import sys, knowbench.schema, knowbench.validate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
