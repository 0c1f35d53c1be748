"""Per-edit superposition-interference diagnostics (DESIGN 7), computed by the runner after each apply.

Notation as in :mod:`knowbench.superposition`: k a key, C = E[kkᵀ], p(kᵢ, kⱼ) = kᵢᵀC⁻¹kⱼ / kᵢᵀC⁻¹kᵢ,
δ = v* − W_before k the residual an edit writes, W_0 the unedited weight.

What is watched: the modules the editor's ``sites()`` name — one unit per written linear module m
(weight W in Linear layout (d_out, d_in), GPT-2's Conv1D transposed), whose key is m's *input*, read
with a forward hook on m. UltraEdit's Llama sites are gate_proj / up_proj of several layers, so one
layer may hold several units. An editor that names no sites gets every layer's rewrite module (the
MLP output projection). In the summary a unit is keyed by its layer, or by its module's name where
its layer holds several units; every entry carries ``layer`` and ``module``.

Once, on the unedited model, before the first edit:

* a fixed probe set of original-knowledge keys — by default the task's locality items: the key at
  the last token of the record's subject when the locality prompt names it, else at the prompt's
  last token (where the answer is read out) — at every watched module;
* ‖W_0 kⱼ‖ per probe.

After every ``editor.apply``, at each edited module (p, cosines and the prediction are
matrix-vector work per edit key; the observed interference is one product of ΔW with the keys):

* per edit key (from the editor's :class:`LayerTrace` of that module; a trace naming no module of
  the model goes to its layer's rewrite module): p against the probes and against every
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
one apply. Editors without traces (fine-tuning), and sites without one (UltraEdit's gate_proj /
up_proj), get the observed interference only; their edit keys are read by the diagnostics after the
apply, from a one-batch memo of the run's prompts while no change so far can have moved them (a
module's input depends neither on its own weight, nor on later blocks, nor on modules of its block
called after it), else afresh.

At the end (:meth:`EditDiagnostics.summary`): interference against the number of edits with linear
and power-law fits (the study predicts linear growth), how well the prediction matches the
observation, and the AUROC with which a probe's interference at the time its locality item was
evaluated predicts that the item flipped (agreement < 1).
"""

from __future__ import annotations

