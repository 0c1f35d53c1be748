"""MEMIT: a batch of edits spread over the MLP output projections of layers L₁ < … < L_m (DESIGN 6).

1. For each edit i, z*_i = z_i + δ_i at the output of the last layer L_m (the residual stream at the
   last subject token of the bare prompt), δ_i optimised as in :mod:`knowbench.locate`.
2. For each layer L_j in ascending order, on the model as the previous layers left it:
   K = the keys at L_j, one column per edit (mean of the bare prompt's key and of the mean key over
   the sampled prefixes), h = the current output of L_m at the bare prompt, and

       R  = (z* − h) / (m − j)                       the residual, spread over the remaining layers
       ΔW = R Kᵀ (λC + K Kᵀ)⁻¹                       λ = mom2_update_weight, C = E[kkᵀ]

   solved in float64 from the Cholesky factor of C, computed once per layer for the run
   (Woodbury: (λC + KKᵀ)⁻¹K = A(λI + KᵀA)⁻¹ with A = C⁻¹K, so each edit costs O(d²n), not O(d³)).

Only the blocks from L₁ up run again between layers: the residual stream entering L₁ is recorded once.
Each :class:`LayerTrace` holds K, R (residuals) and W K + b + R (the values the layer was asked for).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from knowbench.editor import EditOutcome, EditRequest, LayerTrace
from knowbench.keys import record
from knowbench.locate import LocateEditor, LocateHparams, Targets, optimise_targets, weighted_keys

MEMIT_STARTS = ["The", "Therefore", "Because", "I", "You"]


@dataclass
class MEMITHparams(LocateHparams):
    clamp_norm_factor: float = 0.75
    mom2_update_weight: float = 15000.0
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    context_template_starts: list[str] | None = field(default_factory=lambda: list(MEMIT_STARTS))


class MEMIT(LocateEditor):
    name: ClassVar[str] = "memit"
    hparams_cls: ClassVar[type] = MEMITHparams
    supports_batch: ClassVar[bool] = True
    grouped_contexts: ClassVar[bool] = True

    @classmethod
    def rule_hparams(cls, model: Any, layers: list[int]) -> MEMITHparams:
        """λ scales with the key width: what matters is kᵀC⁻¹k / λ (≈ d_in for a typical key),
        so the references' λ = 15000-20000 for d_in = 6400-16384 would leave a small model's
        update almost nothing to write. λ = 2·d_in sits inside the references' range of λ / d_in
        (0.9 for GPT-J, 1.4 for Llama-7B, 3.1 for GPT-2 XL)."""
        from knowbench.arch import ArchAdapter

        d_in = ArchAdapter(model).key_dim(layers[-1])
        return cls.hparams_cls(layers=layers, mom2_update_weight=float(2 * d_in))

    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        self.check_requests(requests)
        self.prepare()
        ctx = self.contexts()
        layers, top = self.layers, self.layers[-1]
        t = optimise_targets(self.model, self, requests, ctx, top, "block", key_layers=[layers[0]],
                             calls_from=layers[0])
        self._last_targets = t  # kept for diagnostics and tests until the next apply
        z_star = t.target.double()
        b = t.batch
        bare = b.bare_rows().to(b.subj_cols.device)
        traces, changed, layer_info = [], [], []
        for j, layer in enumerate(layers):
            if j == 0:  # nothing edited yet: the recorded pass has the keys and z
                key_rows, cur_z = t.keys[layer], t.init
            else:
                rec = self._rerun(t, key_layers=[layer], z_layer=top)
                key_rows = rec.keys[layer]
                cur_z = rec.block_out[top][bare, b.subj_cols[bare]]
            keys = weighted_keys(key_rows, b, ctx)  # (n, d_in) float64
            resid = (z_star - cur_z.double()) / (len(layers) - j)  # (n, d_out)
            before = self.rewrite_out(layer, keys)
            delta_w = self.solve_update(layer, keys, resid)
            changed.append(self.write(layer, delta_w))
            traces.append(LayerTrace(layer, self.adapter.rewrite_name(layer), keys.float(),
                                     (before + resid).float(), resid.float()))
            layer_info.append({"layer": layer, "resid_norm": round(float(resid.norm(dim=-1).mean()), 5),
                               "update_norm": round(float(delta_w.norm()), 5)})
        extra = self.after_update(t)
        edits = [dict(s, record=r.record_index) for s, r in zip(t.stats, requests)]
        info = self._info({"edits": edits, "layer_updates": layer_info, **extra})
        return EditOutcome(changed_params=changed, traces=traces, info=info)

    # -- pieces AlphaEdit reuses ------------------------------------------------------------
    def _rerun(self, t: Targets, key_layers: list[int], z_layer: int | None = None):
        """Keys (and z) on the current weights, rerunning only the blocks from L₁ up."""
        first = self.layers[0]
        b = t.batch
        return record(
            self.model, self.adapter, b.input_ids, b.attention_mask, b.position_ids,
            positions=(b.subj_rows, b.subj_cols), key_layers=key_layers,
            block_out_layers=[z_layer] if z_layer is not None else [],
            stop_after=max(key_layers + ([z_layer] if z_layer is not None else [])),
            replay_from=(t.rec, first, t.rec.block_in[first]),
        )

    def solve_update(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """ΔW = R Kᵀ (λC + KKᵀ)⁻¹ with keys K as rows (n, d_in) and R as rows (n, d_out)."""
        lam = float(self.hparams.mom2_update_weight)
        kt = keys.T  # (d_in, n)
        sm = self.second_moment(layer)
        a = sm.solve(kt) if sm is not None else kt.clone()  # C⁻¹K
        m = lam * torch.eye(kt.shape[1], dtype=kt.dtype, device=kt.device) + kt.T @ a
        return resid.T @ torch.linalg.solve(m, a.T)  # R M⁻¹ Aᵀ (M symmetric)

    def after_update(self, t: Targets) -> dict[str, Any]:
        return {}
