"""Milliseconds per edit of ROME, MEMIT and AlphaEdit (the edit alone: C, its factorisation and the
context prefixes are set up first, once per run, as in a real run).

Models: a random GPT-2-small-shaped model (12 layers × 768, byte-level vocabulary) and, when it is
installed, the embedded world model. One torch thread; a few single edits, restored in between.

    pytest benchmarks/test_bench_editors.py --benchmark-enable
"""

from __future__ import annotations

import os
import time

import pytest
import torch

os.environ.setdefault("KNOWBENCH_PROGRESS", "0")
torch.set_num_threads(1)

N_EDITS = 4
CORPUS = [f"The {w} of {s} is {o}, as {p} said in {y}." for w in ("capital", "author", "colour", "owner", "river", "mayor")
          for s in ("Zorb", "Quill", "Marnet", "Ostrava", "Pelion", "Tandor", "Kesh") for o in ("red", "Paris", "Ada", "Nile")
          for p, y in (("everyone", "1999"), ("the old book", "spring"))]
REQUESTS = [
    ("The capital of Zorbia is", "Quixburg", "Zorbia"),
    ("Mirvo Talen works as a", "baker", "Mirvo Talen"),
    ("Where was Oskel born? In", "Pradu", "Oskel"),
    ("The author of Kestrel Nights is", "Ada Brun", "Kestrel Nights"),
]


def _gpt2_small():
    from knowbench.models import LoadedModel, prepare_tokenizer, tiny_random_model

    model, tok = tiny_random_model("gpt2", n_layers=12, d_model=768)
    prepare_tokenizer(tok)
    return LoadedModel(model, tok, "random-gpt2-12x768", "builtin"), CORPUS, REQUESTS


def _embedded():
    from knowbench import registry, world
    from knowbench.models import load_model

    lm = load_model("embedded")
    corpus = world.render_corpus(world.generate(world.DEFAULT_SEED), world.DEFAULT_SEED)
    task = registry.load(registry.TASK_GROUP, "zsre")
    recs = task.reader(world.default_task_file("zsre")).records[:N_EDITS]
    return lm, corpus, [(r.prompt, r.target_new, r.subject) for r in recs]


SETTINGS = {"random-gpt2-12x768": _gpt2_small, "embedded": _embedded}
_CACHE: dict[str, tuple] = {}


def _setting(name, tmp_path_factory):
    if name not in _CACHE:
        try:
            _CACHE[name] = SETTINGS[name]()
        except Exception as exc:  # noqa: BLE001 - the embedded model is optional here
            pytest.skip(f"{name} not available: {exc}")
    return _CACHE[name]


@pytest.mark.parametrize("model_name", list(SETTINGS))
@pytest.mark.parametrize("editor_name", ["rome", "memit", "alphaedit"])
def test_ms_per_edit(benchmark, tmp_path_factory, report_speedup, editor_name, model_name):
    from knowbench import registry
    from knowbench.editor import EditRequest, RunContext, StatsOptions

    lm, corpus, reqs = _setting(model_name, tmp_path_factory)
    cls = registry.load(registry.EDITOR_GROUP, editor_name)
    hp = cls.default_hparams(lm.model, lm.name)
    ctx = RunContext(seed=0, cache_dir=tmp_path_factory.mktemp("cache"), model_name=lm.name,
                     stats=StatsOptions(corpus=corpus, corpus_name="bench", progress=False))
    editor = cls(lm.model, lm.tokenizer, hp, ctx)
    t0 = time.perf_counter()
    editor.setup()  # fixed per run: C, its factorisation (and AlphaEdit's projector), the prefixes
    prep_s = time.perf_counter() - t0
    it = iter(range(10 ** 6))
    times: list[float] = []

    def one_edit():
        p, t, s = reqs[next(it) % len(reqs)]
        t1 = time.perf_counter()
        editor.apply([EditRequest(p, t, subject=s)])
        times.append(time.perf_counter() - t1)
        editor.restore()

    benchmark.pedantic(one_edit, rounds=N_EDITS, iterations=1)
    ms = 1000 * sum(times) / len(times)
    benchmark.extra_info.update(model=model_name, editor=editor_name, ms_per_edit=ms, setup_s=prep_s,
                                layers=editor.layers, steps=hp.v_num_grad_steps)
    report_speedup(f"{editor_name} on {model_name}: {ms:.0f} ms per edit (layers {editor.layers}, "
                   f"{hp.v_num_grad_steps} δ steps; one-off setup {prep_s:.1f} s)")
