"""Speed benchmarks (pytest-benchmark): one edit per editor, and evaluation of a task's metrics.

All on the tiny ``random-gpt2`` model with one torch thread, so they measure knowbench's own
overhead and the editors' algorithms rather than a model's size; the numbers are for comparing a
change against a saved baseline on the same machine (docs/pytest-plugin.md, "Speed benchmarks"),
not for papers.

    pytest benchmarks --benchmark-only
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("KNOWBENCH_PROGRESS", "0")
torch.set_num_threads(1)

EDITORS = ("ft-m", "ft-l", "rome", "memit", "alphaedit")
MODEL = "random-gpt2"
# a stand-in corpus for the locate-then-edit editors' key statistics C = E[k kᵀ] (no download)
CORPUS = [f"The {w} of {s} is {o}." for w in ("capital", "author", "colour", "owner", "river")
          for s in ("Zorb", "Quill", "Marnet", "Ostrava", "Pelion", "Tandor") for o in ("red", "Paris", "Ada", "Nile")]


def zsre_records(n: int) -> list[dict]:
    return [{
        "subject": f"Zorb{i}", "prompt": f"Which family does Zorb{i} belong to?", "target_new": f"Noct{i % 7}",
        "ground_truth": [f"Aspid{i % 5}"], "rephrase_prompt": f"What family is Zorb{i} in?", "cond": "",
        "portability": {"Reasoning": [{"prompt": f"The family of Zorb{i} is named", "ground_truth": f"Owl{i % 3}"}]},
        "locality": {"Relation_Specificity": [{"prompt": f"The rank of Zorb{i} is", "ground_truth": ["genus"]}]},
    } for i in range(n)]


@pytest.fixture(scope="module")
def zsre(tmp_path_factory):
    """(records, task) of a small ZsRE-format file, read by the real task loader."""
    from knowbench import registry

    path = tmp_path_factory.mktemp("bench") / "ZsRE-test-all.json"
    path.write_text(json.dumps(zsre_records(16)))
    task = registry.load(registry.TASK_GROUP, "zsre")
    return task.reader(path).records, task


@pytest.fixture(scope="module")
def lm():
    from knowbench.models import load_model

    return load_model(MODEL)


@pytest.fixture(scope="module", autouse=True)
def _stats_cache(tmp_path_factory):
    # statistics computed here must not land in (or come from) the user's cache
    old = os.environ.get("KNOWBENCH_CACHE")
    os.environ["KNOWBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("KNOWBENCH_CACHE", None)
    else:
        os.environ["KNOWBENCH_CACHE"] = old


@pytest.mark.parametrize("editor_name", EDITORS)
def test_edit_speed(benchmark, lm, zsre, editor_name):
    """One edit and the exact restore after it (the single protocol's inner step)."""
    from knowbench import registry
    from knowbench.editor import RunContext, StatsOptions
    from knowbench.runner import _requests

    records, _ = zsre
    try:
        cls = registry.load(registry.EDITOR_GROUP, editor_name)
    except registry.PluginError as exc:
        pytest.skip(str(exc))
    hp = cls.default_hparams(lm.model, MODEL)
    ctx = RunContext(seed=0, model_name=MODEL, device="cpu", stats=StatsOptions(corpus=CORPUS, corpus_name="bench"))
    editor = cls(lm.model, lm.tokenizer, hp, ctx)
    requests = _requests(records[:1])
    editor.apply(requests)  # warm-up: key statistics and caches are built once, outside the timing
    editor.restore()

    def one_edit():
        editor.apply(requests)
        editor.restore()

    benchmark.pedantic(one_edit, rounds=5, iterations=1)


@pytest.mark.parametrize("fluency", [False, True], ids=["no-fluency", "fluency"])
def test_evaluation_speed(benchmark, lm, zsre, fluency):
    """Post-edit metrics of 8 ZsRE records (teacher forcing; with fluency also 100-token generation)."""
    from knowbench.evaluation import EvalConfig, Evaluator

    records, task = zsre
    records = records[:8] if not fluency else records[:2]
    cfg = EvalConfig(fluency=fluency, seed=0)
    family = task.family_class()(None, cfg)
    family.prepare(records)
    ev = Evaluator(lm.model, lm.tokenizer, family, cfg)
    ref = ev.reference(records)
    scores = benchmark.pedantic(ev.evaluate, args=(records, ref), rounds=5, iterations=1)
    assert len(scores) == len(records)
