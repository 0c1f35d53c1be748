"""Training time of the trainable editors (SERAC, MEND) on the embedded world's ZsRE training
split, from scratch in an empty cache: the issue's target is at most 20 minutes each on the 2-core
machine. The trained editor is then run on 100 ZsRE records, so the time is the time to an editor
that works (Edit Succ. and Locality are printed beside it).

    pytest benchmarks/test_bench_training.py --benchmark-enable -s
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("KNOWBENCH_PROGRESS", "0")

TARGET_S = 20 * 60


@pytest.mark.parametrize("editor", ["serac", "mend"])
def test_training_time(editor, tmp_path, monkeypatch, benchmark, report_speedup):
    import torch

    from knowbench.runner import RunConfig, run, train

    torch.set_num_threads(2)
    monkeypatch.setenv("KNOWBENCH_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(editor=editor, task="zsre")
    meta = benchmark.pedantic(lambda: train(cfg), rounds=1, iterations=1)
    assert meta["reused"] is False
    result = run(RunConfig(editor=editor, task="zsre", limit=100, fluency=False, diagnostics=False))
    post = result["metrics"]["post"]
    report_speedup(
        f"{editor}: trained in {meta['train_s']:.0f} s ({meta['train_s'] / TARGET_S:.2f} of the 20-minute target) on "
        f"{os.cpu_count()} cores; zsre --limit 100 Edit Succ. {post['edit_succ']['value']:.1f}, "
        f"Locality {post['locality']['value']:.1f}"
    )
    assert meta["train_s"] <= TARGET_S
