"""Helpers for the ROME / MEMIT / AlphaEdit / statistics tests: a toy corpus, editors wired to a
temporary statistics cache, and key extraction written independently of knowbench.keys."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from knowbench.arch import ArchAdapter
from knowbench.editor import EditRequest, RunContext, StatsOptions

_WORDS = ("the a of in city river capital is was born lives works museum old new north south "
          "Zorbia Quix painter baker red blue and to from").split()


def toy_corpus(n: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 24))) for _ in range(n)]


REQS = [
    EditRequest("The capital of Zorbia is", "Quix", subject="Zorbia", record_index=0),
    EditRequest("Mirvo Talen works as a", "baker", subject="Mirvo Talen", record_index=1),
    EditRequest("Where was Oskel born? In", "Pradu", subject="Oskel", record_index=2),
]


def make_editor(cls, model, tok, tmp_path: Path, seed: int = 0, **overrides):
    hp = cls.default_hparams(model, "tiny")
    hp = dataclasses.replace(hp, v_num_grad_steps=overrides.pop("v_num_grad_steps", 4), **overrides)
    ctx = RunContext(  # statistics are cached under tmp_path / "stats"
        seed=seed, cache_dir=Path(tmp_path), model_name="tiny",
        stats=StatsOptions(corpus=toy_corpus(), corpus_name="toy", progress=False),
    )
    return cls(model, tok, hp, ctx)


@torch.no_grad()
def rewrite_io(model, tok, text: str, layer: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of the rewrite module at token ``index`` of ``text`` (plain hook, one row)."""
    adapter = ArchAdapter(model)
    got = {}

    def hook(mod, args, out):
        got["k"], got["v"] = args[0][0, index].clone(), out[0, index].clone()

    h = adapter.rewrite_module(layer).register_forward_hook(hook)
    try:
        model(**tok(text, return_tensors="pt"))
    finally:
        h.remove()
    return got["k"], got["v"]


@torch.no_grad()
def corpus_keys(model, tok, texts: list[str], layer: int) -> torch.Tensor:
    """Every token's key of every text, one text at a time (no padding): (N, d_in) float64."""
    adapter = ArchAdapter(model)
    rows = []
    h = adapter.rewrite_module(layer).register_forward_hook(lambda m, a, o: rows.append(a[0][0].double()))
    try:
        for t in texts:
            model(**tok(t, return_tensors="pt"))
    finally:
        h.remove()
    return torch.cat(rows)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
