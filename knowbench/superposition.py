"""Knowledge in superposition: how much one edit's key overlaps others, and what edits accumulate.

Notation (DESIGN 6–7). k ∈ R^{d_in} is a key (the rewrite module's input at a subject's last
token) and C = E[k kᵀ] its layer's uncentred second moment. With the Cholesky factor C = L Lᵀ,
the whitened key u = L⁻¹k has uᵢᵀuⱼ = kᵢᵀC⁻¹kⱼ; every quantity below depends on keys only through
these inner products, so L⁻¹ serves exactly as C^{-1/2} would (one factorisation per layer):

    p(kᵢ, kⱼ)        = kᵢᵀC⁻¹kⱼ / kᵢᵀC⁻¹kᵢ                        not symmetric; p(k, k) = 1
    whitened cosine  = kᵢᵀC⁻¹kⱼ / √(kᵢᵀC⁻¹kᵢ · kⱼᵀC⁻¹kⱼ)          its arccos is the whitened angle
    excess kurtosis  = m₄ / m₂² − 3                                  Fisher, biased moments (scipy's default)

Lifelong closed form: edit t writes v_t at k_t with

    W_t = W_{t−1} + δ_t (C⁻¹k_t)ᵀ / (k_tᵀC⁻¹k_t),      δ_t = v_t − W_{t−1} k_t,

so for any key k_j the accumulated change is a p-weighted sum of the residuals,

    (W_T − W_0) k_j = Σ_t p(k_t, k_j) δ_t                            (predicted)

and the interference on k_j is ‖(W_T − W_0) k_j‖ / ‖W_0 k_j‖ (observed: exact for any weight
change, whichever editor made it). p = 0 (whitened orthogonality) means edit t cannot disturb k_j.

Also here: the AUROC with which a score predicts a binary outcome (Mann–Whitney, ties counted
half) and the linear / power-law fits used to test "interference grows linearly with edits".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .linalg import jittered_cholesky


# -- whitening ---------------------------------------------------------------------------------
class Whitener:
    """u = L⁻¹k for C = L Lᵀ, in float64. Build from C, from L, or from a :class:`SecondMoment`
    (whose cached Cholesky factor is reused, so a run factorises each layer's C once)."""

    def __init__(self, chol: torch.Tensor, ridge: float = 0.0):
        if chol.dim() != 2 or chol.shape[0] != chol.shape[1]:
            raise ValueError(f"Cholesky factor must be square, got shape {tuple(chol.shape)}")
        self.L = chol.to(torch.float64)
        self.ridge = ridge  # added to C's diagonal to make it positive definite (0: none)

    @classmethod
    def from_moment(cls, c: torch.Tensor, name: str = "C") -> "Whitener":
        """Factorise C in float64; a singular C gets the smallest ridge (× mean diagonal) that works."""
        c = c.detach().to(torch.float64)
        if c.dim() != 2 or c.shape[0] != c.shape[1]:
            raise ValueError(f"{name} must be a square matrix, got shape {tuple(c.shape)}")
        got = jittered_cholesky(c)
        if got is None:
            raise ValueError(f"{name} is not positive definite even with a ridge of 1e-4·mean(diag)")
        return cls(*got)

    @classmethod
    def from_any(cls, source: Any, name: str = "C") -> "Whitener":
        """A Whitener from a Whitener, a ``knowbench.stats.SecondMoment`` or a plain C tensor."""
        if isinstance(source, Whitener):
            return source
        if hasattr(source, "cholesky") and hasattr(source, "mom2"):  # stats.SecondMoment
            return cls(source.cholesky(), float(getattr(source, "jitter", 0.0)))
        if isinstance(source, torch.Tensor):
            return cls.from_moment(source, name)
        raise TypeError(f"cannot whiten with a {type(source).__name__}; pass C, a SecondMoment or a Whitener")

    @property
    def dim(self) -> int:
        return self.L.shape[0]

    def whiten(self, keys: torch.Tensor) -> torch.Tensor:
        """(n, d) keys -> (n, d) whitened keys L⁻¹k (float64)."""
        k = _rows(keys, self.dim).to(device=self.L.device, dtype=torch.float64)
        return torch.linalg.solve_triangular(self.L, k.T, upper=False).T

    def solve(self, keys: torch.Tensor) -> torch.Tensor:
        """(n, d) keys -> (n, d) rows C⁻¹k (float64)."""
        k = _rows(keys, self.dim).to(device=self.L.device, dtype=torch.float64)
        return torch.cholesky_solve(k.T, self.L).T


def _rows(keys: torch.Tensor, dim: int) -> torch.Tensor:
    keys = keys.detach()
    if keys.dim() == 1:
        keys = keys[None]
    if keys.dim() != 2 or keys.shape[1] != dim:
        raise ValueError(f"keys must have shape (n, {dim}), got {tuple(keys.shape)}")
    return keys


# -- p and cosines ------------------------------------------------------------------------------
def p_from_whitened(u_i: torch.Tensor, u_j: torch.Tensor) -> torch.Tensor:
    """P[a, b] = p(k_a, k_b) = u_aᵀu_b / u_aᵀu_a for whitened rows u_i (n, d), u_j (m, d)."""
    return (u_i @ u_j.T) / (u_i * u_i).sum(1, keepdim=True)


def cosine_from_whitened(u_i: torch.Tensor, u_j: torch.Tensor) -> torch.Tensor:
    """Whitened cosine matrix (n, m); the raw cosine when given raw keys."""
    ni = u_i.norm(dim=1, keepdim=True)
    nj = u_j.norm(dim=1, keepdim=True)
    return (u_i @ u_j.T) / (ni * nj.T)


def p_matrix(keys_i: torch.Tensor, keys_j: torch.Tensor | None, whitener: Whitener) -> torch.Tensor:
    """P[a, b] = p(k_a, k_b); keys_j defaults to keys_i (the m×m matrix of the study)."""
    u_i = whitener.whiten(keys_i)
    u_j = u_i if keys_j is None else whitener.whiten(keys_j)
    return p_from_whitened(u_i, u_j)


def whitened_cosine(keys_i: torch.Tensor, keys_j: torch.Tensor | None, whitener: Whitener) -> torch.Tensor:
    u_i = whitener.whiten(keys_i)
    u_j = u_i if keys_j is None else whitener.whiten(keys_j)
    return cosine_from_whitened(u_i, u_j)


def raw_cosine(keys_i: torch.Tensor, keys_j: torch.Tensor | None = None) -> torch.Tensor:
    k_i = keys_i.detach().to(torch.float64)
    k_j = k_i if keys_j is None else keys_j.detach().to(torch.float64)
    return cosine_from_whitened(k_i, k_j)


def angles_deg(cos: torch.Tensor | np.ndarray) -> np.ndarray:
    c = np.asarray(cos.cpu() if isinstance(cos, torch.Tensor) else cos, dtype=np.float64)
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def offdiagonal(m: torch.Tensor | np.ndarray) -> np.ndarray:
    """The off-diagonal entries of a square matrix, flattened row by row."""
    a = np.asarray(m.cpu() if isinstance(m, torch.Tensor) else m, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"need a square matrix, got shape {a.shape}")
    return a[~np.eye(a.shape[0], dtype=bool)]


# -- statistics ---------------------------------------------------------------------------------
def excess_kurtosis(values: Any) -> float:
    """Fisher's excess kurtosis with biased moments, m₄/m₂² − 3 (= scipy.stats.kurtosis defaults);
    NaN for fewer than two values or zero variance."""
    x = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64).ravel()
    if x.size < 2:
        return float("nan")
    d = x - x.mean()
    m2 = float(np.mean(d * d))
    if m2 <= 0.0:
        return float("nan")
    return float(np.mean(d**4) / (m2 * m2) - 3.0)


