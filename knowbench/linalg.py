"""Factorising a second moment C = E[kkᵀ] (DESIGN 6): one Cholesky ladder for every caller.

C of a real layer is often singular (MLP units that never fire on the corpus). The factorisation
first tries C itself and then C + j·mean(diag C)·I for a short ladder of j, keeping the first that
is positive definite; a requested ridge is a floor for j. ``stats.SecondMoment`` (the editors' C)
and ``superposition.Whitener`` (the diagnostics' whitening) both factorise through here.
"""

from __future__ import annotations

import torch

JITTERS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4)  # relative to mean(diag C)


def jittered_cholesky(c: torch.Tensor, ridge: float = 0.0) -> tuple[torch.Tensor, float] | None:
    """(L, added) with C + added·I = L Lᵀ, added = max(j, ridge)·mean(diag C) for the first j of
    :data:`JITTERS` that works; None if even the largest does not make C positive definite."""
    scale = float(torch.diagonal(c).mean()) or 1.0
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    for jitter in JITTERS:
        jitter = max(jitter, ridge)
        chol, info = torch.linalg.cholesky_ex(c + jitter * scale * eye)
        if int(info) == 0:
            return chol, jitter * scale
    return None
