"""WISE's lifelong edit stream on the embedded world model: T sequential edits of the zsre test file
(the editor's shipped hparams for the model, its training split for the unrelated rows), timed as
edit time alone (no evaluation), plus the router's cost: one forward pass of 64 prompts through
every memory at the end of the stream. One torch thread.

    pytest benchmarks/test_bench_wise.py --benchmark-enable            # T = 1000
    KNOWBENCH_BENCH_WISE_T=100 pytest benchmarks/test_bench_wise.py --benchmark-enable
"""

from __future__ import annotations

import os
import time

import pytest
import torch

os.environ.setdefault("KNOWBENCH_PROGRESS", "0")
torch.set_num_threads(1)

T = int(os.environ.get("KNOWBENCH_BENCH_WISE_T", "1000"))


def _setting():
    from knowbench import registry, world
    from knowbench.editor import TrainSplit
    from knowbench.models import load_model

    lm = load_model("embedded")
    task = registry.load(registry.TASK_GROUP, "zsre")
    test_file = world.default_task_file("zsre")
    train_file = task.resolve_train(None, test_file)
    split = TrainSplit(report=task.reader(train_file), path=train_file, sha256="bench")
    return lm, task.reader(test_file).records, split


def test_wise_stream(benchmark, report_speedup):
    from knowbench.editor import EditRequest, RunContext
    from knowbench.editors.wise import WISE

    try:
        lm, records, split = _setting()
    except Exception as exc:  # noqa: BLE001 - the embedded model and its splits are optional here
        pytest.skip(f"embedded model or zsre splits not available: {exc}")
    records = records[:T]
    hp = WISE.default_hparams(lm.model, lm.name)
    editor = WISE(lm.model, lm.tokenizer, hp, RunContext(seed=0, model_name=lm.name, train_split=split))
    t0 = time.perf_counter()
    editor.setup()  # the prefixes and the pool of unrelated prompts, once per run
    setup_s = time.perf_counter() - t0
    out: dict[str, float] = {}

    def stream():
        editor.restore()
        c0, t1 = time.process_time(), time.perf_counter()
        for r in records:
            editor.apply([EditRequest(r.prompt, r.target_new, subject=r.subject, record_index=r.index)])
        out["wall_s"], out["cpu_s"] = time.perf_counter() - t1, time.process_time() - c0
        prompts = [r.prompt for r in records[:64]]
        ids = lm.tokenizer(prompts, return_tensors="pt", padding=True)
        t2 = time.perf_counter()
        with torch.no_grad():
            lm.model(**ids)
        out["route_64_ms"] = 1000 * (time.perf_counter() - t2)

    benchmark.pedantic(stream, rounds=1, iterations=1)
    rep = editor.report()
    editor.restore()
    benchmark.extra_info.update(T=len(records), setup_s=setup_s, memories=rep.get("memories"), **out)
    report_speedup(f"wise on embedded: T = {len(records)} edits in {out['wall_s']:.0f} s wall / "
                   f"{out['cpu_s']:.0f} s CPU "
                   f"({1000 * out['wall_s'] / len(records):.0f} ms per edit), {rep.get('memories')} memories; "
                   f"a 64-prompt forward through the router {out['route_64_ms']:.0f} ms; setup {setup_s:.1f} s")