def abs_summary(values: Any) -> dict[str, Any]:
    """mean |x|, max |x|, excess kurtosis of x, and n (the per-edit summary of a row of p values)."""
    x = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64).ravel()
    if x.size == 0:
        return {"n": 0}
    return {
        "mean_abs": _r(np.abs(x).mean()),
        "max_abs": _r(np.abs(x).max()),
        "kurtosis": _r(excess_kurtosis(x)),
        "n": int(x.size),
    }


def spread(values: Any) -> dict[str, Any]:
    """mean, median, max and n of non-negative quantities (interference)."""
    x = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64).ravel()
    if x.size == 0:
        return {"n": 0}
    return {"mean": _r(x.mean()), "median": _r(np.median(x)), "max": _r(x.max()), "n": int(x.size)}


def _r(v: float, digits: int = 6) -> float | None:
    """JSON-safe rounding to significant digits; NaN/inf become None (not measured)."""
    v = float(v)
    if not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


# -- closed-form edits and interference -----------------------------------------------------------
def rank_one_update(w: torch.Tensor, key: torch.Tensor, value: torch.Tensor, whitener: Whitener) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed-form edit writing ``value`` at ``key``: (ΔW, δ) with δ = v − W k and
    ΔW = δ (C⁻¹k)ᵀ / (kᵀC⁻¹k), in float64. After W += ΔW, W k = v exactly."""
    k = key.detach().to(torch.float64).reshape(1, -1)
    delta = value.detach().to(torch.float64).reshape(-1) - w.detach().to(torch.float64) @ k[0]
    cinv_k = whitener.solve(k)[0]
    return torch.outer(delta, cinv_k) / float(k[0] @ cinv_k), delta


def predicted_change(p: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Σ_t p(k_t, k_j) δ_t for every j: p (T, n_j) of the edits against the keys, deltas (T, d_out)
    -> (n_j, d_out)."""
    return p.to(torch.float64).T @ deltas.to(torch.float64)


