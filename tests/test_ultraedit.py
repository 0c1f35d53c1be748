"""UltraEdit: the written update equals a dense ridge solution computed independently, the lifelong
normaliser equals numpy's mean/std over every row seen so far, the cached gradients equal
autograd's with respect to the module output, and restore() is exact (GPT-2 Conv1D and Llama
Linear layouts)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from knowbench.editor import EditRequest, RunContext
from knowbench.editors.ultraedit import RunningMoments, UltraEdit, UltraEditHparams, ridge_update
from knowbench.scoring import target_spans

REQS = [
    EditRequest("The capital of Zorbia is", "Quix", subject="Zorbia", record_index=0),
    EditRequest("Mirvo Talen works as a", "baker", subject="Mirvo Talen", record_index=1),
    EditRequest("Where was Oskel born? In", "Pradu", subject="Oskel", record_index=2),
    EditRequest("The river of Nalt flows into the", "Sea of Ub", subject="Nalt", record_index=3),
]

# two modules of one shape (they share a normaliser) and one of another; the last is the rewrite module
MODULES = {
    "gpt2": ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"],
    "llama": ["model.layers.1.mlp.gate_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"],
}


def _family(model) -> str:
    return "gpt2" if model.config.model_type == "gpt2" else "llama"


def _editor(model, tok, **kw) -> UltraEdit:
    hp = UltraEditHparams(inner_params=MODULES[_family(model)], **{"lr": 1e-2, **kw})
    return UltraEdit(model, tok, hp, RunContext())


def _weight_linear(model, name: str) -> torch.Tensor:
    """The module's weight as (d_out, d_in), whatever its storage."""
    mod = model.get_submodule(name)
    w = mod.weight.detach().double().clone()
    return w if isinstance(mod, torch.nn.Linear) else w.T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _independent_rows(model, tok, reqs, modules, token: str, per_pass: int):
    """Module inputs and ∂L/∂(module output) at the cached positions, from plain hooks and
    ``retain_grad``; L = mean NLL of the target tokens of each pass of ``per_pass`` requests."""
    keys = {m: [] for m in modules}
    grads = {m: [] for m in modules}
    for c0 in range(0, len(reqs), per_pass):
        chunk = reqs[c0 : c0 + per_pass]
        spans = target_spans(tok, [(r.prompt, r.target_new) for r in chunk])
        width = max(len(ids) for ids, _ in spans)
        ids = torch.full((len(spans), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (s, _) in enumerate(spans):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        seen = {}

        def hook_for(name):
            def hook(mod, args, out):
                out.retain_grad()
                seen[name] = (args[0], out)
            return hook

        handles = [model.get_submodule(m).register_forward_hook(hook_for(m)) for m in modules]
        try:
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)
            nll = [-logp[i, t - 1, s[t]] for i, (s, start) in enumerate(spans) for t in range(start, len(s))]
            torch.stack(nll).mean().backward()
        finally:
            for h in handles:
                h.remove()
        rows, cols = [], []
        for i, (s, start) in enumerate(spans):
            pos = range(0, len(s)) if token == "mask" else range(start - 1, len(s) - 1)
            rows += [i] * len(pos)
            cols += list(pos)
        for m in modules:
            k, v = seen[m]
            keys[m].append(k[rows, cols].detach().double())
            grads[m].append(v.grad[rows, cols].detach().double())
        model.zero_grad(set_to_none=True)
    return {m: torch.cat(keys[m]) for m in modules}, {m: torch.cat(grads[m]) for m in modules}


@pytest.mark.parametrize("token", ["ans", "mask"])
def test_cached_rows_equal_autograd_of_the_module_output(tiny, token):
    model, tok = tiny
    model.double()
    ed = _editor(model, tok, token=token, batch_size_once=3)  # passes of 3 and 1 requests
    got = ed.cache(REQS)
    keys, grads = _independent_rows(model, tok, REQS, ed.modules, token, per_pass=3)
    for m in ed.modules:
        assert got["keys"][m].shape == keys[m].shape
        assert torch.allclose(got["keys"][m], keys[m], rtol=0, atol=1e-12)
        assert float(grads[m].norm()) > 0
        assert _rel(got["grads"][m], grads[m]) < 1e-10
    # the anchor of each request is its last prompt token (it predicts the target's first token)
    spans = target_spans(tok, [(r.prompt, r.target_new) for r in REQS])
    n_rows = [len(s) if token == "mask" else len(s) - start for s, start in spans]
    offsets = np.cumsum([0] + n_rows[:-1])
    expect = [int(o) + (start - 1 if token == "mask" else 0) for o, (_, start) in zip(offsets, spans)]
    assert got["anchors"] == expect


def test_running_moments_equal_numpy_over_all_rows_so_far():
    g = np.random.default_rng(0)
    rm = RunningMoments(7)
    seen = []
    for b in (1, 5, 2, 17, 1, 40):  # a one-row batch first: σ is 0 until a second row comes
        x = 1e3 + g.normal(size=(b, 7)) * g.uniform(0.01, 10, size=7)  # far from 0: cancellation-prone
        rm.update(torch.from_numpy(x))
        seen.append(x)
        allx = np.concatenate(seen)
        assert rm.n == len(allx)
        np.testing.assert_allclose(rm.mean.numpy(), allx.mean(0), rtol=1e-13)
        if len(allx) > 1:
            np.testing.assert_allclose(rm.std.numpy(), allx.std(0, ddof=1), rtol=1e-9)
        else:
            assert float(rm.std.abs().max()) == 0.0


def test_editor_normaliser_is_shared_per_shape_and_lives_across_turns(tiny):
    model, tok = tiny
    ed = _editor(model, tok)
    rows: dict[tuple[int, int], list[torch.Tensor]] = {}
    for turn in (REQS[:1], REQS[1:3], REQS[3:]):
        ed.apply(turn)
        cache = ed._last["cache"]
        for m in ed.modules:
            rows.setdefault(ed.shape(m), []).append(torch.cat([cache["keys"][m], cache["grads"][m]], -1))
    assert len(ed.norms) == 2  # the two equal-shape modules pool their rows
    for shape, parts in rows.items():
        allx = torch.cat(parts).numpy()
        norm = ed.norms[shape]
        assert norm.n == len(allx)
        np.testing.assert_allclose(norm.mean.numpy(), allx.mean(0), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(norm.std.numpy(), allx.std(0, ddof=1), rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("token", ["ans", "mask"])  # ans: N < d_in (N×N system); mask: N > d_in
def test_written_update_equals_dense_ridge_solution(tiny, token):
    """After two turns, W_after − W_before = (KᵀK + λI)⁻¹KᵀV̂ with V̂ = −lr‖k̂‖²∇̂v, k̂ and ∇̂v
    normalised by numpy's mean and std over every row seen so far of the module's shape."""
    model, tok = tiny
    model.double()  # what is stored is ΔW itself, not a float32 rounding of W + ΔW
    lr, lam = 2e-2, 0.3
    ed = _editor(model, tok, token=token, lr=lr, ridge=lam)
    history: dict[tuple[int, int], list[torch.Tensor]] = {}

    def remember():
        cache = ed._last["cache"]
        for m in ed.modules:
            history.setdefault(ed.shape(m), []).append(torch.cat([cache["keys"][m], cache["grads"][m]], -1))

    ed.apply(REQS[:2])
    remember()
    before = {m: _weight_linear(model, m) for m in ed.modules}
    out = ed.apply(REQS[2:])
    remember()
    cache = ed._last["cache"]
    n_rows = cache["keys"][ed.modules[0]].shape[0]
    d_in = ed.shape(ed.modules[0])[0]
    assert (n_rows < d_in) == (token == "ans")
    for m in ed.modules:
        d_in, d_out = ed.shape(m)
        pool = torch.cat(history[(d_in, d_out)]).numpy()
        mu, sd = pool.mean(0), pool.std(0, ddof=1)
        k, g = cache["keys"][m].numpy(), cache["grads"][m].numpy()
        z = (np.concatenate([k, g], 1) - mu) / (sd + np.finfo(np.float32).eps)
        k_hat, g_hat = z[:, :d_in], z[:, d_in:]
        v_hat = -lr * (k_hat**2).sum(1, keepdims=True) * g_hat
        dense = np.linalg.inv(k.T @ k + lam * np.eye(d_in)) @ k.T @ v_hat  # (d_in, d_out)
        written = (_weight_linear(model, m) - before[m]).T  # (d_in, d_out)
        assert float(written.norm()) > 1e-6
        assert _rel(written, torch.from_numpy(dense)) < 1e-8, m
    assert sorted(out.changed_params) == sorted(m + ".weight" for m in ed.modules)
    # the rewrite module is traced at each request's last prompt token, δ = v̂ there
    (tr,) = out.traces
    rewrite = ed.modules[-1]
    assert tr.module == rewrite and tr.layer == 2 and tr.keys.shape[0] == len(REQS[2:])
    anchors = torch.tensor(cache["anchors"])
    assert torch.allclose(tr.keys.double(), cache["keys"][rewrite][anchors].float().double())
    assert torch.allclose(tr.residuals.double(), ed._last["targets"][rewrite][anchors].float().double())


@pytest.mark.parametrize("n", [5, 40])
def test_ridge_update_both_branches_equal_least_squares(n):
    """The N×N (push-through) and d×d branches against lstsq on [K; √λI] ΔW = [V̂; 0]."""
    g = torch.Generator().manual_seed(n)
    k = torch.randn(n, 12, generator=g, dtype=torch.float64) * 3
    v = torch.randn(n, 7, generator=g, dtype=torch.float64)
    lam = 0.5
    a = torch.cat([k, lam**0.5 * torch.eye(12, dtype=torch.float64)])
    b = torch.cat([v, torch.zeros(12, 7, dtype=torch.float64)])
    expect = torch.linalg.lstsq(a, b).solution
    assert _rel(ridge_update(k, v, lam), expect) < 1e-10


def test_restore_is_bit_identical_and_restarts_the_stream(tiny):
    model, tok = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tok("The capital of Zorbia is Quix", return_tensors="pt")
    with torch.no_grad():
        logits0 = model(**ids).logits.clone()
    ed = _editor(model, tok, lr=5e-2)
    for turn in (REQS[:2], REQS[2:3], REQS[3:]):
        ed.apply(turn)
    with torch.no_grad():
        assert not torch.equal(model(**ids).logits, logits0)
    ed.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, logits0)
    assert ed.norms == {} and ed.turns == 0
    # a fresh stream: the same turn writes what a new editor on the original model writes
    ed.apply(REQS[:2])
    after_restore = {m: _weight_linear(model, m) for m in ed.modules}
    ed.restore()
    fresh = _editor(model, tok, lr=5e-2)
    fresh.apply(REQS[:2])
    for m in ed.modules:
        assert torch.equal(_weight_linear(model, m), after_restore[m])
    fresh.restore()


def test_sites_defaults_and_bad_modules(tiny):
    model, tok = tiny
    ed = _editor(model, tok)
    sites = ed.sites()
    assert [s.module for s in sites] == ed.modules and all(s.second_moment == "identity" for s in sites)
    assert [s.layer for s in sites] == [1, 2, 2]
    rule = UltraEdit(model, tok, UltraEditHparams(), RunContext())  # 4 layers: the depth rule
    if _family(model) == "llama":
        assert rule.modules == ["model.layers.1.mlp.gate_proj", "model.layers.2.mlp.gate_proj",
                                "model.layers.2.mlp.up_proj", "model.layers.3.mlp.up_proj"]
    else:
        assert rule.modules == ["transformer.h.3.mlp.c_proj"]
    with pytest.raises(ValueError, match="no module"):
        UltraEdit(model, tok, UltraEditHparams(inner_params=["transformer.h.9.mlp.nope"]), RunContext())
    assert ed.provenance()["semantics"].startswith("paper")


def test_sequential_run_with_diagnostics(zsre_file, tmp_path):
    """knowbench run: sequential turns of 2 edits; the rewrite module's traces feed the diagnostics."""
    from knowbench.runconfig import RunConfig
    from knowbench.runner import run

    hp = tmp_path / "ue.yaml"
    hp.write_text(json.dumps({"inner_params": ["transformer.h.2.mlp.c_proj", "transformer.h.3.mlp.c_proj"],
                              "lr": 1e-3}))
    r = run(RunConfig(editor="ultraedit", task="zsre", data=str(zsre_file), model="random-gpt2", limit=4,
                      sequential=4, batch_size=2, eval_timing="final", fluency=False, curve_every=0,
                      hparams=str(hp)))
    assert r["editor"]["provenance"]["modules"] == ["transformer.h.2.mlp.c_proj", "transformer.h.3.mlp.c_proj"]
    assert [e["turn"] for e in r["edits"]] == [1, 2]
    summary = r["diagnostics"]["summary"]
    assert summary["edited_layers"] == [2, 3]
    assert summary["layers"]["3"]["n_edit_keys"] == 4
