"""MEMIT: each layer's update is the normal-equations solution for its keys and residual share, the
layers are solved in order on the model the lower ones left, and batches / restore behave."""

from __future__ import annotations

import pytest
import torch

from knowbench.arch import ArchAdapter
from knowbench.editors.memit import MEMIT

from knowbench.editors.locate import replay_keys, weighted_keys

from kb_locate import REQS, make_editor, weights


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_update_is_the_normal_equations_solution(tiny, tmp_path):
    model, tok = tiny
    ad = ArchAdapter(model)
    ed = make_editor(MEMIT, model, tok, tmp_path, layers=[1, 2], mom2_update_weight=50.0)
    w0 = {l: ad.rewrite_weight(l).detach().double().clone() for l in ed.layers}
    out = ed.apply(REQS)  # a batch of three edits
    assert [t.layer for t in out.traces] == [1, 2]
    assert out.changed_params == [ad.rewrite_param_name(1), ad.rewrite_param_name(2)]
    lam = 50.0
    for tr in out.traces:
        k = tr.keys.double().T  # (d_in, n)
        r = tr.residuals.double().T  # (d_out, n)
        c = ed.stat(tr.layer).mom2
        # ΔW (λC + KKᵀ) = R Kᵀ, solved densely (no Cholesky, no Woodbury)
        expect = torch.linalg.solve((lam * c + k @ k.T).T, (r @ k.T).T).T
        applied = ad.rewrite_weight(tr.layer).detach().double() - w0[tr.layer]
        assert k.shape[1] == 3
        assert _rel(applied, expect) < 1e-4, tr.layer
        # values the layer was asked for = W_before K + b + R
        bias = ad.rewrite_module(tr.layer).bias
        b = bias.detach().double() if bias is not None else 0.0
        assert _rel(tr.values.double(), (w0[tr.layer] @ k).T + b + tr.residuals.double()) < 1e-4


def test_residual_is_spread_and_layers_see_the_edited_model(tiny, tmp_path):
    model, tok = tiny
    ed = make_editor(MEMIT, model, tok, tmp_path, layers=[0, 1, 2])
    out = ed.apply(REQS[:2])
    t0 = out.traces[0]
    # first layer: R = (z* − z) / 3 with z the unedited value, i.e. δ / 3
    delta = ed._last_targets.delta.double()
    assert float(delta.norm()) > 0
    assert _rel(t0.residuals.double() * 3, delta) < 1e-5
    # keys of layer j were read after layers < j were edited: recomputing them on the final model
    # (edits at layers ≥ j do not change layer j's keys) gives the trace's keys
    rec = replay_keys(model, ed.adapter, ed._last_targets, ed.layers[0], key_layers=[0, 1, 2])

    for tr in out.traces:
        again = weighted_keys(rec.keys[tr.layer], ed._last_targets.batch, ed.contexts())
        assert _rel(again, tr.keys) < 1e-5
    # and they differ from the unedited model's keys there: the lower edits were seen
    ed.restore()
    orig = weighted_keys(replay_keys(model, ed.adapter, ed._last_targets, ed.layers[0], key_layers=[2]).keys[2],
                         ed._last_targets.batch, ed.contexts())
    assert _rel(orig, out.traces[2].keys) > 1e-4


def test_batch_equals_each_target_alone(tiny, tmp_path):
    """δ for a batch is optimised jointly but per edit: identical to optimising each alone."""
    model, tok = tiny
    ed = make_editor(MEMIT, model, tok, tmp_path, layers=[1, 2])
    ed.apply(REQS)
    batch_delta = ed._last_targets.delta.clone()
    ed.restore()
    for i, req in enumerate(REQS):
        ed.apply([req])
        assert torch.allclose(ed._last_targets.delta[0], batch_delta[i], atol=1e-5, rtol=1e-4)
        ed.restore()


def test_restore_and_provenance(tiny, tmp_path):
    model, tok = tiny
    before = weights(model)
    ed = make_editor(MEMIT, model, tok, tmp_path)
    out = ed.apply(REQS[:1])
    prov = out.info["provenance"]
    assert prov["layers"] == ed.layers and len(prov["context_templates"]) == 6  # "" + 5 starts
    assert prov["context_weights"][0] == pytest.approx(0.5)
    assert set(prov["stats"]["layers"]) == {str(l) for l in ed.layers}
    out2 = ed.apply(REQS[1:2])
    assert "provenance" not in out2.info  # full provenance once per run
    ed.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_default_hparams_reference_and_rule(tiny):
    from types import SimpleNamespace

    model, tok = tiny
    hp = MEMIT.default_hparams(model, "random-x")  # no YAML: layer rule, λ from the key width
    assert hp.layers == [0, 1] and hp.mom2_update_weight == 2 * ArchAdapter(model).key_dim(1)
    assert hp.clamp_norm_factor == 0.75 and hp.context_template_starts == ["The", "Therefore", "Because", "I", "You"]
    xl = MEMIT.default_hparams(SimpleNamespace(config=SimpleNamespace(model_type="gpt2", n_layer=48)), "gpt2-xl")
    assert xl.layers == [13, 14, 15, 16, 17] and xl.mom2_update_weight == 20000
    gptj = MEMIT.default_hparams(SimpleNamespace(config=SimpleNamespace(model_type="gptj", n_layer=28)), "EleutherAI/gpt-j-6b")
    assert gptj.layers == [3, 4, 5, 6, 7, 8] and gptj.mom2_update_weight == 15000 and gptj.v_num_grad_steps == 25
