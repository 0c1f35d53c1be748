"""MEND: a trained hypernetwork turns the edit's gradient into a weight update (EDITORS.md 5).

Edited weights: the MLP matrices of the last 3 layers (``layers``/``modules``): GPT-2 c_fc and
c_proj (Conv1D, stored (d_in, d_out)), Llama gate/up/down_proj (Linear, stored (d_out, d_in)).

Gradient factors. For an edit (prompt x, target y) the edit loss is the NLL of the target tokens
given the prompt (prompt masked, mean over every target token of the batch). For every edited
matrix W (input u, output z = W u) one forward/backward pass on the current weights records, per
token b of the batch, u_b (d_in,) and δ_b = ∂NLL/∂z_b (d_out,); rows where u_b or δ_b is all zero
(padding, the last token) are dropped. Then ∇W = Σ_b δ_b u_bᵀ (Linear layout).

Normalisation (norm True). ũ = (u − μ_u)/(σ_u + 1e-7), δ̃ = (δ − μ_δ)/(σ_δ + 1e-7) with running
(Welford) mean and standard deviation per network, updated with every factor row seen in training
(before the rows are normalised, as the reference does) and frozen afterwards; the network's
outputs are not de-normalised. Before a normaliser has seen two rows it is the identity.

Network g. One per weight shape (d_in, d_out) (``shared``: the c_fc of every edited layer share
one, as do the c_proj), with a learned per-matrix "mode" (scale s_m, shift o_m). Input
h₀ = [ũ; δ̃] (d_in + d_out,), n_hidden + 1 residual low-rank layers

    h ← h + max(0, s_m ⊙ (U V h + b) + o_m)     U (D, r) = 0, V (r, D) ~ N(0, 1), b = 0, s = 1, o = 0

with r = min(rank, D); the clamp (not ReLU) passes the gradient at 0 so U learns from the start,
and with U = 0 every layer is the identity. The output splits into (u′, δ′).

Update. W̃ = W + α_m · Σ_b δ′_b u′_bᵀ, α_m learnable per matrix, initialised to ``edit_lr``. This
is the reference code's convention ("easyedit@14cea82"): the transformed gradient is *added* and
training learns the sign (α turns negative within the first steps); the paper writes W − α∇̃W.
At identity g and identity normaliser the change is exactly α·∇W of the edit NLL.

Meta-training (``train``; the base model is frozen, only g and α learn). Per record (batch of one,
records in a seeded permutation per epoch): the factors on the unedited model (detached), W̃ as
above, then one forward pass over [edit; locality prompts] through the edited weights
(torch.func.functional_call, so the loss reaches g and α)

    L = cedit · NLL_edit(W̃; edit) + cloc · KL(p_W(·|x_loc) ‖ p_W̃(·|x_loc))

with the edit loss on the edit itself (EasyEdit's edit_inner; the paper uses a rephrase) and the
KL averaged over every token of the record's locality prompts joined with their answers. Adam on
g (lr ``lr``) and α (lr ``lr_lr``; the reference also gives α to g's optimiser at lr 1e-6, a
negligible addition left out), gradients accumulated over ``accumulate`` records, norm clipped at
``grad_clip``. The last ``val_fraction`` of the split (at least ``val_min`` records, at most half)
is held out; every ``val_every`` steps it is edited one record at a time and scored (edit success =
argmax accuracy on the target tokens, locality = argmax agreement on the locality answers before
and after, the losses); the state with the best ``select_on`` is kept, training stops after
``patience`` steps without improvement, after ``max_steps`` or after ``max_seconds``. A checkpoint
(g, α, optimiser, normalisers, step, curve, best state) is written every ``checkpoint_every``
steps and resumed from when ``train`` runs again on the same folder.

Reference hyper-parameters (hparams/MEND, 7B and GPT-2 XL): lr 1e-6, edit_lr 1e-4, lr_lr 1e-4,
cedit 0.1, cloc 1.0, n_hidden 1, rank 1920, norm, shared, accumulate 10, grad_clip 100, 100,000
steps, patience 20,000. The embedded world model needs larger learning rates
(editors/hparams/mend-embedded.yaml).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from knowbench.editor import (
    Artefact, ChangeKind, EditOutcome, EditRequest, RunContext, Site, TrainSplit, WeightEditor, hparams_to_dict,
)
from knowbench.devices import input_device, like
from knowbench.scoring import _fit, _max_positions, target_spans
from knowbench.tokens import pad_batch, pad_id

from .hparams_yaml import YamlHparams

log = logging.getLogger(__name__)

SEMANTICS = "easyedit@14cea82"  # edit loss on the edit itself; the update is added, its sign learned
ARTEFACT_FILE = "mend.pt"
SELECT_ON = ("loss", "score")  # lowest validation loss (the reference), or highest mean(edit, locality)

# The MLP matrices per family, relative to a transformer block (EasyEdit's inner_params).
MLP_MATRICES: dict[str, list[str]] = {
    "gpt2": ["mlp.c_fc", "mlp.c_proj"],
    "gptj": ["mlp.fc_in", "mlp.fc_out"],
    "gpt_neox": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    **{f: ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] for f in ("llama", "mistral", "qwen2", "gemma")},
}


@dataclass
class MENDHparams:
    layers: list[int] = field(default_factory=list)  # empty: the last 3 layers
    modules: list[str] = field(default_factory=list)  # relative to a block; empty: the family's MLP matrices
    # the network g
    rank: int = 1920  # r = min(rank, d_in + d_out)
    n_hidden: int = 1  # n_hidden + 1 residual low-rank layers
    norm: bool = True  # standardise u and δ by running statistics
    shared: bool = True  # one network per weight shape (per-matrix modes) instead of one per matrix
    edit_lr: float = 1e-4  # initial α
    # meta-training
    lr: float = 1e-6  # Adam on g
    lr_lr: float = 1e-4  # Adam on α
    cedit: float = 0.1
    cloc: float = 1.0
    grad_clip: float = 100.0
    accumulate: int = 10  # records per optimiser step
    max_steps: int = 100_000  # records seen
    max_seconds: float = 0.0  # wall-clock limit of the training (0: none)
    val_every: int = 1000
    patience: int = 20_000  # steps without a better validation value before stopping
    checkpoint_every: int = 5000
    val_fraction: float = 0.1
    val_min: int = 20
    val_max: int = 0  # at most this many validation records (0: no limit)
    select_on: str = "loss"  # "loss" (cedit·edit + cloc·loc, lower is better) or "score"


# -- the network g ---------------------------------------------------------------------------------
class _Normaliser(nn.Module):
    """Running mean and variance of the factor rows (Chan's merge of Welford statistics, float64)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        """Add rows (n, dim) to the statistics."""
        if rows.shape[0] == 0:
            return
        rows = rows.to(torch.float64)
        n_b = rows.shape[0]
        mean_b = rows.mean(0)
        m2_b = ((rows - mean_b) ** 2).sum(0)
        n_a = self.count.clone()
        n = n_a + n_b
        diff = mean_b - self.mean
        self.mean += diff * (n_b / n)
        self.m2 += m2_b + diff**2 * (n_a * n_b / n)
        self.count.fill_(n)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.count < 2:  # nothing learned yet: identity
            return rows
        std = (self.m2 / (self.count - 1)).sqrt()
        return (rows - self.mean.to(rows.dtype)) / (std.to(rows.dtype) + 1e-7)


class _LowRankResidual(nn.Module):
    """h + max(0, s_m ⊙ (U V h + b) + o_m): the identity at initialisation (U = 0)."""

    def __init__(self, dim: int, rank: int, n_modes: int, generator: torch.Generator):
        super().__init__()
        r = min(rank, dim)
        self.U = nn.Parameter(torch.zeros(dim, r))
        self.V = nn.Parameter(torch.randn(r, dim, generator=generator))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, h: torch.Tensor, mode: int) -> torch.Tensor:  # h (n, D)
        pre = (h @ self.V.T) @ self.U.T + self.bias  # (n, D); low rank, never the D×D product
        pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        return h + pre.clamp(min=0)  # clamp: gradient 1 at 0, so U learns from the identity


