"""Milliseconds per edit of UltraEdit on the embedded world model, in single-edit turns and in turns of
100 edits (the original's setting), applied one after another as in a lifelong run, and the edit time
a T = 1000 stream extrapolates to. One torch thread.

    pytest benchmarks/test_bench_ultraedit.py --benchmark-enable
"""

from __future__ import annotations

import os
import time

import pytest
import torch

os.environ.setdefault("KNOWBENCH_PROGRESS", "0")
torch.set_num_threads(1)

_CACHE: dict[str, tuple] = {}


def _embedded():
    if "embedded" not in _CACHE:
        try:
            from knowbench import registry, world
            from knowbench.models import load_model

            lm = load_model("embedded")
            task = registry.load(registry.TASK_GROUP, "zsre")
            recs = task.reader(world.default_task_file("zsre")).records[:200]
        except Exception as exc:  # noqa: BLE001 - the embedded model is optional here
            pytest.skip(f"embedded model not available: {exc}")
        _CACHE["embedded"] = (lm, recs)
    return _CACHE["embedded"]


@pytest.mark.parametrize("turn", [1, 100])
def test_ms_per_edit(benchmark, report_speedup, turn):
    from knowbench.editor import EditRequest, RunContext
    from knowbench.editors.ultraedit import UltraEdit

    lm, recs = _embedded()
    reqs = [EditRequest(r.prompt, r.target_new, subject=r.subject, record_index=r.index) for r in recs]
    editor = UltraEdit(lm.model, lm.tokenizer, UltraEdit.default_hparams(lm.model, lm.name), RunContext())
    n_turns = 20 if turn == 1 else 2
    it = iter(range(10 ** 6))
    times: list[float] = []

    def one_turn():
        i = next(it)
        t1 = time.perf_counter()
        editor.apply(reqs[(i * turn) % len(reqs):][:turn])
        times.append(time.perf_counter() - t1)

    try:
        benchmark.pedantic(one_turn, rounds=n_turns, iterations=1)
    finally:
        editor.restore()
    ms = 1000 * sum(times) / (len(times) * turn)
    benchmark.extra_info.update(model="embedded", editor="ultraedit", turn=turn, ms_per_edit=ms,
                                modules=editor.modules)
    report_speedup(f"ultraedit on embedded, turns of {turn}: {ms:.1f} ms per edit "
                   f"(T = 1000 ≈ {ms:.0f} s of edit time; modules {editor.modules})")
