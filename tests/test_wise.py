"""WISE: a closed router leaves the model bit for bit as it was, an open one equals the model with
W_v replaced by W_v′, the gradient mask and the clamp hold exactly, TIES merging equals a per-entry
loop, routing equals a brute-force Δ_act computation, shards and merges follow the schedule, and
restore leaves no trace (GPT-2 Conv1D and Llama Linear layouts)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from knowbench.editor import EditRequest, PromptOwner, RunContext, check_editor
from knowbench.editors.wise import MAIN, SIDE, WISE, WISEHparams, ties_merge, trim_magnitude

REQS = [
    EditRequest(prompt="The capital of Zorbia is", target_new="Quix", subject="Zorbia", record_index=7),
    EditRequest(prompt="Mount Plumbo stands in", target_new="Wexa", subject="Mount Plumbo", record_index=8),
    EditRequest(prompt="The river Ulm flows into", target_new="Vorn", subject="Ulm", record_index=9),
    EditRequest(prompt="Kolt Brand plays the", target_new="drum", subject="Kolt Brand", record_index=10),
]
TEXTS = ["The capital of Zorbia is Quix", "A quiet river bends near the old mill", "Mount Plumbo stands in"]


def _editor(model, tok, **hp) -> WISE:
    # small: two prefixes of 3 new tokens, a few steps, lr large enough to move W′ visibly
    hp = {"layer": 2, "n_iter": 4, "edit_lr": 5.0, "prefix_starts": ["I", "You"], "prefix_lengths": [3],
          "save_freq": 100, "merge_freq": 100, **hp}
    ed = WISE(model, tok, WISEHparams(**hp), RunContext(seed=0))
    ed.setup()
    return ed


def _batch(tok, texts=TEXTS):
    from knowbench.tokens import pad_batch, pad_id

    seqs = [list(tok(t)["input_ids"]) for t in texts]
    return pad_batch(seqs, pad_id(tok), "right")[:3]


def _logits(model, batch) -> torch.Tensor:
    ids, mask, pos = batch
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _with_weight(model, ed: WISE, w: torch.Tensor):
    """A copy of the model whose W_v is ``w`` (in the module's own layout), without the hooks."""
    other = copy.deepcopy(model)
    for m in other.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    with torch.no_grad():
        other.get_submodule(ed.module_name).weight.copy_(w)
    return other


def test_contract():
    assert check_editor(WISE, "wise") is WISE
    assert WISE.uses_train_split and WISE.kind.value == "modules"


# -- the router ------------------------------------------------------------------------------------
def test_closed_router_is_the_unedited_model_bit_for_bit(tiny):
    model, tok = tiny
    batch = _batch(tok)
    before = _logits(model, batch)
    ed = _editor(model, tok)
    assert torch.equal(_logits(model, batch), before)  # built, set up, nothing applied: no hook
    for r in REQS[:2]:
        ed.apply([r])
    assert not torch.equal(ed.side, ed.w0)  # W′ was written...
    ed.hparams.act_ratio = math.inf  # ...but no row reaches an infinite threshold
    assert torch.equal(_logits(model, batch), before)
    choice, _ = ed.decisions(TEXTS)
    assert choice == [MAIN] * len(TEXTS)


def test_open_router_is_the_model_with_the_side_memory(tiny):
    model, tok = tiny
    batch = _batch(tok)
    before = _logits(model, batch)
    ed = _editor(model, tok)
    for r in REQS[:2]:
        ed.apply([r])
    ed.hparams.act_ratio = 0.0  # every row routes to W′ (Δ ≥ 0 = ε)
    got = _logits(model, batch)
    dense = _logits(_with_weight(model, ed, ed.side), batch)
    assert torch.equal(got, dense)
    assert not torch.allclose(got, before)
    rep = ed.report()
    assert rep["forward_rows_side"] == len(TEXTS) and rep["forward_rows_main"] == 0


@pytest.mark.parametrize("infer_max_tokens", [100, 26])
def test_routing_equals_brute_force(tiny, infer_max_tokens):
    """Retrieve: W′ when its Δ ≥ ε₀, then the memory with the largest Δ above its own ε; Δ recomputed
    here per row from the dense formula mean_t ‖φ(W a_t + b) − φ(W_v a_t + b)‖ over real tokens (the
    max over tokens for a row longer than infer_max_tokens)."""
    model, tok = tiny
    ed = _editor(model, tok, save_freq=1, merge_freq=1, act_ratio=0.9, infer_max_tokens=infer_max_tokens)
    for r in REQS[:3]:
        ed.apply([r])
    assert len(ed.memories) == 3 and ed.side is None
    # a current side memory with one edit too, and a spread of thresholds so that every branch occurs
    ed.hparams.save_freq = ed.hparams.merge_freq = 100
    ed.apply([REQS[3]])
    texts = TEXTS + [r.prompt + " " + r.target_new for r in REQS]
    ids, mask, pos = _batch(tok, texts)
    a, out0 = ed._capture(ids, mask, pos)
    phi = ed.phi

    @torch.no_grad()
    def delta(w, row):
        n = int(mask[row].sum())
        o = (a[row, :n] @ w.T if not ed.conv1d else a[row, :n] @ w)
        if ed.module.bias is not None:
            o = o + ed.module.bias
        dist = (phi(o) - phi(out0[row, :n])).norm(dim=-1)
        return float(dist.max() if n > infer_max_tokens else dist.mean())

    lengths = mask.sum(1)
    assert infer_max_tokens == 100 or (lengths > infer_max_tokens).any() and (lengths <= infer_max_tokens).any()
    choice, best = ed.decisions(texts)
    eps_side = ed.hparams.act_ratio * ed.side_mem.min_act
    for row in range(len(texts)):
        d_side = delta(ed.side, row)
        want, top = (SIDE if d_side >= eps_side else MAIN), d_side
        for i, mem in enumerate(ed.memories):
            d = delta(mem.weight, row)
            if d > top and d > ed.hparams.act_ratio * mem.min_act:
                want, top = i + 1, d
        assert choice[row] == want
        assert best[row] == pytest.approx(top, rel=1e-4, abs=1e-5)
    assert any(c > SIDE for c in choice), choice  # memories are chosen, so their outputs are checked too
    # and the forward hook uses exactly those decisions, row by row
    logits = _logits(model, (ids, mask, pos))
    for row, c in enumerate(choice):
        w = ed.w0 if c == MAIN else ed.side if c == SIDE else ed.memories[c - 1].weight
        n = int(mask[row].sum())
        alone = (ids[row : row + 1, :n], mask[row : row + 1, :n], pos[row : row + 1, :n])
        ref = _logits(_with_weight(model, ed, w), alone)
        torch.testing.assert_close(logits[row, :n], ref[0], rtol=1e-4, atol=1e-5)


# -- the edit -----------------------------------------------------------------------------------------
def test_gradient_mask_and_clamp_hold_exactly(tiny):
    model, tok = tiny
    ed = _editor(model, tok, weight_decay=0.1, norm_constraint=0.02, edit_lr=50.0, n_iter=3, mask_ratio=0.3)
    for r in REQS[:2]:
        ed.apply([r])
    w0, side, m = ed.w0, ed.side, ed.grad_mask.bool()
    assert 0.2 < m.float().mean() < 0.4
    assert torch.equal(side[~m], w0[~m])  # outside the mask W′ is W_v exactly (weight decay too)
    diff = (side - w0).abs()
    assert diff[m].max() > 0.019  # the clamp is reached...
    assert bool((side <= w0 + 0.02).all() and (side >= w0 - 0.02).all())  # ...and never passed


def test_new_mask_per_shard_and_reset(tiny):
    model, tok = tiny
    ed = _editor(model, tok, save_freq=2, merge_freq=4)
    ed.apply([REQS[0]])
    m1 = ed.grad_mask.clone()
    ed.apply([REQS[1]])  # shard 1 full: stored, W′ reset
    assert ed.side is None and len(ed.memories) == 1 and ed.memories[0].records == {7, 8}
    ed.apply([REQS[2]])
    assert not torch.equal(ed.grad_mask, m1) and ed.n_shards == 2
    assert torch.equal(ed.side[ed.grad_mask == 0], ed.w0[ed.grad_mask == 0])


# -- merging ------------------------------------------------------------------------------------------
def _ties_loop(base, tensors, weights, density):
    """TIES per entry: trim each τ_i to its k largest |·|, elect the sign of Σ w_i τ̃_i, mean over agreeing."""
    flat = [(t - base).reshape(-1).tolist() for t in tensors]
    n = len(flat[0])
    k = int(density * n)
    trimmed = []
    for d in flat:
        cut = sorted((abs(x) for x in d), reverse=True)[k - 1]
        trimmed.append([x if abs(x) >= cut else 0.0 for x in d])
    out = []
    for j in range(n):
        s = sum(w * t[j] for w, t in zip(weights, trimmed))
        sign = 1.0 if s >= 0 else -1.0
        num = den = 0.0
        for w, t in zip(weights, trimmed):
            if t[j] != 0 and (t[j] > 0) == (sign > 0):
                num += w * t[j]
                den += w
        out.append(base.reshape(-1)[j].item() + (num / den if den else 0.0))
    return torch.tensor(out, dtype=torch.float64).view(base.shape)


@pytest.mark.parametrize("weights", [[1 / 3] * 3, [0.2, 0.2, 0.6], [0.1, 0.5, 0.4]])
@pytest.mark.parametrize("density", [0.53, 0.3, 1.0])
def test_ties_merge_equals_a_per_entry_loop(weights, density):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 7, generator=g, dtype=torch.float64)
    tensors = [base + torch.randn(6, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    got = ties_merge(base, tensors, weights, density)
    torch.testing.assert_close(got, _ties_loop(base, tensors, weights, density), rtol=1e-12, atol=1e-12)


def test_trim_keeps_the_largest_entries():
    d = torch.tensor([0.1, -3.0, 2.0, -0.5, 0.0, 1.0])
    assert torch.equal(trim_magnitude(d, 0.5), torch.tensor([0.0, -3.0, 2.0, 0.0, 0.0, 1.0]))
    with pytest.raises(ValueError):
        trim_magnitude(d, 0.1)


def _spy_on_stored_shards(monkeypatch) -> list[torch.Tensor]:
    """A list that receives a copy of the side memory each time WISE stores it as a shard."""
    stored = []
    real = WISE._store_shard

    def spy(self):
        stored.append(self.side.clone())
        real(self)

    monkeypatch.setattr(WISE, "_store_shard", spy)
    return stored


def test_retrieve_merges_every_merge_freq(tiny, monkeypatch):
    model, tok = tiny
    stored = _spy_on_stored_shards(monkeypatch)
    ed = _editor(model, tok, save_freq=1, merge_freq=2)
    ed.apply([REQS[0]])
    assert len(ed.memories) == 1 and ed.memories[0].shards == 1  # a stored shard, retrievable at once
    ed.apply([REQS[1]])
    assert len(ed.memories) == 1 and ed.memories[0].shards == 2 and ed.n_merges == 1
    torch.testing.assert_close(ed.memories[0].weight, ties_merge(ed.w0, stored[:2], [0.5, 0.5], 0.53))
    assert ed.memories[0].records == {7, 8}
    assert ed.memories[0].min_act == pytest.approx(min(ed.acts[:2]))
    ed.apply([REQS[2]])
    ed.apply([REQS[3]])
    assert [m.shards for m in ed.memories] == [2, 2] and ed.memories[1].records == {9, 10}
    torch.testing.assert_close(ed.memories[1].weight, ties_merge(ed.w0, stored[2:], [0.5, 0.5], 0.53))


def test_merge_mode_schedule_and_weights(tiny, monkeypatch):
    model, tok = tiny
    stored = _spy_on_stored_shards(monkeypatch)
    ed = _editor(model, tok, retrieve=False, save_freq=1, merge_freq=2, densities=0.6)
    ed.apply([REQS[0]])
    assert ed.merged is None and len(ed.pending) == 1
    # a stored shard routes through the view before the committed merge
    torch.testing.assert_close(ed._merge_view().weight, ties_merge(ed.w0, stored[:1], [1.0], 0.6))
    ed.apply([REQS[1]])
    first = ties_merge(ed.w0, stored[:2], [0.5, 0.5], 0.6)
    torch.testing.assert_close(ed.merged.weight, first)
    ed.apply([REQS[2]])
    ed.apply([REQS[3]])
    torch.testing.assert_close(ed.merged.weight, ties_merge(ed.w0, stored[2:] + [first], [0.2, 0.2, 0.6], 0.6))
    assert ed.merged.records == {7, 8, 9, 10} and ed.min_all == pytest.approx(min(ed.acts))
    ed.hparams.act_ratio = 0.0  # open: rows go to M or W′ (empty here), never to W_v
    choice, _ = ed.decisions(TEXTS)
    assert set(choice) == {1}


# -- restore and statistics ----------------------------------------------------------------------------
def test_restore_is_bit_identical(tiny):
    model, tok = tiny
    batch = _batch(tok)
    before, state, n_hooks = _logits(model, batch), _snapshot(model), _hooks(model)
    flags = [p.requires_grad for p in model.parameters()]
    ed = _editor(model, tok, save_freq=1, merge_freq=2, act_ratio=0.0)
    for r in REQS[:3]:
        ed.apply([r])
    assert not torch.equal(_logits(model, batch), before)
    ed.restore()
    assert _hooks(model) == n_hooks and not ed.memories and ed.side is None and ed.n_edits == 0
    assert torch.equal(_logits(model, batch), before)
    after = _snapshot(model)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert [p.requires_grad for p in model.parameters()] == flags
    ed.apply([REQS[0]])  # usable again after restore
    assert ed.n_edits == 1


def test_router_statistics_attribute_the_hooks_decisions(tiny):
    """rewrite_prompts notes the prompts; the forward passes that follow (rows "prompt + answer")
    are counted per owner metric with the decision the hook made on that very row."""
    model, tok = tiny
    ed = _editor(model, tok, save_freq=2, merge_freq=2, act_ratio=0.9)
    assert ed.rewrite_prompts(["x"], [PromptOwner(7, "edit_succ")]) == ["x"]  # no edit: nothing noted
    for r in REQS[:3]:
        ed.apply([r])
    prompts = [REQS[0].prompt, REQS[2].prompt, "A quiet river bends", "Unrelated words here"]
    owners = [PromptOwner(7, "edit_succ"), PromptOwner(9, "rephrase"), PromptOwner(7, "locality"),
              PromptOwner(8, "fluency")]
    assert ed.rewrite_prompts(prompts, owners) == prompts  # the identity
    rows = [REQS[0].prompt + " Quix", REQS[2].prompt + " Vorn", "A quiet river bends near", "Unrelated words here too",
            "Nothing noted starts this row"]
    choice, best = ed.decisions(rows)
    _logits(model, _batch(tok, rows))
    rep = ed.report()
    json.dumps(rep)
    assert rep["n_prompts_edit_succ"] == 1 and rep["n_prompts_rephrase"] == 1 and rep["n_prompts_locality"] == 1
    assert rep["hit_rate_edit"] == float(choice[0] != MAIN) and rep["hit_rate_rephrase"] == float(choice[1] != MAIN)
    assert rep["false_routing_locality"] == float(choice[2] != MAIN)
    assert rep["delta_edit_prompts"] == pytest.approx(best[0], rel=1e-4)
    assert rep["own_rate_edit"] == float(choice[0] != MAIN and 7 in ed._memory_records(choice[0]))
    assert rep["forward_rows_rows"] == len(rows)
    assert rep["memories"] == 1 and rep["side_edits"] == 1 and rep["edits"] == 3 and rep["delta_edit_mean"] > 0
    ed.hparams.act_ratio = 0.0  # open: every noted row is routed
    _logits(model, _batch(tok, rows))
    assert ed.report()["hit_rate_edit"] == pytest.approx((float(choice[0] != MAIN) + 1) / 2)
    ed.apply([REQS[3]])  # counts describe the model after the latest apply
    assert "hit_rate_edit" not in ed.report()


def test_prefixes_and_unrelated_rows_come_from_the_seed_and_the_split(tiny, tmp_path):
    from types import SimpleNamespace

    from knowbench.editor import TrainSplit

    model, tok = tiny
    a, b = _editor(model, tok), _editor(model, tok)
    assert a.prefixes == b.prefixes and len(a.prefixes) == 2 and a.loc_pool == a.prefixes
    probe = SimpleNamespace(prompt="The rank of Zorb0 is", answer="genus")
    rec = SimpleNamespace(locality={"Relation_Specificity": [probe]})
    split = TrainSplit(report=SimpleNamespace(records=[rec]), path=tmp_path / "ZsRE-train-all.json", sha256="0")
    ed = WISE(model, tok, WISEHparams(layer=1, prefix_starts=["I"], prefix_lengths=[2]), RunContext(train_split=split))
    ed.setup()
    assert ed.loc_pool == ["The rank of Zorb0 is"] and "ZsRE-train-all.json" in ed.loc_source
    rows = ed._batch(REQS[0], ed.loc_pool)
    last = rows.ids[-1][rows.mask[-1].bool()].tolist()
    assert last == list(tok("The rank of Zorb0 is")["input_ids"])  # the unrelated row is the split's prompt


@pytest.mark.parametrize("mode", ["prompt", "subject", "from_subject"])
def test_act_masks_select_the_right_tokens(tiny, mode):
    model, tok = tiny
    ed = _editor(model, tok, act_mask=mode)
    rows = ed._batch(REQS[1], ["Nothing related"])
    for r in range(rows.n_edit_rows):
        ids = rows.ids[r][rows.mask[r].bool()].tolist()
        assert tok.decode(ids[rows.first[r]:], skip_special_tokens=True).strip().startswith("Mount Plumbo stands in")
        if mode != "prompt":
            s0, s1 = rows.subject[r]
            assert tok.decode(ids[s0:s1]).strip() == "Mount Plumbo"
    ed.apply([REQS[1]])  # the loss runs with these masks
    assert ed.n_edits == 1 and math.isfinite(ed.acts[0])


def test_bad_hparams_are_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="merge_freq"):
        WISE(model, tok, WISEHparams(save_freq=3, merge_freq=4), RunContext())
    with pytest.raises(ValueError, match="act_mask"):
        WISE(model, tok, WISEHparams(act_mask="tokens"), RunContext())
