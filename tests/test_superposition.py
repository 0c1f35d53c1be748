"""The superposition math against direct dense computations (float64, small random problems)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from knowbench import superposition as S


def _spd(d: int, seed: int, n: int | None = None) -> torch.Tensor:
    """A count-normalised uncentred second moment of n random (correlated) keys: SPD, not diagonal."""
    g = torch.Generator().manual_seed(seed)
    n = n or 4 * d
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    k = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.3
    return k.T @ k / n


def _keys(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_p_and_whitened_cosine_equal_dense_computation():
    d = 12
    C = _spd(d, 0)
    Ki, Kj = _keys(5, d, 1), _keys(7, d, 2)
    Cinv = np.linalg.inv(C.numpy())
    ki, kj = Ki.numpy(), Kj.numpy()
    dense_p = np.array([[a @ Cinv @ b / (a @ Cinv @ a) for b in kj] for a in ki])
    dense_cos = np.array([[a @ Cinv @ b / np.sqrt((a @ Cinv @ a) * (b @ Cinv @ b)) for b in kj] for a in ki])
    w = S.Whitener.from_moment(C)
    np.testing.assert_allclose(S.p_matrix(Ki, Kj, w).numpy(), dense_p, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(S.whitened_cosine(Ki, Kj, w).numpy(), dense_cos, rtol=1e-9, atol=1e-12)
    # the symmetric square root C^{-1/2} gives the same numbers as the Cholesky factor
    evals, evecs = np.linalg.eigh(C.numpy())
    c_half_inv = evecs @ np.diag(evals**-0.5) @ evecs.T
    ui, uj = ki @ c_half_inv, kj @ c_half_inv
    np.testing.assert_allclose(S.p_matrix(Ki, Kj, w).numpy(), (ui @ uj.T) / (ui * ui).sum(1)[:, None], rtol=1e-8)
    # C⁻¹k through the factor
    np.testing.assert_allclose(w.solve(Ki).numpy(), ki @ Cinv, rtol=1e-8, atol=1e-10)


def test_p_of_a_key_with_itself_is_one_and_p_is_not_symmetric():
    d = 10
    w = S.Whitener.from_moment(_spd(d, 3))
    K = _keys(6, d, 4) * torch.linspace(0.5, 3.0, 6)[:, None]  # different norms
    P = S.p_matrix(K, None, w)
    np.testing.assert_allclose(torch.diagonal(P).numpy(), np.ones(6), atol=1e-12)
    assert not torch.allclose(P, P.T, atol=1e-6)
    # P[i,j]·‖u_i‖² = P[j,i]·‖u_j‖² (the same inner product)
    n2 = (w.whiten(K) ** 2).sum(1)
    torch.testing.assert_close(P * n2[:, None], (P * n2[:, None]).T)
    cos = S.whitened_cosine(K, None, w)
    torch.testing.assert_close(torch.diagonal(cos), torch.ones(6, dtype=torch.float64))
    assert S.offdiagonal(P).shape == (30,)


def test_whitener_reuses_a_second_moment_factorisation():
    from knowbench.stats import SecondMoment

    C = _spd(8, 5)
    sm = SecondMoment(layer=0, module="m", mom2=C, count=100)
    w = S.Whitener.from_any(sm)
    assert w.L is sm.cholesky()  # the cached factor itself, not a second factorisation
    K = _keys(3, 8, 6)
    torch.testing.assert_close(S.p_matrix(K, None, w), S.p_matrix(K, None, S.Whitener.from_moment(C)))


def test_singular_moment_gets_a_ridge_and_bad_input_is_clear():
    k = _keys(3, 6, 7)
    C = k.T @ k / 3  # rank 3 < 6
    w = S.Whitener.from_moment(C)
    assert w.ridge > 0
    with pytest.raises(ValueError, match="square"):
        S.Whitener.from_moment(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"shape \(n, 6\)"):
        w.whiten(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="cannot whiten"):
        S.Whitener.from_any("C")


def test_kurtosis_equals_scipy():
    rng = np.random.default_rng(0)
    for x in (rng.standard_normal(500), rng.standard_t(3, 800), rng.laplace(size=300), np.r_[np.zeros(50), 5.0]):
        assert S.excess_kurtosis(x) == pytest.approx(stats.kurtosis(x), rel=1e-10, abs=1e-12)
    assert S.excess_kurtosis(torch.tensor([1.0, 2.0, 4.0])) == pytest.approx(stats.kurtosis([1.0, 2.0, 4.0]))
    assert np.isnan(S.excess_kurtosis([1.0])) and np.isnan(S.excess_kurtosis([2.0, 2.0]))
    summary = S.abs_summary(np.array([-3.0, 1.0, 0.5, -0.25]))
    assert summary["mean_abs"] == pytest.approx(1.1875) and summary["max_abs"] == 3.0 and summary["n"] == 4


@pytest.mark.parametrize("seed", [0, 1])
def test_sequential_rank_one_edits_predicted_equals_observed(seed):
    """W_t = W_{t-1} + δ_t (C⁻¹k_t)ᵀ/(k_tᵀC⁻¹k_t), δ_t = v_t − W_{t-1}k_t ⇒ (W_T − W_0)k_j = Σ_t p(k_t,k_j) δ_t."""
    d_in, d_out, T = 16, 9, 12
    w = S.Whitener.from_moment(_spd(d_in, 10 + seed))
    W0 = _keys(d_out, d_in, 20 + seed)
    edit_keys = _keys(T, d_in, 30 + seed)
    values = _keys(T, d_out, 40 + seed) * 3
    probes = _keys(25, d_in, 50 + seed)
    W = W0.clone()
    deltas = []
    for t in range(T):
        dW, delta = S.rank_one_update(W, edit_keys[t], values[t], w)
        W = W + dW
        deltas.append(delta)
        # the edit writes its value exactly
        torch.testing.assert_close(W @ edit_keys[t], values[t], rtol=1e-9, atol=1e-9)
    deltas = torch.stack(deltas)
    observed = S.change_on_keys(W, W0, probes)
    predicted = S.predicted_change(S.p_matrix(edit_keys, probes, w), deltas)
    rel = (observed - predicted).norm(dim=1) / observed.norm(dim=1)
    assert rel.max() < 1e-5
    base = (probes @ W0.T).norm(dim=1)
    np.testing.assert_allclose(S.relative_norm(predicted, base), S.relative_norm(observed, base), rtol=1e-5)
    # on an earlier edit j: the drift since it was written is the sum over later edits only
    j = 3
    W_j = W0.clone()
    for t in range(j + 1):
        W_j = W_j + S.rank_one_update(W_j, edit_keys[t], values[t], w)[0]
    drift = (W - W_j) @ edit_keys[j]
    later = S.predicted_change(S.p_matrix(edit_keys[j + 1 :], edit_keys[j : j + 1], w), deltas[j + 1 :])[0]
    assert ((drift - later).norm() / drift.norm()) < 1e-5


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert S.auroc(scores, labels) == pytest.approx(brute, abs=1e-12)
    assert S.auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert S.auroc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    assert S.auroc([1, 2], [True, True]) is None
    assert S.auroc([np.nan, 1.0, 2.0], [True, False, True]) == 1.0  # NaN scores are left out


def test_growth_fits():
    x = np.arange(1, 21)
    lin = S.linear_fit(x, 0.3 * x + 2)
    assert lin.slope == pytest.approx(0.3) and lin.intercept == pytest.approx(2) and lin.r2 == pytest.approx(1)
    assert S.power_fit(x, 5 * np.sqrt(x)).slope == pytest.approx(0.5)
    assert S.power_fit(x, 0.1 * x).slope == pytest.approx(1.0)
    assert S.linear_fit([1], [2]) is None and S.linear_fit([2, 2], [1, 3]) is None


def test_angles_and_offdiagonal():
    np.testing.assert_allclose(S.angles_deg(np.array([1.0, 0.0, -1.0, 1.0 + 1e-12])), [0.0, 90.0, 180.0, 0.0])
    m = np.arange(9.0).reshape(3, 3)
    np.testing.assert_array_equal(S.offdiagonal(m), [1, 2, 3, 5, 6, 7])
    with pytest.raises(ValueError, match="square"):
        S.offdiagonal(np.zeros((2, 3)))
