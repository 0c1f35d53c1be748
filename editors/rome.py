"""ROME: a rank-one update of one MLP output projection W (DESIGN 6).

For an edit (subject s in prompt x, new target y) at layer l:

* k  = the key (input of W) at the last subject token of the bare prompt, (d_in,);
  k* = the mean key over the context prompts "{prefix}{x}" (the bare prompt and ~20 prefixes
  sampled from the model once per run), (d_in,);
* v  = W k + b, the value at the bare prompt, (d_out,); v* = v + δ with δ from the optimisation in
  :mod:`knowbench.editors.locate` (target NLL + KL + weight decay, norm clamp, early stop);
* with C = E[k kᵀ] (d_in, d_in) (``mom2_adjustment``; C = I when off) and u = C⁻¹k*, solved in
  float64, ΔW (d_out, d_in):

      key_mode "rome"   (reference)  ΔW = (v* − W k − b) uᵀ / (kᵀu)      maps k  to v*
      key_mode "r-rome"              ΔW = δ uᵀ / (k*ᵀu),  v* = W k* + b + δ   maps k* to v*

  This is the minimum-‖ΔW‖_C change that writes the new key-value pair; the reference mixes the
  bare key k (in the denominator and the residual) with k* (in u), which can make kᵀu small and
  the update huge ("disabling edits"); r-ROME uses k* everywhere.

Several requests in one ``apply`` are written one after another, each on the model the previous
ones left. The :class:`LayerTrace` rows are the update in the closed form of DESIGN 7,
ΔW = δ' (C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*): keys k*, residuals δ' = ΔW k*, values W k* + b + δ' (in "r-rome"
these are exactly v* and δ; in "rome" δ' = δ·(k*ᵀu)/(kᵀu)).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from knowbench.editor import EditOutcome, EditRequest, LayerTrace

from .locate import LocateEditor, LocateHparams, c_solve, optimise_targets, quarter_depth, weighted_keys

log = logging.getLogger(__name__)

KEY_MODES = ("rome", "r-rome")


@dataclass
class ROMEHparams(LocateHparams):
    key_mode: str = "rome"  # "rome" (reference: k and k* mixed) or "r-rome" (k* everywhere)


@dataclass
class ROMESolution:
    """Everything one rank-one update used (kept on the editor for checks and diagnostics)."""

    layer: int
    k: torch.Tensor  # bare-prompt key
    k_star: torch.Tensor  # context-averaged key
    v_star: torch.Tensor  # target value
    delta: torch.Tensor  # optimised δ
    u: torch.Tensor  # C⁻¹k*
    delta_w: torch.Tensor  # (d_out, d_in) float64


class ROME(LocateEditor):
    name: ClassVar[str] = "rome"
    hparams_cls: ClassVar[type] = ROMEHparams
    supports_batch: ClassVar[bool] = False

    @classmethod
    def default_layers(cls, n_layers: int) -> list[int]:
        """One layer, at a quarter of the depth (for a model no YAML matches)."""
        return [quarter_depth(n_layers)]

    def __init__(self, model: Any, tokenizer: Any, hparams: ROMEHparams, context: Any):
        super().__init__(model, tokenizer, hparams, context)
        if hparams.key_mode not in KEY_MODES:
            raise ValueError(f"rome: key_mode must be one of {', '.join(KEY_MODES)}, got {hparams.key_mode!r}")
        self.last: list[ROMESolution] = []

    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        self.check_requests(requests)
        self.setup()
        ctx = self.contexts()
        mode = self.hparams.key_mode
        rows: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {l: [] for l in self.layers}
        changed: list[str] = []
        per_edit: list[dict[str, Any]] = []
        self.last = []
        for req in requests:
            for layer in self.layers:
                t = optimise_targets(self.model, self, [req], ctx, layer, "rewrite", key_layers=[layer])
                keys = t.keys[layer]
                k = keys[0].double()  # row 0: the bare prompt
                k_star = weighted_keys(keys, t.batch, ctx)[0]
                delta = t.delta[0].double()
                u = c_solve(self.second_moment(layer), k_star)  # C⁻¹k* (d_in,)
                before_star = self.rewrite_out(layer, k_star[None])[0]
                if mode == "rome":
                    v_star = t.init[0].double() + delta  # v at the bare prompt, plus δ
                    key = k
                else:
                    v_star = before_star + delta
                    key = k_star
                resid = v_star - self.rewrite_out(layer, key[None])[0]  # = δ in both modes
                denom = key @ u
                if abs(float(denom)) < 1e-8 * float(key.norm() * u.norm()):
                    log.warning("rome: kᵀC⁻¹k* ≈ 0 for record %s; the update is ill-conditioned", req.record_index)
                delta_w = torch.outer(resid, u) / denom
                changed.append(self.write(layer, delta_w))
                eff = delta_w @ k_star  # what the update does at k*: the closed form's δ'
                rows[layer].append((k_star, before_star + eff, eff))
                self.last.append(ROMESolution(layer, k, k_star, v_star, delta, u, delta_w))
                stat = dict(t.stats[0])
                stat.update(layer=layer, record=req.record_index, denominator=float(denom),
                            update_norm=round(float(delta_w.norm()), 5))
                if mode == "rome":
                    stat["key_ratio"] = round(float((k_star @ u) / denom), 5)  # 1 in r-ROME
                per_edit.append(stat)
        traces = [
            LayerTrace(
                layer=l, module=self.adapter.rewrite_name(l),
                keys=torch.stack([r[0] for r in rs]).float(),
                values=torch.stack([r[1] for r in rs]).float(),
                residuals=torch.stack([r[2] for r in rs]).float(),
            )
            for l, rs in rows.items() if rs
        ]
        info = self._info({"key_mode": mode, "edits": per_edit})
        return EditOutcome(changed_params=sorted(set(changed)), traces=traces, info=info)
