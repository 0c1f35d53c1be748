"""Per-edit diagnostics on tiny random models: key capture, closed-form agreement, protocols, runner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from knowbench import superposition as S
from knowbench.arch import ArchAdapter
from knowbench.diagnostics import (
    DiagnosticsConfig,
    EditDiagnostics,
    ProbeItem,
    capture_keys,
)
from knowbench.editor import EditContext, EditOutcome, EditRequest, LayerTrace, Site, WeightEditor
from knowbench.evaluation import EvalConfig, RecordScores
from knowbench.records import EditRecord, Probe
from knowbench.tasks.families import QAFamily

LAYER = 1


def locality_probes(records):
    """The probe keys the QA family gives the diagnostics: one per locality item."""
    return QAFamily(None, EvalConfig()).probes(records)


def editor_layers(editor):
    return [site.layer for site in editor.sites()]


def _moment(model, tok, layer: int) -> torch.Tensor:
    """C from keys of every position of a few texts (enough tokens for a full-rank C)."""
    texts = [f"Text number {i} talks about Zorb{i} and the Noct family of owls." * 2 for i in range(24)]
    keys = capture_keys(model, tok, [(t, None) for t in texts], [layer])[layer]
    # every-position keys would be better; last-token keys plus a small ridge are enough for tests
    c = keys.double().T @ keys.double() / len(keys)
    return c + 1e-2 * torch.eye(c.shape[0], dtype=torch.float64) * torch.diagonal(c).mean()


class ClosedForm(WeightEditor):
    """A test editor: the lifelong closed form at one layer, v* = W k + a seeded random δ."""

    name = "closed-form"
    hparams_cls = dict
    supports_batch = False

    def __init__(self, model, tok, C: torch.Tensor, layer: int = LAYER, scale: float = 2.0, written: float = 1.0):
        super().__init__(model, tok, {}, EditContext())
        self.layer, self.C, self.scale = layer, C, scale
        self.written = written  # < 1: writes only part of δ, like MEMIT's λ-regularised solve
        self.whitener = S.Whitener.from_moment(C)
        self.gen = torch.Generator().manual_seed(0)

    def second_moment(self, layer: int):
        return self.C if layer == self.layer else None

    def sites(self):
        a = self.adapter
        return [Site(self.layer, a.rewrite_name(self.layer), a.rewrite_param_name(self.layer), second_moment=self.C)]

    def apply(self, requests):
        (req,) = requests
        name = self.adapter.rewrite_param_name(self.layer)
        self.param(name)
        k = capture_keys(self.model, self.tok, [(req.prompt, req.subject)], [self.layer])[self.layer][0].double()
        W = self.adapter.rewrite_weight(self.layer).detach().double()
        v = W @ k + self.scale * torch.randn(W.shape[0], generator=self.gen, dtype=torch.float64)
        dW, delta = S.rank_one_update(W, k, v, self.whitener)
        self.adapter.add_to_rewrite_weight(self.layer, self.written * dW)
        trace = LayerTrace(self.layer, self.adapter.rewrite_name(self.layer), k[None], v[None], delta[None])
        return EditOutcome([name], [trace])


class Perturb(WeightEditor):
    """A fine-tuning stand-in: changes the rewrite weight, reports no traces."""

    name = "perturb"
    hparams_cls = dict

    def __init__(self, model, tok, layer: int = LAYER):
        super().__init__(model, tok, {}, EditContext())
        self.layer = layer
        self.gen = torch.Generator().manual_seed(1)

    def sites(self):
        a = self.adapter
        return [Site(self.layer, a.rewrite_name(self.layer), a.rewrite_param_name(self.layer))]

    def apply(self, requests):
        name = self.adapter.rewrite_param_name(self.layer)
        self.param(name)
        W = self.adapter.rewrite_weight(self.layer)
        self.adapter.add_to_rewrite_weight(self.layer, 0.01 * torch.randn(W.shape, generator=self.gen))
        return EditOutcome([name])


def _records(n: int) -> list[EditRecord]:
    return [
        EditRecord(
            index=10 + i, source="t", prompt=f"Which family does Zorb{i} belong to?", target_new=f"Noct{i}",
            subject=f"Zorb{i}",
            locality={"Relation_Specificity": [Probe(f"The rank of Zorb{i} is", "genus"),
                                               Probe(f"Who wrote poem {i}?", "Ann")]},
        )
        for i in range(n)
    ]


def _requests(records):
    return [[EditRequest(r.prompt, r.target_new, r.subject, record_index=r.index)] for r in records]


@pytest.fixture
def tiny64(tiny):
    model, tok = tiny
    return model.double(), tok


@pytest.fixture
def gpt2_64():
    from knowbench.models import prepare_tokenizer, tiny_random_model

    model, tok = tiny_random_model("gpt2")
    prepare_tokenizer(tok)
    return model.double(), tok


# -- probes and keys ------------------------------------------------------------------------------
def test_locality_probes_name_subject_and_owner():
    probes = locality_probes(_records(2))
    assert probes[0] == ProbeItem("The rank of Zorb0 is", "Zorb0", 10, "Relation_Specificity", 0)
    assert probes[1] == ProbeItem("Who wrote poem 0?", None, 10, "Relation_Specificity", 1)
    assert [p.record for p in probes] == [10, 10, 11, 11]


def test_capture_keys_match_one_prompt_at_a_time(tiny):
    """Batched capture (padding, BOS, several layers) equals a hook on a lone forward pass."""
    from knowbench.keys import subject_index

    model, tok = tiny
    adapter = ArchAdapter(model)
    items = [("The rank of Zorb0 is", "Zorb0"), ("A much longer prompt about Quux the great is", "Quux"),
             ("Who wrote it?", None)]
    got = capture_keys(model, tok, items, [0, 2], batch_size=8)
    for i, (prompt, subj) in enumerate(items):
        ids = tok(prompt, return_tensors="pt").input_ids
        pos = subject_index(tok, prompt, subj) if subj else ids.shape[1] - 1
        seen = {}
        hooks = [adapter.rewrite_module(l).register_forward_hook(
            lambda m, a, o, l=l: seen.__setitem__(l, a[0][0, pos].detach())) for l in (0, 2)]
        with torch.no_grad():
            model(input_ids=ids)
        for h in hooks:
            h.remove()
        for l in (0, 2):
            torch.testing.assert_close(got[l][i], seen[l].float(), rtol=1e-4, atol=1e-5)


def test_diagnostics_watch_the_editors_sites(tiny):
    """The diagnostics read only what an editor declares in sites(): its layers, and C there."""
    from knowbench.diagnostics import for_run

    model, tok = tiny
    recs = _records(2)
    diag = for_run(model, tok, Perturb(model, tok, layer=2).sites(), recs, locality_probes(recs), sequential=True)
    assert diag.watch == [2] and diag.moments(2) is None
    diag = for_run(model, tok, [], recs, locality_probes(recs), sequential=True)  # names none: every layer
    assert diag.watch == list(range(ArchAdapter(model).n_layers))


# -- the closed form ----------------------------------------------------------------------------------
def test_sequential_closed_form_prediction_matches_observation(tiny64):
    model, tok = tiny64
    C = _moment(model, tok, LAYER)
    recs = _records(6)
    editor = ClosedForm(model, tok, C)
    diag = EditDiagnostics(model, tok, locality_probes(recs), [LAYER], moments=editor.second_moment,
                           config=DiagnosticsConfig(sequential=True))
    w = S.Whitener.from_moment(C)
    probe_keys = diag.layers[LAYER].probe_keys
    for t, req in enumerate(_requests(recs)):
        out = editor.apply(req)
        entry = diag.after_apply(req, out)
        (lay,) = entry["layers"]
        inter = lay["interference"]["probes"]
        assert inter["observed"]["mean"] > 0
        assert inter["predicted"]["mean"] == pytest.approx(inter["observed"]["mean"], rel=1e-5)
        assert inter["predicted"]["max"] == pytest.approx(inter["observed"]["max"], rel=1e-5)
        if t:
            e = lay["interference"]["earlier"]
            assert e["observed"]["n"] == t
            assert e["predicted"]["mean"] == pytest.approx(e["observed"]["mean"], rel=1e-5)
        # the per-edit p summary equals a dense computation
        k = out.traces[0].keys
        Cinv = torch.linalg.inv(C)
        p = (k @ Cinv @ probe_keys.T) / (k @ Cinv @ k.T)
        row = lay["edits"][0]
        assert row["p_probes"]["mean_abs"] == pytest.approx(float(p.abs().mean()), rel=1e-5)
        assert row["p_probes"]["max_abs"] == pytest.approx(float(p.abs().max()), rel=1e-5)
        assert row["p_earlier"]["n"] == t
        assert row["delta_norm"] == pytest.approx(float(out.traces[0].residuals.norm()), rel=1e-5)
        assert row["record"] == recs[t].index
    st = diag.layers[LAYER]
    np.testing.assert_allclose(st.last_pred.numpy(), st.last_obs.numpy(), rtol=1e-5)
    assert st.keys.n == 6 and w.dim == C.shape[0]
    s = diag.summary()
    info = s["layers"][str(LAYER)]
    assert info["interference"]["agreement"]["max_rel_error"] < 1e-5
    g = info["interference"]["growth"]["observed"]
    assert g["n_points"] == 6 and g["linear"]["slope"] is not None
    assert s["accumulating"] and s["probes"]["n"] == 12
    assert s["probes"]["key_position"] == {"subject_last": 6, "prompt_last": 6}
    json.dumps(diag.result())  # JSON-serialisable


def test_prediction_uses_what_the_edit_wrote(gpt2_64):
    """An update of the closed form's shape that writes only part of δ (MEMIT-like) is still predicted
    exactly, with δ' = (W_after − W_before)k."""
    model, tok = gpt2_64
    C = _moment(model, tok, LAYER)
    recs = _records(4)
    editor = ClosedForm(model, tok, C, written=0.3)
    diag = EditDiagnostics(model, tok, locality_probes(recs), [LAYER], moments=editor.second_moment)
    for req in _requests(recs):
        e = diag.after_apply(req, editor.apply(req))
        row = e["layers"][0]["edits"][0]
        assert row["written_norm"] == pytest.approx(0.3 * row["delta_norm"], rel=1e-5)
        inter = e["layers"][0]["interference"]
        assert inter["probes"]["predicted"]["mean"] == pytest.approx(inter["probes"]["observed"]["mean"], rel=1e-5)
    assert inter["earlier"]["predicted"]["max"] == pytest.approx(inter["earlier"]["observed"]["max"], rel=1e-5)


