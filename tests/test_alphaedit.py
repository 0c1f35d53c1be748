"""AlphaEdit: updates never touch the preserved subspace, the solver equals the reference's dense
formula (with and without earlier edits' keys), and the accumulated keys follow restore()."""

from __future__ import annotations

import pytest
import torch

from knowbench.arch import ArchAdapter
from knowbench.editors.alphaedit import AlphaEdit

from kb_locate import REQS, make_editor, weights


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _threshold_at_median(model, tok, tmp_path, layers):
    """A threshold that splits C's spectrum in half, so P is a proper projector here."""
    probe = make_editor(AlphaEdit, model, tok, tmp_path, layers=layers, nullspace_threshold=1e9)
    probe.setup()
    return min(float(probe.stat(l).eigh()[0].median()) for l in layers)


def test_preserved_subspace_is_untouched_across_sequential_edits(tiny, tmp_path):
    model, tok = tiny
    model.double()  # float64 weights: what is stored is the update itself, not a float32 rounding of W + ΔW
    ad = ArchAdapter(model)
    layers = [1, 2]
    thr = _threshold_at_median(model, tok, tmp_path, layers)
    ed = make_editor(AlphaEdit, model, tok, tmp_path, layers=layers, nullspace_threshold=thr)
    w0 = {l: ad.rewrite_weight(l).detach().double().clone() for l in layers}
    for req in REQS:  # three edits one after another
        out = ed.apply([req])
    assert out.info["preserved_keys"] == 3
    g = torch.Generator().manual_seed(0)
    for l in layers:
        u = ed.basis(l)
        d, r = u.shape
        assert 0 < r < d
        dw = ad.rewrite_weight(l).detach().double() - w0[l]
        assert float(dw.norm()) > 1e-6  # something was written
        x = torch.randn(d, 16, generator=g, dtype=torch.float64)
        kept = x - u @ (u.T @ x)  # keys inside the preserved subspace (P k = 0)
        assert float((dw @ kept).norm()) < 1e-9 * float(dw.norm() * kept.norm())
        # ... while keys in the null space are moved
        free = u @ (u.T @ x)
        assert float((dw @ free).norm()) > 1e-3 * float(dw.norm() * free.norm())
        # and the original-knowledge keys the model actually produces barely move: C's dominant
        # eigenvectors are preserved exactly
        evals, evecs = ed.stat(l).eigh()
        top = evecs[:, evals >= thr]
        assert float((dw @ top).norm()) < 1e-9 * float(dw.norm())


@pytest.mark.parametrize("n_prev", [0, 3, 200])
def test_solver_equals_the_reference_dense_formula(tmp_path, n_prev):
    """ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + αI)⁻¹ with P = UUᵀ, in full d×d, against the editor's
    r×r / Woodbury solve; n_prev covers no earlier keys, few (Woodbury) and many (r×r)."""
    from knowbench.models import prepare_tokenizer, tiny_random_model

    model, tok = tiny_random_model("llama", n_layers=2, d_model=32)
    prepare_tokenizer(tok)
    ed = make_editor(AlphaEdit, model, tok, tmp_path, layers=[1], nullspace_threshold=1e9, L2=0.7)
    ed.setup()
    u = ed.basis(1)
    d, r = u.shape
    g = torch.Generator().manual_seed(n_prev)
    kp = torch.randn(n_prev, d, generator=g, dtype=torch.float64)
    if n_prev:
        ed.add_preserved(1, kp)
    keys = torch.randn(4, d, generator=g, dtype=torch.float64)
    resid = torch.randn(4, ArchAdapter(model).value_dim(1), generator=g, dtype=torch.float64)
    got = ed.projected_solve(1, keys, resid)
    p = u @ u.T
    kk = keys.T @ keys + kp.T @ kp
    expect = resid.T @ keys @ p @ torch.linalg.inv(kk @ p + 0.7 * torch.eye(d, dtype=torch.float64))
    assert _rel(got, expect) < 1e-8
    assert (ed._s[1] is not None) == (n_prev >= r // 2)


def test_restore_clears_the_preserved_keys(tiny, tmp_path):
    model, tok = tiny
    before = weights(model)
    ed = make_editor(AlphaEdit, model, tok, tmp_path)
    out = ed.apply(REQS[:2])  # a batch
    assert out.info["preserved_keys"] == 2
    assert set(out.info["nullspace_dims"]) == {str(l) for l in ed.layers}
    assert all(ed._kp[l].shape[1] == 2 or ed._s[l] is not None for l in ed.layers)
    ed.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert ed.n_preserved_keys == 0 and all(ed._kp[l].shape[1] == 0 and ed._s[l] is None for l in ed.layers)
    assert ed.apply(REQS[2:])  .info["preserved_keys"] == 1


def test_empty_null_space_is_a_clear_error(tiny, tmp_path):
    model, tok = tiny
    ed = make_editor(AlphaEdit, model, tok, tmp_path, nullspace_threshold=0.0)
    before = weights(model)
    with pytest.raises(ValueError, match="null space is empty.*nullspace_threshold"):
        ed.apply(REQS[:1])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_sites_carry_the_c_of_the_projector_even_without_mom2_adjustment(tiny, tmp_path):
    model, tok = tiny
    ed = make_editor(AlphaEdit, model, tok, tmp_path, mom2_adjustment=False)
    sites = ed.sites()
    assert [s.layer for s in sites] == ed.layers
    assert all(s.second_moment is ed.stat(s.layer) for s in sites)
