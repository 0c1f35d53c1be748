"""AlphaEdit: MEMIT's targets and residual spreading, with the update confined to the null space of
preserved knowledge (DESIGN 6).

Preserved knowledge is summarised by C = E[kkᵀ] (d_in, d_in; count-normalised) of the original
model. With U (d_in, r) the eigenvectors of C whose eigenvalue is below ``nullspace_threshold``
(2e-2 in the reference), P = U Uᵀ projects onto directions that ordinary text barely uses. At each
layer, with K (d_in, n) the new edits' keys (columns), R (d_out, n) their residual share and
K_p (d_in, n_p) the keys of every earlier edit of the run:

    ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹            (d_out, d_in); α = ``L2`` (10 in the reference)

Since every row of ΔW lies in the span of U, ΔW k = 0 for any key k with P k = 0: the preserved
subspace is untouched exactly, however many edits follow. We solve in that span: ΔW = Y Uᵀ with

    Y (Uᵀ K_all K_allᵀ U + α I_r) = R Kᵀ U,     K_all = [K_p, K],   Y (d_out, r)

which is the same solution (the matrix above is invertible and Y Uᵀ satisfies its equation). Per
layer the editor keeps Uᵀ K_p (r, n_p) while there are fewer earlier keys than r/2 (the r×r system
is then solved through Woodbury in the number of keys), or S = Uᵀ K_p K_pᵀ U (r, r) afterwards. K_p
is the keys after each edit is written (as the reference), accumulated across a sequential run and
cleared by ``restore()``.

One ``apply``:

1. targets z* = z + δ at the last layer L_m (MEMIT's, :func:`~.locate.optimise_targets`);
2. for each layer L_j in ascending order: K and R = (z* − h) / (m − j) on the model the lower
   layers left (:func:`~.locate.layer_keys_and_residual`), the projected solve above
   (:meth:`AlphaEdit.projected_solve`), W += ΔW;
3. K_p += the edits' keys at every layer, read on the edited model (:meth:`AlphaEdit.add_preserved`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from knowbench.editor import EditOutcome, EditRequest, LayerTrace

from .locate import LocateEditor, layer_keys_and_residual, optimise_targets, replay_keys, weighted_keys
from .memit import MEMITHparams, rule_update_weight

log = logging.getLogger(__name__)


@dataclass
class AlphaEditHparams(MEMITHparams):
    nullspace_threshold: float = 2e-2  # eigenvalue of the count-normalised C below which a direction is free
    L2: float = 10.0  # α, the ridge on the projected normal equations


class AlphaEdit(LocateEditor):
    name: ClassVar[str] = "alphaedit"
    hparams_cls: ClassVar[type] = AlphaEditHparams
    supports_batch: ClassVar[bool] = True
    grouped_contexts: ClassVar[bool] = True  # MEMIT's contexts: bare prompt weighs 1/2 in k

    def __init__(self, model: Any, tokenizer: Any, hparams: AlphaEditHparams, context: Any):
        super().__init__(model, tokenizer, hparams, context)
        self._basis: dict[int, torch.Tensor] = {}  # U per layer (d_in, r), from the original C
        self._kp: dict[int, torch.Tensor | None] = {}  # Uᵀ K_p (r, n_p) while n_p is small
        self._s: dict[int, torch.Tensor | None] = {}  # Uᵀ K_p K_pᵀ U (r, r) afterwards
        self.n_preserved_keys = 0

    @classmethod
    def rule_hparams(cls, model: Any, layers: list[int]) -> AlphaEditHparams:
        return cls.hparams_cls(layers=layers, mom2_update_weight=rule_update_weight(model, layers))

    def uses_stats(self) -> bool:
        return True  # P comes from C whatever mom2_adjustment says

    def setup(self) -> None:
        super().setup()
        for layer in self.layers:
            self.basis(layer)

    def basis(self, layer: int) -> torch.Tensor:
        """U: eigenvectors of C with eigenvalue < nullspace_threshold (computed once per layer)."""
        if layer not in self._basis:
            evals, evecs = self.stat(layer).eigh()
            keep = evals < self.hparams.nullspace_threshold
            r = int(keep.sum())
            if r == 0:
                raise ValueError(
                    f"alphaedit: no eigenvalue of C at layer {layer} is below nullspace_threshold="
                    f"{self.hparams.nullspace_threshold} (smallest {float(evals[0]):.3g}); the null "
                    f"space is empty and no edit could be written. Raise nullspace_threshold."
                )
            self._basis[layer] = evecs[:, keep].contiguous()
            self._kp[layer] = evecs.new_zeros(r, 0)
            self._s[layer] = None
            log.info("alphaedit: layer %d null space has %d of %d dimensions", layer, r, evals.numel())
        return self._basis[layer]

    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        self.check_requests(requests)
        self.setup()
        ctx = self.contexts()
        layers, top = self.layers, self.layers[-1]
        # 1. targets z* = z + δ at L_m, recording the pass from L₁ up for the layers below
        t = optimise_targets(self.model, self, requests, ctx, top, "block", key_layers=[layers[0]],
                             calls_from=layers[0])
        self._last_targets = t  # kept for diagnostics and tests until the next apply
        # 2. layer by layer, each on the model the lower layers left: the projected solve
        traces, changed, layer_info = [], [], []
        for j, layer in enumerate(layers):
            keys, resid = layer_keys_and_residual(self, t, j)  # K (n, d_in), R (n, d_out)
            before = self.rewrite_out(layer, keys)  # W K + b (n, d_out)
            delta_w = self.projected_solve(layer, keys, resid)
            changed.append(self.write(layer, delta_w))
            traces.append(LayerTrace(layer, self.adapter.rewrite_name(layer), keys.float(),
                                     (before + resid).float(), resid.float()))
            layer_info.append({"layer": layer, "resid_norm": round(float(resid.norm(dim=-1).mean()), 5),
                               "update_norm": round(float(delta_w.norm()), 5)})
        # 3. K_p += the edits' keys at every layer, read on the edited model
        rec = replay_keys(self.model, self.adapter, t, layers[0], key_layers=list(layers))
        for layer in layers:
            self.add_preserved(layer, weighted_keys(rec.keys[layer], t.batch, ctx))
        self.n_preserved_keys += t.batch.n_edits
        edits = [dict(s, record=r.record_index) for s, r in zip(t.stats, requests)]
        info = self._info({
            "edits": edits, "layer_updates": layer_info,
            "nullspace_dims": {str(l): int(self.basis(l).shape[1]) for l in layers},
            "preserved_keys": self.n_preserved_keys,
        })
        return EditOutcome(changed_params=changed, traces=traces, info=info)

    def projected_solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """ΔW = Y Uᵀ (d_out, d_in), Y = R Kᵀ U (Uᵀ K_all K_allᵀ U + α I)⁻¹, for keys (n, d_in) and
        residuals (n, d_out) as rows, float64."""
        u = self.basis(layer)  # (d_in, r)
        alpha = float(self.hparams.L2)
        ku = u.T @ keys.T  # Uᵀ K (r, n)
        rhs = ku @ resid  # Uᵀ K Rᵀ (r, d_out)
        kp, s = self._kp[layer], self._s[layer]
        r = u.shape[1]
        if s is None and kp.shape[1] + ku.shape[1] < r // 2:
            ka = torch.cat([kp, ku], dim=1)  # Uᵀ K_all (r, n_all): Woodbury in the number of keys
            small = alpha * torch.eye(ka.shape[1], dtype=ka.dtype, device=ka.device) + ka.T @ ka
            y_t = (rhs - ka @ torch.linalg.solve(small, ka.T @ rhs)) / alpha  # Yᵀ (r, d_out)
        else:
            if s is None:
                s = kp @ kp.T
            m = s + ku @ ku.T + alpha * torch.eye(r, dtype=ku.dtype, device=ku.device)  # (r, r)
            y_t = torch.cholesky_solve(rhs, torch.linalg.cholesky(m))  # Yᵀ (r, d_out)
        return y_t.T @ u.T

    def add_preserved(self, layer: int, keys: torch.Tensor) -> None:
        """Add keys (n, d_in) to K_p, the earlier edits every later update must leave in place."""
        ku = self.basis(layer).T @ keys.T.to(self.basis(layer))  # Uᵀ K (r, n)
        kp, s = self._kp[layer], self._s[layer]
        if s is None and kp.shape[1] + ku.shape[1] < self.basis(layer).shape[1] // 2:
            self._kp[layer] = torch.cat([kp, ku], dim=1)
        else:
            self._s[layer] = (s if s is not None else kp @ kp.T) + ku @ ku.T
            self._kp[layer] = kp.new_zeros(kp.shape[0], 0)

    def restore(self) -> None:
        """Original weights back, and with them no earlier edits to preserve."""
        super().restore()
        for layer in self._kp:
            self._kp[layer] = self._kp[layer].new_zeros(self._kp[layer].shape[0], 0)
            self._s[layer] = None
        self.n_preserved_keys = 0