def test_probe_file_and_options(gpt2_64, tmp_path):
    from knowbench.diagnostics import for_run

    model, tok = gpt2_64
    f = tmp_path / "probes.json"
    f.write_text(json.dumps([{"prompt": "The capital of Zorb is", "subject": "Zorb"},
                             {"requested_rewrite": {"prompt": "{} plays the", "subject": "Quux"}}]))
    editor = Perturb(model, tok)
    recs = _records(2)
    diag = for_run(model, tok, editor.sites(), recs, locality_probes(recs), sequential=True, options={"probes": str(f)})
    assert [p.subject for p in diag.probes] == ["Zorb", "Quux"] and diag.probes[0].record is None
    assert diag.probe_source == f"file {f}" and diag.watch == [LAYER]
    with pytest.raises(ValueError, match="unknown diagnostics option"):
        for_run(model, tok, editor.sites(), recs, locality_probes(recs), sequential=True, options={"probe": "x"})


def test_single_protocol_interference_is_per_edit(tiny64):
    model, tok = tiny64
    C = _moment(model, tok, LAYER)
    recs = _records(3)
    editor = ClosedForm(model, tok, C)
    diag = EditDiagnostics(model, tok, locality_probes(recs), [LAYER], moments=editor.second_moment,
                           config=DiagnosticsConfig(sequential=False))
    means = []
    for req in _requests(recs):
        out = editor.apply(req)
        entry = diag.after_apply(req, out)
        inter = entry["layers"][0]["interference"]
        assert "earlier" not in inter  # restored weights: no earlier edits in the model
        assert inter["probes"]["predicted"]["mean"] == pytest.approx(inter["probes"]["observed"]["mean"], rel=1e-5)
        means.append(inter["probes"]["observed"]["mean"])
        editor.restore()
    # p against earlier edits is still reported (as overlap), interference is not accumulated
    assert entry["layers"][0]["edits"][0]["p_earlier"]["n"] == 2
    assert "growth" not in diag.summary()["layers"][str(LAYER)]["interference"]


