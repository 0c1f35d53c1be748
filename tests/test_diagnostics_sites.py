"""Weight diagnostics keyed on the modules an editor's sites() name, not only each layer's rewrite
module: keys are the input of THAT module (checked against a plain hook on a lone forward pass),
the observed interference equals ‖ΔW k‖ / ‖W_0 k‖ computed by hand for a known ΔW, two sites on one
layer are two entries, the key memo is reused only where no change can have moved it, and the
observer pickles (run checkpoints). GPT-2 (Conv1D) and Llama (Linear) layouts."""

from __future__ import annotations

import io
import json
import logging
import pickle

import pytest
import torch

from knowbench.arch import ArchAdapter
from knowbench.diagnostics import DiagnosticsConfig, EditDiagnostics, ProbeItem, capture_inputs, for_run
from knowbench.editor import EditOutcome, EditRequest, LayerTrace, RunContext, Site, WeightEditor
from knowbench.keys import subject_index

# one non-rewrite module per family (Llama's up_proj, GPT-2's c_fc), and two modules of one layer
ONE = {"gpt2": "transformer.h.1.mlp.c_fc", "llama": "model.layers.1.mlp.up_proj"}
TWO = {"gpt2": ["transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"],
       "llama": ["model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj"]}

PROBES = [ProbeItem("The rank of Zorb0 is", "Zorb0"), ProbeItem("Who wrote poem 1?", None),
          ProbeItem("A much longer prompt about Quux the great is", "Quux")]
REQS = [[EditRequest("Which family does Zorb0 belong to?", "Noct", "Zorb0", record_index=0)],
        [EditRequest("Mirvo Talen works as a", "baker", "Mirvo Talen", record_index=1)],
        [EditRequest("Where was Oskel born? In", "Pradu", "Oskel", record_index=2)]]


def _family(model) -> str:
    return "gpt2" if model.config.model_type == "gpt2" else "llama"


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])


def _linear(model, name: str) -> torch.Tensor:
    """W (d_out, d_in) whatever the storage: Linear as is, Conv1D transposed."""
    mod = model.get_submodule(name)
    w = mod.weight.detach().double().clone()
    return w if isinstance(mod, torch.nn.Linear) else w.T


def _hooked_key(model, tok, name: str, prompt: str, subject: str | None) -> torch.Tensor:
    """The module's input at the key position, from a plain hook on a lone forward pass."""
    ids = tok(prompt, return_tensors="pt").input_ids
    pos = subject_index(tok, prompt, subject) if subject else ids.shape[1] - 1
    seen = {}

    def hook(mod, args, out) -> None:  # returns None: the module's output stays as it is
        seen.setdefault("k", args[0][0, pos].detach())

    h = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        h.remove()
    return seen["k"].double()


class RankOne(WeightEditor):
    """A toy editor: W += a bᵀ (seeded, known) at each named module, in the module's own storage
    layout; one Site per module; optionally a trace at the modules in ``traced``."""

    name = "rank-one"
    hparams_cls = dict

    def __init__(self, model, tok, modules: list[str], traced: tuple[str, ...] = (), scale: float = 0.3):
        super().__init__(model, tok, {}, RunContext())
        self.modules, self.traced, self.scale = modules, traced, scale
        self.gen = torch.Generator().manual_seed(3)
        self.updates: list[dict[str, torch.Tensor]] = []  # ΔW (d_out, d_in) of every apply

    def sites(self):
        return [Site(_layer_of(m), m, m + ".weight") for m in self.modules]

    def apply(self, requests):
        done, traces = {}, []
        for m in self.modules:
            w = _linear(self.model, m)
            a = torch.randn(w.shape[0], 1, generator=self.gen, dtype=torch.float64)
            b = torch.randn(w.shape[1], 1, generator=self.gen, dtype=torch.float64)
            dw = self.scale * (a @ b.T) / (a.norm() * b.norm()) * w.norm() / w.shape[0] ** 0.5
            p = self.param(m + ".weight")
            with torch.no_grad():
                p.add_((dw if isinstance(self.model.get_submodule(m), torch.nn.Linear) else dw.T).to(p.dtype))
            done[m] = dw
            if m in self.traced:
                k = torch.stack([_hooked_key(self.model, self.tok, m, r.prompt, r.subject) for r in requests])
                traces.append(LayerTrace(_layer_of(m), m, k, None, (k @ dw.T)))
        self.updates.append(done)
        return EditOutcome([m + ".weight" for m in self.modules], traces)


