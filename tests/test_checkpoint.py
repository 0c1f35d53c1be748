"""Runs that survive a kill: a sequential run stopped after a checkpoint and resumed from it equals
the same run done in one go (metrics, per-record scores, curve, edits, diagnostics), for every kind
of editor state (weights, a codebook, side memories, running statistics, adapters, a prompt store)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from knowbench import runner
from knowbench.checkpoint import CheckpointError, fingerprint, read_header
from knowbench.runner import RunConfig, resume_all, run_all


class _Killed(Exception):
    """Stands in for a kill right after a checkpoint reached the disk."""


def _comparable(result: dict) -> dict:
    """What must not differ: everything but the timings (which differ from run to run)."""
    def untimed(block):
        return json.loads(json.dumps(block), object_hook=lambda d: {k: v for k, v in d.items()
                                                                   if "second" not in k and "time" not in k
                                                                   and not k.endswith("_s") and k != "timing"})
    return {"metrics": result["metrics"], "records": result["records"], "curve": result["curve"],
            "edits": untimed(result["edits"]), "diagnostics": untimed(result.get("diagnostics"))}


def _cfg(tmp_path: Path, editor: str, model: str, T: int, **kw) -> RunConfig:
    base = dict(editor=editor, task="zsre", model=model, limit=T, sequential=T, eval_timing="both",
                fluency=False, curve_every=2, curve_probes=3, seed=0)
    base.update(kw)
    return RunConfig(**base)


def _interrupted(monkeypatch, cfg: RunConfig, kill_after_writes: int) -> Path:
    """Run ``cfg`` and stop it right after its ``kill_after_writes``-th checkpoint; the checkpoint."""
    real = runner._Checkpointing.write
    count = {"n": 0}

    def write(self, *a, **kw):
        real(self, *a, **kw)
        count["n"] += 1
        if count["n"] == kill_after_writes:
            raise _Killed

    monkeypatch.setattr(runner._Checkpointing, "write", write)
    with pytest.raises(_Killed):
        run_all(cfg)
    monkeypatch.setattr(runner._Checkpointing, "write", real)
    return Path(cfg.checkpoint)


CASES = [
    ("ft-m", "embedded", {}),
    ("ft-m", "random-llama", {}),
    ("rome", "embedded", {}),
    ("alphaedit", "embedded", {}),
    ("grace", "embedded", {}),
    ("wise", "embedded", {}),
    ("ultraedit", "random-llama", {"batch_size": 2}),
    ("lora", "embedded", {}),
    ("ice", "embedded", {}),
]


@pytest.mark.parametrize("editor,model,kw", CASES, ids=[f"{e}-{m}" for e, m, _ in CASES])
def test_killed_and_resumed_equals_one_go(tmp_path, monkeypatch, editor, model, kw):
    T = 4 if not kw.get("batch_size") else 6
    one_go = run_all(_cfg(tmp_path, editor, model, T, **kw))
    ckpt = tmp_path / "run.ckpt"
    cfg = _cfg(tmp_path, editor, model, T, checkpoint_every=kw.get("batch_size", 1), checkpoint=str(ckpt), **kw)
    _interrupted(monkeypatch, cfg, kill_after_writes=2)
    head = read_header(ckpt)
    assert 0 < head["done"] < T
    resumed = resume_all(ckpt)
    assert [r["protocol"]["eval_timing"] for r in resumed] == ["each", "final"]
    for a, b in zip(one_go, resumed):
        assert b["config"]["extra"]["resumed_from"]["edits_done"] == head["done"]
        assert _comparable(a) == _comparable(b)


@pytest.mark.parametrize("editor", ["ft-m", "rome"])
def test_checkpoint_holds_edited_weights_not_the_model(tmp_path, monkeypatch, editor):
    """Unchanged tensors of the loaded model, and what the editor and the observer prepared before
    the first edit (ROME's C and its factor: 64 MB in float64 here), go in by reference."""
    cfg = _cfg(tmp_path, editor, "embedded", 4, checkpoint_every=1, checkpoint=str(tmp_path / "c.ckpt"))
    ckpt = _interrupted(monkeypatch, cfg, kill_after_writes=1)
    from knowbench.models import load_model

    n_params = sum(p.numel() for p in load_model("embedded").model.parameters())
    assert ckpt.stat().st_size < 4 * n_params  # float32 model: a full copy would be 4 bytes a parameter


def test_resume_refuses_another_run(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "ft-m", "embedded", 4, checkpoint_every=1, checkpoint=str(tmp_path / "c.ckpt"),
               diagnostics=False)
    ckpt = _interrupted(monkeypatch, cfg, kill_after_writes=1)
    lines = ckpt.read_bytes().split(b"\n", 1)
    head = json.loads(lines[0])
    head["config"]["seed"] = 1  # another sample of records
    other = tmp_path / "other.ckpt"
    other.write_bytes(json.dumps(head).encode() + b"\n" + lines[1])
    with pytest.raises(CheckpointError, match="selected records"):
        resume_all(other)
    (tmp_path / "junk.ckpt").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a knowbench checkpoint"):
        resume_all(tmp_path / "junk.ckpt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resume_all(tmp_path / "missing.ckpt")


def test_fingerprint_sees_any_change():
    import torch

    w = torch.randn(64, 32)
    f = fingerprint(w)
    v = w.clone()
    v[3, 5] += 1e-4
    assert fingerprint(v) != f
    assert fingerprint(w.flip(0)) != f  # same values, another order
    assert fingerprint(w.clone()) == f


def test_cli_sigterm_writes_checkpoint_and_resume_finishes(tmp_path):
    """The command line: SIGTERM mid-run writes a checkpoint, exits 143 and says how to resume;
    ``knowbench run --resume`` writes results equal to an uninterrupted run's and removes it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KNOWBENCH_PROGRESS": "0"}
    common = ["--editor", "ft-m", "--task", "zsre", "--sequential", "12", "--no-fluency", "--no-diagnostics"]
    exe = [sys.executable, "-m", "knowbench"]
    subprocess.run(exe + ["-q", "run", *common, "--output", str(tmp_path / "a.json")], env=env, check=True,
                   capture_output=True)
    out = tmp_path / "b.json"
    p = subprocess.Popen(exe + ["run", *common, "--output", str(out), "--checkpoint-every", "2"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = out.with_suffix(".ckpt")
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint was written"
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    if p.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert p.returncode == 128 + signal.SIGTERM
    assert f"knowbench run --resume {ckpt}" in " ".join(err.split())
    r = subprocess.run(exe + ["-q", "run", "--resume", str(ckpt)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not ckpt.exists()
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads(out.read_text())
    assert _comparable(a) == _comparable(b)
    assert b["config"]["extra"]["resumed_from"]["edits_done"] > 0