def test_auroc_pairs_each_probe_with_its_locality_item(gpt2_64):
    model, tok = gpt2_64
    C = _moment(model, tok, LAYER)
    recs = _records(6)
    editor = ClosedForm(model, tok, C)
    probes = locality_probes(recs)
    diag = EditDiagnostics(model, tok, probes, [LAYER], moments=editor.second_moment,
                           config=DiagnosticsConfig(sequential=False))
    for req in _requests(recs):
        diag.after_apply(req, editor.apply(req))
        editor.restore()
    at = diag.layers[LAYER].at_eval
    assert sorted(at) == list(range(len(probes)))
    # flips exactly where the interference is above its median: a perfect predictor
    med = np.median([o for o, _ in at.values()])
    post = {}
    for j, p in enumerate(probes):
        vals = post.setdefault(p.record, RecordScores(p.record, {"locality": {p.key: [1.0, 1.0]}})).values
        vals["locality"][p.key][p.item] = 0.5 if at[j][0] > med else 1.0
    a = diag.summary(list(post.values()))["auroc"]
    assert a["observed"] == 1.0 and a["n_flipped"] == 6 and a["n_kept"] == 6
    # the opposite labelling gives 0
    for s in post.values():
        s.values["locality"]["Relation_Specificity"] = [1.5 - v for v in s.values["locality"]["Relation_Specificity"]]
    assert diag.summary(post)["auroc"]["observed"] == 0.0


