"""MEND: the update against hand computations (outer products through g; α·∇W by autograd at the
identity), exact restore, a killed meta-training resumed to the same parameters, and the runner's
train → run path with the stored artefact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import zsre_records
from knowbench.editor import Artefact, EditRequest, RunContext, TrainSplit
from knowbench.editors.mend import MEND, MENDHparams

REQS = [EditRequest("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux", record_index=0),
        EditRequest("Which family does Zorb3 belong to?", "Noct5", "Zorb3", record_index=1)]


def _stored(w: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """A stored weight in Linear layout (d_out, d_in)."""
    return w.T if conv1d else w


def _editor(tiny, **kw) -> MEND:
    model, tok = tiny
    return MEND(model, tok, MENDHparams(rank=kw.pop("rank", 12), **kw), RunContext(seed=3))


def test_edits_the_mlp_matrices_of_the_last_three_layers(tiny):
    ed = _editor(tiny)
    conv = ed.adapter.model_type == "gpt2"
    mods = ["mlp.c_fc", "mlp.c_proj"] if conv else ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    blocks = "transformer.h" if conv else "model.layers"
    assert [m.name for m in ed.matrices] == [f"{blocks}.{l}.{m}.weight" for l in (1, 2, 3) for m in mods]
    assert all(m.conv1d == conv for m in ed.matrices)
    # shared: one network per shape (Llama gate and up share one, with 6 modes)
    assert len(ed.nets) == 2
    assert [s.param for s in ed.sites()] == [ed.adapter.rewrite_param_name(l) for l in (1, 2, 3)]


def test_normaliser_statistics_match_the_batch_statistics():
    """Running statistics fed in uneven chunks equal the mean and (n−1) variance of all rows."""
    from knowbench.editors.mend import _Normaliser

    rows = torch.randn(103, 7, generator=torch.Generator().manual_seed(0)) * torch.arange(1.0, 8.0) + 5
    norm = _Normaliser(7)
    assert torch.equal(norm(rows), rows)  # nothing seen yet: identity
    for chunk in rows.split([1, 2, 40, 60]):
        norm.update(chunk)
    x = rows.double()
    assert int(norm.count) == 103
    torch.testing.assert_close(norm.mean, x.mean(0))
    torch.testing.assert_close(norm.m2 / 102, x.var(0))
    torch.testing.assert_close(norm(rows), ((x - x.mean(0)) / (x.std(0) + 1e-7)).float())


def _randomise(ed: MEND, gen: torch.Generator) -> None:
    """A g far from the identity and a normaliser with non-trivial statistics."""
    with torch.no_grad():
        for net in ed.nets.values():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 2 else 1.0))
            net.norm_u.update(torch.randn(50, net.d_in, generator=gen) * 2 + 1)
            net.norm_d.update(torch.randn(50, net.d_out, generator=gen) * 0.01 - 0.003)
        ed.alpha.copy_(torch.randn(ed.alpha.shape, generator=gen))


def _g_by_hand(net, u: torch.Tensor, d: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """g written out row by row: standardise, then h ← h + max(0, s ⊙ (U(V h) + b) + o) per layer."""
    def standardise(x, norm):
        n = float(norm.count)
        std = (norm.m2 / (n - 1)).sqrt()
        return ((x.double() - norm.mean) / (std + 1e-7)).float()

    out_u, out_d = [], []
    for b in range(u.shape[0]):
        h = torch.cat([standardise(u[b], net.norm_u), standardise(d[b], net.norm_d)])
        for layer in net.layers:
            pre = layer.U @ (layer.V @ h) + layer.bias
            h = h + torch.maximum(layer.mode_scale[mode] * pre + layer.mode_shift[mode], torch.zeros(()))
        out_u.append(h[: net.d_in])
        out_d.append(h[net.d_in :])
    return torch.stack(out_u), torch.stack(out_d)


@pytest.mark.parametrize("n_requests", [1, 2])
def test_change_is_alpha_times_sum_of_outer_products_through_g(tiny, n_requests):
    ed = _editor(tiny)
    _randomise(ed, torch.Generator().manual_seed(0))
    before = {m.name: ed.model.get_parameter(m.name).detach().clone() for m in ed.matrices}
    ed.apply(REQS[:n_requests])
    for i, m in enumerate(ed.matrices):
        u, d = ed.last_factors[m.name]
        assert u.shape[0] > 0 and u.shape[1] == m.d_in and d.shape[1] == m.d_out
        with torch.no_grad():
            u2, d2 = _g_by_hand(ed.nets[m.net], u, d, m.mode)
            want = torch.zeros(m.d_out, m.d_in)
            for b in range(u.shape[0]):
                want += torch.outer(d2[b], u2[b])
            want *= ed.alpha[i]
        got = _stored(ed.model.get_parameter(m.name).detach() - before[m.name], m.conv1d)
        assert want.abs().max() > 1e-3, "the check needs a visible change"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def _nll_by_hand(model, tok, requests) -> torch.Tensor:
    """Mean −log p over every target token of the requests, each sequence scored alone, unpadded."""
    total, count = 0.0, 0
    for r in requests:
        prompt_ids = tok(r.prompt)["input_ids"]
        ids = tok(r.prompt + " " + r.target_new)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids  # byte-level: no merge across the boundary
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        for t in range(len(prompt_ids), len(ids)):
            total = total - logp[t - 1, ids[t]]
            count += 1
    return total / count


@pytest.mark.parametrize("n_requests", [1, 2])
def test_identity_g_gives_alpha_times_the_autograd_gradient(tiny, n_requests):
    """At initialisation g is the identity and the normaliser has seen nothing: ΔW = α·∇W NLL."""
    model, tok = tiny
    ed = _editor(tiny)
    with torch.no_grad():
        ed.alpha.copy_(torch.linspace(0.5, 2.0, len(ed.matrices)))
    params = [model.get_parameter(m.name) for m in ed.matrices]
    grads = torch.autograd.grad(_nll_by_hand(model, tok, REQS[:n_requests]), params)
    before = [p.detach().clone() for p in params]
    ed.apply(REQS[:n_requests])
    for i, (m, p, g, b) in enumerate(zip(ed.matrices, params, grads, before)):
        assert g.abs().max() > 0
        torch.testing.assert_close(p.detach() - b, ed.alpha[i].detach() * g, rtol=1e-4,
                                   atol=1e-5 * float(g.abs().max()))
    # norm False ignores the statistics: a normaliser that has seen data changes nothing either
    ed.restore()
    ed2 = MEND(model, tok, MENDHparams(rank=12, norm=False), RunContext(seed=3))
    with torch.no_grad():
        ed2.alpha.fill_(-1.0)
        for net in ed2.nets.values():
            net.norm_u.update(torch.randn(20, net.d_in) + 3)
            net.norm_d.update(torch.randn(20, net.d_out) + 3)
    ed2.apply(REQS[:n_requests])
    for p, g, b in zip(params, grads, before):
        torch.testing.assert_close(p.detach() - b, -g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))


def test_restore_is_exact_after_sequential_edits(tiny):
    model, _ = tiny
    ed = _editor(tiny)
    _randomise(ed, torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ed.apply(REQS[:1])
    ed.apply(REQS[1:])
    assert any(not torch.equal(state[k], v) for k, v in model.state_dict().items())
    ed.restore()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# -- meta-training ----------------------------------------------------------------------------------
TINY_TRAIN = dict(rank=8, lr=1e-3, lr_lr=1e-3, max_steps=12, accumulate=2, val_every=4, checkpoint_every=4,
                  val_min=2, patience=1000)


def _split(tmp_path: Path) -> TrainSplit:
    from knowbench.registry import load_task

    path = tmp_path / "train.json"
    path.write_text(json.dumps(zsre_records(12)))
    _, task = load_task("zsre")
    return TrainSplit(task.reader(path), path, "test")


class Interrupt(RuntimeError):
    pass


def _train(tiny, folder: Path, split: TrainSplit, stop_at: int | None = None) -> MEND:
    model, tok = tiny
    ed = MEND(model, tok, MENDHparams(**TINY_TRAIN), RunContext(seed=5, artefact_dir=folder))
    if stop_at is not None:
        def kill(step):
            if step == stop_at:
                raise Interrupt(step)
        ed._on_step = kill
    ed.train(split)
    return ed


@pytest.mark.parametrize("tiny", ["gpt2"], indirect=True)
def test_killed_training_resumes_to_the_same_parameters(tiny, tmp_path):
    model, tok = tiny
    split = _split(tmp_path)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    whole = _train(tiny, tmp_path / "whole", split)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items()), "training changed the model"

    with pytest.raises(Interrupt):
        _train(tiny, tmp_path / "killed", split, stop_at=7)
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 4  # the last checkpoint before the kill
    resumed = _train(tiny, tmp_path / "killed", split)
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()

    a, b = whole.nets.state_dict(), resumed.nets.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(whole.alpha, resumed.alpha)
    # training moved g away from its initialisation
    fresh = MEND(model, tok, MENDHparams(**TINY_TRAIN), RunContext(seed=5)).nets.state_dict()
    assert any(not torch.equal(fresh[k], a[k]) for k in a if not k.endswith(("count", "mean", "m2")))

    meta = torch.load(tmp_path / "whole" / "mend.pt", weights_only=False)["meta"]
    assert [p["step"] for p in meta["curve"]] == [0, 4, 8, 12] and meta["steps"] == 12
    assert meta["best_step"] in (0, 4, 8, 12) and meta["semantics"] == "easyedit@14cea82"
    assert all(0 <= p["edit_succ"] <= 100 and 0 <= p["locality"] <= 100 for p in meta["curve"])
    # load_artefact gives back the stored state
    loaded = MEND(model, tok, MENDHparams(**TINY_TRAIN), RunContext(seed=9))
    loaded.load_artefact(Artefact(tmp_path / "whole", meta))
    c = loaded.nets.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a) and torch.equal(loaded.alpha, whole.alpha)


def test_runner_trains_then_runs_with_the_artefact(zsre_file, tmp_path, monkeypatch):
    import yaml

    from knowbench.runner import RunConfig, run, train

    monkeypatch.setenv("KNOWBENCH_CACHE", str(tmp_path / "cache"))
    hp_file = tmp_path / "mend-tiny.yaml"
    hp_file.write_text(yaml.safe_dump({**TINY_TRAIN, "max_steps": 6, "val_every": 3}))
    cfg = dict(editor="mend", task="zsre", data=str(zsre_file), model="random-gpt2", train_data=str(zsre_file),
               hparams=str(hp_file))
    made = train(RunConfig(**cfg))
    assert made["reused"] is False and made["editor"]["steps"] == 6
    assert [p["step"] for p in made["editor"]["curve"]] == [0, 3, 6]
    r = run(RunConfig(**cfg, limit=3, fluency=False))
    art = r["editor"]["artefact"]
    assert art["reused"] is True and art["key"] == made["key"] and art["editor"]["curve"]
    assert r["editor"]["provenance"]["semantics"] == "easyedit@14cea82"
    assert r["editor"]["hparams"]["rank"] == 8
    assert all(e["changed_params"] for e in r["edits"])
    assert r["metrics"]["post"]["edit_succ"]["n"] == 3
