"""Per-edit superposition-interference diagnostics (DESIGN 7), computed by the runner after each apply.

Notation as in :mod:`knowbench.superposition`: k a key, C = E[kkᵀ], p(kᵢ, kⱼ) = kᵢᵀC⁻¹kⱼ / kᵢᵀC⁻¹kᵢ,
δ = v* − W_before k the residual an edit writes, W_0 the unedited rewrite weight.

Once, on the unedited model, before the first edit:

* a fixed probe set of original-knowledge keys — by default the task's locality items: the key at
  the last token of the record's subject when the locality prompt names it, else at the prompt's
  last token (where the answer is read out) — at every layer the editor may change;
* ‖W_0 kⱼ‖ per probe.

After every ``editor.apply``, at each edited layer (p, cosines and the prediction are
matrix-vector work per edit key; the observed interference is one product of ΔW with the keys):

* per edit key (from the editor's :class:`LayerTrace`): p against the probes and against every
  earlier edit's key (mean |p|, max |p|, excess kurtosis), the whitened cosine likewise, ‖δ‖ (the
  residual the editor asked for) and ‖δ'‖, δ' = (W_after − W_before)k the residual it wrote;
* interference on the probes, observed ‖(W_t − W_0)kⱼ‖ / ‖W_0 kⱼ‖ next to the closed form's
  ‖Σᵢ p(kᵢ, kⱼ)δ'ᵢ‖ / ‖W_0 kⱼ‖. With δ' the prediction is exact for any update of the closed
  form's shape δ'(C⁻¹k)ᵀ/(kᵀC⁻¹k): ROME (δ' = δ) and single-edit MEMIT (whose λ-regularised solve
  writes a fraction of δ in the same direction); where it departs from the observation, the
  editor's update is not that rank one (AlphaEdit's null-space projection, batches);
* sequential runs: interference on earlier edits, observed as the drift of edit j's value since it
  was written, ‖(W_t − W_j)k_j‖ / ‖W_j k_j‖ (W_j: the weight right after edit j), next to
  ‖Σ_{i>j} p(kᵢ, k_j)δ'ᵢ‖ / ‖W_j k_j‖. (Measured from W_0 it would count edit j's own write.)

In single / batch runs the weights are restored after each apply, so interference there is that of
one apply. Editors without traces (fine-tuning) get the observed interference only; their edit keys
are read after the apply at the changed layer (a layer's key does not depend on its own weight).

At the end (:meth:`EditDiagnostics.summary`): interference against the number of edits with linear
and power-law fits (the study predicts linear growth), how well the prediction matches the
observation, and the AUROC with which a probe's interference at the time its locality item was
evaluated predicts that the item flipped (agreement < 1).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import superposition as S
from .arch import ArchAdapter
from .records import KeyProbe

log = logging.getLogger("knowbench")


# -- probes -------------------------------------------------------------------------------------
ProbeItem = KeyProbe  # the name the diagnostics used before probes moved to knowbench.records


def file_probes(path: str | Path) -> list[ProbeItem]:
    """Probes from a file in any format ``knowbench superposition --data`` reads (no owners)."""
    from .study import read_facts

    facts, _ = read_facts(path)
    return [ProbeItem(f.prompt, f.subject) for f in facts]


def cap_probes(probes: list[ProbeItem], n: int | None, seed: int) -> list[ProbeItem]:
    """At most n probes: a seeded sample kept in order."""
    if n is None or len(probes) <= n:
        return probes
    keep = sorted(random.Random(seed).sample(range(len(probes)), n))
    return [probes[i] for i in keep]


# -- keys ---------------------------------------------------------------------------------------
@torch.no_grad()
def capture_keys(
    model: nn.Module,
    tok: Any,
    items: Sequence[tuple[str, str | None]],
    layers: Sequence[int],
    batch_size: int = 32,
    progress: str | None = None,
) -> dict[int, torch.Tensor]:
    """Keys (rewrite-module inputs) of (prompt, subject) pairs at ``layers``, one forward pass per
    batch with every layer hooked (stopping after the highest one): {layer: (n, d_in)} in float32
    (float64 for a float64 model).
    The key is read at the subject's last token (its first occurrence), or at the prompt's last
    token when the subject is None."""
    from .keys import record, subject_indices
    from .tokens import pad_batch, pad_id

    adapter = ArchAdapter(model)
    layers = sorted({adapter._check(layer) for layer in layers})
    n = len(items)
    if n == 0 or not layers:
        return {layer: torch.zeros(0, adapter.key_dim(layer)) for layer in layers}
    rows: list[tuple[list[int], int] | None] = [None] * n
    with_subj = [i for i, (_, s) in enumerate(items) if s]
    without = [i for i, (_, s) in enumerate(items) if not s]
    if with_subj:
        for i, r in zip(with_subj, subject_indices(tok, [items[i][0] for i in with_subj], [items[i][1] for i in with_subj])):
            rows[i] = r
    if without:
        for i, r in zip(without, subject_indices(tok, [items[i][0] for i in without], [""] * len(without), fact_token="last")):
            rows[i] = r
    param = next(model.parameters())
    device = param.device
    kdtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    out = {layer: torch.empty(n, adapter.key_dim(layer), dtype=kdtype) for layer in layers}
    order = sorted(range(n), key=lambda i: len(rows[i][0]))  # similar lengths together: less padding
    was_training = model.training
    if was_training:  # toggling walks every module: only when needed
        model.eval()
    from .progress import progress_bar

    try:
        with progress_bar(progress or "keys", n if progress else None) as advance:
            for b0 in range(0, n, batch_size):
                idx = order[b0 : b0 + batch_size]
                ids, mask, pos, _ = pad_batch([rows[i][0] for i in idx], pad_id(tok), "right", device)
                where = (torch.arange(len(idx), device=device), torch.tensor([rows[i][1] for i in idx], device=device))
                rec = record(model, adapter, ids, mask, pos, positions=where, key_layers=layers, stop_after=layers[-1])
                for layer in layers:
                    out[layer][idx] = rec.keys[layer].to(kdtype).cpu()
                advance(len(idx))
    finally:
        if was_training:
            model.train(True)
    return out


# -- growable row buffers -----------------------------------------------------------------------------
class _Rows:
    """An (n, d) tensor that grows by appending rows (capacity doubles)."""

    def __init__(self, dim: int, dtype: torch.dtype):
        self._buf = torch.zeros(16, dim, dtype=dtype)
        self.n = 0

    def append(self, rows: torch.Tensor) -> None:
        need = self.n + rows.shape[0]
        if need > self._buf.shape[0]:
            new = torch.zeros(max(need, 2 * self._buf.shape[0]), self._buf.shape[1], dtype=self._buf.dtype)
            new[: self.n] = self._buf[: self.n]
            self._buf = new
        self._buf[self.n : need] = rows.to(self._buf.dtype)
        self.n = need

    @property
    def view(self) -> torch.Tensor:
        return self._buf[: self.n]


@dataclass
class _Layer:
    layer: int
    module: str
    param: str
    probe_keys: torch.Tensor  # (n_p, d_in) float32 (float64 for a float64 model), on the CPU
    probe_base: torch.Tensor  # (n_p,) ‖W_0 k_j‖ float64
    w0: torch.Tensor | None  # own copy (Linear layout) when the editor keeps none
    d_out: int
    whitener: S.Whitener | None = None
    whitener_info: dict[str, Any] = field(default_factory=dict)
    probe_u: torch.Tensor | None = None
    pred_probe: torch.Tensor | None = None  # (n_p, d_out) Σ p δ so far
    keys: _Rows | None = None  # earlier edits' keys
    white: _Rows | None = None  # and whitened
    after: _Rows | None = None  # W_j k_j right after edit j (sequential)
    pred_drift: _Rows | None = None  # Σ_{i>j} p(k_i, k_j) δ_i (sequential)
    has_prediction: bool = True  # False once an apply at this layer could not be whitened
    w_prev: torch.Tensor | None = None  # the weight after the previous apply (sequential)
    last_obs: torch.Tensor | None = None
    last_pred: torch.Tensor | None = None
    at_eval: dict[int, tuple[float, float | None]] = field(default_factory=dict)
    series: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # per-edit-key stats, for the summary


@dataclass
class DiagnosticsConfig:
    probes: str | None = None  # probe file instead of the task's locality items
    max_probes: int | None = 512
    batch_size: int = 32
    seed: int = 0
    sequential: bool = True  # weights accumulate across applies (no restore between them)


class EditDiagnostics:
    """The runner's per-edit hook: build on the unedited model, call :meth:`after_apply` after
    every ``editor.apply`` (before any restore), then :meth:`summary`."""

    def __init__(
        self,
        model: nn.Module,
        tok: Any,
        probes: list[ProbeItem],
        layers: Sequence[int] | None = None,
        *,
        moments: Callable[[int], Any] | None = None,
        originals: Callable[[str], torch.Tensor | None] | None = None,
        config: DiagnosticsConfig | None = None,
        probe_source: str = "custom",
        identity_moment: bool = False,
    ):
        t0 = time.perf_counter()
        self.model, self.tok = model, tok
        self.cfg = config or DiagnosticsConfig()
        self.adapter = ArchAdapter(model)
        self.probes = probes
        self.probe_source = probe_source
        self.moments = moments or (lambda layer: None)
        self.originals = originals or (lambda name: None)
        self.identity_moment = identity_moment
        self.watch = sorted({self.adapter._check(layer) for layer in layers}) if layers else list(range(self.adapter.n_layers))
        # W_0: our own copy of the few layers an editor names; when it names none (every layer is
        # watched) the editor's own snapshot of what it touched, if it keeps one
        own_copies = layers is not None or originals is None
        if layers is None:
            log.info("diagnostics: the editor does not name its layers; watching all %d rewrite layers", len(self.watch))
        keys = capture_keys(model, tok, [(p.prompt, p.subject) for p in probes], self.watch, self.cfg.batch_size)
        self.layers: dict[int, _Layer] = {}
        for layer in self.watch:
            w = self.adapter.rewrite_weight(layer).detach()
            k = keys[layer]
            param = self.adapter.rewrite_param_name(layer)
            own = w.clone() if own_copies else None
            wd = torch.float64 if w.dtype == torch.float64 else torch.float32
            base = (k.to(w.device, wd) @ w.to(wd).T).double().norm(dim=1).cpu() if len(k) else torch.zeros(0, dtype=torch.float64)
            self.layers[layer] = _Layer(layer, self.adapter.rewrite_name(layer), param, k, base, own, w.shape[0])
        self.n_edits = 0
        self.n_applies = 0
        self.entries: list[dict[str, Any]] = []
        self.setup_s = time.perf_counter() - t0
        self.apply_s = 0.0
        self.edit_s = 0.0
        self._warned: set[str] = set()
        # Edit keys read by the diagnostics themselves (editors without traces, i.e. fine-tuning):
        # the run's prompts are captured in one batch, and reused while every weight changed so far
        # lies at or above the key's own rewrite module, where it cannot move that key.
        self.run_items: list[tuple[str, str | None]] = []
        self._key_memo: dict[tuple[str, str | None], dict[int, torch.Tensor]] = {}
        self._changed: set[str] = set()
        self._by_record: dict[int, list[int]] = {}
        for j, p in enumerate(probes):
            if p.record is not None:
                self._by_record.setdefault(p.record, []).append(j)

    # -- one apply -----------------------------------------------------------------------------
    @torch.no_grad()
    def after_apply(self, requests: Sequence[Any], outcome: Any, edit_seconds: float | None = None) -> dict[str, Any]:
        """Diagnose one apply of ``len(requests)`` edits (EditRequests or EditRecords, in order)."""
        t0, setup0 = time.perf_counter(), self.setup_s
        self.n_applies += 1
        self.n_edits += len(requests)
        if edit_seconds is not None:
            self.edit_s += edit_seconds
        traces = {}
        for tr in getattr(outcome, "traces", None) or []:
            traces[self.adapter._check(tr.layer)] = tr
        changed = set(getattr(outcome, "changed_params", None) or [])
        self._changed = (self._changed | changed) if self.cfg.sequential else changed
        edited = [l for l in self.watch if l in traces or self.layers[l].param in changed]
        for l in sorted(set(traces) - set(self.watch)):
            self._warn_once(f"trace{l}", f"diagnostics: layer {l} was edited but was not watched (the editor "
                            f"named layers {self.watch}); it is left out")
        record_ids = [_record_index(r) for r in requests]
        entry: dict[str, Any] = {"apply": self.n_applies, "n_edits": self.n_edits, "records": record_ids, "layers": []}
        captured: dict[int, torch.Tensor] = {}
        need_capture = [l for l in edited if l not in traces]
        if need_capture:  # fine-tuning style: read the edit keys ourselves
            items = [(getattr(r, "prompt"), _subject_in(r)) for r in requests]
            captured = self._edit_keys(items, need_capture)
        for layer in edited:
            tr = traces.get(layer)
            entry["layers"].append(self._layer_step(self.layers[layer], tr, captured.get(layer), record_ids))
        dt = time.perf_counter() - t0 - (self.setup_s - setup0)  # one-off set-up work is not per-apply
        self.apply_s += dt
        entry["seconds"] = round(dt, 5)
        self.entries.append(entry)
        return entry

    def _keys_unmoved(self, layer: int) -> bool:
        """Whether the weights changed so far leave the keys at ``layer`` as on the original model:
        only rewrite modules at ``layer`` or above, or blocks above it, were changed."""
        n = self.adapter.n_layers
        safe = [self.adapter.rewrite_name(j) + "." for j in range(layer, n)]
        safe += [self.adapter.block_name(j) + "." for j in range(layer + 1, n)]
        return all(any(p.startswith(prefix) for prefix in safe) for p in self._changed)

    def _edit_keys(self, items: list[tuple[str, str | None]], layers: list[int]) -> dict[int, torch.Tensor]:
        memo_layers = [l for l in layers if self._keys_unmoved(l)]
        if memo_layers and not self._key_memo and self.run_items:
            t0 = time.perf_counter()
            todo = list(dict.fromkeys(self.run_items + items))
            got = capture_keys(self.model, self.tok, todo, self.watch, self.cfg.batch_size)
            for i, item in enumerate(todo):
                self._key_memo[item] = {l: got[l][i] for l in self.watch}
            self.setup_s += time.perf_counter() - t0  # set-up work, like the probe keys
        out: dict[int, torch.Tensor] = {}
        if all(item in self._key_memo for item in items):
            out = {l: torch.stack([self._key_memo[item][l] for item in items]) for l in memo_layers}
        rest = [l for l in layers if l not in out]
        if rest:
            out.update(capture_keys(self.model, self.tok, items, rest, self.cfg.batch_size))
        return out

    def _layer_step(self, st: _Layer, trace: Any, captured: torch.Tensor | None, record_ids: list[int | None]) -> dict[str, Any]:
        w_t = self.adapter.rewrite_weight(st.layer).detach()
        w_0 = self._original(st)
        seq = self.cfg.sequential
        out: dict[str, Any] = {"layer": st.layer, "module": st.module}
        if trace is not None:
            keys = trace.keys.detach().cpu()
            keys = keys.double() if keys.dtype == torch.float64 else keys.float()
            deltas = trace.residuals.detach().double().cpu() if trace.residuals is not None else None
            values = trace.values.detach().double().cpu() if trace.values is not None else None
            out["keys"] = "trace"
        else:
            keys, deltas, values = captured, None, None
            out["keys"] = "captured"
        if keys is not None and keys.shape[0] != len(record_ids):
            record_ids = [None] * keys.shape[0]  # an editor may trace a different number of rows
        whitener = self._whitener(st) if trace is not None else None
        if whitener is None:
            st.has_prediction = False
        # δ' = (W_after − W_before) k: what the apply actually wrote at its own keys. The closed form
        # predicts with it: it is δ itself for ROME (which writes v* exactly) and the written
        # fraction of δ for MEMIT's λ-regularised solve, whose single-edit update is the same rank one.
        w_before = st.w_prev if (seq and st.w_prev is not None) else w_0
        realised = None
        if keys is not None and w_before is not None:
            realised = S.change_on_keys(w_t, w_before, keys).double().cpu()
        if st.keys is None:
            st.keys = _Rows(keys.shape[1], keys.dtype) if keys is not None else None
        t_prev = st.keys.n if st.keys is not None else 0

        # -- p, cosines, ‖δ‖ per edit key ----------------------------------------------------------
        rows: list[dict[str, Any]] = []
        u = None
        p_probe = None
        p_prev_old = None
        if keys is not None:
            if whitener is not None:
                u = whitener.whiten(keys).cpu()  # C may live on the GPU; the bookkeeping stays on the CPU
                if st.probe_u is None:
                    st.probe_u = whitener.whiten(st.probe_keys).cpu()
                if st.white is None:
                    st.white = _Rows(keys.shape[1], torch.float64)
                p_probe = S.p_from_whitened(u, st.probe_u)
                c_probe = S.cosine_from_whitened(u, st.probe_u)
                earlier = torch.cat([st.white.view, u[:-1]]) if st.white.n == t_prev else u[:-1]
                p_prev = S.p_from_whitened(u, earlier)
                c_prev = S.cosine_from_whitened(u, earlier)
                p_prev_old = p_prev[:, :t_prev] if st.white.n == t_prev else None
            for a in range(keys.shape[0]):
                row: dict[str, Any] = {"record": record_ids[a]}
                if deltas is not None:
                    row["delta_norm"] = S._r(deltas[a].norm())
                    if values is not None:
                        row["value_norm"] = S._r((values[a] - deltas[a]).norm())  # ‖v* − δ‖ = ‖W_before k (+b)‖
                if realised is not None:
                    row["written_norm"] = S._r(realised[a].norm())
                if u is not None:
                    n_earlier = (t_prev if p_prev_old is not None else 0) + a
                    row["p_probes"] = S.abs_summary(p_probe[a])
                    row["p_earlier"] = S.abs_summary(p_prev[a, :n_earlier])
                    row["cos_probes"] = _cos_summary(c_probe[a])
                    row["cos_earlier"] = _cos_summary(c_prev[a, :n_earlier])
                rows.append(row)
        out["edits"] = rows
        st.rows.extend(rows)

        # -- interference on the probes --------------------------------------------------------------
        if not seq or st.pred_probe is None:
            st.pred_probe = torch.zeros(len(st.probe_keys), st.d_out, dtype=torch.float64)
        predicting = st.has_prediction and realised is not None and p_probe is not None
        if predicting:
            st.pred_probe += S.predicted_change(p_probe, realised)
        if w_0 is None:
            obs = torch.full((len(st.probe_keys),), float("nan"), dtype=torch.float64)
        else:
            obs = S.relative_norm(S.change_on_keys(w_t, w_0, st.probe_keys).cpu(), st.probe_base)
        pred = S.relative_norm(st.pred_probe, st.probe_base) if predicting else None
        st.last_obs, st.last_pred = obs, pred
        interference: dict[str, Any] = {"probes": {"observed": S.spread(obs)}}
        if pred is not None:
            interference["probes"]["predicted"] = S.spread(pred)
        for rid in record_ids:
            for j in self._by_record.get(rid, ()) if rid is not None else ():
                st.at_eval[j] = (float(obs[j]), float(pred[j]) if pred is not None else None)

        # -- interference on earlier edits (sequential) ---------------------------------------------
        if seq and keys is not None:
            wf = w_t.float() if w_t.dtype != torch.float64 else w_t
            if st.after is None:
                st.after = _Rows(st.d_out, torch.float64)
                st.pred_drift = _Rows(st.d_out, torch.float64)
            if st.after.n and st.after.n == t_prev:
                now = (st.keys.view.to(wf.device, wf.dtype) @ wf.T).double().cpu()
                base = st.after.view.norm(dim=1)
                drift = (now - st.after.view).norm(dim=1) / base
                earlier_i: dict[str, Any] = {"observed": S.spread(drift)}
                if predicting and p_prev_old is not None:
                    st.pred_drift.view.add_(S.predicted_change(p_prev_old, realised))
                    earlier_i["predicted"] = S.spread(st.pred_drift.view.norm(dim=1) / base)
                interference["earlier"] = earlier_i
            st.after.append((keys.to(wf.device, wf.dtype) @ wf.T).double().cpu())
            st.pred_drift.append(torch.zeros(keys.shape[0], st.d_out, dtype=torch.float64))
        if keys is not None:
            st.keys.append(keys)
            if u is not None and st.white is not None and st.white.n == t_prev:
                st.white.append(u)
        if seq:
            st.w_prev = w_t.clone()
        out["interference"] = interference
        st.series.append({
            "n_edits": self.n_edits,
            "observed": S._r(obs.mean()) if len(obs) else None,
            "predicted": S._r(pred.mean()) if pred is not None and len(pred) else None,
            "earlier_observed": interference.get("earlier", {}).get("observed", {}).get("mean"),
            "earlier_predicted": interference.get("earlier", {}).get("predicted", {}).get("mean"),
        })
        return out

    def _original(self, st: _Layer) -> torch.Tensor | None:
        if st.w0 is not None:
            return st.w0
        got = self.originals(st.param)
        if got is None:
            self._warn_once(f"w0{st.layer}", f"diagnostics: the editor kept no original of {st.param}; "
                            "no observed interference there")
            return None
        return got.T if self.adapter.spec.conv1d else got

    def _whitener(self, st: _Layer) -> S.Whitener | None:
        if st.whitener is not None or st.whitener_info.get("error"):
            return st.whitener
        try:
            src = self.moments(st.layer)
            if (src is None and self.identity_moment) or (isinstance(src, str) and src == "identity"):
                src = torch.eye(st.probe_keys.shape[1], dtype=torch.float64)
                st.whitener_info["source"] = "identity (the editor solves with C = I)"
            if src is None:
                raise LookupError("the editor exposes no second moment C for this layer")
            st.whitener = S.Whitener.from_any(src, name=f"C of {st.module}")
            st.whitener_info.setdefault("source", "editor")
            if hasattr(src, "provenance"):
                st.whitener_info["statistics"] = src.provenance()
            if st.whitener.ridge:
                st.whitener_info["ridge"] = st.whitener.ridge
        except (LookupError, ValueError, TypeError, RuntimeError) as exc:
            st.whitener_info["error"] = str(exc)
            self._warn_once(f"C{st.layer}", f"diagnostics: no p or prediction at layer {st.layer}: {exc}")
        return st.whitener

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", msg)

    # -- end of run -----------------------------------------------------------------------------------
    def summary(self, post: Any = None, eval_timing: str = "each") -> dict[str, Any]:
        """Fits, agreement and AUROC. ``post``: the runner's post-edit scores (RecordScores list or
        {index: RecordScores}); ``eval_timing`` "final" pairs each probe with its interference on the
        final model, "each" with its interference right after its own record's apply."""
        post_map = _post_map(post)
        seq = self.cfg.sequential
        per_layer: dict[str, Any] = {}
        scores_obs: dict[int, float] = {}
        scores_pred: dict[int, float] = {}
        for layer, st in self.layers.items():
            if not st.series:
                continue
            info: dict[str, Any] = {"module": st.module, "n_edit_keys": len(st.rows)}
            if st.whitener_info:
                info["whitening"] = st.whitener_info
            for name in ("p_probes", "p_earlier", "cos_probes", "cos_earlier"):
                agg = _aggregate_rows([r.get(name) for r in st.rows])
                if agg:
                    info[name] = agg
            dn = [r["delta_norm"] for r in st.rows if r.get("delta_norm") is not None]
            if dn:
                info["delta_norm"] = {"mean": S._r(np.mean(dn)), "max": S._r(np.max(dn))}
            interf: dict[str, Any] = {"final": {"observed": S.spread(st.last_obs)}}
            if st.last_pred is not None:
                interf["final"]["predicted"] = S.spread(st.last_pred)
                interf["agreement"] = _agreement(st.last_obs, st.last_pred)
            if seq:
                interf["growth"] = _growth(st.series)
            info["interference"] = interf
            # the interference each probe carried when its locality item was evaluated
            if eval_timing == "final" and seq:
                at = {j: (float(st.last_obs[j]), float(st.last_pred[j]) if st.last_pred is not None else None)
                      for j in range(len(self.probes))}
            else:
                at = st.at_eval
            info["auroc"] = _auroc(self.probes, post_map, {j: o for j, (o, _) in at.items()},
                                   {j: p for j, (_, p) in at.items() if p is not None})
            for j, (o, p) in at.items():
                scores_obs[j] = scores_obs.get(j, 0.0) + o
                if p is not None:
                    scores_pred[j] = scores_pred.get(j, 0.0) + p
            info["series"] = st.series
            per_layer[str(layer)] = info
        total_edit = self.edit_s or None
        n_subject = sum(1 for p in self.probes if p.subject)
        out: dict[str, Any] = {
            "probes": {
                "source": self.probe_source,
                "n": len(self.probes),
                "key_position": {"subject_last": n_subject, "prompt_last": len(self.probes) - n_subject},
            },
            "watched_layers": self.watch,
            "edited_layers": [int(k) for k in per_layer],
            "accumulating": seq,
            "eval_timing": eval_timing if seq else "each",
            "layers": per_layer,
            "auroc": {**_auroc(self.probes, post_map, scores_obs, scores_pred),
                      "score": "interference at evaluation time, summed over edited layers"},
            "timing": {
                "setup_s": round(self.setup_s, 4),
                "per_apply_s": round(self.apply_s / max(1, self.n_applies), 5),
                "total_s": round(self.setup_s + self.apply_s, 4),
                "fraction_of_edit_time": round(self.apply_s / total_edit, 4) if total_edit else None,
            },
        }
        return out

    def result(self, post: Any = None, eval_timing: str = "each") -> dict[str, Any]:
        """What the runner stores under ``result["diagnostics"]``."""
        return {"kind": "weights", "edits": self.entries, "summary": self.summary(post, eval_timing)}


