"""FT-L / FT-M: they learn the target, touch one weight, and restore bit-identically."""

from __future__ import annotations

import torch

from knowbench.editor import EditRequest, RunContext
from knowbench.editors.ft import FTHparams, FTL, FTM
from knowbench.scoring import teacher_forced

REQ = EditRequest(prompt="The capital of Zorbia is", target_new="Quix", subject="Zorbia")


def _acc(model, tok):
    return teacher_forced(model, tok, [(REQ.prompt, REQ.target_new)])[0].accuracy


def test_ftm_learns_target_and_restores_exactly(tiny):
    model, tok = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = FTM(model, tok, FTHparams(num_steps=40, lr=5e-2), RunContext())
    acc0 = _acc(model, tok)
    out = editor.apply([REQ])
    acc1 = _acc(model, tok)
    assert acc1 == 1.0 and acc0 < 1.0
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == out.changed_params == [editor.param_name]
    editor.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_ftl_optimises_last_prompt_position(tiny):
    model, tok = tiny
    editor = FTL(model, tok, FTHparams(num_steps=30, lr=5e-2), RunContext())
    out = editor.apply([REQ])
    assert out.info["loss_last"] < out.info["loss_first"]
    editor.restore()


def test_batch_of_edits(tiny):
    model, tok = tiny
    reqs = [EditRequest(prompt="The capital of Zorbia is", target_new="Quix"),
            EditRequest(prompt="Mount Plumbo stands in", target_new="Wexa")]
    editor = FTM(model, tok, FTHparams(num_steps=150, lr=5e-2, stop_loss=1e-3), RunContext())
    editor.apply(reqs)
    accs = [tf.accuracy for tf in teacher_forced(model, tok, [(r.prompt, r.target_new) for r in reqs])]
    assert min(accs) == 1.0


def test_site_is_the_trained_weight_without_a_second_moment(tiny):
    model, tok = tiny
    editor = FTM(model, tok, FTHparams(), RunContext())
    (site,) = editor.sites()
    assert site.param == editor.param_name and site.layer == editor.layer and site.second_moment is None