import functools
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
def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores W as (d_in, d_out) and computes x W + b."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A module's weight in Linear layout (d_out, d_in), so that v = W k: a view for nn.Linear
    (and any 2-D weight), a transposed view for Conv1D (:class:`knowbench.arch.ArchAdapter` does the
    same for the rewrite module)."""
    w = module.weight
    return w.T if is_conv1d(module) else w


def _key_rows(tok: Any, items: Sequence[tuple[str, str | None]]) -> list[tuple[list[int], int]]:
    """Token ids and key position of each (prompt, subject) pair: the subject's last token (its first
    occurrence), or the prompt's last token when the subject is None."""
    from .keys import subject_indices

    rows: list[tuple[list[int], int] | None] = [None] * len(items)
    with_subj = [i for i, (_, s) in enumerate(items) if s]
    without = [i for i, (_, s) in enumerate(items) if not s]
    if with_subj:
        for i, r in zip(with_subj, subject_indices(tok, [items[i][0] for i in with_subj], [items[i][1] for i in with_subj])):
            rows[i] = r
    if without:
        for i, r in zip(without, subject_indices(tok, [items[i][0] for i in without], [""] * len(without), fact_token="last")):
            rows[i] = r
    return rows  # type: ignore[return-value]


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    tok: Any,
    items: Sequence[tuple[str, str | None]],
    modules: Sequence[str],
    batch_size: int = 32,
    progress: str | None = None,
) -> dict[str, torch.Tensor]:
    """Keys of (prompt, subject) pairs at any linear modules: each named module's *input* at the key
    position (:func:`_key_rows`), one forward pass per batch with every module hooked (abandoned once
    each has been called): {module name: (n, d_in)} in float32 (float64 for a float64 model)."""
    from .devices import input_device
    from .keys import StopForward
    from .progress import progress_bar
    from .tokens import pad_batch, pad_id

    names = list(dict.fromkeys(modules))
    mods = {name: model.get_submodule(name) for name in names}
    param = next(model.parameters())
    device = input_device(model)  # token ids go where the embeddings are (a model may span devices)
    kdtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    n = len(items)
    out = {name: torch.empty(n, linear_weight(m).shape[1], dtype=kdtype) for name, m in mods.items()}
    if n == 0 or not names:
        return out
    rows = _key_rows(tok, items)
    order = sorted(range(n), key=lambda i: len(rows[i][0]))  # similar lengths together: less padding
    got: dict[str, torch.Tensor] = {}
    where: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any, name: str) -> None:
        if name in got:  # a module called twice in one pass: its first call is the key
            return
        x = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
        got[name] = x.detach()[tuple(w.to(x.device) for w in where[0])]
        if len(got) == len(names):
            raise StopForward  # everything is captured: the rest of the pass is not needed

    was_training = model.training
    if was_training:  # toggling walks every module: only when needed
        model.eval()
    handles = [m.register_forward_hook(functools.partial(hook, name=name), with_kwargs=True) for name, m in mods.items()]
    try:
        with progress_bar(progress or "keys", n if progress else None) as advance:
            for b0 in range(0, n, batch_size):
                idx = order[b0 : b0 + batch_size]
                ids, mask, pos, _ = pad_batch([rows[i][0] for i in idx], pad_id(tok), "right", device)
                where[:] = [(torch.arange(len(idx), device=device), torch.tensor([rows[i][1] for i in idx], device=device))]
                got.clear()
                try:
                    model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
                except StopForward:
                    pass
                for name in names:
                    if name in got:
                        out[name][idx] = got[name].to(kdtype).cpu()
                    else:  # e.g. an expert the router skipped: no key, so nothing measured there
                        out[name][idx] = float("nan")
                        log.warning("diagnostics: module %s was not called for %d prompt(s); their keys are NaN",
                                    name, len(idx))
                advance(len(idx))
    finally:
        for h in handles:
            h.remove()
        if was_training:
            model.train(True)
    return out


@torch.no_grad()
def capture_keys(
    model: nn.Module,
    tok: Any,
    items: Sequence[tuple[str, str | None]],
    layers: Sequence[int],
    batch_size: int = 32,
    progress: str | None = None,
) -> dict[int, torch.Tensor]:
    """Keys (rewrite-module inputs) of (prompt, subject) pairs at ``layers`` (:func:`capture_inputs`
    at each layer's rewrite module): {layer: (n, d_in)}."""
    adapter = ArchAdapter(model)
    names = {layer: adapter.rewrite_name(layer) for layer in sorted({adapter._check(layer) for layer in layers})}
    got = capture_inputs(model, tok, items, list(names.values()), batch_size, progress)
    return {layer: got[name] for layer, name in names.items()}


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
class _Site:
    """One watched unit: the linear module ``module`` (weight ``param``) in block ``layer``."""

    layer: int
    module: str
    param: str
    probe_keys: torch.Tensor  # (n_p, d_in) the module's input, float32 (float64 for a float64 model), on the CPU
    probe_base: torch.Tensor  # (n_p,) ‖W_0 k_j‖ float64
    w0: torch.Tensor | None  # own copy (Linear layout) when the editor keeps none
    d_out: int
    uid: int | str = -1  # the layer for its rewrite module, else the module's name
    key: str = ""  # in the summary: str(layer), or the module's name where a layer has several units
    rewrite: bool = True  # the module is its layer's rewrite module
    conv1d: bool = False  # the weight is stored (d_in, d_out)
    whitener: S.Whitener | None = None
    whitener_info: dict[str, Any] = field(default_factory=dict)
    probe_u: torch.Tensor | None = None
    pred_probe: torch.Tensor | None = None  # (n_p, d_out) Σ p δ so far
    keys: _Rows | None = None  # earlier edits' keys
    white: _Rows | None = None  # and whitened
    after: _Rows | None = None  # W_j k_j right after edit j (sequential)
    pred_drift: _Rows | None = None  # Σ_{i>j} p(k_i, k_j) δ_i (sequential)
    has_prediction: bool = True  # False once an apply at this unit could not be whitened
    w_prev: torch.Tensor | None = None  # the weight after the previous apply (sequential)
    last_obs: torch.Tensor | None = None
    last_pred: torch.Tensor | None = None
    at_eval: dict[int, tuple[float, float | None]] = field(default_factory=dict)
    series: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # per-edit-key stats, for the summary


