"""Least-overlap editing: the update equals the dense minimum-norm solution with every kept key
left in place, the layer choice equals a brute-force least-squares projection, refusals leave the
model untouched, and restore() is exact. GPT-2 (Conv1D) and Llama (Linear) layouts."""

from __future__ import annotations

import json

import pytest
import torch

from knowbench.arch import ArchAdapter
from knowbench.editors.least_overlap import KeptBasis, LeastOverlap

from kb_locate import REQS, make_editor, rewrite_io, weights

LAYERS = [0, 1]
PROBES = [
    {"prompt": "The river Quix flows to the north", "subject": "Quix"},
    {"prompt": "The painter Zorbia lives in the old city", "subject": "Zorbia"},
    {"prompt": "A baker from the south works in the museum", "subject": "baker"},
]


def _subject_index(tok, prompt: str, subject: str) -> int:
    end = prompt.index(subject) + len(subject)
    return len(tok(prompt[:end])["input_ids"]) - 1


def _key(model, tok, prompt: str, subject: str, layer: int) -> torch.Tensor:
    """The rewrite module's input at the subject's last token (a plain hook, not knowbench.keys)."""
    return rewrite_io(model, tok, prompt, layer, _subject_index(tok, prompt, subject))[0].double()


def _editor(model, tok, tmp_path, **kw):
    probes = tmp_path / "probes.json"
    probes.write_text(json.dumps(PROBES))
    ed = make_editor(LeastOverlap, model, tok, tmp_path, layers=LAYERS, probe_facts=str(probes),
                     n_probe_keys=len(PROBES), **kw)
    ed.setup()
    # a threshold inside C's spectrum, so the preserved subspace S is a proper subspace
    thr = min(float(ed.stat(l).eigh()[0].quantile(0.75)) for l in LAYERS)
    ed.hparams.preserve_threshold = thr
    ed._reset_bases()
    return ed


def _spy_solve(ed):
    seen = []
    real = ed.solve

    def solve(layer, k_star, delta):
        out = real(layer, k_star, delta)
        seen.append((layer, k_star.clone(), delta.clone(), out[0].clone()))
        return out

    ed.solve = solve
    return seen


@pytest.mark.parametrize("norm", ["whitened", "raw"])
def test_update_is_the_dense_minimum_norm_solution_leaving_kept_keys_in_place(tiny, tmp_path, norm):
    model, tok = tiny
    model.double()  # the stored change is the update itself, not a float32 rounding of W + ΔW
    ad = ArchAdapter(model)
    ed = _editor(model, tok, tmp_path, solve_norm=norm)
    seen = _spy_solve(ed)
    # what must be kept, read independently as the editor's definition says: the probe keys on the
    # unedited model, each edit's bare key right after it is written
    probes = {l: torch.stack([_key(model, tok, p["prompt"], p["subject"], l) for p in PROBES]) for l in LAYERS}
    earlier: dict[int, list[torch.Tensor]] = {l: [] for l in LAYERS}
    for req in REQS[:2]:
        ed.apply([req])
        for l in LAYERS:
            earlier[l].append(_key(model, tok, req.prompt, req.subject, l))
    earlier = {l: torch.stack(v) for l, v in earlier.items()}
    w_before = {l: ad.rewrite_weight(l).detach().double().clone() for l in LAYERS}
    ed.apply([REQS[2]])
    layer, k_star, delta, _ = seen[-1]
    dw = ad.rewrite_weight(layer).detach().double() - w_before[layer]
    # the dense solution: min ‖ΔW L‖_F (whitened) or ‖ΔW‖_F (raw) with ΔW k* = δ and ΔW k = 0 for
    # every kept key and direction of S
    chol = ed.stat(layer).cholesky().double()
    if norm == "raw":
        chol = torch.eye(chol.shape[0], dtype=torch.float64)
    evals, evecs = ed.stat(layer).eigh()
    s = evecs[:, evals >= ed.hparams.preserve_threshold].double()
    kept = torch.cat([s.T, probes[layer], earlier[layer]])  # rows (m, d_in)
    a = torch.linalg.solve_triangular(chol, torch.cat([k_star[None], kept]).T, upper=False)  # whitened columns
    rhs = torch.cat([delta[None], torch.zeros(kept.shape[0], delta.shape[0], dtype=torch.float64)])  # (1+m, d_out)
    w_hat = rhs.T @ torch.linalg.pinv(a)  # least-norm ΔŴ with ΔŴ A = Rᵀ
    expect = torch.linalg.solve_triangular(chol.T, w_hat.T, upper=True).T  # ΔW = ΔŴ L⁻¹
    assert float((dw - expect).norm() / expect.norm()) < 1e-6
    assert float((dw @ k_star - delta).norm() / delta.norm()) < 1e-8  # the edit is written
    scale = float(dw.norm())
    for k in kept:  # earlier edits, probes and S: untouched
        assert float((dw @ k).norm()) < 1e-8 * scale * float(k.norm())
    # and the earlier edits' keys at the other layer were left where they were too
    for l in LAYERS:
        if l != layer:
            assert torch.equal(ad.rewrite_weight(l).detach().double(), w_before[l])


