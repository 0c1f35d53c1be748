"""``knowbench sweep``: the grid format and its errors, the engines (local in this process, local
worker processes, a real local Ray instance), skipping of cells whose results validate, reruns of
corrupt or out-of-date cells, retries and the record of failures, thread pinning, trainable editors
trained first, the tables and the leaderboard submit at the end.

Cells are tiny (2-3 zsre records on the embedded model, no fluency, no diagnostics); the Ray test
starts a two-CPU local Ray instance and takes ~30-60 s."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from knowbench import sweep
from knowbench.validate import validate_file

ROOT = Path(__file__).resolve().parents[1]
FAST = {"fluency": False, "diagnostics": False}


def write_grid(tmp_path: Path, name: str = "grid", **grid) -> Path:
    path = tmp_path / f"{name}.yaml"
    grid.setdefault("output_dir", str(tmp_path / "out" / name))
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def cli(*args) -> int:
    from knowbench.cli import main

    return main(["sweep", *map(str, args)])


def manifest(grid: sweep.Grid) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads((grid.output_dir / sweep.MANIFEST).read_text())["cells"]}


def result(path: Path) -> dict:
    report = validate_file(path)
    assert report.ok, report.describe()
    return report.result


# -- the grid --------------------------------------------------------------------------------------
BASE = {"editors": ["ft-m"], "tasks": [{"name": "zsre", "limit": 2}]}


@pytest.mark.parametrize("change,where,says", [
    ({"editor": ["ft-m"]}, "editor", "unknown key"),
    ({"tasks": [{"name": "zsre", "limt": 2}]}, "tasks[0].limt", "unknown key"),
    ({"tasks": [{"name": "zsre", "limit": "ten"}]}, "tasks[0].limit", "must be int | None"),
    ({"run": {"fluency": "no"}}, "run.fluency", "must be bool"),
    ({"run": {"sequential": 10}}, "run.sequential", "belongs in a protocols entry"),
    ({"editors": [{"name": "ft-m", "seed": 3}]}, "editors[0].seed", "seeds axis"),
    ({"tasks": [{"name": "zsre", "batch_size": 4}]}, "tasks[0].batch_size", "belongs in a protocols entry"),
    ({"editors": [{"name": "ft-m", "output": "x.json"}]}, "editors[0].output", "set by the sweep"),
    ({"protocols": [{"name": "sequential"}]}, "protocols[0]", "needs sequential: T"),
    ({"protocols": [{"eval_timing": "both"}]}, "protocols[0].eval_timing", "only a sequential protocol"),
    ({"protocols": [{"sequential": "100"}]}, "protocols[0].sequential", "must be int | None"),
    ({"resources": {"num_cpus": 0}}, "resources.num_cpus", "positive number"),
    ({"resources": {"gpus": 1}}, "resources.gpus", "unknown key"),
    ({"seeds": [0, "one"]}, "seeds[1]", "must be an integer"),
    ({"retries": -1}, "retries", "integer >= 0"),
    ({"editors": None}, "editors", "is required"),
    ({"editors": [{"label": "x"}]}, "editors[0]", "needs a name"),
    ({"tasks": ["zsre", {"name": "zsre", "limit": 5}]}, "", "give one of the entries a label"),
    ({"exclude": [{"editor": "ft-m"}]}, "exclude", "leaves no cell"),
    ({"exclude": [{"editr": "ft-m"}]}, "exclude[0].editr", "unknown key"),
])
def test_grid_errors_name_the_file_and_the_key(tmp_path, change, where, says):
    grid = {**BASE, **change}
    path = write_grid(tmp_path, **{k: v for k, v in grid.items() if v is not None})
    with pytest.raises(sweep.GridError) as exc:
        sweep.load_grid(path)
    msg = str(exc.value)
    assert msg.startswith(f"grid {path}: ") and says in msg
    if where:
        assert f": {where}: " in msg or f": {where} " in msg or f": {where}." in msg, msg


def test_grid_error_on_the_command_line_exits_2(tmp_path, capsys):
    path = write_grid(tmp_path, **BASE, run={"fluency": "no"})
    assert cli(path) == 2
    err = "".join(capsys.readouterr().err.split())  # the log line as rich wrapped it, unwrapped
    assert f"grid{path}:run.fluency:mustbebool" in err


def test_grid_expands_with_labels_overrides_exclusions_and_stable_keys(tmp_path):
    grid = dict(
        editors=["ft-m", {"name": "rome", "label": "rome-l1", "hparams": {"layers": [1]},
                          "resources": {"num_cpus": 2}, "eval_batch_size": 4}],
        tasks=[{"name": "zsre", "limit": 4}, "counterfact"],
        models=[None, {"name": "random-gpt2", "eval_batch_size": 8}],
        seeds=[0, 1],
        protocols=["single", {"sequential": 40, "eval_timing": "both"}, {"batch_size": 2}],
        run={"fluency": False, "eval_batch_size": 16, "extra": {"stats": {"samples": 10}}},
        exclude=[{"editor": "rome-l1", "protocol": "batch2"}],
        checkpoint_every=10,
    )
    g = sweep.load_grid(write_grid(tmp_path, **grid))
    assert len(g.cells) == 2 * 2 * 2 * 2 * 3 - 2 * 2 * 2  # rome-l1 × batch2 left out
    by = {c.name: c for c in g.cells}
    c = by["rome-l1_zsre_random-gpt2_seq40-both_s1_h" + sweep._digest({"layers": [1]})[:6]]
    assert (c.editor, c.task, c.model, c.protocol, c.seed) == ("rome-l1", "zsre", "random-gpt2", "seq40-both", 1)
    # later layers win: run < model < task < editor < protocol
    assert c.options["eval_batch_size"] == 4 and c.options["limit"] == 4 and c.options["fluency"] is False
    assert c.options["curve_every"] == 2  # T/20, as `knowbench run --sequential 40`
    assert c.options["checkpoint_every"] == 10 and c.options["extra"] == {"stats": {"samples": 10}}
    assert c.hparams == {"layers": [1]} and c.resources == {"num_cpus": 2, "num_gpus": 0}
    assert [f.name for f in g.files(c)] == [f"{c.name}-each.json", f"{c.name}-final.json"]
    m = by["ft-m_counterfact_random-gpt2_batch2_s0"]
    assert m.options["eval_batch_size"] == 8 and "limit" not in m.options and m.options["batch_size"] == 2
    assert by["ft-m_counterfact_embedded_single_s0"].options["eval_batch_size"] == 16
    assert by["ft-m_counterfact_embedded_single_s0"].options["model"] is None  # the default model
    assert len({c.key for c in g.cells}) == len(g.cells)
    # the key follows the options, not the checkpointing
    again = sweep.load_grid(write_grid(tmp_path, **{**grid, "checkpoint_every": 50}))
    assert [c.key for c in again.cells] == [c.key for c in g.cells]
    changed = sweep.load_grid(write_grid(tmp_path, **{**grid, "run": {**grid["run"], "eval_batch_size": 12}}))
    moved = [(a.key != b.key, a.options["eval_batch_size"] != b.options["eval_batch_size"])
             for a, b in zip(changed.cells, g.cells)]
    assert all(k == o for k, o in moved) and sum(k for k, _ in moved) == 2 * 3 * 2  # ft-m on the default model
    # an editor's own protocols replace the grid's for it
    g2 = sweep.load_grid(write_grid(tmp_path, editors=["ft-m", {"name": "grace", "protocols": [{"sequential": 10, "eval_timing": "final"}]}],
                                    tasks=["zsre"], protocols=["single"]))
    assert [c.name for c in g2.cells] == ["ft-m_zsre_embedded_single_s0", "grace_zsre_embedded_seq10-final_s0"]


def test_shipped_grids():
    ke = sweep.load_grid(ROOT / "examples" / "knowedit-table.yaml")
    assert len(ke.cells) == 11 * 6 and {c.protocol for c in ke.cells} == {"single"} and {c.seed for c in ke.cells} == {0}
    assert {c.task: c.options["limit"] for c in ke.cells} == {
        "wiki_recent": 50, "zsre": 100, "wikibio": 50, "counterfact": 50, "convsent": 50, "sanitation": 50}
    assert all(c.options["fluency"] and c.options["model"] is None for c in ke.cells)
    ll = sweep.load_grid(ROOT / "examples" / "lifelong.yaml")
    protos = {}
    for c in ll.cells:
        protos.setdefault(c.editor, set()).add(c.protocol)
        assert c.task == "zsre" and c.options["fluency"] is False and c.options["checkpoint_every"] == 100
        assert "limit" not in c.options and c.options["curve_every"] == c.options["sequential"] // 20
    assert protos["ft-m"] == {"seq100-both", "seq1000-both", "seq1000-b100-final"}
    assert protos["rome"] == {"seq100-both", "seq1000-both"}
    assert protos["grace"] == protos["wise"] == {"seq100-both", "seq1000-both"}  # one edit at a time
    assert protos["ultraedit"] == {"seq100-both", "seq1000-both", "seq1000-b100-final"}


# -- running ---------------------------------------------------------------------------------------
def test_local_sweep_records_retries_skips_reruns_tables_and_submits(tmp_path, monkeypatch, capsys):
    import torch

    from knowbench import runner

    calls: list[str] = []
    real = runner.run_all

    def flaky(cfg):  # ft-l's first attempt fails, once
        calls.append(cfg.editor)
        if cfg.editor == "ft-l" and not getattr(flaky, "failed", False):
            flaky.failed = True
            raise RuntimeError("flaky node")
        return real(cfg)

    monkeypatch.setattr(runner, "run_all", flaky)
    threads = torch.get_num_threads()
    path = write_grid(tmp_path, editors=["ft-m", {"name": "ft-l", "resources": {"num_cpus": 2}}, "no-such-editor"],
                      tasks=[{"name": "zsre", "limit": 2}], run=FAST, retries=2)
    g = sweep.load_grid(path)
    lb = tmp_path / "lb"
    assert cli(path, "--format", "markdown", "--submit", lb) == 1  # one cell failed
    out = capsys.readouterr().out
    m = manifest(g)
    ftm, ftl, bad = (m[f"{e}_zsre_embedded_single_s0"] for e in ("ft-m", "ft-l", "no-such-editor"))
    assert (ftm["status"], ftm["attempts"], ftm["errors"]) == ("done", 1, [])
    assert (ftl["status"], ftl["attempts"]) == ("done", 2) and "flaky node" in ftl["errors"][0]["error"]
    # a RunError (here: no such editor) fails the same way every time: recorded, not retried
    assert (bad["status"], bad["attempts"]) == ("failed", 1) and "unknown editor" in bad["errors"][0]["error"]
    failures = [json.loads(line) for line in (g.output_dir / sweep.FAILURES).read_text().splitlines()]
    assert [f["cell"] for f in failures] == [ftl["name"], bad["name"]] and "Traceback" in failures[0]["traceback"]
    files = {e: g.results_dir / f"{e}_zsre_embedded_single_s0.json" for e in ("ft-m", "ft-l")}
    res = {e: result(f) for e, f in files.items()}
    for e, r in res.items():
        cell = next(c for c in g.cells if c.editor == e)
        assert r["config"]["extra"]["sweep_cell"] == cell.key and r["protocol"]["n_edits"] == 2
    # each cell's torch ran on the CPUs it was given; this process got its threads back
    assert res["ft-m"]["environment"]["torch_threads"] == 1 and res["ft-l"]["environment"]["torch_threads"] == 2
    assert torch.get_num_threads() == threads
    # the tables: KnowEdit's layout (single edits), every format written, markdown on stdout
    assert "| DataSet" in out and "FT-M" in out and "FT-L" in out
    csv = (g.output_dir / "knowedit.csv").read_text().splitlines()
    assert csv[0].endswith("FT-L,FT-M") and len(csv) == 5
    assert "<table" in (g.output_dir / "knowedit.html").read_text() and (g.output_dir / "knowedit.md").exists()
    assert not (g.output_dir / "lifelong.md").exists()
    stored = sorted((lb / "results").rglob("*.json"))
    assert len(stored) == 2 and (lb / "README.md").exists()

    # a rerun runs only what is not done (the failed cell); the leaderboard gets nothing new
    calls.clear()
    assert cli(path, "--submit", lb) == 1
    assert calls == ["no-such-editor"] and manifest(g)[ftm["name"]]["skipped"] is True
    assert sorted((lb / "results").rglob("*.json")) == stored

    # a result edited after the run (integrity hash) is rerun, and so is a cut-off file
    r = json.loads(files["ft-m"].read_text())
    r["metrics"]["post"]["edit_succ"]["value"] = 1.0
    files["ft-m"].write_text(json.dumps(r))
    files["ft-l"].write_text(files["ft-l"].read_text()[:100])
    states = {s.cell.editor: s for s in sweep.plan(g)}
    assert states["ft-m"].todo and "not a valid result" in states["ft-m"].why
    assert states["ft-l"].todo and "not a valid result" in states["ft-l"].why
    assert cli(path, "--dry-run") == 0
    dry = capsys.readouterr().out
    assert "not a valid result" in dry and "error: --editor no-such-editor" in dry
    calls.clear()
    assert cli(path) == 1
    assert sorted(calls) == ["ft-l", "ft-m", "no-such-editor"]
    assert result(files["ft-m"])["metrics"] == res["ft-m"]["metrics"]  # the same run again

    # other options (the grid changed) make a cell run again
    changed = sweep.load_grid(write_grid(tmp_path, editors=["ft-m"], tasks=[{"name": "zsre", "limit": 2}],
                                         run={**FAST, "eval_batch_size": 8}, output_dir=str(g.output_dir)))
    (state,) = sweep.plan(changed)
    assert state.todo and "written for other options" in state.why


def test_failing_cell_is_retried_up_to_the_limit(tmp_path, monkeypatch):
    from knowbench import runner

    def broken(cfg):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(runner, "run_all", broken)
    path = write_grid(tmp_path, **BASE, run=FAST, retries=5)
    g = sweep.load_grid(path)
    assert cli(path, "--retries", 1) == 1  # --retries overrides the grid's
    (rec,) = manifest(g).values()
    assert (rec["status"], rec["attempts"], len(rec["errors"])) == ("failed", 2, 2)
    assert all("out of memory, say" in e["error"] for e in rec["errors"])
    assert len((g.output_dir / sweep.FAILURES).read_text().splitlines()) == 2
    assert not list(g.results_dir.glob("*.json"))


def test_local_worker_processes(tmp_path, capsys):
    """Two spawned workers; a sequential protocol with both timings writes two files, and the end
    shows both tables."""
    path = write_grid(tmp_path, editors=["ft-m"], tasks=[{"name": "zsre", "limit": 3}], run=FAST,
                      protocols=["single", {"sequential": 3, "eval_timing": "both"}])
    g = sweep.load_grid(path)
    t0 = time.perf_counter()
    assert cli(path, "--workers", 2, "--format", "csv") == 0
    took = time.perf_counter() - t0
    out = capsys.readouterr().out
    with capsys.disabled():
        print(f"\nlocal engine, 2 workers, 2 cells: {took:.1f} s")
    names = sorted(p.name for p in g.results_dir.glob("*.json"))
    assert names == ["ft-m_zsre_embedded_seq3-both_s0-each.json", "ft-m_zsre_embedded_seq3-both_s0-final.json",
                     "ft-m_zsre_embedded_single_s0.json"]
    timings = {result(g.results_dir / n)["protocol"]["eval_timing"] for n in names[:2]}
    assert timings == {"each", "final"}
    assert all(result(g.results_dir / n)["environment"]["torch_threads"] == 1 for n in names)
    assert (g.output_dir / "knowedit.csv").exists() and (g.output_dir / "lifelong.csv").exists()
    assert "edit_succ" in out and "T=3" not in out  # csv on stdout
    assert "seq3" not in (g.output_dir / "knowedit.md").read_text()


def test_trainable_editor_is_trained_first(tmp_path, zsre_file, monkeypatch):
    """A cell of a trainable editor without an artefact trains it first (once: the next cell finds it)."""
    import importlib
    import sys

    pytest.importorskip("test_contract")
    from test_contract import FAMILIES, TOYS, make_dist  # the contract's toy editors, a trainable one among them

    make_dist(tmp_path, "kb-toys", "kb_toys", TOYS, editors={n: f"kb_toys:{c}" for n, c in FAMILIES.items()})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KNOWBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delitem(sys.modules, "kb_toys", raising=False)
    importlib.invalidate_caches()
    path = write_grid(tmp_path, editors=["toy-memo"], models=["random-gpt2"],
                      tasks=[{"name": "zsre", "data": str(zsre_file), "train_data": str(zsre_file), "limit": 3}],
                      protocols=["single", {"sequential": 3}], run=FAST)
    g = sweep.load_grid(path)
    assert cli(path) == 0
    assert [r["trained"] for r in manifest(g).values()] == [True, False]  # trained once, then found
    keys = {result(f)["editor"]["artefact"]["key"] for c in g.cells for f in g.files(c)}
    assert len(keys) == 1


def test_ray_engine_missing_says_how_to_install(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    path = write_grid(tmp_path, **BASE, run=FAST)
    assert cli(path, "--engine", "ray") == 2
    assert 'pip install "knowbench[ray]"' in " ".join(capsys.readouterr().err.split())


def test_ray_engine_runs_a_grid_and_a_rerun_skips_it(tmp_path, capsys, monkeypatch):
    """A real local Ray instance (two CPUs, started by the engine): a 2 × 2 grid (two editors × two
    seeds) gives four results that validate; a second run skips all four without starting Ray."""
    ray = pytest.importorskip("ray")
    # Ray starts its workers at nice 15; on a machine busy with other work they would barely run
    monkeypatch.setenv("RAY_worker_niceness", "0")
    path = write_grid(tmp_path, editors=["ft-m", "ft-l"], tasks=[{"name": "zsre", "limit": 2}], seeds=[0, 1],
                      run=FAST, resources={"num_cpus": 1})
    g = sweep.load_grid(path)
    t0 = time.perf_counter()
    try:
        assert cli(path, "--engine", "ray", "--workers", 2) == 0
    finally:
        if ray.is_initialized():
            ray.shutdown()
    first = time.perf_counter() - t0
    recs = manifest(g)
    assert len(recs) == 4 and all(r["status"] == "done" and not r["skipped"] for r in recs.values())
    for c in g.cells:
        (f,) = g.files(c)
        r = result(f)
        assert r["config"]["extra"]["sweep_cell"] == c.key and r["protocol"]["seed"] == c.seed
        assert r["environment"]["torch_threads"] == 1
    assert not ray.is_initialized()  # the engine shut down the instance it started
    t0 = time.perf_counter()
    assert cli(path, "--engine", "ray") == 0
    second = time.perf_counter() - t0
    assert all(r["skipped"] for r in manifest(g).values())
    assert not ray.is_initialized()  # nothing to run: no Ray
    assert "FT-M" in capsys.readouterr().out
    with capsys.disabled():
        print(f"\nray 2x2 grid: {first:.1f} s; rerun (all skipped): {second:.1f} s")


class _Killed(BaseException):
    """A kill of the sweep's process right after a cell's checkpoint reached the disk."""


def test_killed_sweep_resumes_its_cell_from_the_checkpoint(tmp_path, monkeypatch):
    from knowbench import runner

    cell = {"editors": ["ft-m"], "tasks": [{"name": "zsre", "limit": 4}],
            "protocols": [{"sequential": 4, "eval_timing": "final"}], "run": FAST}
    g = sweep.load_grid(write_grid(tmp_path, "ckpt", checkpoint_every=1, **cell))
    real = runner._Checkpointing.write
    writes = []

    def write(self, *a, **kw):
        real(self, *a, **kw)
        writes.append(self.path)
        if len(writes) == 2:
            raise _Killed

    monkeypatch.setattr(runner._Checkpointing, "write", write)
    with pytest.raises(_Killed):
        sweep.run_sweep(g)
    monkeypatch.setattr(runner._Checkpointing, "write", real)
    (ckpt,) = set(writes)
    assert ckpt.exists() and ckpt.parent == g.results_dir
    (state,) = sweep.plan(g)
    assert state.todo
    sweep.run_sweep(g)  # started again: goes on from the checkpoint
    (done,) = sorted(g.results_dir.glob("*.json"))
    resumed = result(done)
    assert resumed["config"]["extra"]["resumed_from"]["edits_done"] == 2 and not ckpt.exists()
    one_go = sweep.load_grid(write_grid(tmp_path, "plain", **cell))
    sweep.run_sweep(one_go)
    (plain,) = sorted(one_go.results_dir.glob("*.json"))
    plain = result(plain)
    assert (resumed["metrics"], resumed["records"], resumed["curve"]) == (plain["metrics"], plain["records"], plain["curve"])
    assert not sweep.plan(g)[0].todo  # and a third start skips it