_Layer = _Site  # the name before units were keyed by module


@dataclass
class DiagnosticsConfig:
    probes: str | None = None  # probe file instead of the task's locality items
    max_probes: int | None = 512
    batch_size: int = 32
    seed: int = 0
    sequential: bool = True  # weights accumulate across applies (no restore between them)


# -- what the editor declares, as picklable look-ups (run checkpoints pickle the observer) ---------
def _nothing(*_: Any) -> None:
    """The default look-up: nothing known."""
    return None


class SiteMoments:
    """The C an editor's :class:`~knowbench.editor.Site` solves with, looked up by the site's param
    or module name, or by a layer (the site at that layer's rewrite module, else its only site)."""

    def __init__(self, sites: Sequence[Any], rewrite_names: dict[int, str] | None = None):
        self.sites = list(sites)
        self.rewrite_names = dict(rewrite_names or {})

    def site(self, key: int | str) -> Any:
        if isinstance(key, str):
            return next((s for s in self.sites if key in (s.param, s.module)), None)
        at = [s for s in self.sites if s.layer == key]
        rewrite = [s for s in at if s.module == self.rewrite_names.get(key)]
        return rewrite[0] if rewrite else (at[0] if len(at) == 1 else None)

    def __call__(self, key: int | str) -> Any:
        site = self.site(key)
        return site.second_moment if site is not None else None