def test_layer_choice_is_the_brute_force_least_overlap(tiny, tmp_path):
    model, tok = tiny
    ed = _editor(model, tok, tmp_path)
    # the kept keys as the editor defines them: probes on the unedited model, each edit's key right after it
    kept = {l: [_key(model, tok, p["prompt"], p["subject"], l) for p in PROBES] for l in LAYERS}
    for req in REQS:
        want = {}
        for l in LAYERS:
            chol = ed.stat(l).cholesky().double()
            u = torch.linalg.solve_triangular(chol, _key(model, tok, req.prompt, req.subject, l)[:, None], upper=False)[:, 0]
            a = torch.linalg.solve_triangular(chol, torch.stack(kept[l]).T, upper=False)
            x = torch.linalg.lstsq(a, u[:, None]).solution
            want[l] = 1 - float((u - (a @ x)[:, 0]).square().sum() / u.square().sum())
        out = ed.apply([req])
        got = out.info["edits"][0]
        assert got["layer"] == min(LAYERS, key=lambda l: (want[l], l))
        assert got["overlap"] == pytest.approx(want[got["layer"]], abs=1e-5)
        for l, v in got["declined"].items():
            assert v == pytest.approx(want[int(l)], abs=1e-5)
        for l in LAYERS:
            kept[l].append(_key(model, tok, req.prompt, req.subject, l))
    rep = ed.report()
    assert rep["edits"] == 3 and sum(rep["layer_counts"].values()) == 3
    assert rep["overlap_chosen_mean"] <= rep["overlap_declined_mean"]


def test_an_edit_without_room_is_refused_and_writes_nothing(tiny, tmp_path):
    model, tok = tiny
    ed = _editor(model, tok, tmp_path, min_free=0.999999)
    before = weights(model)
    with pytest.raises(ValueError, match="lies outside the kept keys"):
        ed.apply([REQS[0]])
    after = weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert ed.report()["refused"] == 1 and ed.n_edits == 0


def test_restore_is_exact_and_forgets_the_earlier_edits(tiny, tmp_path):
    model, tok = tiny
    ed = _editor(model, tok, tmp_path)
    w0 = weights(model)
    dims0 = {l: ed._b[l].m for l in LAYERS}
    first = [ed.apply([r]).info["edits"][0]["update_norm"] for r in REQS]
    assert any(ed._b[l].m > dims0[l] for l in LAYERS)
    ed.restore()
    assert all(torch.equal(w0[n], p) for n, p in model.named_parameters())
    assert {l: ed._b[l].m for l in LAYERS} == dims0 and ed.n_edits == 0
    again = [ed.apply([r]).info["edits"][0]["update_norm"] for r in REQS]
    assert again == first  # the same stream gives the same updates after a restore


def test_kept_basis_is_orthonormal_and_skips_dependent_vectors():
    g = torch.Generator().manual_seed(0)
    b = KeptBasis(12, 1e-6)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    assert b.add_rows(x) == 5
    assert not b.add(x[0] * 3 - x[1])  # inside the span: no new column
    q = b.q
    assert torch.allclose(q.T @ q, torch.eye(5, dtype=torch.float64), atol=1e-12)
    y = torch.randn(12, generator=g, dtype=torch.float64)
    r = b.outside(y)
    assert float((q.T @ r).abs().max()) < 1e-12
    coef = torch.linalg.lstsq(x.T, y[:, None]).solution
    assert torch.allclose(r, y - (x.T @ coef)[:, 0], atol=1e-10)  # = the least-squares residual


def test_a_run_reports_its_choices_in_the_result(tmp_path, monkeypatch):
    """Through the runner: every edit's record names its layer and overlaps, and diagnostics.editor
    sums them up (chosen against declined)."""
    from knowbench.runner import RunConfig, run_all

    from kb_locate import toy_corpus

    monkeypatch.setenv("KNOWBENCH_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(toy_corpus(80)))
    hp = tmp_path / "hp.yaml"
    hp.write_text("layers: [0, 1]\nv_num_grad_steps: 3\nmom2_n_samples: 80\n")
    (res,) = run_all(RunConfig(editor="least-overlap", task="zsre", model="random-gpt2", sequential=3,
                               fluency=False, curve_every=0, hparams=str(hp), output=str(tmp_path / "r.json"),
                               extra={"stats": {"corpus": str(corpus), "samples": 80}}))
    per_edit = [e["edits"][0] for e in res["edits"]]
    assert len(per_edit) == 3 and all(e["layer"] in (0, 1) and set(e["declined"]) <= {"0", "1"} for e in per_edit)
    rep = res["diagnostics"]["editor"]
    assert rep["edits"] == 3 and sum(rep["layer_counts"].values()) == 3
    assert rep["overlap_chosen_mean"] == pytest.approx(sum(e["overlap"] for e in per_edit) / 3, abs=1e-5)
