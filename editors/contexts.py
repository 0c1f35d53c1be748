"""Context prefixes: short texts put in front of an edit prompt so that the key k* describes the
subject rather than one sentence (DESIGN 6).

k* = Σ_c w_c k(prefix_c + prompt), the bare prompt ("") first. ROME weighs every context equally
(:meth:`ContextSet.flat`); MEMIT and AlphaEdit weigh the bare prompt 1/2 and the n sampled prefixes
1/(2n) each (:meth:`ContextSet.grouped`). The prefixes are sampled from the model once per run,
seeded (:func:`sample_prefixes`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from knowbench.stats import one_line, sample_texts


@dataclass
class ContextSet:
    """Prefixes put before a prompt ("" is the bare prompt) and the weight of each in k*."""

    prefixes: list[str]
    weights: list[float]
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.prefixes) != len(self.weights) or not self.prefixes:
            raise ValueError("ContextSet needs one weight per prefix and at least one prefix")
        if self.prefixes[0] != "":
            raise ValueError("the first context must be the bare prompt ('')")

    def __len__(self) -> int:
        return len(self.prefixes)

    @property
    def sha(self) -> str:
        return hashlib.sha256(json.dumps(self.prefixes).encode()).hexdigest()[:12]

    @classmethod
    def flat(cls, prefixes: list[str], seed: int = 0) -> "ContextSet":
        allp = [""] + prefixes
        return cls(allp, [1.0 / len(allp)] * len(allp), seed)

    @classmethod
    def grouped(cls, prefixes: list[str], seed: int = 0) -> "ContextSet":
        if not prefixes:
            return cls([""], [1.0], seed)
        return cls([""] + prefixes, [0.5] + [0.5 / len(prefixes)] * len(prefixes), seed)


def _clean_prefix(text: str) -> str:
    # one line (newlines break one-line prompts), braces gone, ending in ". " before the prompt
    return one_line(text) + ". "


def sample_prefixes(
    model: nn.Module,
    tok: Any,
    length_params: Sequence[Sequence[int]],
    seed: int,
    starts: Sequence[str] | None = None,
    top_k: int = 5,
) -> list[str]:
    """Context prefixes: :func:`knowbench.stats.sample_texts` (``length_params``: (tokens, count) per
    group; ``starts``: MEMIT's start words, or None to start from BOS as ROME does), each cleaned to
    one line ending in ". "."""
    return [_clean_prefix(t) for t in sample_texts(model, tok, length_params, seed, starts, top_k)]