class GradientNet(nn.Module):
    """g for one weight shape: normalisers for u and δ, then the residual low-rank layers on [ũ; δ̃]."""

    def __init__(self, d_in: int, d_out: int, hp: MENDHparams, n_modes: int, generator: torch.Generator):
        super().__init__()
        self.d_in, self.d_out, self.use_norm = d_in, d_out, hp.norm
        self.norm_u = _Normaliser(d_in)
        self.norm_d = _Normaliser(d_out)
        self.layers = nn.ModuleList(
            [_LowRankResidual(d_in + d_out, hp.rank, n_modes, generator) for _ in range(hp.n_hidden + 1)]
        )

    def standardise(self, u: torch.Tensor, d: torch.Tensor, update_stats: bool = False) -> torch.Tensor:
        """h₀ = [ũ; δ̃] (n, d_in + d_out) for factor rows u (n, d_in), δ (n, d_out); ``update_stats``
        first adds the rows to the running statistics (training)."""
        u, d = u.float(), d.float()
        if update_stats:
            self.norm_u.update(u)
            self.norm_d.update(d)
        if self.use_norm:
            u, d = self.norm_u(u), self.norm_d(d)
        return torch.cat([u, d], dim=-1)

    def transform(self, h: torch.Tensor, mode: int | torch.Tensor) -> torch.Tensor:
        """The residual layers on h₀ (n, D); ``mode`` one per call or one per row (n,)."""
        for layer in self.layers:
            h = layer(h, mode)
        return h

    def forward(self, u: torch.Tensor, d: torch.Tensor, mode: int, update_stats: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(u′, δ′) for the factor rows of one matrix."""
        h = self.transform(self.standardise(u, d, update_stats), mode)
        return h[:, : self.d_in], h[:, self.d_in :]


@dataclass
class _Matrix:
    """One edited weight: where it is and how it is stored."""

    name: str  # parameter name
    module: str  # module name
    layer: int
    conv1d: bool  # stored (d_in, d_out)
    d_in: int
    d_out: int
    net: str  # key of its network in MEND.nets
    mode: int  # its mode in that network


@dataclass
class _Batch:
    input_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T)
    pos: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): target token ids where the edit loss reads them, else -100


@dataclass
class _Example:
    """One training/validation record, tokenised once."""

    edit: _Batch
    loc: _Batch | None  # locality prompts joined with their answers (labels: the answer tokens)
    both: _Batch | None  # the edit row then the locality rows: one edited forward pass for both losses


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No model parameter requires grad inside (factors are taken w.r.t. module outputs)."""
    was = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in was:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in was:
            p.requires_grad_(flag)


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over every labelled token (position t predicts token t+1)."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    picked = lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum().clamp(min=1)


def _kl(base_logits: torch.Tensor, post_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p_base ‖ p_post) averaged over the unmasked positions."""
    lp_base = F.log_softmax(base_logits.float(), dim=-1)
    lp_post = F.log_softmax(post_logits.float(), dim=-1)
    kl = (lp_base.exp() * (lp_base - lp_post)).sum(-1)  # (B, T)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1)


class MEND(YamlHparams, WeightEditor):
    name = "mend"
    hparams_cls: ClassVar[type] = MENDHparams
    kind: ClassVar[ChangeKind] = ChangeKind.WEIGHTS
    supports_batch: ClassVar[bool] = True
    trainable: ClassVar[bool] = True


    def __init__(self, model: nn.Module, tokenizer: Any, hparams: MENDHparams, context: RunContext):
        super().__init__(model, tokenizer, hparams, context)
        hp = hparams
        if hp.select_on not in SELECT_ON:
            raise ValueError(f"mend: select_on must be one of {', '.join(SELECT_ON)}, got {hp.select_on!r}")
        n = self.adapter.n_layers
        bad = [l for l in hp.layers if not -n <= l < n]
        if bad:
            raise ValueError(f"mend: layers {bad} out of range for a {n}-layer model")
        self.layers = sorted({l % n for l in hp.layers}) if hp.layers else list(range(max(0, n - 3), n))
        modules = hp.modules or MLP_MATRICES.get(self.adapter.model_type)
        if not modules:
            raise ValueError(f"mend: no default MLP matrices for model_type {self.adapter.model_type!r}; set modules")
        named = dict(model.named_modules())
        self.matrices: list[_Matrix] = []
        shapes: dict[tuple[int, int], int] = {}
        for layer in self.layers:
            for rel in modules:
                mod_name = f"{self.adapter.block_name(layer)}.{rel}"
                mod = named.get(mod_name)
                if mod is None or not isinstance(getattr(mod, "weight", None), torch.Tensor) or mod.weight.dim() != 2:
                    raise ValueError(f"mend: {mod_name} is not a module with a 2-D weight in this model")
                conv1d = type(mod).__name__ == "Conv1D"  # transformers' Conv1D stores (d_in, d_out)
                rows, cols = mod.weight.shape
                d_in, d_out = (rows, cols) if conv1d else (cols, rows)
                shape = (d_in, d_out)
                key = f"{d_in}x{d_out}" if hp.shared else mod_name.replace(".", "_")
                mode = shapes.get(shape, 0) if hp.shared else 0
                shapes[shape] = mode + 1
                self.matrices.append(_Matrix(mod_name + ".weight", mod_name, layer, conv1d, d_in, d_out, key, mode))
        self.nets = self._build_nets(context.seed)
        self.alpha = nn.Parameter(torch.full((len(self.matrices),), float(hp.edit_lr), device=self._device()))
        self.last_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._artefact: str | None = None

    # -- parts ----------------------------------------------------------------------------------
    def _build_nets(self, seed: int) -> nn.ModuleDict:
        """Fresh networks; V drawn from a generator seeded by the run seed (not the global RNG)."""
        gen = torch.Generator().manual_seed(int(seed))
        counts: dict[str, int] = {}
        dims: dict[str, tuple[int, int]] = {}
        for m in self.matrices:
            counts[m.net] = counts.get(m.net, 0) + 1
            dims[m.net] = (m.d_in, m.d_out)
        nets = nn.ModuleDict({k: GradientNet(*dims[k], self.hparams, counts[k], gen) for k in dims})
        return nets.to(self._device())

    def _device(self) -> torch.device:
        """Where token rows, the networks and α live: the input embeddings' device (the factors of
        a matrix on another device are moved there, its ΔW back to the matrix's device)."""
        return input_device(self.model)

    def outer_parameters(self) -> list[nn.Parameter]:
        return list(self.nets.parameters()) + [self.alpha]

    def sites(self) -> list[Site]:
        """The MLP output projection of every edited layer (the rewrite module the diagnostics watch)."""
        out = []
        names = {m.name for m in self.matrices}
        for layer in self.layers:
            param = self.adapter.rewrite_param_name(layer)
            if param in names:
                out.append(Site(layer, self.adapter.rewrite_name(layer), param, second_moment=None))
        return out

    def provenance(self) -> dict[str, Any]:
        return {
            "semantics": SEMANTICS,
            "params": [m.name for m in self.matrices],
            "alpha": [round(float(a), 8) for a in self.alpha.detach()],
            "artefact": self._artefact,
        }

    # -- tokenisation ---------------------------------------------------------------------------
    def _rows(self, pairs: Sequence[tuple[str, str]], who: str) -> list[tuple[list[int], int]]:
        spans = target_spans(self.tok, pairs)
        limit, bos = _max_positions(self.model), getattr(self.tok, "bos_token_id", None)
        try:
            return [_fit(ids, start, limit, i, bos) for i, (ids, start) in enumerate(spans)]
        except ValueError as exc:
            raise ValueError(f"mend: {who}: {exc}") from None

    def _batch(self, rows: list[tuple[list[int], int]]) -> _Batch:
        # right padding: every row starts at column 0; padded positions get no δ (nothing reads them)
        ids, mask, pos, _ = pad_batch([r for r, _ in rows], pad_id(self.tok), "right", self._device())
        labels = torch.full_like(ids, -100)
        for i, (r, start) in enumerate(rows):
            labels[i, start : len(r)] = torch.tensor(r[start:], device=ids.device)
        return _Batch(ids, mask, pos, labels)

    def _example(self, record: Any) -> _Example:
        edit_rows = self._rows([(record.prompt, record.target_new)], f"record {record.index}")
        edit = self._batch(edit_rows)
        pairs = [(p.prompt, p.answer) for probes in record.locality.values() for p in probes
                 if p.answer and p.answer.strip()]
        if not pairs:
            return _Example(edit, None, None)
        loc_rows = self._rows(pairs, f"record {record.index} locality")
        return _Example(edit, self._batch(loc_rows), self._batch(edit_rows + loc_rows))

    # -- the edit ---------------------------------------------------------------------------------
    def _logits(self, batch: _Batch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.mask, position_ids=batch.pos)
        if params is None:
            return self.model(**kwargs).logits
        return functional_call(self.model, params, (), kwargs).logits

    def factors(self, batch: _Batch) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
        """Per edited matrix, the rows (u_b, δ_b) of ∇W = Σ_b δ_b u_bᵀ of the edit NLL on the current
        weights (all-zero rows dropped), detached; and the NLL."""
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        named = dict(self.model.named_modules())
        handles = []
        for m in self.matrices:
            def hook(mod, inputs, output, name=m.name):
                captured[name] = (inputs[0], output)
            handles.append(named[m.module].register_forward_hook(hook))
        # the edited weights as fresh leaves that require grad, so every hooked output carries a graph
        leaves = {m.name: self.model.get_parameter(m.name).detach().requires_grad_(True) for m in self.matrices}
        try:
            with _frozen(self.model), torch.enable_grad():
                nll = _nll(self._logits(batch, leaves), batch.labels)
                outs = [captured[m.name][1] for m in self.matrices]
                grads = torch.autograd.grad(nll, outs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        out = {}
        for m, g in zip(self.matrices, grads):
            u = captured[m.name][0].detach().reshape(-1, m.d_in).float()
            d = (torch.zeros_like(captured[m.name][1]) if g is None else g).detach().reshape(-1, m.d_out).float()
            keep = (u != 0).any(-1) & (d != 0).any(-1)
            out[m.name] = (u[keep], d[keep])
        return out, float(nll.detach())

    def deltas(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], update_stats: bool = False
               ) -> dict[str, torch.Tensor]:
        """ΔW per matrix in its stored layout: α_m Σ_b δ′_b u′_bᵀ (Conv1D: its transpose).

        The rows of all matrices that share a network go through it in one call (each row with its
        matrix's mode); the statistics are updated and applied matrix by matrix, in order, as the
        reference does when it transforms one matrix after the other."""
        by_net: dict[str, list[int]] = {}
        for i, m in enumerate(self.matrices):
            by_net.setdefault(m.net, []).append(i)
        out: dict[str, torch.Tensor] = {}
        for key, idx in by_net.items():
            net = self.nets[key]
            # the factors of a matrix on another device than the networks go to theirs
            h0 = [net.standardise(*(like(f, self.alpha) for f in factors[self.matrices[i].name]),
                                  update_stats=update_stats) for i in idx]
            sizes = [h.shape[0] for h in h0]
            modes = torch.cat([torch.full((n,), self.matrices[i].mode, dtype=torch.long) for i, n in zip(idx, sizes)])
            h = net.transform(torch.cat(h0), modes.to(h0[0].device))
            for i, part in zip(idx, h.split(sizes)):
                m = self.matrices[i]
                u2, d2 = part[:, : m.d_in], part[:, m.d_in :]
                outer = torch.einsum("bi,bo->io" if m.conv1d else "bi,bo->oi", u2, d2)
                out[m.name] = self.alpha[i] * outer
        return {m.name: out[m.name] for m in self.matrices}

    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        rows = self._rows([(r.prompt, r.target_new) for r in requests],
                          ", ".join(f"record {r.record_index}" for r in requests))
        batch = self._batch(rows)
        factors, nll = self.factors(batch)
        self.last_factors = factors
        with torch.no_grad():
            deltas = self.deltas(factors)
            norms = {}
            for name, delta in deltas.items():
                w = self.param(name)
                w.add_(delta.to(dtype=w.dtype, device=w.device))
                norms[name] = float(delta.norm())
        return EditOutcome(
            changed_params=[m.name for m in self.matrices],
            info={"nll_before": nll, "n_rows": {k: int(v[0].shape[0]) for k, v in factors.items()},
                  "delta_norm": norms},
        )

    # -- meta-training ------------------------------------------------------------------------------
    def _step_losses(self, ex: _Example, train: bool) -> dict[str, Any]:
        """Edit one example with g; the losses (with graph when ``train``) and the edited logits."""
        factors, _ = self.factors(ex.edit)
        base = {m.name: self.model.get_parameter(m.name).detach() for m in self.matrices}
        with torch.set_grad_enabled(train):
            deltas = self.deltas(factors, update_stats=train)
            edited = {n: base[n] + deltas[n].to(base[n].device, base[n].dtype) for n in base}
            if ex.loc is None:
                post_edit = self._logits(ex.edit, edited)
            else:
                # one pass over [edit row; locality rows]; right padding leaves each row's own
                # positions as they are alone, so the columns past a row's width are dropped
                post = self._logits(ex.both, edited)
                post_edit = post[:1, : ex.edit.input_ids.shape[1]]
                post_loc = post[1:, : ex.loc.input_ids.shape[1]]
            l_edit = _nll(post_edit, ex.edit.labels)
            out: dict[str, Any] = {"l_edit": l_edit, "post_edit": post_edit}
            if ex.loc is not None:
                with torch.no_grad():
                    base_loc = self._logits(ex.loc)
                out.update(l_loc=_kl(base_loc, post_loc, ex.loc.mask), base_loc=base_loc, post_loc=post_loc)
            else:
                out["l_loc"] = torch.zeros((), device=l_edit.device)
            out["loss"] = self.hparams.cedit * l_edit + self.hparams.cloc * out["l_loc"]
        return out

    @staticmethod
    def _argmax_match(logits: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor | None = None) -> float:
        """Mean over rows of the fraction of labelled positions whose argmax equals the label
        (or, with ``ref``, the argmax of the reference logits)."""
        pred = logits[:, :-1].argmax(-1)
        want = labels[:, 1:] if ref is None else ref[:, :-1].argmax(-1)
        keep = labels[:, 1:] != -100
        per_row = ((pred == want) & keep).sum(1).float() / keep.sum(1).clamp(min=1).float()
        return float(per_row[keep.any(1)].mean()) if keep.any() else float("nan")

    @torch.no_grad()
    def validate(self, examples: Sequence[_Example]) -> dict[str, float]:
        """Edit each example alone with the current g and α and score it (nothing is written to the model)."""
        sums = {"edit_succ": 0.0, "locality": 0.0, "loss_edit": 0.0, "loss_loc": 0.0, "loss": 0.0}
        n_loc = 0
        for ex in examples:
            o = self._step_losses(ex, train=False)
            sums["edit_succ"] += self._argmax_match(o["post_edit"], ex.edit.labels)
            sums["loss_edit"] += float(o["l_edit"])
            sums["loss_loc"] += float(o["l_loc"])
            sums["loss"] += float(o["loss"])
            if ex.loc is not None:
                sums["locality"] += self._argmax_match(o["post_loc"], ex.loc.labels, ref=o["base_loc"])
                n_loc += 1
        n = max(1, len(examples))
        out = {k: v / n for k, v in sums.items() if k != "locality"}
        out["edit_succ"] *= 100
        if n_loc:  # a split without locality items (ConvSent's, say) has no locality to report
            out["locality"] = 100 * sums["locality"] / n_loc
        out["score"] = (out["edit_succ"] + out["locality"]) / 2 if n_loc else out["edit_succ"]
        return out

    def _split(self, records: list[Any]) -> tuple[list[Any], list[Any]]:
        hp = self.hparams
        n = len(records)
        if n < 2:
            raise ValueError(f"mend: the training split has {n} usable record(s); need at least 2")
        n_val = max(hp.val_min, math.ceil(hp.val_fraction * n))
        if hp.val_max > 0:
            n_val = min(n_val, hp.val_max)
        if n_val > n // 2:
            log.warning("mend: only %d training records; holding out %d (half) for validation", n, n // 2)
            n_val = n // 2
        return records[: n - n_val], records[n - n_val :]

    def _on_step(self, step: int) -> None:
        """Called after every training step (tests interrupt a training here)."""

    def _order(self, step: int, n: int) -> int:
        """The training record of ``step``: a fresh permutation per epoch, fixed by the seed and the
        epoch alone (so a resumed training sees the same records)."""
        epoch, at = divmod(step, n)
        if getattr(self, "_perm_epoch", None) != epoch:
            gen = torch.Generator().manual_seed(int(self.context.seed) * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(n, generator=gen).tolist(), epoch
        return self._perm[at]

    def _state(self) -> dict[str, Any]:
        return {"nets": copy.deepcopy(self.nets.state_dict()), "alpha": self.alpha.detach().clone()}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.nets.load_state_dict(state["nets"])
        with torch.no_grad():
            self.alpha.copy_(state["alpha"])

    def train(self, split: TrainSplit) -> Artefact:
        from knowbench.progress import progress_bar
        from knowbench.training import drop_checkpoint, load_checkpoint, save_checkpoint

        hp: MENDHparams = self.hparams
        folder = self.context.artefact_dir
        if folder is None:
            raise ValueError("mend: train() needs context.artefact_dir (knowbench train sets it)")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        train_recs, val_recs = self._split(list(split.report.records))
        train_ex = [self._example(r) for r in train_recs]
        val_ex = [self._example(r) for r in val_recs]
        n_loc = sum(ex.loc is not None for ex in train_ex)
        if n_loc < len(train_ex):  # ConvSent's KL locality, say, is no (prompt, answer) pair to keep
            log.warning("mend: %d of %d training records have no locality (prompt, answer) items; on those "
                        "the training minimises the edit loss alone", len(train_ex) - n_loc, len(train_ex))
        log.info("mend: %d training and %d validation records, %d matrices, %d parameters in g",
                 len(train_ex), len(val_ex), len(self.matrices), sum(p.numel() for p in self.nets.parameters()))

        self.nets = self._build_nets(self.context.seed)
        with torch.no_grad():
            self.alpha.fill_(float(hp.edit_lr))
        opt = torch.optim.Adam([{"params": list(self.nets.parameters()), "lr": hp.lr},
                                {"params": [self.alpha], "lr": hp.lr_lr}])
        step, curve, best, best_step, best_value, elapsed, stopped = 0, [], None, -1, None, 0.0, "max_steps"
        state = load_checkpoint(folder)
        if state is not None:
            self._load_state(state)
            opt.load_state_dict(state["opt"])
            step, curve, elapsed = state["step"], state["curve"], state["elapsed"]
            best, best_step, best_value = state["best"], state["best_step"], state["best_value"]
            log.info("mend: resuming from the checkpoint at step %d", step)
        better = (lambda a, b: a < b) if hp.select_on == "loss" else (lambda a, b: a > b)

        def checkpoint() -> None:
            save_checkpoint(folder, {"nets": self.nets.state_dict(), "alpha": self.alpha.detach().clone(),
                                     "opt": opt.state_dict(), "step": step, "curve": curve, "best": best,
                                     "best_step": best_step, "best_value": best_value,
                                     "elapsed": elapsed + time.perf_counter() - t0})

        def evaluate() -> None:
            nonlocal best, best_step, best_value
            point = {"step": step, **{k: round(v, 6) for k, v in self.validate(val_ex).items()}}
            curve.append(point)
            value = point[hp.select_on]
            if best_value is None or better(value, best_value):
                best, best_step, best_value = self._state(), step, value
            log.info("mend step %d: edit %.1f locality %s loss %.4f (edit %.4f, loc %.4f)", step,
                     point["edit_succ"], f"{point['locality']:.1f}" if "locality" in point else "–", point["loss"],
                     point["loss_edit"], point["loss_loc"])

        accumulate = max(1, hp.accumulate)
        ckpt_every = max(1, hp.checkpoint_every)
        ckpt_every = ckpt_every + (-ckpt_every) % accumulate  # at optimiser-step boundaries: no pending grads
        progress = self.context.progress or progress_bar
        t0 = time.perf_counter()
        self.model.eval()
        with _frozen(self.model), progress("mend · meta-training", hp.max_steps) as advance:
            advance(step)
            if step == 0 and not curve:
                evaluate()
            opt.zero_grad(set_to_none=True)
            while step < hp.max_steps:
                ex = train_ex[self._order(step, len(train_ex))]
                out = self._step_losses(ex, train=True)
                (out["loss"] / accumulate).backward()
                step += 1
                if step % accumulate == 0:
                    torch.nn.utils.clip_grad_norm_(self.outer_parameters(), hp.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if step % max(1, hp.val_every) == 0:
                    evaluate()
                if step % ckpt_every == 0:
                    checkpoint()
                self._on_step(step)
                advance(1)
                if best_step >= 0 and step - best_step >= hp.patience:
                    stopped = "early_stop"
                    break
                if hp.max_seconds > 0 and elapsed + time.perf_counter() - t0 >= hp.max_seconds:
                    stopped = "time_limit"
                    break
            if not curve or curve[-1]["step"] != step:
                evaluate()
        train_s = elapsed + time.perf_counter() - t0
        if best is not None:
            self._load_state(best)
        meta = {
            "semantics": SEMANTICS,
            "hparams": hparams_to_dict(hp),
            "params": [m.name for m in self.matrices],
            "steps": step,
            "best_step": best_step,
            "best": next((p for p in curve if p["step"] == best_step), None),
            "stopped": stopped,
            "n_train": len(train_ex),
            "n_val": len(val_ex),
            "alpha": [float(a) for a in self.alpha.detach()],
            "curve": curve,
            "train_seconds": round(train_s, 3),
        }
        torch.save({"nets": self.nets.state_dict(), "alpha": self.alpha.detach().cpu(), "meta": meta},
                   folder / ARTEFACT_FILE)
        drop_checkpoint(folder)
        self._artefact = str(folder)
        return Artefact(folder, meta)

    def load_artefact(self, artefact: Artefact) -> None:
        state = torch.load(Path(artefact.path) / ARTEFACT_FILE, map_location=self._device(), weights_only=False)
        params = state["meta"]["params"]
        mine = [m.name for m in self.matrices]
        if params != mine:
            raise ValueError(f"mend: the artefact {artefact.path} edits {params}, this run edits {mine}")
        self._load_state(state)
        self._artefact = str(artefact.path)