@pytest.fixture
def tiny64(tiny):
    model, tok = tiny
    return model.double(), tok


def test_a_non_rewrite_site_is_diagnosed_at_its_own_module(tiny64):
    """ΔW at up_proj / c_fc: probe keys are that module's inputs and the observed interference on
    probes and on earlier edits is ‖ΔW k‖ / ‖W k‖ computed by hand."""
    model, tok = tiny64
    m = ONE[_family(model)]
    editor = RankOne(model, tok, [m])
    diag = for_run(model, tok, editor.sites(), [r for req in REQS for r in req], PROBES, sequential=True)
    assert list(diag.layers) == [m] and diag.watch == [1]  # not the rewrite module of layer 1
    st = diag.layers[m]
    keys = torch.stack([_hooked_key(model, tok, m, p.prompt, p.subject) for p in PROBES])
    torch.testing.assert_close(st.probe_keys.double(), keys, rtol=1e-10, atol=1e-12)
    w0 = _linear(model, m)
    edit_keys = []
    try:
        for t, req in enumerate(REQS):
            entry = diag.after_apply(req, editor.apply(req))
            (lay,) = entry["layers"]
            assert lay["module"] == m and lay["layer"] == 1 and lay["keys"] == "captured"
            dw_total = sum(u[m] for u in editor.updates)
            want = (keys @ dw_total.T).norm(dim=1) / (keys @ w0.T).norm(dim=1)
            torch.testing.assert_close(st.last_obs, want, rtol=1e-9, atol=1e-12)
            assert lay["interference"]["probes"]["observed"]["max"] == pytest.approx(float(want.max()), rel=1e-5)
            # the edit's own key at the module, read independently; drift of earlier edits' values
            edit_keys.append(_hooked_key(model, tok, m, req[0].prompt, req[0].subject))
            if t:
                w_now = _linear(model, m)
                w_prev = w_now - editor.updates[-1][m]
                k = torch.stack(edit_keys[:-1])
                # W_j k_j right after edit j, and the drift of every later update
                w_after = [w0 + sum(u[m] for u in editor.updates[: j + 1]) for j in range(t)]
                base = torch.stack([(w_after[j] @ k[j]).norm() for j in range(t)])
                drift = torch.stack([((w_now - w_after[j]) @ k[j]).norm() for j in range(t)]) / base
                got = lay["interference"]["earlier"]["observed"]
                assert got["n"] == t and got["max"] == pytest.approx(float(drift.max()), rel=1e-5)
                assert got["mean"] == pytest.approx(float(drift.mean()), rel=1e-5)
                assert w_prev.shape == w0.shape
        info = diag.summary()["layers"]["1"]
        assert info["module"] == m and info["layer"] == 1 and info["rewrite_module"] is False
        assert info["n_edit_keys"] == 3
    finally:
        editor.restore()


def test_two_sites_on_one_layer_are_two_entries(tiny64):
    """gate_proj + up_proj (Llama) / c_fc + c_proj (GPT-2) at layer 2: both reported, each against
    its own ΔW; a trace naming a module goes to that module's unit, the other's keys are captured."""
    model, tok = tiny64
    mods = TWO[_family(model)]
    editor = RankOne(model, tok, mods, traced=(mods[1],))
    diag = for_run(model, tok, editor.sites(), [], PROBES, sequential=True)
    assert diag.watch == [2] and len(diag.layers) == 2
    keys = {m: torch.stack([_hooked_key(model, tok, m, p.prompt, p.subject) for p in PROBES]) for m in mods}
    w0 = {m: _linear(model, m) for m in mods}
    try:
        for req in REQS[:2]:
            entry = diag.after_apply(req, editor.apply(req))
            assert [lay["module"] for lay in entry["layers"]] == mods
            assert [lay["keys"] for lay in entry["layers"]] == ["captured", "trace"]
        s = diag.summary()
        assert list(s["layers"]) == mods  # several units at one layer: keyed by module name
        assert s["edited_layers"] == [2] and s["edited_modules"] == mods and s["watched_layers"] == [2]
        for m in mods:
            dw = editor.updates[0][m] + editor.updates[1][m]
            want = (keys[m] @ dw.T).norm(dim=1) / (keys[m] @ w0[m].T).norm(dim=1)
            fin = s["layers"][m]["interference"]["final"]["observed"]
            assert fin["mean"] == pytest.approx(float(want.mean()), rel=1e-5)
            assert fin["max"] == pytest.approx(float(want.max()), rel=1e-5)
            assert s["layers"][m]["layer"] == 2
        # the table names each module; an existing reader (the runner's printout) copes
        from rich.console import Console

        from knowbench.diagnostics import diagnostics_table

        buf = io.StringIO()
        Console(file=buf, width=80).print(diagnostics_table({"diagnostics": diag.result()}))
        shown = buf.getvalue()
        for m in mods:
            assert f"2 {m.rsplit('.', 1)[-1]}" in shown
        json.dumps(diag.result())
    finally:
        editor.restore()