def test_editor_without_traces_gets_observed_interference_only(tiny):
    model, tok = tiny
    recs = _records(3)
    editor = Perturb(model, tok)
    diag = EditDiagnostics(model, tok, locality_probes(recs), editor_layers(editor),
                           config=DiagnosticsConfig(sequential=True))
    entries = [diag.after_apply(req, editor.apply(req)) for req in _requests(recs)]
    for t, e in enumerate(entries):
        (lay,) = e["layers"]
        assert lay["keys"] == "captured" and "predicted" not in lay["interference"]["probes"]
        assert lay["interference"]["probes"]["observed"]["mean"] > 0
        assert ("earlier" in lay["interference"]) == (t > 0)
        assert "p_probes" not in lay["edits"][0]
    assert entries[-1]["layers"][0]["interference"]["earlier"]["observed"]["n"] == 2
    # the observed value is exact: recompute from the weights
    st = diag.layers[LAYER]
    W_t = ArchAdapter(model).rewrite_weight(LAYER).detach()
    W_0 = st.w0
    direct = ((st.probe_keys @ (W_t - W_0).T).norm(dim=1) / (st.probe_keys @ W_0.T).norm(dim=1)).double()
    torch.testing.assert_close(st.last_obs, direct, rtol=1e-4, atol=1e-7)


def test_no_probes_is_handled(gpt2_64):
    model, tok = gpt2_64
    C = _moment(model, tok, LAYER)
    editor = ClosedForm(model, tok, C)
    diag = EditDiagnostics(model, tok, [], [LAYER], moments=editor.second_moment)
    recs = _records(2)
    for req in _requests(recs):
        e = diag.after_apply(req, editor.apply(req))
    assert e["layers"][0]["interference"]["probes"]["observed"] == {"n": 0}
    assert e["layers"][0]["interference"]["earlier"]["predicted"]["n"] == 1
    assert diag.summary()["auroc"]["n_flipped"] == 0


