"""Overhead of the per-edit superposition diagnostics next to the edit itself (target: ≤ 10%).

On the embedded world model (a GPT-2 of 4 layers × 128 wide) when it is installed, else on a
random GPT-2 of the same shape (``KNOWBENCH_BENCH_MODEL=smollm2-135m`` picks another model); ROME (traces: p, cosines, prediction, observed interference) and
FT-M (no traces: keys read by the diagnostics, observed interference only), sequential edits, the
probe set being the locality items of 64 records. One torch thread.

    pytest benchmarks/test_bench_diagnostics.py --benchmark-enable
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

os.environ.setdefault("KNOWBENCH_PROGRESS", "0")
torch.set_num_threads(1)

N_EDITS = 8
N_PROBE_RECORDS = 64
TARGET = 0.10
CORPUS = [f"The {w} of {s} is {o}." for w in ("capital", "author", "colour", "owner", "river", "mayor")
          for s in ("Zorb", "Quill", "Marnet", "Ostrava", "Pelion", "Tandor", "Kesh") for o in ("red", "Paris", "Ada", "Nile")]


def _zsre_records(n: int) -> list[dict]:
    return [{
        "subject": f"Zorb{i}", "prompt": f"Which family does Zorb{i} belong to?", "target_new": f"Noct{i % 7}",
        "ground_truth": [f"Aspid{i % 5}"], "rephrase_prompt": f"What family is Zorb{i} in?", "cond": "",
        "portability": {},
        "locality": {"Relation_Specificity": [{"prompt": f"The rank of Zorb{i} is", "ground_truth": ["genus"]}]},
    } for i in range(n)]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """(model name, LoadedModel, records, corpus) — the embedded world when installed."""
    from knowbench import registry
    from knowbench.models import LoadedModel, load_model, prepare_tokenizer, tiny_random_model

    tmp = tmp_path_factory.mktemp("bench_diag")
    task = registry.load(registry.TASK_GROUP, "zsre")
    other = os.environ.get("KNOWBENCH_BENCH_MODEL")
    if other:
        path = tmp / "ZsRE-test-all.json"
        path.write_text(json.dumps(_zsre_records(N_PROBE_RECORDS)))
        return other, load_model(other), task.reader(path).records, CORPUS
    try:
        lm = load_model("embedded")
    except OSError:  # not built (FileNotFoundError) or not registered: a random model of the same shape
        lm = None
    if lm is not None:
        from knowbench import world

        records = task.reader(world.default_task_file("zsre")).records
        corpus = world.render_corpus(world.generate(world.DEFAULT_SEED), world.DEFAULT_SEED)[:2000]
        name = "embedded"
    else:
        model, tok = tiny_random_model("gpt2", n_layers=4, d_model=192)
        prepare_tokenizer(tok)
        lm = LoadedModel(model, tok, "random-gpt2-4x192", "builtin")
        path = tmp / "ZsRE-test-all.json"
        path.write_text(json.dumps(_zsre_records(N_PROBE_RECORDS)))
        records = task.reader(path).records
        corpus = CORPUS
        name = "random-gpt2-4x192 (embedded model not installed)"
    return name, lm, records[:N_PROBE_RECORDS], corpus


@pytest.fixture(scope="module", autouse=True)
def _stats_cache(tmp_path_factory):
    """Key statistics computed here neither land in nor come from the user's cache."""
    old = os.environ.get("KNOWBENCH_CACHE")
    os.environ["KNOWBENCH_CACHE"] = str(tmp_path_factory.mktemp("bench_diag_cache"))
    yield
    if old is None:
        os.environ.pop("KNOWBENCH_CACHE", None)
    else:
        os.environ["KNOWBENCH_CACHE"] = old


def _run(benchmark, setting, editor_name: str, report) -> float:
    from knowbench import registry
    from knowbench.diagnostics import for_run
    from knowbench.editor import RunContext, StatsOptions
    from knowbench.evaluation import EvalConfig
    from knowbench.runner import _requests
    from knowbench.tasks.families import QAFamily

    name, lm, records, corpus = setting
    cls = registry.load(registry.EDITOR_GROUP, editor_name)
    hp = cls.default_hparams(lm.model, name)
    editor = cls(lm.model, lm.tokenizer, hp, RunContext(model_name=name, stats=StatsOptions(corpus=corpus, progress=False)))
    editor.setup()  # C and context prefixes: fixed per run, not part of an edit
    probes = QAFamily(None, EvalConfig()).probes(records)
    diag = for_run(lm.model, lm.tokenizer, editor.sites(), records, probes, sequential=True)
    edit_s: list[float] = []
    diag_s: list[float] = []
    it = iter(records[:N_EDITS])

    def one_edit():
        reqs = _requests([next(it)])
        t0 = time.perf_counter()
        out = editor.apply(reqs)
        t1 = time.perf_counter()
        setup_before = diag.setup_s
        diag.after_apply(reqs, out, t1 - t0)
        edit_s.append(t1 - t0)
        # one-off work done on the first call (keying the run's prompts in one batch) counts as set-up
        diag_s.append(time.perf_counter() - t1 - (diag.setup_s - setup_before))

    try:
        benchmark.pedantic(one_edit, rounds=N_EDITS, iterations=1)
    finally:
        editor.restore()
    ratio = sum(diag_s) / sum(edit_s)
    per_edit_setup = diag.setup_s / N_EDITS
    benchmark.extra_info.update(model=name, editor=editor_name, edit_ms=1000 * sum(edit_s) / N_EDITS,
                                diagnostics_ms=1000 * sum(diag_s) / N_EDITS, overhead=ratio,
                                setup_ms=1000 * diag.setup_s, probes=len(diag.probes))
    report(f"diagnostics · {editor_name} on {name}: edit {1000 * sum(edit_s) / N_EDITS:.1f} ms, diagnostics "
           f"{1000 * sum(diag_s) / N_EDITS:.2f} ms per edit = {100 * ratio:.1f}% of the edit (plus a one-off "
           f"{1000 * diag.setup_s:.0f} ms for {len(diag.probes)} probe keys (and the run's edit keys, for editors without traces): "
           f"{100 * per_edit_setup / (sum(edit_s) / N_EDITS):.1f}% amortised over {N_EDITS} edits)")
    return ratio


def test_diagnostics_overhead_rome(benchmark, setting, report_speedup):
    assert _run(benchmark, setting, "rome", report_speedup) <= TARGET


def test_diagnostics_overhead_ft_m(benchmark, setting, report_speedup):
    assert _run(benchmark, setting, "ft-m", report_speedup) <= TARGET