def test_editor_without_sites_watches_every_rewrite_layer(tiny, caplog):
    model, tok = tiny
    ad = ArchAdapter(model)
    editor = RankOne(model, tok, [ad.rewrite_name(3), ONE[_family(model)]])
    diag = for_run(model, tok, [], [], PROBES, sequential=True)
    assert diag.watch == list(range(ad.n_layers)) and list(diag.layers) == list(range(ad.n_layers))
    assert all(st.module == ad.rewrite_name(l) for l, st in diag.layers.items())
    try:
        with caplog.at_level(logging.WARNING, logger="knowbench"):
            entry = diag.after_apply(REQS[0], editor.apply(REQS[0]))
        assert [(lay["layer"], lay["module"]) for lay in entry["layers"]] == [(3, ad.rewrite_name(3))]
        assert "not among the watched sites" in caplog.text and ONE[_family(model)] in caplog.text
        s = diag.summary()
        assert list(s["layers"]) == ["3"] and s["edited_layers"] == [3] and s["layers"]["3"]["rewrite_module"]
    finally:
        editor.restore()


def test_trace_without_module_goes_to_the_rewrite_site(tiny):
    model, tok = tiny
    ad = ArchAdapter(model)
    sites = [Site(1, ONE[_family(model)], ONE[_family(model)] + ".weight"),
             Site(1, ad.rewrite_name(1), ad.rewrite_param_name(1), second_moment="identity")]
    diag = EditDiagnostics(model, tok, PROBES, sites=sites)
    k = torch.randn(1, ad.key_dim(1))
    assert diag._trace_unit(LayerTrace(1, "", k)) == 1  # per-layer trace: the rewrite module
    assert diag._trace_unit(LayerTrace(1, ONE[_family(model)], k)) == ONE[_family(model)]
    assert diag._trace_unit(LayerTrace(2, ad.rewrite_name(2), k)) is None  # a module not watched
    assert diag.moments(1) == "identity" and diag.moments(ONE[_family(model)] + ".weight") is None


def test_key_memo_is_reused_only_where_no_change_moves_the_keys(tiny):
    """The forward-order rule on both layouts, and the memo against fresh captures after a change
    that moves the keys (attention below the module) and one that cannot (a later module)."""
    model, tok = tiny
    fam = _family(model)
    ad = ArchAdapter(model)
    m = ONE[fam]
    L = "model.layers" if fam == "llama" else "transformer.h"
    attn = f"{L}.1.self_attn.o_proj.weight" if fam == "llama" else f"{L}.1.attn.c_attn.weight"
    sibling_before = f"{L}.1.mlp.gate_proj.weight" if fam == "llama" else f"{L}.1.ln_2.weight"
    editor = RankOne(model, tok, [m])
    diag = EditDiagnostics(model, tok, PROBES, sites=editor.sites())
    diag.run_items = [(r.prompt, r.subject) for req in REQS for r in req]

    def unmoved(*params):
        diag._changed = set(params)
        return diag._keys_unmoved(m)

    assert unmoved(m + ".weight", ad.rewrite_param_name(1), f"{L}.2.mlp.up_proj.weight" if fam == "llama"
                   else f"{L}.2.attn.c_attn.weight")  # itself, later in the block, a later block
    assert not unmoved(attn) and not unmoved(sibling_before) and not unmoved(f"{L}.0.mlp.{'down_proj' if fam == 'llama' else 'c_proj'}.weight")
    assert not unmoved("no.such.param")
    if fam == "gpt2":  # the LM head is tied to the token embedding, which every key depends on
        assert not unmoved("lm_head.weight")
    else:  # gate_proj is called before up_proj: conservative for up_proj, safe the other way round
        g = EditDiagnostics(model, tok, [], sites=[Site(1, f"{L}.1.mlp.gate_proj", f"{L}.1.mlp.gate_proj.weight")])
        g._changed = {m + ".weight"}
        assert g._keys_unmoved(f"{L}.1.mlp.gate_proj")
    items = [(REQS[2][0].prompt, REQS[2][0].subject)]
    try:
        diag._changed = set()
        diag.after_apply(REQS[0], editor.apply(REQS[0]))  # fills the memo, changes m only
        fresh = capture_inputs(model, tok, items, [m])[m]
        torch.testing.assert_close(diag._edit_keys(items, [m])[m], fresh)
        assert len(diag._key_memo) == 3
        w = model.get_parameter(attn)
        saved = w.detach().clone()
        with torch.no_grad():
            w.mul_(1.5)
        diag._changed.add(attn)
        fresh = capture_inputs(model, tok, items, [m])[m]
        assert not torch.allclose(fresh, diag._key_memo[items[0]][m])
        torch.testing.assert_close(diag._edit_keys(items, [m])[m], fresh)
        with torch.no_grad():
            w.copy_(saved)
    finally:
        editor.restore()