def change_on_keys(w_t: torch.Tensor, w_0: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(W_t − W_0) kⱼ for every key row: (n, d_out). The difference is taken first (exact in
    floating point for nearby weights; half-precision weights are widened first), then multiplied
    in float32 or float64."""
    dtype = torch.float64 if w_t.dtype == torch.float64 else torch.float32
    diff = w_t.detach().to(dtype) - w_0.detach().to(device=w_t.device, dtype=dtype)
    return keys.detach().to(device=diff.device, dtype=dtype) @ diff.T


def relative_norm(change: torch.Tensor, base_norm: torch.Tensor) -> torch.Tensor:
    """‖change_j‖ / base_norm_j per row (float64); base 0 gives inf."""
    return change.to(torch.float64).norm(dim=1) / base_norm.to(torch.float64)


# -- does the theory hold? ------------------------------------------------------------------------
def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Probability that a positive outranks a negative (ties count half); None if a class is empty."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    keep = np.isfinite(s)
    s, y = s[keep], y[keep]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class Fit:
    slope: float
    intercept: float
    r2: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"slope": _r(self.slope), "intercept": _r(self.intercept), "r2": _r(self.r2) if self.r2 is not None else None}


def linear_fit(x: Sequence[float], y: Sequence[float]) -> Fit | None:
    """Least squares y ≈ slope·x + intercept with R²; None for fewer than two distinct x."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    if xa.size < 2 or np.ptp(xa) == 0:
        return None
    slope, intercept = np.polyfit(xa, ya, 1)
    resid = ya - (slope * xa + intercept)
    ss_tot = float(((ya - ya.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else None
    return Fit(float(slope), float(intercept), r2)


def power_fit(x: Sequence[float], y: Sequence[float]) -> Fit | None:
    """log y ≈ exponent·log x + c: the exponent is 1 for linear growth, ½ for a random walk."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xa) & np.isfinite(ya) & (xa > 0) & (ya > 0)
    if keep.sum() < 2:
        return None
    return linear_fit(np.log(xa[keep]), np.log(ya[keep]))
