"""GRACE: the codebook leaves a position whose key is outside every ε-ball bit for bit as it was,
puts the stored value exactly where a key is inside its ball, follows EasyEdit's add / split / expand
rules, searches like a brute-force loop, and restore leaves no trace (GPT-2 and Llama layouts)."""

from __future__ import annotations

import math

import pytest
import torch

from knowbench.editor import EditRequest, PromptOwner, RunContext, check_editor
from knowbench.editors.grace import GRACE, Codebook, GRACEHparams

REQ = EditRequest(prompt="The capital of Zorbia is", target_new="Quix", subject="Zorbia", record_index=7)
REQ2 = EditRequest(prompt="Mount Plumbo stands in", target_new="Wexa", subject="Mount Plumbo", record_index=8)
OTHER = "A quiet river bends near the old mill"


def _editor(model, tok, **hp) -> GRACE:
    hp = {"layer": 1, "n_iter": 5, "eps": 1e-3, **hp}
    return GRACE(model, tok, GRACEHparams(**hp), RunContext(seed=0))


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _module_io(editor: GRACE, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codebook module's input and its (possibly replaced) output, read by a hook that runs
    after the codebook's."""
    got = {}

    def grab(module, args, out):
        got["x"], got["h"] = args[0].detach().clone(), out.detach().clone()

    handle = editor.module.register_forward_hook(grab)
    try:
        _logits(editor.model, ids)
    finally:
        handle.remove()
    return got["x"][0], got["h"][0]


def _key_position(tok, req: EditRequest) -> tuple[torch.Tensor, int]:
    from knowbench.scoring import target_spans

    ids, start = target_spans(tok, [(req.prompt, req.target_new)])[0]
    return torch.tensor([ids]), start - 1


def _snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "tree": [(n, id(m), type(m)) for n, m in model.named_modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    }


def _brute_nearest(keys: torch.Tensor, q: torch.Tensor) -> tuple[float, int]:
    """Nearest key of one query by a loop in float64; ties go to the newest (largest index)."""
    best, arg = math.inf, -1
    for i in range(keys.shape[0]):
        d = float(((q.double() - keys[i].double()) ** 2).sum().sqrt())
        if d <= best:  # "<=": a later entry at the same distance wins
            best, arg = d, i
    return best, arg


# -- the adaptor on both layouts ------------------------------------------------------------------
def test_contract_and_module_names(tiny):
    model, tok = tiny
    assert check_editor(GRACE, "grace") is GRACE
    ed = _editor(model, tok)
    assert ed.module_name == ed.adapter.rewrite_name(1)  # c_proj / down_proj
    ed2 = _editor(model, tok, module="mlp_in")
    assert ed2.module_name == ed.adapter.spec.mlp_in.format(i=1)
    for bad in ({"val_init": "hot"}, {"eps_expand": "decay"}, {"module": "nope"}, {"eps": -1.0}):
        with pytest.raises(ValueError):
            _editor(model, tok, **bad)


@pytest.mark.parametrize("module", ["rewrite", "mlp_in"])
def test_outside_every_ball_is_bit_identical_inside_is_the_value(tiny, module):
    model, tok = tiny
    other = _ids(tok, OTHER)
    before_other = _logits(model, other)
    ids, key_pos = _key_position(tok, REQ)
    x0, h0 = _module_io(_editor(model, tok, module=module), ids)  # no codebook yet: the unedited module
    ed = _editor(model, tok, module=module)
    ed.apply([REQ])
    cb = ed.codebook
    assert cb.n == 1 and torch.equal(cb.keys[0], x0[key_pos].float())
    # an input none of whose positions is within ε of the key: logits bit-identical
    d, _ = cb.nearest(_module_io(ed, other)[0])
    assert bool((d > cb.eps[0]).all())
    assert torch.equal(_logits(model, other), before_other)
    # the edit's own "prompt target": the last prompt token reproduces the key and gets the value
    # exactly; every other position keeps the unedited module output bit for bit
    x, h = _module_io(ed, ids)
    assert torch.equal(x, x0)  # the module's input does not depend on the codebook
    assert torch.equal(h[key_pos], cb.values[0].to(h.dtype))
    rest = [t for t in range(h.shape[0]) if t != key_pos]
    assert torch.equal(h[rest], h0[rest])
    assert not torch.equal(h[key_pos], h0[key_pos])
    ed.restore()


def test_the_value_is_trained_on_the_target(tiny):
    """The loss falls and the first target token becomes the argmax at the key token (a tiny random
    model's near-uniform head cannot be made confident, and its later target tokens hardly read the
    replaced position: the embedded model's runs show whole targets)."""
    model, tok = tiny
    ed = _editor(model, tok, n_iter=10, eps=1e-3, edit_lr=1.0)
    out = ed.apply([REQ])
    assert out.info["steps"] == 10 and out.info["loss_last"] < out.info["loss_first"] - 0.1
    ids, key_pos = _key_position(tok, REQ)
    assert int(_logits(model, ids)[0, key_pos].argmax()) == int(ids[0, key_pos + 1])
    ed.restore()
    ed = _editor(model, tok, n_iter=10, stop_loss=100.0)  # stops before the first step
    assert ed.apply([REQ]).info["steps"] == 1
    ed.restore()


def test_replay_trains_like_full_forward_passes(tiny):
    """Re-running the blocks from the edited layer up gives the full model's loss and gradient: the
    same trained value as full forward passes; a model whose logits the replay cannot reproduce
    (here a hook scaling them) falls back to full passes."""
    model, tok = tiny
    got = {}
    for replay in (True, False):
        ed = _editor(model, tok, n_iter=6, replay=replay)
        out = ed.apply([REQ])
        assert out.info["replay"] is replay
        got[replay] = (ed.codebook.values[0].clone(), out.info["loss_first"], out.info["loss_last"])
        ed.restore()
    assert torch.allclose(got[True][0], got[False][0], atol=1e-4, rtol=1e-4)
    assert got[True][1] == pytest.approx(got[False][1], rel=1e-5)
    assert got[True][2] == pytest.approx(got[False][2], rel=1e-3)
    handle = model.register_forward_hook(lambda m, a, out: out.__class__(logits=2 * out.logits))
    try:
        ed = _editor(model, tok, n_iter=2)
        assert ed.apply([REQ]).info["replay"] is False
        ed.restore()
    finally:
        handle.remove()


def test_restore_is_bit_identical(tiny):
    model, tok = tiny
    prompts = [_ids(tok, REQ.prompt + " " + REQ.target_new), _ids(tok, REQ2.prompt), _ids(tok, OTHER)]
    before = [_logits(model, p) for p in prompts]
    snap = _snapshot(model)
    ed = _editor(model, tok, eps=50.0)  # large balls: every input is replaced somewhere
    ed.apply([REQ])
    ed.apply([REQ2])
    assert ed.codebook.n == 2 and ed._handle is not None
    assert not torch.equal(_logits(model, prompts[0]), before[0])
    ed.restore()
    assert ed.codebook.n == 0 and ed._handle is None and ed.report()["codebook_size"] == 0
    after = _snapshot(model)
    assert after["state"].keys() == snap["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in snap["state"].items())
    assert after["params"] == snap["params"] and after["tree"] == snap["tree"] and after["hooks"] == snap["hooks"]
    assert all(torch.equal(_logits(model, p), b) for p, b in zip(prompts, before))
    # and the editor can be used again after restore (single protocol)
    ed.apply([REQ2])
    assert ed.codebook.n == 1
    ed.restore()


def test_sequential_codebook_grows_and_keeps_earlier_values(tiny):
    model, tok = tiny
    ed = _editor(model, tok, eps=1e-3)
    ed.apply([REQ])
    v0 = ed.codebook.values[0].clone()
    ed.apply([REQ2])
    assert ed.codebook.n == 2 and torch.equal(ed.codebook.values[0], v0)
    ids, key_pos = _key_position(tok, REQ)
    assert torch.equal(_module_io(ed, ids)[1][key_pos], v0.to(ed.module.weight.dtype))
    assert ed.delete(REQ.record_index) == 1 and ed.codebook.n == 1
    assert ed.codebook.records == [{REQ2.record_index}]
    ed.restore()


def test_cold_values_repeat_with_the_seed(tiny):
    model, tok = tiny
    vals = []
    for _ in range(2):
        ed = _editor(model, tok, n_iter=0)  # no training: the cold initial value itself
        ed.apply([REQ])
        vals.append(ed.codebook.values[0].clone())
        ed.restore()
    assert torch.equal(vals[0], vals[1]) and float(vals[0].min()) >= 0 and float(vals[0].max()) < 1
    ed = _editor(model, tok, n_iter=0, val_init="warm")
    ids, key_pos = _key_position(tok, REQ)
    h0 = _module_io(ed, ids)[1][key_pos]
    ed.apply([REQ])
    assert torch.equal(ed.codebook.values[0], h0.float())
    ed.restore()


# -- the codebook rules on constructed keys ------------------------------------------------------------
def _rules_editor(tiny, **hp) -> GRACE:
    model, tok = tiny
    ed = _editor(model, tok, eps=1.0, **hp)
    ed.codebook = Codebook(4, 3)
    return ed


def _key(*xs: float) -> torch.Tensor:
    return torch.tensor([*xs, 0.0, 0.0, 0.0][:4])


def test_add_split_expand_rules(tiny):
    ed = _rules_editor(tiny)
    cb, h0 = ed.codebook, torch.zeros(3)
    A, B = (1, 2), (3,)
    assert ed._update_codebook(_key(0), h0, A, 0)[:2] == (0, "add")  # empty codebook
    assert ed._update_codebook(_key(5), h0, A, 1)[:2] == (1, "add")  # d 5 > ε₀ + ε_j = 2: out of reach
    assert cb.n == 2 and cb.eps.tolist() == [1.0, 1.0]
    # within reach (d 1.5 ≤ 2), another label: a new key, both radii d/2 (the old one 1e-5 less)
    slot, action, d = ed._update_codebook(_key(0, 1.5), h0, B, 2)
    assert (slot, action, d) == (2, "split", 1.5)
    assert cb.eps[0].item() == pytest.approx(0.75 - 1e-5, abs=1e-7) and cb.eps[2].item() == pytest.approx(0.75)
    assert cb.eps[1].item() == 1.0  # untouched
    # same label, outside the ball but within reach: coverage expands the radius to d, no new key
    slot, action, d = ed._update_codebook(_key(5, 1.8), h0, A, 3)
    assert (slot, action) == (1, "expand") and d == pytest.approx(1.8) and cb.n == 3
    assert cb.eps[1].item() == pytest.approx(1.8) and torch.equal(cb.keys[1], _key(5))
    assert cb.records[1] == {1, 3}
    # same label inside the ball: nothing changes
    assert ed._update_codebook(_key(5, 1.0), h0, A, 4)[:2] == (1, "inside") and cb.eps[1].item() == pytest.approx(1.8)
    # the same prompt with another target (d = 0): the newest entry owns the key
    slot, action, _ = ed._update_codebook(_key(5), h0, B, 5)
    assert action == "split" and cb.eps[slot].item() == 0.0 and cb.eps[1].item() < 0
    d, idx = cb.nearest(_key(5)[None])
    assert int(idx[0]) == slot and float(d[0]) <= cb.eps[slot].item()
    assert ed.counts == {"add": 0, "split": 0, "expand": 0, "inside": 0}  # counted by apply, not here


def test_moving_average_expansion(tiny):
    ed = _rules_editor(tiny, eps_expand="moving_average")
    cb, h0 = ed.codebook, torch.zeros(3)
    ed._update_codebook(_key(0), h0, (1,), 0)
    assert ed._update_codebook(_key(1.6), h0, (1,), 1)[1] == "expand"
    assert torch.allclose(cb.keys[0], _key(0.8)) and cb.eps[0].item() == pytest.approx(1.6)


def test_search_and_hook_equal_a_brute_force_loop(tiny):
    model, tok = tiny
    ed = _editor(model, tok, module="rewrite")
    d_in, d_out = ed.codebook.d_in, ed.codebook.d_out
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(40, d_in, generator=g)
    keys[7] = keys[3]  # a tie: the newer entry (7) must win
    cb = ed.codebook
    for i, k in enumerate(keys):
        cb.add(k, torch.randn(d_out, generator=g), 0.0, (i,), i)
    near = keys[torch.randint(0, 40, (30,), generator=g)] + 0.3 * torch.randn(30, d_in, generator=g)
    x = torch.cat([keys[:10], near, torch.randn(20, d_in, generator=g)])  # exact, near and far queries
    dist, idx = cb.nearest(x)
    brute = [_brute_nearest(keys, q) for q in x]
    assert idx.tolist() == [b[1] for b in brute]
    assert torch.allclose(dist.double(), torch.tensor([b[0] for b in brute], dtype=torch.float64), atol=1e-5)
    assert int(idx[3]) == 7 and float(dist[3]) == 0.0
    # radii between the exact and the near distances, never within 1e-3 of a distance
    eps = torch.full((40,), 0.5 * float(dist[10:40].min()))
    assert float((dist[:, None] - eps[None]).abs().min()) > 1e-3
    cb._e[:40] = eps
    # the hook through the real module: replaced rows are the chosen values, the others untouched
    ed._attach()
    x3 = x.reshape(6, 10, d_in).to(ed.module.weight.dtype)
    with torch.no_grad():
        plain = ed.module.forward(x3)  # forward() bypasses hooks
        hooked = ed.module(x3)
    flat_plain, flat_hooked = plain.reshape(-1, d_out), hooked.reshape(-1, d_out)
    for n, (d, j) in enumerate(brute):
        expect = cb.values[j].to(plain.dtype) if d <= eps[j] else flat_plain[n]
        assert torch.equal(flat_hooked[n], expect), n
    assert int(sum(d <= eps[j] for d, j in brute)) == 10  # the exact queries only
    ed.restore()


# -- routing statistics through rewrite_prompts -------------------------------------------------------
def test_router_stats_count_hits_and_false_routing(tiny):
    model, tok = tiny
    ed = _editor(model, tok, eps=1e-3)
    ed.apply([REQ])
    own = PromptOwner(record=REQ.record_index, metric="edit_succ", request=REQ)
    foreign = PromptOwner(record=99, metric="edit_succ")
    loc = PromptOwner(record=REQ.record_index, metric="locality", key="Relation_Specificity")
    prompts = [REQ.prompt, REQ.prompt, OTHER]
    assert ed.rewrite_prompts(prompts, [own, foreign, loc]) == prompts  # the identity
    rep = ed.report()
    assert rep["codebook_size"] == 1 and rep["n_add"] == 1
    assert rep["hit_rate_edit"] == 1.0 and rep["own_rate_edit"] == 0.5  # record 99 made no entry
    assert rep["nearest_edit"] == pytest.approx(0.0, abs=1e-4)
    assert rep["false_routing_locality"] == 0.0 and rep["nearest_over_eps_locality"] > 1
    # a locality prompt that contains the edit prompt's prefix hits at its key token
    ed.rewrite_prompts([REQ.prompt + " and more"], [loc])
    assert ed.report()["false_routing_locality"] == 0.5
    ed.apply([REQ2])  # counts start again per apply
    assert "hit_rate_edit" not in ed.report()
    ed.restore()


def test_runner_sequential_end_to_end(zsre_file, tmp_path):
    from knowbench.runconfig import RunConfig
    from knowbench.runner import run

    hp = tmp_path / "hp.yaml"
    hp.write_text("layer: 1\nn_iter: 3\neps: 0.001\n")
    r = run(RunConfig(editor="grace", task="zsre", data=str(zsre_file), model="random-gpt2", limit=3, sequential=3,
                      fluency=False, hparams=str(hp), output=str(tmp_path / "out.json")))
    prov = r["editor"]["provenance"]
    assert prov["semantics"] == "easyedit@14cea82" and prov["query"].startswith("every position")
    assert r["editor"]["kind"] == "modules" and len(r["edits"]) == 3
    assert [e["codebook_size"] for e in r["edits"]] == [1, 2, 3]
    final = r["diagnostics"]["summary"]["editor_final"]
    assert final["codebook_size"] == 3 and final["hit_rate_edit"] == 1.0


def test_shipped_hparams_files_are_valid():
    from knowbench.editor import load_hparams_file, override_hparams
    from knowbench.editors.hparams_yaml import hparams_dir

    files = [f for f in hparams_dir().iterdir() if f.name.startswith("grace-") and f.name.endswith(".yaml")]
    assert {f.name for f in files} >= {"grace-llama.yaml", "grace-gpt2-xl.yaml", "grace-embedded.yaml"}
    for f in files:
        hp = override_hparams(GRACEHparams(), load_hparams_file(f), source=f.name)  # type-checked
        assert hp.n_iter > 0 and hp.eps > 0 and hp.layer >= 0