def test_ultraedit_sites_are_diagnosed_and_observed_exactly(tiny64):
    """UltraEdit's default Llama rule writes gate_proj / up_proj (two on one layer); every written
    module is diagnosed, and the observed interference equals ‖ΔW k‖/‖W_0 k‖ with the editor's ΔW."""
    from knowbench.editors.ultraedit import UltraEdit, UltraEditHparams

    model, tok = tiny64
    hp = UltraEditHparams(lr=1e-2, token="mask")
    if _family(model) == "gpt2":  # the rule edits only c_proj there: name a c_fc too
        hp.inner_params = ["transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj", "transformer.h.3.mlp.c_proj"]
    ed = UltraEdit(model, tok, hp, RunContext())
    diag = for_run(model, tok, ed.sites(), [], PROBES, sequential=True)
    assert [st.module for st in diag.layers.values()] == ed.modules
    keys = {m: torch.stack([_hooked_key(model, tok, m, p.prompt, p.subject) for p in PROBES]) for m in ed.modules}
    w0 = {m: _linear(model, m) for m in ed.modules}
    try:
        reqs = [r for req in REQS for r in req]
        diag.after_apply(reqs, ed.apply(reqs))
        s = diag.summary()
        assert s["edited_modules"] == ed.modules
        for m in ed.modules:
            dw = ed._last["deltas"][m].T  # (d_in, d_out) -> (d_out, d_in)
            torch.testing.assert_close(_linear(model, m) - w0[m], dw, rtol=1e-8, atol=1e-12)
            want = (keys[m] @ dw.T).norm(dim=1) / (keys[m] @ w0[m].T).norm(dim=1)
            key = next(k for k, info in s["layers"].items() if info["module"] == m)
            assert s["layers"][key]["interference"]["final"]["observed"]["max"] == pytest.approx(float(want.max()), rel=1e-5)
            assert s["layers"][key]["interference"]["final"]["observed"]["mean"] > 0
        if _family(model) == "llama":
            assert set(s["layers"]) == {"1", "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj", "3"}
    finally:
        ed.restore()


def test_observer_pickles(tiny):
    """Run checkpoints pickle the observer: look-ups are module-level callables, not closures."""
    model, tok = tiny
    mods = TWO[_family(model)]
    editor = RankOne(model, tok, mods)
    try:
        for sites in (editor.sites(), []):
            diag = for_run(model, tok, sites, [r for req in REQS for r in req], PROBES, sequential=True)
            diag.after_apply(REQS[0], editor.apply(REQS[0]))
            copy = pickle.loads(pickle.dumps(diag))
            drop = lambda s: {k: v for k, v in s.items() if k != "timing"}  # noqa: E731
            assert drop(copy.summary()) == drop(diag.summary())
            editor.restore()
        plain = EditDiagnostics(model, tok, PROBES, [1], config=DiagnosticsConfig(sequential=False))
        assert pickle.loads(pickle.dumps(plain)).moments(1) is None
    finally:
        editor.restore()