def test_missing_moment_is_a_warning_not_a_crash(gpt2_64):
    model, tok = gpt2_64
    C = _moment(model, tok, LAYER)
    editor = ClosedForm(model, tok, C)
    diag = EditDiagnostics(model, tok, locality_probes(_records(1)), [LAYER])  # no C given
    (req,) = _requests(_records(1))
    e = diag.after_apply(req, editor.apply(req))
    lay = e["layers"][0]
    assert "p_probes" not in lay["edits"][0] and "predicted" not in lay["interference"]["probes"]
    assert lay["interference"]["probes"]["observed"]["mean"] > 0
    assert "no second moment" in diag.summary()["layers"][str(LAYER)]["whitening"]["error"]


# -- through the runner -------------------------------------------------------------------------------
def test_runner_stores_diagnostics_and_can_switch_them_off(zsre_file, tmp_path):
    from knowbench.runner import RunConfig, run

    hp = tmp_path / "ft.yaml"
    hp.write_text("num_steps: 2\n")  # the plumbing is under test, not fine-tuning
    base = dict(editor="ft-m", task="zsre", data=str(zsre_file), model="random-gpt2", fluency=False, hparams=str(hp))
    r = run(RunConfig(**base, sequential=3, extra={"diagnostics": {"max_probes": 2}}))
    d = r["diagnostics"]
    assert len(d["edits"]) == 3 and [e["n_edits"] for e in d["edits"]] == [1, 2, 3]
    assert d["summary"]["probes"]["n"] == 2 and "seeded sample of 2 of 3" in d["summary"]["probes"]["source"]
    (layer,) = d["summary"]["edited_layers"]
    assert d["summary"]["layers"][str(layer)]["interference"]["final"]["observed"]["n"] == 2
    assert d["summary"]["timing"]["fraction_of_edit_time"] is not None
    json.dumps(d)
    import io

    from rich.console import Console

    from knowbench.report import print_result

    buf = io.StringIO()
    print_result(r, Console(file=buf, width=80))
    shown = buf.getvalue()
    assert "Superposition diagnostics" in shown and "interf. obs/pred" in shown and "AUROC" in shown
    assert max(len(line) for line in shown.splitlines()) <= 80
    r = run(RunConfig(**base, limit=2, diagnostics=False))
    assert "diagnostics" not in r


def test_edit_keys_of_a_run_are_captured_once_and_stay_exact(tiny):
    """Editors without traces: the run's prompts are keyed in one batch and reused while the changed
    weights cannot move the keys; after a change below the key's layer they are read afresh."""
    model, tok = tiny
    recs = _records(4)
    editor = Perturb(model, tok)
    diag = EditDiagnostics(model, tok, locality_probes(recs), editor_layers(editor),
                           config=DiagnosticsConfig(sequential=True))
    diag.run_items = [(r.prompt, r.subject) for r in recs]
    try:
        for req in _requests(recs[:2]):
            diag.after_apply(req, editor.apply(req))
            items = [(q.prompt, q.subject) for q in req]
            fresh = capture_keys(model, tok, items, [LAYER])[LAYER]
            torch.testing.assert_close(diag._edit_keys(items, [LAYER])[LAYER], fresh)
        assert len(diag._key_memo) == len(recs)  # one batch for the whole run
        # a weight below the key's module moves the keys: the memo must not be used
        ad = ArchAdapter(model)
        below, w = next((n, p) for n, p in model.named_parameters() if n.startswith(ad.block_name(LAYER) + ".")
                        and not n.startswith(ad.rewrite_name(LAYER) + ".") and p.dim() == 2)
        saved = w.detach().clone()
        with torch.no_grad():
            w.mul_(1.5)
        diag._changed.add(below)
        items = [(recs[2].prompt, recs[2].subject)]
        fresh = capture_keys(model, tok, items, [LAYER])[LAYER]
        stale = diag._key_memo[items[0]][LAYER]
        assert not torch.allclose(fresh[0], stale)
        torch.testing.assert_close(diag._edit_keys(items, [LAYER])[LAYER], fresh)
        with torch.no_grad():
            w.copy_(saved)
    finally:
        editor.restore()
