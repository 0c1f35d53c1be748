"""Least-overlap editing: write each edit at the candidate layer where its key is least superposed
with what must be kept, and leave what must be kept exactly in place (DESIGN 6–7).

"Knowledge in superposition" explains why lifelong locate-then-edit fails: an edit at key k_t moves
every other key k_j by p(k_t, k_j) δ_t, and p is rarely 0. This editor acts on that in two ways.

Notation. At candidate layer l the rewrite module W (d_out, d_in) maps a key k to W k + b;
C = E[kkᵀ] = L Lᵀ (Cholesky, float64) and u = L⁻¹k is the whitened key, so uᵢᵀuⱼ = kᵢᵀC⁻¹kⱼ and
‖ΔW L‖²_F = E‖ΔW k‖² is the change an update makes on ordinary text. Per layer the editor keeps

    Q_l (d_in, m)   orthonormal basis of the whitened keys that must be kept: n_probe_keys keys of
                    known facts (read once on the unedited model) and the bare-prompt key of every
                    earlier edit of the run (read at every candidate layer after it is written);
    B_l (d_in, m')  orthonormal basis of span(L⁻¹S, Q_l), S the preserved subspace: the
                    eigenvectors of C whose eigenvalue is at least ``preserve_threshold`` (the
                    directions ordinary text uses; AlphaEdit's null space is their complement).

1. Choice of layer. For the edit's bare-prompt key at each candidate layer,

       overlap_l = ‖Q_lᵀ u‖² / ‖u‖²            (0: whitened-orthogonal to all kept keys; 1: inside their span)

   and the edit is written at l* = argmin_l overlap_l. The overlaps of the declined layers are
   reported beside the chosen one.

2. Target value at l*: ROME's optimisation (:func:`~.locate.optimise_targets`, "rewrite" mode)
   gives δ, the context-averaged key k* and v* = W k* + b + δ (r-ROME's form: k* throughout).

3. Update. With u* = L⁻¹k* and ũ = (I − B Bᵀ) u* its part outside everything kept,

       ΔŴ = δ ũᵀ / (ũᵀu*)        ΔW = ΔŴ L⁻¹ = δ (L⁻ᵀũ)ᵀ / (ũᵀu*)        (d_out, d_in)

   is the least-‖ΔW L‖_F update (the least change on ordinary text) with

       ΔW k* = δ                       the edit is written exactly;
       ΔW k = 0 for L⁻¹k ∈ span(B)     every earlier edit's key, every probe key and every direction
                                        of S is left unchanged, exactly.

   ũᵀu* = ‖ũ‖², and ‖ΔŴ‖_F = ‖δ‖ / ‖ũ‖: the less room an edit's key has outside what is kept
   (``free`` = ‖ũ‖²/‖u*‖²), the larger its side effects on keys nobody kept. An edit whose free
   fraction is below ``min_free`` at l* is not written (the run records it as failed).

After the write, the edit's bare-prompt key (the prompt its Edit Succ. is scored on) is read at
every candidate layer on the edited model (a lower-layer write changes the keys above it) and
added to Q and B there. ``restore()`` puts the
weights back and forgets the earlier edits (the probe keys and S stay: they come from the unedited
model). One request per apply (no batch); requests in one apply are written one after another.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from knowbench.editor import EditOutcome, EditRequest, LayerTrace

from .locate import LocateEditor, LocateHparams, optimise_targets, weighted_keys

log = logging.getLogger(__name__)


@dataclass
class LeastOverlapHparams(LocateHparams):
    preserve_threshold: float = 0.1  # S: eigenvectors of C with eigenvalue >= this (C's units)
    n_probe_keys: int = 256  # known facts whose keys are kept (0: none)
    probe_facts: str | None = None  # their file (any `knowbench superposition --data` format);
    #                                 None: the embedded world's facts for a world model, else none
    min_free: float = 1e-4  # refuse an edit with less of its key outside what is kept
    # the norm the update is least in: "whitened" ‖ΔW L‖_F (the change on ordinary text, ROME's) or
    # "raw" ‖ΔW‖_F (AlphaEdit's, with no C⁻¹ weight on the rarely used directions); both keep the
    # same keys exactly
    solve_norm: str = "whitened"
    orth_tol: float = 1e-6  # a kept key adds a direction only if this much of it is new (relative norm)


class KeptBasis:
    """An orthonormal basis (d, m) grown one vector at a time by Gram–Schmidt, orthogonalised twice
    (float64); a vector adds a column only if more than ``tol`` of its norm lies outside the span."""

    def __init__(self, dim: int, tol: float, device: Any = None):
        self.tol = tol
        self._q = torch.zeros(dim, 64, dtype=torch.float64, device=device)
        self.m = 0

    @property
    def q(self) -> torch.Tensor:
        return self._q[:, : self.m]

    def outside(self, x: torch.Tensor) -> torch.Tensor:
        """(I − Q Qᵀ) x for x (d,) or (d, n), twice for orthogonality to working precision."""
        q = self.q
        for _ in range(2):
            x = x - q @ (q.T @ x)
        return x

    def add(self, x: torch.Tensor) -> bool:
        x = x.to(self._q)
        r = self.outside(x)
        if float(r.norm()) <= self.tol * float(x.norm()):
            return False
        if self.m == self._q.shape[1]:
            self._q = torch.cat([self._q, torch.zeros_like(self._q)], dim=1)
        self._q[:, self.m] = r / r.norm()
        self.m += 1
        return True

    def add_rows(self, rows: torch.Tensor) -> int:
        return sum(self.add(r) for r in rows)


class LeastOverlap(LocateEditor):
    name: ClassVar[str] = "least-overlap"
    hparams_cls: ClassVar[type] = LeastOverlapHparams
    supports_batch: ClassVar[bool] = False

    def __init__(self, model: Any, tokenizer: Any, hparams: LeastOverlapHparams, context: Any):
        super().__init__(model, tokenizer, hparams, context)
        if not 0 <= hparams.min_free < 1:
            raise ValueError(f"least-overlap: min_free must be in [0, 1), got {hparams.min_free}")
        if hparams.solve_norm not in ("whitened", "raw"):
            raise ValueError(f"least-overlap: solve_norm must be 'whitened' or 'raw', got {hparams.solve_norm!r}")
        self._chol: dict[int, torch.Tensor] = {}  # L per layer
        self._probe_keys: dict[int, torch.Tensor] = {}  # probe keys per layer (n, d_in), raw, float64
        self._s_dims: dict[int, int] = {}
        self._q: dict[int, KeptBasis] = {}  # probes + earlier edits (the choice)
        self._b: dict[int, KeptBasis] = {}  # S + probes + earlier edits (the solve)
        self._probe_source = ""
        self.n_edits = 0
        self.choices: list[dict[str, Any]] = []  # per edit: chosen layer, its overlap, the declined ones

    def uses_stats(self) -> bool:
        return True  # whitening and S need C at every candidate layer

    # -- fixed for the run: C, S and the probe keys per layer ----------------------------------------
    def setup(self) -> None:
        super().setup()
        if self._chol:
            return
        probes = self._probe_items()
        raw = capture(self.model, self.tok, probes, self.layers) if probes else {}
        for layer in self.layers:
            sm = self.stat(layer)
            self._chol[layer] = sm.cholesky().to(torch.float64)
            self._probe_keys[layer] = raw[layer].to(torch.float64) if probes else None  # raw keys
        self._reset_bases()

    def _reset_bases(self) -> None:
        hp = self.hparams
        for layer in self.layers:
            chol = self._chol[layer]
            d = chol.shape[0]
            q, b = KeptBasis(d, hp.orth_tol, chol.device), KeptBasis(d, hp.orth_tol, chol.device)
            evals, evecs = self.stat(layer).eigh()
            s = evecs[:, evals >= hp.preserve_threshold].to(torch.float64)  # (d, |S|) raw directions
            # span(S) in the solve's coordinates at once (QR), then Gram–Schmidt for the rest
            ws = s if self.raw else torch.linalg.solve_triangular(chol, s, upper=False)
            if ws.shape[1]:
                basis, _ = torch.linalg.qr(ws)
                b._q = torch.cat([basis, torch.zeros(d, 64, dtype=torch.float64, device=chol.device)], dim=1)
                b.m = basis.shape[1]
            self._s_dims[layer] = b.m
            pk = self._probe_keys.get(layer)
            if pk is not None:
                q.add_rows(self.whiten(layer, pk))
                b.add_rows(self.to_solve(layer, pk))
            self._q[layer], self._b[layer] = q, b

    @property
    def raw(self) -> bool:
        return self.hparams.solve_norm == "raw"

    def to_solve(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """Key rows in the solve's coordinates: whitened u = L⁻¹k, or the raw keys (float64)."""
        return keys.to(torch.float64) if self.raw else self.whiten(layer, keys)

    def _probe_items(self) -> list[tuple[str, str]]:
        hp = self.hparams
        if hp.n_probe_keys <= 0:
            self._probe_source = "none (n_probe_keys 0)"
            return []
        from knowbench.defaults import is_world_model
        from knowbench.study import read_facts, world_facts

        if hp.probe_facts:
            facts, _ = read_facts(hp.probe_facts)
            self._probe_source = hp.probe_facts
        elif is_world_model(self.context.model_name):
            facts, rep = world_facts()
            self._probe_source = rep.path
        else:
            log.warning("least-overlap: no probe_facts for model %s; keeping S and the earlier edits only",
                        self.context.model_name)
            self._probe_source = "none (no probe_facts for this model)"
            return []
        rng = random.Random(f"least-overlap-probes-{self.context.seed}")
        pick = sorted(rng.sample(range(len(facts)), min(hp.n_probe_keys, len(facts))))
        return [(facts[i].prompt, facts[i].subject) for i in pick]

    def whiten(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """u = L⁻¹k for key rows (n, d_in) -> (n, d_in) float64."""
        chol = self._chol[layer]
        k = keys.to(device=chol.device, dtype=torch.float64)
        return torch.linalg.solve_triangular(chol, k.T, upper=False).T

    # -- the edit ---------------------------------------------------------------------------------------
    def overlaps(self, bare: dict[int, torch.Tensor]) -> dict[int, float]:
        """overlap_l = ‖Q_lᵀu‖²/‖u‖² of one bare key per candidate layer ({layer: (d_in,)})."""
        out = {}
        for layer in self.layers:
            u = self.whiten(layer, bare[layer][None])[0]
            q = self._q[layer].q
            out[layer] = float((q.T @ u).square().sum() / u.square().sum())
        return out

    def solve(self, layer: int, k_star: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, float]:
        """ΔW (d_out, d_in) with ΔW k* = δ and ΔW k = 0 on everything kept, least in the solve's
        norm, and the free fraction ‖ũ‖²/‖u*‖²: whitened, ΔW = δ (L⁻ᵀũ)ᵀ / (ũᵀu*) with u* = L⁻¹k*;
        raw, ΔW = δ ũᵀ / (ũᵀk*) with u* = k*; ũ = the part of u* outside B's span."""
        u = self.to_solve(layer, k_star[None])[0]  # u* (d_in,)
        free_u = self._b[layer].outside(u)  # ũ
        free = float(free_u.square().sum() / u.square().sum())
        if self.raw:
            back = free_u
        else:  # L⁻ᵀũ
            back = torch.linalg.solve_triangular(self._chol[layer].T, free_u[:, None], upper=True)[:, 0]
        return torch.outer(delta.to(back), back) / (free_u @ u), free

    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        self.check_requests(requests)
        self.setup()
        ctx = self.contexts()
        hp = self.hparams
        changed, traces, per_edit = [], [], []
        for req in requests:
            # 1. the layer where the bare key overlaps least with the kept keys
            bare = capture(self.model, self.tok, [(req.prompt, req.subject)], self.layers)
            ov = self.overlaps({l: bare[l][0] for l in self.layers})
            layer = min(self.layers, key=lambda l: (ov[l], l))
            # 2. δ and k* at that layer (ROME's optimisation)
            t = optimise_targets(self.model, self, [req], ctx, layer, "rewrite", key_layers=[layer])
            k_star = weighted_keys(t.keys[layer], t.batch, ctx)[0]
            delta = t.delta[0].double()
            # 3. the update that writes δ at k* and leaves everything kept in place
            delta_w, free = self.solve(layer, k_star, delta)
            choice = {"record": req.record_index, "layer": layer, "overlap": round(ov[layer], 6),
                      "declined": {str(l): round(v, 6) for l, v in ov.items() if l != layer},
                      "free": round(free, 6)}
            if free < hp.min_free:
                self.choices.append({**choice, "written": False})
                raise ValueError(f"least-overlap: record {req.record_index}: only {free:.2e} of its whitened key at "
                                 f"layer {layer} lies outside the kept keys (min_free {hp.min_free}); not written")
            before = self.rewrite_out(layer, k_star[None])[0]
            changed.append(self.write(layer, delta_w))
            traces.append(LayerTrace(layer, self.adapter.rewrite_name(layer), k_star[None].float(),
                                     (before + delta)[None].float(), delta[None].float()))
            # 4. keep this edit: its bare-prompt key (the one its Edit Succ. reads) at every candidate
            #    layer, read on the edited model
            kept = capture(self.model, self.tok, [(req.prompt, req.subject)], self.layers)
            for l in self.layers:
                self._q[l].add_rows(self.whiten(l, kept[l]))
                self._b[l].add_rows(self.to_solve(l, kept[l]))
            self.n_edits += 1
            self.choices.append({**choice, "written": True})
            per_edit.append({**dict(t.stats[0]), **choice, "update_norm": round(float(delta_w.norm()), 5)})
        info = self._info({"edits": per_edit, "kept_dims": {str(l): self._b[l].m for l in self.layers}})
        return EditOutcome(changed_params=sorted(set(changed)), traces=traces, info=info)

    # -- diagnostics and the contract ------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Where the edits went and how superposed they were there: the chosen layer's overlap
        against the mean of the declined layers', per edit averaged over the run."""
        written = [c for c in self.choices if c["written"]]
        out: dict[str, Any] = {"edits": self.n_edits, "refused": len(self.choices) - len(written)}
        if written:
            chosen = [c["overlap"] for c in written]
            declined = [sum(c["declined"].values()) / len(c["declined"]) for c in written if c["declined"]]
            out["overlap_chosen_mean"] = round(sum(chosen) / len(chosen), 6)
            if declined:
                out["overlap_declined_mean"] = round(sum(declined) / len(declined), 6)
            out["free_mean"] = round(sum(c["free"] for c in written) / len(written), 6)
            out["free_min"] = round(min(c["free"] for c in written), 6)
            out["layer_counts"] = {str(l): sum(c["layer"] == l for c in written) for l in self.layers}
            out["last"] = written[-1]
        if self._b:
            out["kept_dims"] = {str(l): self._b[l].m for l in self.layers}
        return out

    def provenance(self) -> dict[str, Any]:
        prov = super().provenance()
        prov["probe_keys"] = {"source": self._probe_source,
                              "n": int(next(iter(self._probe_keys.values())).shape[0])
                              if self._probe_keys and next(iter(self._probe_keys.values())) is not None else 0}
        prov["preserved_dims"] = {str(l): d for l, d in self._s_dims.items()}
        return prov

    def restore(self) -> None:
        """Original weights back; the earlier edits are forgotten (probe keys and S stay)."""
        super().restore()
        if self._chol:
            self._reset_bases()
        self.n_edits = 0
        self.choices = []


def capture(model: Any, tok: Any, items: list[tuple[str, str]], layers: list[int]) -> dict[int, torch.Tensor]:
    """Keys at the subject's last token of (prompt, subject) pairs at ``layers`` on the model as it is."""
    from knowbench.diagnostics import capture_keys

    return capture_keys(model, tok, items, layers, batch_size=32)