# -- helpers ------------------------------------------------------------------------------------------
def _record_index(r: Any) -> int | None:
    for name in ("record_index", "index"):
        v = getattr(r, name, None)
        if isinstance(v, int) and v >= 0:
            return v
    return None


def _subject_in(r: Any) -> str | None:
    s = getattr(r, "subject", None)
    return s if s and s in getattr(r, "prompt", "") else None


def _cos_summary(c: torch.Tensor) -> dict[str, Any]:
    x = c.cpu().numpy().astype(np.float64)
    if x.size == 0:
        return {"n": 0}
    return {
        "mean_abs": S._r(np.abs(x).mean()),
        "max_abs": S._r(np.abs(x).max()),
        "min_angle_deg": S._r(S.angles_deg(np.abs(x)).min()),
        "n": int(x.size),
    }


def _aggregate_rows(stats: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Over edit keys: mean of mean|·|, max of max|·|, mean and max of the kurtosis."""
    stats = [s for s in stats if s and s.get("n")]
    if not stats:
        return None
    out = {
        "mean_abs": S._r(np.mean([s["mean_abs"] for s in stats])),
        "max_abs": S._r(np.max([s["max_abs"] for s in stats])),
        "n_edits": len(stats),
    }
    kurt = [s["kurtosis"] for s in stats if s.get("kurtosis") is not None]
    if kurt:
        out["kurtosis_mean"] = S._r(np.mean(kurt))
    if "min_angle_deg" in stats[0]:
        out["min_angle_deg"] = S._r(np.min([s["min_angle_deg"] for s in stats]))
    return out


def _agreement(obs: torch.Tensor, pred: torch.Tensor) -> dict[str, Any]:
    o, p = obs.numpy(), pred.numpy()
    keep = np.isfinite(o) & np.isfinite(p) & (o > 0)
    if not keep.any():
        return {"n": 0}
    rel = np.abs(o[keep] - p[keep]) / o[keep]
    out = {"median_rel_error": S._r(np.median(rel)), "max_rel_error": S._r(rel.max()), "n": int(keep.sum())}
    if keep.sum() > 2 and np.std(o[keep]) > 0 and np.std(p[keep]) > 0:
        out["pearson"] = S._r(np.corrcoef(o[keep], p[keep])[0, 1])
    return out


def _growth(series: list[dict[str, Any]]) -> dict[str, Any]:
    """Interference against the number of edits: linear fit (slope, R²) and the power-law exponent."""
    out: dict[str, Any] = {}
    x = [pt["n_edits"] for pt in series]
    for name in ("observed", "predicted", "earlier_observed", "earlier_predicted"):
        y = [pt.get(name) for pt in series]
        pts = [(a, b) for a, b in zip(x, y) if b is not None]
        if len(pts) < 2:
            continue
        xs, ys = zip(*pts)
        lin, pw = S.linear_fit(xs, ys), S.power_fit(xs, ys)
        if lin is None:
            continue
        out[name] = {"linear": lin.as_dict(), "power_exponent": S._r(pw.slope) if pw else None,
                     "power_r2": S._r(pw.r2) if pw and pw.r2 is not None else None, "n_points": len(pts)}
    return out


def _post_map(post: Any) -> dict[int, Any]:
    if post is None:
        return {}
    if isinstance(post, dict):
        return post
    return {s.index: s for s in post}


def _flipped(probe: ProbeItem, post_map: dict[int, Any]) -> bool | None:
    """Did the probe's locality item change its predictions (agreement < 1)? None if unknown."""
    if probe.record is None or probe.key is None or probe.item is None:
        return None
    scores = post_map.get(probe.record)
    if scores is None:
        return None
    loc = scores.values.get("locality") if hasattr(scores, "values") else scores.get("locality")
    if not isinstance(loc, dict):
        return None
    items = loc.get(probe.key)
    if not isinstance(items, list) or probe.item >= len(items) or items[probe.item] is None:
        return None
    return float(items[probe.item]) < 1.0 - 1e-9


def _auroc(probes: list[ProbeItem], post_map: dict[int, Any], obs: dict[int, float], pred: dict[int, float]) -> dict[str, Any]:
    labels = {j: _flipped(probes[j], post_map) for j in obs}
    labelled = [j for j, y in labels.items() if y is not None]
    n_pos = sum(1 for j in labelled if labels[j])
    out: dict[str, Any] = {"n_flipped": n_pos, "n_kept": len(labelled) - n_pos}
    if not labelled:
        out["note"] = "no locality items with per-item agreement to label"
        return out
    a = S.auroc([obs[j] for j in labelled], [labels[j] for j in labelled])
    out["observed"] = S._r(a, 4) if a is not None else None
    lp = [j for j in labelled if j in pred]
    if lp:
        b = S.auroc([pred[j] for j in lp], [labels[j] for j in lp])
        out["predicted"] = S._r(b, 4) if b is not None else None
    if a is None:
        out["note"] = "AUROC needs both flipped and unflipped locality items"
    return out


# -- building it for a run ------------------------------------------------------------------------------
def diagnostics_config(options: dict[str, Any] | None, *, sequential: bool, seed: int) -> DiagnosticsConfig:
    """``options`` (RunConfig.extra["diagnostics"]): ``probes`` (a file of probe facts in any format
    ``knowbench superposition`` reads), ``max_probes`` (default 512), ``batch_size``."""
    options = dict(options or {})
    unknown = set(options) - {"probes", "max_probes", "batch_size"}
    if unknown:
        raise ValueError(f"unknown diagnostics option(s) {', '.join(sorted(unknown))}; valid: probes, max_probes, batch_size")
    return DiagnosticsConfig(
        probes=options.get("probes"), max_probes=options.get("max_probes", 512),
        batch_size=int(options.get("batch_size", 32)), seed=seed, sequential=sequential,
    )


def run_probes(task_probes: list[KeyProbe], cfg: DiagnosticsConfig) -> tuple[list[KeyProbe], str]:
    """The probe keys of a run (the task's locality items, or ``cfg.probes``' facts), capped."""
    if cfg.probes:
        probes, source = file_probes(cfg.probes), f"file {cfg.probes}"
    else:
        probes, source = task_probes, "task locality items"
    n_all = len(probes)
    probes = cap_probes(probes, cfg.max_probes, cfg.seed)
    if n_all > len(probes):
        source += f" (seeded sample of {len(probes)} of {n_all})"
    return probes, source


def for_run(
    lm_model: nn.Module,
    tok: Any,
    sites: Sequence[Any],
    records: Sequence[Any],
    task_probes: list[KeyProbe],
    *,
    sequential: bool,
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> EditDiagnostics:
    """The weight diagnostics of one run, on the still unedited model, watching the editor's
    ``sites()`` (every rewrite layer when it names none)."""
    cfg = diagnostics_config(options, sequential=sequential, seed=seed)
    probes, source = run_probes(task_probes, cfg)
    if not probes:
        log.warning("diagnostics: no probe keys (the selected records have no locality items); only "
                    "interference on earlier edits is measured")
    by_layer = {site.layer: site for site in sites}
    by_param = {site.param: site for site in sites}

    def moments(layer: int) -> Any:
        site = by_layer.get(layer)
        return site.second_moment if site is not None else None

    def originals(param: str) -> torch.Tensor | None:
        site = by_param.get(param)
        return site.original if site is not None else None

    diag = EditDiagnostics(
        lm_model, tok, probes, sorted(by_layer) or None, moments=moments,
        originals=originals if any(site.original is not None for site in sites) else None,
        config=cfg, probe_source=source,
    )
    diag.run_items = [(getattr(r, "prompt"), _subject_in(r)) for r in records]
    return diag


# -- terminal summary -------------------------------------------------------------------------------------
def diagnostics_table(result: dict[str, Any]):
    """A rich Table summarising ``result["diagnostics"]`` per edited layer (None if absent).

    Columns that no layer has (p and prediction for editors without traces) are left out, so the
    table fits an 80-column terminal."""
    diag = (result.get("diagnostics") or {}).get("summary")
    if not diag or not diag.get("layers"):
        return None
    from rich.table import Table

    def f(v: Any, fmt: str = "{:.3f}") -> str:
        return "" if v is None else fmt.format(v)

    def pair(a: Any, b: Any, fmt: str = "{:.3f}") -> str:
        return "" if a is None and b is None else f"{f(a, fmt) or '–'} / {f(b, fmt) or '–'}"

    seq = diag.get("accumulating")
    rows = []
    for layer, info in diag["layers"].items():
        pp, pe, cw = info.get("p_probes", {}), info.get("p_earlier", {}), info.get("cos_probes", {})
        fin = info["interference"]["final"]
        slope = ((info["interference"].get("growth") or {}).get("observed") or {}).get("linear", {}).get("slope")
        rows.append({
            "layer": layer,
            "|p| probes mean/max": pair(pp.get("mean_abs"), pp.get("max_abs")),
            "κ(p)": f(pp.get("kurtosis_mean"), "{:.1f}"),
            "|p| earlier": f(pe.get("mean_abs")),
            "|cos_w|": f(cw.get("mean_abs")),
            "‖δ‖": f((info.get("delta_norm") or {}).get("mean"), "{:.2f}"),
            "interf. obs/pred": pair(fin["observed"].get("mean"), (fin.get("predicted") or {}).get("mean"), "{:.3g}"),
            "slope/edit": f(slope, "{:.1e}") if seq else "",
            "AUROC": f(info.get("auroc", {}).get("observed"), "{:.2f}"),
        })
    cols = [c for c in rows[0] if c == "layer" or any(r[c] for r in rows)]
    t = Table(title="Superposition diagnostics", title_justify="left")
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*[r[c] for c in cols])
    return t


def diagnostics_notes(result: dict[str, Any]) -> list[str]:
    """The lines printed under the table: what the probes are, AUROC, overhead."""
    diag = (result.get("diagnostics") or {}).get("summary")
    if not diag or not diag.get("layers"):
        return []
    pr, a = diag["probes"], diag.get("auroc", {})
    frac = diag.get("timing", {}).get("fraction_of_edit_time")
    kind = "accumulated since the first edit" if diag.get("accumulating") else "of each edit alone"
    auroc = f"{a['observed']:.3f}" if a.get("observed") is not None else "n/a"
    return [
        f"interference ‖ΔW k‖/‖W₀k‖ {kind}, on {pr['n']} probe keys ({pr['source']})",
        f"locality flips predicted by interference: AUROC {auroc} ({a.get('n_flipped', 0)} flipped, "
        f"{a.get('n_kept', 0)} kept)" + (f" · diagnostics took {100 * frac:.1f}% of the edit time" if frac is not None else ""),
    ]


def print_diagnostics(result: dict[str, Any], console: Any) -> None:
    t = diagnostics_table(result)
    if t is not None:
        console.print(t)
        for line in diagnostics_notes(result):
            console.print(line, style="dim", markup=False, highlight=False)