class EditDiagnostics:
    """The runner's per-edit hook: build on the unedited model, call :meth:`after_apply` after
    every ``editor.apply`` (before any restore), then :meth:`summary`.

    What is watched: the editor's ``sites`` (one unit per written linear module, keys = that
    module's input), else the rewrite module of each of ``layers``, else of every layer.
    ``moments(uid)``: C of a unit, asked with its id (the layer for a rewrite module, else the module
    name; :class:`SiteMoments` by default when sites are given). ``originals(param)``: W_0 as the
    editor stores it (storage layout), used only when every layer is watched and sites give none."""

    def __init__(
        self,
        model: nn.Module,
        tok: Any,
        probes: list[ProbeItem],
        layers: Sequence[int] | None = None,
        *,
        sites: Sequence[Any] | None = None,
        moments: Callable[[int | str], Any] | None = None,
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
        self._warned: set[str] = set()
        n_layers = self.adapter.n_layers
        rewrite_names = {l: self.adapter.rewrite_name(l) for l in range(n_layers)}
        sites = list(sites or [])
        self.moments = moments or (SiteMoments(sites, rewrite_names) if sites else _nothing)
        self.originals = originals or _nothing
        self.identity_moment = identity_moment
        # (layer, module, param, W_0 the site gives in Linear layout or None)
        specs: list[tuple[int, str, str, torch.Tensor | None]] = []
        if sites:
            for site in sites:
                spec = self._site_spec(site)
                if spec is not None and all(spec[1] != s[1] for s in specs):
                    specs.append(spec)
        else:
            if layers is None:
                log.info("diagnostics: the editor does not name its layers; watching all %d rewrite layers", n_layers)
            for l in sorted({self.adapter._check(l) for l in layers}) if layers else range(n_layers):
                specs.append((l, rewrite_names[l], self.adapter.rewrite_param_name(l), None))
        specs.sort(key=lambda s: s[0])  # by layer, the editor's order within one
        self.watch = sorted({s[0] for s in specs})
        # W_0: our own copy of what an editor names; when it names nothing (every layer is watched)
        # the editor's own snapshot of what it touched, if it keeps one
        own_copies = bool(sites) or layers is not None or originals is None
        keys = capture_inputs(model, tok, [(p.prompt, p.subject) for p in probes], [s[1] for s in specs], self.cfg.batch_size)
        per_layer = {l: sum(1 for s in specs if s[0] == l) for l in self.watch}
        self.layers: dict[int | str, _Site] = {}  # units by id: the layer for a rewrite module, else the module name
        for layer, name, param, given in specs:
            module = model.get_submodule(name)
            w = linear_weight(module).detach()
            k = keys[name]
            own = given.detach() if given is not None else (w.clone() if own_copies else None)
            wd = torch.float64 if w.dtype == torch.float64 else torch.float32
            base = (k.to(w.device, wd) @ w.to(wd).T).double().norm(dim=1).cpu() if len(k) else torch.zeros(0, dtype=torch.float64)
            rewrite = name == rewrite_names[layer]
            uid: int | str = layer if rewrite else name
            self.layers[uid] = _Site(layer, name, param, k, base, own, w.shape[0], uid=uid,
                                     key=str(layer) if per_layer[layer] == 1 else name, rewrite=rewrite,
                                     conv1d=is_conv1d(module))
        self._by_module = {st.module: uid for uid, st in self.layers.items()}
        self._by_param = {st.param: uid for uid, st in self.layers.items()}
        self.n_edits = 0
        self.n_applies = 0
        self.entries: list[dict[str, Any]] = []
        self.setup_s = time.perf_counter() - t0
        self.apply_s = 0.0
        self.edit_s = 0.0
        # Edit keys read by the diagnostics themselves (editors without traces, i.e. fine-tuning, and
        # sites other than the rewrite module): the run's prompts are captured in one batch, and reused
        # while no weight changed so far can move the key (:meth:`_keys_unmoved`).
        self.run_items: list[tuple[str, str | None]] = []
        self._key_memo: dict[tuple[str, str | None], dict[int | str, torch.Tensor]] = {}
        self._changed: set[str] = set()
        self._holders: dict[str, tuple[str, ...]] | None = None  # param name -> modules holding it
        self._calls: dict[str, tuple[int, int]] | None = None  # module -> (first, last) call in a forward pass
        self._by_record: dict[int, list[int]] = {}
        for j, p in enumerate(probes):
            if p.record is not None:
                self._by_record.setdefault(p.record, []).append(j)

    def _site_spec(self, site: Any) -> tuple[int, str, str, torch.Tensor | None] | None:
        """(layer, module, param, W_0) of an editor's site, or None (with a warning) for one the
        weight diagnostics cannot watch: not a 2-D weight of a module inside a transformer block."""
        name, param = site.module, site.param
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            self._warn_once(f"site {name}", f"diagnostics: the editor names a site {name!r} the model does not have; it is left out")
            return None
        w = getattr(module, "weight", None)
        if param != name + ".weight" or not isinstance(w, torch.Tensor) or w.dim() != 2:
            self._warn_once(f"site {name}", f"diagnostics: site {param!r} is not the 2-D weight of module {name!r}; "
                            "it is left out (the diagnostics need a linear map v = W k)")
            return None
        layer = _block_index(name, self.adapter)
        if layer is None:
            self._warn_once(f"site {name}", f"diagnostics: site {name!r} lies outside the transformer blocks; it is left out")
            return None
        if site.layer != layer:
            self._warn_once(f"site {name}", f"diagnostics: site {name!r} says layer {site.layer} but lies in block {layer}; "
                            f"block {layer} is used")
        original = getattr(site, "original", None)
        if original is not None and tuple(original.shape) != tuple(linear_weight(module).shape):
            self._warn_once(f"w0 {name}", f"diagnostics: the original the editor gives for {param} has shape "
                            f"{tuple(original.shape)}, not the Linear layout {tuple(linear_weight(module).shape)}; "
                            "a copy is taken instead")
            original = None
        return layer, name, param, original

    # -- one apply -----------------------------------------------------------------------------
    @torch.no_grad()
    def after_apply(self, requests: Sequence[Any], outcome: Any, edit_seconds: float | None = None) -> dict[str, Any]:
        """Diagnose one apply of ``len(requests)`` edits (EditRequests or EditRecords, in order)."""
        t0, setup0 = time.perf_counter(), self.setup_s
        self.n_applies += 1
        self.n_edits += len(requests)
        if edit_seconds is not None:
            self.edit_s += edit_seconds
        traces: dict[int | str, Any] = {}
        for tr in getattr(outcome, "traces", None) or []:
            uid = self._trace_unit(tr)
            if uid is not None:
                traces[uid] = tr
        changed = set(getattr(outcome, "changed_params", None) or [])
        self._changed = (self._changed | changed) if self.cfg.sequential else changed
        unwatched = sorted(p for p in changed if p not in self._by_param and p.endswith(".weight"))
        if unwatched:
            self._warn_once("unwatched", f"diagnostics: {len(unwatched)} changed weight(s) are not among the "
                            f"watched sites and are not diagnosed: {', '.join(unwatched[:4])}"
                            + (" ..." if len(unwatched) > 4 else ""))
        edited = [uid for uid, st in self.layers.items() if uid in traces or st.param in changed]
        record_ids = [_record_index(r) for r in requests]
        entry: dict[str, Any] = {"apply": self.n_applies, "n_edits": self.n_edits, "records": record_ids, "layers": []}
        captured: dict[int | str, torch.Tensor] = {}
        need_capture = [uid for uid in edited if uid not in traces]
        if need_capture:  # fine-tuning style, or a site without a trace: read the edit keys ourselves
            items = [(getattr(r, "prompt"), _subject_in(r)) for r in requests]
            captured = self._edit_keys(items, need_capture)
        for uid in edited:
            entry["layers"].append(self._layer_step(self.layers[uid], traces.get(uid), captured.get(uid), record_ids))
        dt = time.perf_counter() - t0 - (self.setup_s - setup0)  # one-off set-up work is not per-apply
        self.apply_s += dt
        entry["seconds"] = round(dt, 5)
        self.entries.append(entry)
        return entry

    def _trace_unit(self, tr: Any) -> int | str | None:
        """The unit a :class:`LayerTrace` belongs to: the one watching its module; a trace naming no
        module of the model goes to its layer's rewrite module (traces are per layer there)."""
        name = getattr(tr, "module", None)
        if name in self._by_module:
            return self._by_module[name]
        known = False
        if name:
            try:
                self.model.get_submodule(name)
                known = True
            except AttributeError:
                pass
        try:
            layer = self.adapter._check(tr.layer)
        except (IndexError, TypeError):
            layer = None
        if not known and layer in self.layers:
            return layer
        self._warn_once(f"trace {name or tr.layer}", f"diagnostics: {name or f'layer {tr.layer}'} was edited but "
                        f"was not watched (watched: {', '.join(st.module for st in self.layers.values())}); it is left out")
        return None

    # -- which keys can the changes so far have moved? ----------------------------------------------
    def _keys_unmoved(self, uid: int | str) -> bool:
        """Whether the weights changed so far leave the keys of unit ``uid`` (its module's input) as on
        the original model. A changed parameter cannot move them when every module holding it (tied
        weights count) is the unit's module or inside it (a module's input does not depend on its own
        weight), lies in a later block, or lies in the same block and is first called after the
        unit's module in a forward pass (its output cannot reach an input computed before it ran)."""
        st = self.layers[uid]
        if not self._changed:
            return True
        holders = self._param_holders()
        n = self.adapter.n_layers
        later = tuple(self.adapter.block_name(j) + "." for j in range(st.layer + 1, n))
        block = self.adapter.block_name(st.layer) + "."
        for p in self._changed:
            for h in holders.get(p, ()) or (None,):
                if h is None:
                    return False  # not a parameter of the model we know: assume the worst
                if h == st.module or h.startswith(st.module + ".") or (h + ".").startswith(later):
                    continue
                if (h + ".").startswith(block) and self._called_after(h, st.module):
                    continue
                return False
        return True

    def _param_holders(self) -> dict[str, tuple[str, ...]]:
        """Every name of every parameter -> the modules holding that tensor (several when tied)."""
        if self._holders is None:
            by_id: dict[int, list[str]] = {}
            names: dict[str, int] = {}
            for pname, p in self.model.named_parameters(remove_duplicate=False):
                owner = pname.rsplit(".", 1)[0] if "." in pname else ""
                by_id.setdefault(id(p), []).append(owner)
                names[pname] = id(p)
            self._holders = {pname: tuple(dict.fromkeys(by_id[i])) for pname, i in names.items()}
        return self._holders

    def _called_after(self, other: str, module: str) -> bool:
        """Whether every call of ``other`` starts after the last call of ``module`` starts, in one
        forward pass of a short input (read once). Unknown (not called) is False."""
        if self._calls is None:
            self._calls = _call_order(self.model)
        a, b = self._calls.get(other), self._calls.get(module)
        return a is not None and b is not None and a[0] > b[1]

    def _edit_keys(self, items: list[tuple[str, str | None]], uids: list[int | str]) -> dict[int | str, torch.Tensor]:
        """Keys of ``items`` at units ``uids`` on the current model: from the run's one-batch memo
        where the changes so far cannot have moved them, else captured now."""
        memo_units = [u for u in uids if self._keys_unmoved(u)]
        if memo_units and not self._key_memo and self.run_items:
            t0 = time.perf_counter()
            todo = list(dict.fromkeys(self.run_items + items))
            got = capture_inputs(self.model, self.tok, todo, [st.module for st in self.layers.values()], self.cfg.batch_size)
            for i, item in enumerate(todo):
                self._key_memo[item] = {u: got[st.module][i] for u, st in self.layers.items()}
            self.setup_s += time.perf_counter() - t0  # set-up work, like the probe keys
        out: dict[int | str, torch.Tensor] = {}
        if all(item in self._key_memo for item in items):
            out = {u: torch.stack([self._key_memo[item][u] for item in items]) for u in memo_units}
        rest = [u for u in uids if u not in out]
        if rest:
            got = capture_inputs(self.model, self.tok, items, [self.layers[u].module for u in rest], self.cfg.batch_size)
            out.update({u: got[self.layers[u].module] for u in rest})
        return out

    def _layer_step(self, st: _Layer, trace: Any, captured: torch.Tensor | None, record_ids: list[int | None]) -> dict[str, Any]:
        w_t = linear_weight(self.model.get_submodule(st.module)).detach()
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
        got = self.originals(st.param)  # as the editor stores it
        if got is None:
            self._warn_once(f"w0 {st.module}", f"diagnostics: the editor kept no original of {st.param}; "
                            "no observed interference there")
            return None
        return got.T if st.conv1d else got

    def _whitener(self, st: _Layer) -> S.Whitener | None:
        if st.whitener is not None or st.whitener_info.get("error"):
            return st.whitener
        try:
            src = self.moments(st.param) if isinstance(self.moments, SiteMoments) else self.moments(st.uid)
            if (src is None and self.identity_moment) or (isinstance(src, str) and src == "identity"):
                src = torch.eye(st.probe_keys.shape[1], dtype=torch.float64)
                st.whitener_info["source"] = "identity (the editor solves with C = I)"
            if src is None:
                raise LookupError(f"the editor exposes no second moment C for {st.module}")
            st.whitener = S.Whitener.from_any(src, name=f"C of {st.module}")
            st.whitener_info.setdefault("source", "editor")
            if hasattr(src, "provenance"):
                st.whitener_info["statistics"] = src.provenance()
            if st.whitener.ridge:
                st.whitener_info["ridge"] = st.whitener.ridge
        except (LookupError, ValueError, TypeError, RuntimeError) as exc:
            st.whitener_info["error"] = str(exc)
            self._warn_once(f"C {st.module}", f"diagnostics: no p or prediction at {st.module}: {exc}")
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
        for st in self.layers.values():
            if not st.series:
                continue
            info: dict[str, Any] = {"layer": st.layer, "module": st.module, "rewrite_module": st.rewrite,
                                    "n_edit_keys": len(st.rows)}
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
            per_layer[st.key] = info
        total_edit = self.edit_s or None
        n_subject = sum(1 for p in self.probes if p.subject)
        out: dict[str, Any] = {
            "probes": {
                "source": self.probe_source,
                "n": len(self.probes),
                "key_position": {"subject_last": n_subject, "prompt_last": len(self.probes) - n_subject},
            },
            "watched_layers": self.watch,
            "edited_layers": sorted({info["layer"] for info in per_layer.values()}),
            "watched_modules": [st.module for st in self.layers.values()],
            "edited_modules": [info["module"] for info in per_layer.values()],
            "accumulating": seq,
            "eval_timing": eval_timing if seq else "each",
            "layers": per_layer,  # str(layer), or the module name where a layer has several units
            "auroc": {**_auroc(self.probes, post_map, scores_obs, scores_pred),
                      "score": "interference at evaluation time, summed over edited modules"},
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
def _block_index(name: str, adapter: ArchAdapter) -> int | None:
    """The transformer block a module lies in (``<blocks>.<i>.…``), None outside the blocks."""
    prefix = adapter.spec.blocks + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() and int(head) < adapter.n_layers else None


@torch.no_grad()
def _call_order(model: nn.Module) -> dict[str, tuple[int, int]]:
    """module name -> (first, last) position at which a call of it starts, in one forward pass of a
    two-token input ({} when that pass fails: every same-block change then counts as moving keys)."""
    from .devices import input_device

    starts: dict[str, list[int]] = {}
    counter = [0]

    def pre(mod: nn.Module, args: tuple, name: str) -> None:
        starts.setdefault(name, []).append(counter[0])
        counter[0] += 1

    handles = [m.register_forward_pre_hook(functools.partial(pre, name=name)) for name, m in model.named_modules() if name]
    was_training = model.training
    device = input_device(model)
    try:
        if was_training:
            model.eval()
        ids = torch.zeros((1, 2), dtype=torch.long, device=device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except Exception as exc:  # noqa: BLE001 - an unusual forward: fall back to the conservative rule
        log.debug("diagnostics: no call order (%s); same-block changes count as moving keys", exc)
        return {}
    finally:
        for h in handles:
            h.remove()
        if was_training:
            model.train(True)
    return {name: (min(v), max(v)) for name, v in starts.items()}


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
    """The weight diagnostics of one run, on the still unedited model, watching the modules the
    editor's ``sites()`` name, with each site's C and W_0 (every rewrite layer when it names none)."""
    cfg = diagnostics_config(options, sequential=sequential, seed=seed)
    probes, source = run_probes(task_probes, cfg)
    if not probes:
        log.warning("diagnostics: no probe keys (the selected records have no locality items); only "
                    "interference on earlier edits is measured")
    diag = EditDiagnostics(lm_model, tok, probes, sites=list(sites) or None, config=cfg, probe_source=source)
    diag.run_items = [(getattr(r, "prompt"), _subject_in(r)) for r in records]
    return diag


# -- terminal summary -------------------------------------------------------------------------------------
def diagnostics_table(result: dict[str, Any]):
    """A rich Table summarising ``result["diagnostics"]`` per edited module (None if absent): the
    ``layer`` column names the module where it is not its layer's rewrite module (``2 gate_proj``).

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
    for key, info in diag["layers"].items():
        layer = info.get("layer", key)
        if info.get("rewrite_module", True) and str(key) == str(layer):
            site = str(layer)
        else:
            site = f"{layer} {str(info.get('module', key)).rsplit('.', 1)[-1]}"
        pp, pe, cw = info.get("p_probes", {}), info.get("p_earlier", {}), info.get("cos_probes", {})
        fin = info["interference"]["final"]
        slope = ((info["interference"].get("growth") or {}).get("observed") or {}).get("linear", {}).get("slope")
        rows.append({
            "layer": site,
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
