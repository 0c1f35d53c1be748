"""The locate-then-edit machinery ROME, MEMIT and AlphaEdit share, in the order of the math (DESIGN 6).

1. Keys. Every edit (prompt x with subject s, new target y = y_1..y_m) is run in c contexts
   "{prefix}{x}" (the bare prompt first, then the prefixes of :mod:`.contexts`); the key k is the
   rewrite module's input at the subject's last token, k* = Σ_c w_c k_c the context-weighted mean
   (:func:`build_batch`, :func:`weighted_keys`; :func:`replay_keys` reads them again on edited weights).

2. Target values. A vector δ is added to the residual stream at the last subject token of every
   rewriting prompt "{prefix}{x} y_1..y_{m-1}" at the output of block l, and to the KL prompt
   "{s} is a". δ minimises

       L(δ) = mean_c [ −(1/m) Σ_j log p(y_j | prefix_c, x, y_<j) ]                target NLL
            + kl_factor · KL( p_δ(· | "{s} is a") ‖ p_0(· | "{s} is a") )         at the subject token
            + v_weight_decay · ‖δ‖ / ‖v‖²                                         v: the initial vector

   with Adam (``v_lr``, ``v_num_grad_steps``: that many forward passes, one step fewer), δ projected
   back into the ball ‖δ‖ ≤ clamp_norm_factor·‖v‖ after every step, and an early stop once L < 0.05
   (:func:`optimise_targets`). v* = v + δ (ROME: v the MLP output) or z* = z + δ (MEMIT: z the block
   output): the same thing in every supported architecture, because the MLP output is added straight
   into the residual stream.

3. Closed-form pieces. C⁻¹x with C = E[kkᵀ] from :func:`knowbench.stats.key_statistics`, or x when
   C = I (:func:`c_solve`); for editors spreading one target over layers L₁ < … < L_m, layer L_j's
   keys on the model the lower layers left and its residual share R = (z* − h) / (m − j)
   (:func:`layer_keys_and_residual`); W k + b and W += ΔW (:meth:`LocateEditor.rewrite_out`,
   :meth:`LocateEditor.write`).

Speed: one recorded forward pass per edit (batch) gives the keys, the initial values and the
residual stream after block l; every optimisation step reruns only the blocks above l on it, and the
LM head runs only at the target positions and the KL position. Several edits (MEMIT's batch) are
optimised together with one δ per edit: their losses are independent, so this equals optimising
each alone, with per-edit early stopping and clamping.

:class:`LocateEditor` keeps the run-wide state on the editor instance: the context prefixes (sampled
once, seeded), the second-moment statistics C per layer and their factorisations.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import nn

from knowbench.arch import cache_kwargs, returned_cache
from knowbench.devices import input_device, like, module_device
from knowbench.editor import ChangeKind, EditRequest, RunContext, Site, WeightEditor
from knowbench.keys import Recording, lm_logits, record, subject_indices
from knowbench.scoring import _max_positions, join_prompt_target, target_spans
from knowbench.stats import SecondMoment, key_statistics
from knowbench.tokens import pad_batch, pad_id

from .contexts import ContextSet, sample_prefixes
from .hparams_yaml import find_hparams_file

log = logging.getLogger(__name__)


# -- hyper-parameters --------------------------------------------------------------------------
@dataclass
class LocateHparams:
    """Hyper-parameters shared by the locate-then-edit editors (names follow the reference)."""

    layers: list[int] = field(default_factory=list)  # empty: the editor's default_layers
    fact_token: str = "subject_last"  # "subject_last" or "last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    mom2_adjustment: bool = True  # False: C = I
    mom2_dataset: str = "wikipedia"  # hub corpus name or a local path (a run's StatsOptions.corpus wins)
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"
    mom2_max_length: int | None = None  # tokens per text (default: the model's context)
    mom2_ridge: float = 0.0  # C + ridge·mean(diag C)·I before solving (references: none)
    # (total tokens incl. the start, count) per group of sampled prefixes
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    context_template_starts: list[str] | None = None  # None: sample from BOS (ROME)


def quarter_depth(n_layers: int) -> int:
    """The layer at a quarter of the depth, where the references edit (ROME: 17/48 on gpt2-xl and
    5/32 on llama; MEMIT's 5-6 layers end there)."""
    return min(n_layers - 1, max(0, round(0.25 * n_layers)))


# -- 1. keys: the edit rows and the keys read from them ---------------------------------------
@dataclass
class EditBatch:
    """Token rows for n edits × c contexts (+ one KL row per edit), padded so that every row's
    lookup token sits in column ``split``; row r = e·c + j is edit e in context j."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    n_edits: int
    n_ctx: int
    subj_rows: torch.Tensor  # (n·c + n,) every row
    subj_cols: torch.Tensor  # lookup token of every row
    row_edit: torch.Tensor  # edit index of every row
    tgt_rows: torch.Tensor  # positions whose next token is a target token
    tgt_cols: torch.Tensor
    tgt_labels: torch.Tensor
    tgt_weight: torch.Tensor  # 1 / (m · c) for edit with m target tokens: sums to 1 per edit
    tgt_edit: torch.Tensor
    kl_rows: torch.Tensor  # (n,)
    split: int = 0  # column of every row's lookup token (rows are left-padded to align it)

    def bare_rows(self) -> torch.Tensor:
        return torch.arange(self.n_edits) * self.n_ctx


def _fit_row(ids: list[int], lookup: int, first_target: int, max_len: int | None, tok: Any,
             record_index: int) -> tuple[list[int], int]:
    """``ids`` cut to ``max_len`` tokens by dropping tokens at its left end (after a leading BOS),
    so a context prefix goes first; the lookup token, a token before the target and the target stay
    (else a ValueError naming the record). Returns the row and how many tokens were dropped; a row
    that fits comes back unchanged."""
    if max_len is None or len(ids) <= max_len:
        return ids, 0
    cut = len(ids) - max_len
    head = 1 if ids and ids[0] in getattr(tok, "all_special_ids", ()) and ids[0] == getattr(tok, "bos_token_id", None) else 0
    if head + cut > min(lookup, first_target - 1):
        raise ValueError(
            f"record {record_index}: {len(ids)} tokens do not fit the model's context of {max_len} "
            f"without losing the subject or the target"
        )
    log.debug("record %d: %d context tokens dropped to fit %d positions", record_index, cut, max_len)
    return ids[:head] + ids[head + cut:], cut


def build_batch(tok: Any, requests: Sequence[EditRequest], contexts: ContextSet, fact_token: str, device: Any,
                max_len: int | None = None) -> EditBatch:
    """The rows every key and target is read from: each request in each context (the target's
    tokens fed but the last), then its KL row "{s} is a", left-aligned on the lookup token.

    ``max_len`` (the model's context): a row longer than it loses tokens from its left end (its
    context prefix first, never the subject's last token or the target); rows that fit are as
    they were."""
    seqs, subj_cols, row_edit = [], [], []
    tgt_rows, tgt_cols, tgt_labels, tgt_weight, tgt_edit = [], [], [], [], []
    n, c = len(requests), len(contexts)
    for i, req in enumerate(requests):
        pairs = [(prefix + req.prompt, req.target_new) for prefix in contexts.prefixes]
        spans = target_spans(tok, pairs)
        texts = [join_prompt_target(p, t)[0] for p, t in pairs]
        located = subject_indices(
            tok, texts, [req.subject] * c, [len(p) for p in contexts.prefixes], fact_token,
        )
        for j, ((ids, start), (ids2, subj)) in enumerate(zip(spans, located)):
            if list(ids2[: len(ids)]) != list(ids):
                raise RuntimeError(f"tokenization of {texts[j]!r} is not deterministic")
            if fact_token == "last":
                subj = start - 1
            if subj >= start:
                raise ValueError(
                    f"record {req.record_index}: the subject {req.subject!r} ends inside the target"
                )
            # the row feeds every token but the last: len(ids) - 1 positions
            ids, cut = _fit_row(list(ids), subj, start, None if max_len is None else max_len + 1, tok, req.record_index)
            subj, start = subj - cut, start - cut
            r = len(seqs)
            seqs.append(ids[:-1])  # the last target token is predicted, never fed
            subj_cols.append(subj)
            row_edit.append(i)
            m = len(ids) - start
            for t in range(start, len(ids)):
                tgt_rows.append(r)
                tgt_cols.append(t - 1)
                tgt_labels.append(ids[t])
                tgt_weight.append(1.0 / (m * c))
                tgt_edit.append(i)
    kl_texts = [req.subject + " is a" for req in requests]
    kl_located = subject_indices(tok, kl_texts, [r.subject for r in requests], None, fact_token)
    kl_rows = []
    for i, (ids, subj) in enumerate(kl_located):
        kl_rows.append(len(seqs))
        ends = len(ids)
        while ends > 1 and ids[ends - 1] in getattr(tok, "all_special_ids", ()):
            ends -= 1
        row, cut = _fit_row(list(ids[:ends]), subj, ends, max_len, tok, requests[i].record_index)
        seqs.append(row)
        subj_cols.append(subj - cut)
        row_edit.append(i)
    # Align every row's lookup token on one column S by padding on the left: the columns before S
    # are then the same for every δ, which lets the optimisation cache them (see UpperBlocks).
    split = max(subj_cols)
    shift = [split - c_ for c_ in subj_cols]
    ids, mask, pos, _ = pad_batch(seqs, pad_id(tok), offsets=shift)
    tgt_cols = [c_ + shift[r] for r, c_ in zip(tgt_rows, tgt_cols)]
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    return EditBatch(
        ids.to(device), mask.to(device), pos.to(device), n, c, t(list(range(len(seqs)))),
        t([split] * len(seqs)), t(row_edit), t(tgt_rows), t(tgt_cols), t(tgt_labels),
        t(tgt_weight, torch.float32), t(tgt_edit), t(kl_rows), split,
    )


def weighted_keys(keys: torch.Tensor, batch: EditBatch, contexts: ContextSet) -> torch.Tensor:
    """k* per edit: the context-weighted mean of the keys at the subject token, (n, d_in).
    ``keys`` has one row per batch row (n·c context rows first, then the KL rows)."""
    n, c = batch.n_edits, batch.n_ctx
    w = torch.tensor(contexts.weights, dtype=torch.float64, device=keys.device)
    return (keys[: n * c].double().reshape(n, c, -1) * w[None, :, None]).sum(1)


def replay_keys(model: nn.Module, adapter: Any, t: "Targets", first: int, key_layers: list[int],
                z_layer: int | None = None) -> Recording:
    """Keys at ``key_layers`` (and the output of block ``z_layer``) on the current weights, at every
    row's lookup token, rerunning only the blocks from ``first`` up on the residual stream recorded
    entering it (``t.rec``, recorded with ``calls_from=first``)."""
    b = t.batch
    return record(
        model, adapter, b.input_ids, b.attention_mask, b.position_ids,
        positions=(b.subj_rows, b.subj_cols), key_layers=key_layers,
        block_out_layers=[z_layer] if z_layer is not None else [],
        stop_after=max(key_layers + ([z_layer] if z_layer is not None else [])),
        replay_from=(t.rec, first, t.rec.block_in[first]),
    )


# -- 2. target values: δ, v* = v + δ ---------------------------------------------------------
@dataclass
class Targets:
    """Result of the δ optimisation for n edits at block ``layer``."""

    layer: int
    init: torch.Tensor  # (n, d) the initial vector (v or z) at the bare prompt's subject token
    delta: torch.Tensor  # (n, d)
    rec: Recording | None  # full-width pass with block calls from MEMIT's first layer (None for ROME)
    batch: EditBatch
    stats: list[dict[str, Any]]
    keys: dict[int, torch.Tensor]  # keys at every row's lookup token, per requested layer (unedited model)

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta


class UpperBlocks:
    """The forward pass of one edit batch, arranged for the δ optimisation.

    Columns before the lookup column S (rows are aligned on it) never see δ, so at every block
    above ``layer`` their attention keys and values are fixed. One pass over columns < S fills a
    KV cache; one pass over columns ≥ S (using it) records the keys / values at the lookup token
    (``key_layers``), the residual stream after block ``layer``, and how each upper block was
    called. Every optimisation step then runs only the blocks above ``layer``, only on columns ≥ S
    (the subject's last token, the rest of the prompt, the target). Where that is not possible
    (the last layer, S = 0, or a cache type this does not understand) every column is rerun instead;
    the two paths are checked to agree on the first edit of every editor.
    """

    def __init__(self, model: nn.Module, adapter: Any, b: EditBatch, layer: int, state: dict,
                 key_layers: Sequence[int] = ()):
        self.model, self.adapter, self.b, self.layer = model, adapter, b, layer
        self.key_layers = sorted(set(key_layers))
        self.suffix = False
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.rec: Recording | None = None
        if layer + 1 < adapter.n_layers and b.split > 0 and state.get("suffix_ok", True):
            try:
                self._prepare_suffix()
                if "suffix_ok" not in state:  # first use: the cached path must agree with the full one
                    self._prepare_full(with_keys=False)
                    state["suffix_ok"] = self._agrees()
                    if not state["suffix_ok"]:
                        log.warning("prefix KV cache disagrees with the full pass for %s; rerunning all columns",
                                    type(model).__name__)
                self.suffix = state["suffix_ok"]
            except Exception as exc:  # noqa: BLE001 - an unfamiliar cache: fall back, say why once
                if "suffix_ok" not in state:
                    log.info("prefix KV cache unavailable (%s: %s); rerunning all columns", type(exc).__name__, exc)
                state["suffix_ok"] = False
        if not self.suffix:
            self._prepare_full(with_keys=True)

    # -- preparing --------------------------------------------------------------------------------
    def _prepare_full(self, with_keys: bool) -> None:
        b, n = self.b, self.adapter.n_layers
        self.rec = record(
            self.model, self.adapter, b.input_ids, b.attention_mask, b.position_ids,
            positions=(b.subj_rows, b.subj_cols), key_layers=self.key_layers if with_keys else (),
            block_out_layers=[self.layer], calls_from=self.layer + 1 if self.layer + 1 < n else None,
        )
        self.h0 = self.rec.block_out[self.layer]
        if with_keys:
            self.keys, self.values = self.rec.keys, self.rec.values
            self.lookup = self.h0[like(b.subj_rows, self.h0), like(b.subj_cols, self.h0)]

    def _prepare_suffix(self) -> None:
        from transformers import DynamicCache

        b, s = self.b, self.b.split
        out = self.model(input_ids=b.input_ids[:, :s], attention_mask=b.attention_mask[:, :s],
                         position_ids=b.position_ids[:, :s], **cache_kwargs(self.model, None))
        self.prefix = [(layer.keys.detach(), layer.values.detach()) for layer in returned_cache(out).layers]
        self._new_cache = lambda: DynamicCache(config=self.model.config)
        self._cache = self._fresh()
        rec = record(
            self.model, self.adapter, b.input_ids[:, s:], b.attention_mask, b.position_ids[:, s:],
            positions=(b.subj_rows, torch.zeros_like(b.subj_cols)), key_layers=self.key_layers,
            block_out_layers=[self.layer], calls_from=self.layer + 1,
            model_kwargs=cache_kwargs(self.model, self._cache),
        )
        self.calls = rec.calls
        self.h0s = rec.block_out[self.layer]
        self.keys, self.values = rec.keys, rec.values
        self.lookup = self.h0s[:, 0]

    def _fresh(self):
        cache = self._new_cache()
        for i, (k, v) in enumerate(self.prefix):
            cache.update(k, v, i)
        return cache

    def _run_suffix(self, h: torch.Tensor) -> torch.Tensor:
        old, new = self._cache, self._fresh()  # each step appends to a cache holding the prefix only
        for layer in range(self.layer + 1, self.adapter.n_layers):
            args, kwargs = self.calls[layer]
            args = tuple(new if a is old else a for a in args)
            kwargs = {k: (new if v is old else v) for k, v in kwargs.items()}
            block = self.adapter.block(layer)
            out = block(h, *args[1:], **kwargs) if args else block(**{**kwargs, "hidden_states": h})
            h = out[0] if isinstance(out, (tuple, list)) else out
        return h

    def _agrees(self) -> bool:
        with torch.no_grad():
            a_t, a_k = self(None, force_full=True)
            b_t, b_k = self(None, force_full=False, _suffix=True)
        scale = float(a_t.abs().max()) or 1.0
        return bool((a_t - b_t).abs().max() <= 1e-4 * scale and (a_k - b_k).abs().max() <= 1e-4 * scale)

    # -- one step ----------------------------------------------------------------------------------
    def __call__(self, delta_rows: torch.Tensor | None, force_full: bool = False,
                 _suffix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream after the last block at the target positions and at the KL positions,
        with ``delta_rows`` (one vector per row, or None) added after block ``layer`` at each row's
        lookup token."""
        b = self.b
        # indices and δ go to the device of the tensor they index (blocks may sit on several devices)
        if (self.suffix or _suffix) and not force_full:
            h = self.h0s
            if delta_rows is not None:
                rows = like(b.subj_rows, h)
                h = h.index_put((rows, torch.zeros_like(rows)), delta_rows.to(h.device, h.dtype), accumulate=True)
            out = self._run_suffix(h)
            return out[like(b.tgt_rows, out), like(b.tgt_cols - b.split, out)], out[like(b.kl_rows, out), 0]
        h = self.h0
        if delta_rows is not None:
            h = h.index_put((like(b.subj_rows, h), like(b.subj_cols, h)), delta_rows.to(h.device, h.dtype),
                            accumulate=True)
        out = self.rec.replay(h, self.layer + 1) if self.layer + 1 < self.adapter.n_layers else h
        kl_rows = like(b.kl_rows, out)
        return out[like(b.tgt_rows, out), like(b.tgt_cols, out)], out[kl_rows, like(b.subj_cols, out)[kl_rows]]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_logits(self.adapter, hidden)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter gradients while δ is optimised (the flags are restored afterwards)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


def optimise_targets(
    model: nn.Module,
    editor: "LocateEditor",
    requests: Sequence[EditRequest],
    contexts: ContextSet,
    layer: int,
    init_from: str,
    key_layers: Sequence[int],
    calls_from: int | None = None,
) -> Targets:
    """Find δ for each request at the output of block ``layer`` (see the module docstring).

    ``init_from``: "rewrite" (ROME: v = the rewrite module's output) or "block" (MEMIT: z = the
    block's output). The same recorded pass captures keys at ``key_layers``."""
    hp = editor.hparams
    adapter = editor.adapter
    # the rows go where the model takes its inputs; δ and its loss live where block ``layer`` does
    b = build_batch(editor.tok, requests, contexts, hp.fact_token, input_device(model), max_len=_max_positions(model))
    key_layers = sorted(set(key_layers) | ({layer} if init_from == "rewrite" else set()))
    with frozen(model), torch.no_grad():
        rec = None
        if calls_from is not None:  # MEMIT reruns blocks calls_from..layer at full width later
            rec = record(
                model, adapter, b.input_ids, b.attention_mask, b.position_ids,
                positions=(b.subj_rows, b.subj_cols), calls_from=calls_from,
                block_in_layers=[calls_from], stop_after=layer,
            )
        upper = UpperBlocks(model, adapter, b, layer, editor._runtime, key_layers)
    with frozen(model):
        source = upper.values[layer] if init_from == "rewrite" else upper.lookup
        device = source.device
        init = source[b.bare_rows().to(device)].float()
        row_edit, tgt_edit, tgt_rows = b.row_edit.to(device), b.tgt_edit.to(device), b.tgt_rows.to(device)
        tgt_labels, tgt_weight = b.tgt_labels.to(device), b.tgt_weight.to(device)
        n = len(requests)
        delta = torch.zeros_like(init, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        init_norm = init.norm(dim=-1)
        max_norm = hp.clamp_norm_factor * init_norm
        done = torch.zeros(n, dtype=torch.bool, device=device)
        kl_init = None
        first_nll = None
        done_at = torch.full((n,), -1, dtype=torch.long, device=device)  # Adam steps taken when done
        it = 0
        with torch.enable_grad():
            for it in range(max(1, hp.v_num_grad_steps)):
                h_tgt, h_kl = upper(delta[row_edit])
                # logits only where the loss reads them: target positions and KL positions
                logp = torch.log_softmax(upper.head(h_tgt).float().to(device), dim=-1)
                tok_lp = logp.gather(-1, tgt_labels[:, None])[:, 0]
                nll = torch.zeros(n, device=device).index_add(0, tgt_edit, -tok_lp * tgt_weight)
                kl_lp = torch.log_softmax(upper.head(h_kl).float().to(device), dim=-1)
                if kl_init is None:
                    kl_init = kl_lp.detach()
                    first_nll = nll.detach().clone()
                kl = (kl_lp.exp() * (kl_lp - kl_init)).sum(-1)  # KL(current ‖ initial)
                wd = hp.v_weight_decay * delta.norm(dim=-1) / init_norm**2
                loss = nll + hp.kl_factor * kl + wd
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("δ step %d: loss %s nll %s kl %s ‖δ‖ %s", it, _fmt(loss), _fmt(nll), _fmt(kl),
                              _fmt(delta.norm(dim=-1)))
                newly = (loss.detach() < hp.early_stop_loss) & ~done
                done_at[newly] = it
                done |= newly
                if it >= hp.v_num_grad_steps - 1 or bool(done.all()):
                    break
                opt.zero_grad()
                (loss * (~done).float()).sum().backward()
                before = delta.detach().clone()
                opt.step()
                with torch.no_grad():
                    delta[done] = before[done]  # finished edits keep their δ
                    norms = delta.norm(dim=-1)
                    scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                    delta.mul_(scale[:, None])
    nll, kl, loss, delta = nll.detach(), kl.detach(), loss.detach(), delta.detach()
    # the bare prompt's own NLL (row e·c of each edit): what a teacher-forced score reads
    row_nll = torch.zeros(b.input_ids.shape[0], device=device).index_add(
        0, tgt_rows, -tok_lp.detach() * tgt_weight * b.n_ctx)
    bare_nll = row_nll[b.bare_rows().to(device)]
    stats = [
        {
            "nll_init": round(float(first_nll[i]), 4),
            "nll_final": round(float(nll[i]), 4),
            "nll_bare_final": round(float(bare_nll[i]), 4),
            "kl_final": round(float(kl[i]), 5),
            "loss_final": round(float(loss[i]), 4),
            "steps": int(done_at[i]) if done_at[i] >= 0 else it,
            "early_stop": bool(done_at[i] >= 0),
            "delta_norm": round(float(delta[i].norm()), 4),
            "init_norm": round(float(init_norm[i]), 4),
        }
        for i in range(n)
    ]
    return Targets(layer, init.detach(), delta.detach(), rec, b, stats, upper.keys)


def _fmt(t: torch.Tensor) -> str:
    return "[" + " ".join(f"{float(x):.5f}" for x in t.detach().reshape(-1)[:8]) + "]"


# -- 3. closed-form pieces ----------------------------------------------------------------------
def c_solve(sm: SecondMoment | None, x: torch.Tensor) -> torch.Tensor:
    """C⁻¹x for x (d,) or (d, n) in float64 (Cholesky solve, where C lives), on x's device; x itself
    (a copy) when C = I (None)."""
    return sm.solve(x).to(x.device) if sm is not None else x.clone()


def layer_keys_and_residual(editor: "LocateEditor", t: "Targets", j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For editors spreading z* over ``editor.layers`` = L₁ < … < L_m (MEMIT, AlphaEdit): layer L_j's
    keys K (n, d_in) float64, read on the model as the layers below L_j left it, and its share of
    the remaining residual R = (z* − h) / (m − j) (n, d_out) float64, h = the current output of L_m
    at each bare prompt's subject token. ``t``: targets at L_m recorded with ``calls_from=L₁``.
    Both on the device of layer L_j's rewrite weight (L_m's output may live on another)."""
    layers, top = editor.layers, editor.layers[-1]
    layer, b = layers[j], t.batch
    if j == 0:  # nothing edited yet: the recorded pass has the keys and z
        key_rows, cur_z = t.keys[layer], t.init
    else:
        rec = replay_keys(editor.model, editor.adapter, t, layers[0], key_layers=[layer], z_layer=top)
        z_all = rec.block_out[top]
        bare = b.bare_rows().to(z_all.device)
        key_rows = rec.keys[layer]
        cur_z = z_all[bare, like(b.subj_cols, z_all)[bare]]
    dev = editor.adapter.rewrite_module(layer).weight.device
    keys = weighted_keys(key_rows, b, editor.contexts()).to(dev)  # (n, d_in)
    resid = (t.target.double() - cur_z.double().to(t.target.device)) / (len(layers) - j)  # (n, d_out)
    return keys, resid.to(dev)


# -- the editor base ---------------------------------------------------------------------------
class LocateEditor(WeightEditor):
    """Base of ROME / MEMIT / AlphaEdit: hparams by model family, contexts and C kept for the run.

    C's corpus comes from the run's ``RunContext.stats`` (:class:`knowbench.editor.StatsOptions`:
    corpus, corpus name, source, sample count), its configuration from the ``mom2_*``
    hyper-parameters; statistics are cached under ``RunContext.cache("stats")`` (default
    ``$KNOWBENCH_CACHE/stats`` or ``~/.cache/knowbench/stats``).
    """

    name: ClassVar[str] = "locate"
    hparams_cls: ClassVar[type] = LocateHparams
    kind: ClassVar[ChangeKind] = ChangeKind.WEIGHTS
    grouped_contexts: ClassVar[bool] = False  # MEMIT/AlphaEdit: bare prompt weighs 1/2 in k

    def __init__(self, model: nn.Module, tokenizer: Any, hparams: Any, context: RunContext):
        if not dataclasses.is_dataclass(hparams):
            raise TypeError(f"{self.name}: hparams must be a {self.hparams_cls.__name__}")
        super().__init__(model, tokenizer, hparams, context)
        n = self.adapter.n_layers
        layers = list(hparams.layers) or self.default_layers(n)
        bad = [l for l in layers if not -n <= l < n]
        if bad:
            raise ValueError(f"{self.name}: layers {bad} do not exist in this {n}-layer model")
        self.layers = sorted(l % n for l in layers)
        if hparams.fact_token not in ("subject_last", "last"):
            raise ValueError(f"{self.name}: fact_token must be 'subject_last' or 'last'")
        self._contexts: ContextSet | None = None
        self._stats: dict[int, SecondMoment] = {}
        self._stats_info: dict[str, Any] = {}
        self._applied = 0
        self._runtime: dict[str, Any] = {}  # e.g. whether the prefix KV cache path checked out

    # -- defaults ---------------------------------------------------------------------------
    @classmethod
    def default_layers(cls, n_layers: int) -> list[int]:
        """Layers for a model no YAML matches, by depth fraction: here several (about 15 % of the
        depth, at least 2 from 4 layers up) ending at the quarter-depth layer, as MEMIT spreads its
        update; single-layer editors override this."""
        r = quarter_depth(n_layers)
        m = max(2 if n_layers >= 4 else 1, round(0.15 * n_layers))
        return list(range(max(0, r - m + 1), r + 1))

    @classmethod
    def default_hparams(cls, model: nn.Module, model_name: str = "") -> Any:
        """The YAML for this model family (editors/hparams/{editor}-*.yaml), else the defaults with
        layers from :meth:`default_layers`."""
        found = find_hparams_file(cls.name, model, model_name)
        if found is None:
            n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer")
            return cls.rule_hparams(model, cls.default_layers(n))
        path, values = found
        fields = {f.name for f in dataclasses.fields(cls.hparams_cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"{path}: unknown hyper-parameter(s) {', '.join(unknown)}")
        return cls.hparams_cls(**values)

    @classmethod
    def rule_hparams(cls, model: nn.Module, layers: list[int]) -> Any:
        """Defaults for a model without a YAML: the reference numbers with ``layers``."""
        return cls.hparams_cls(layers=layers)

    # -- run-wide state ---------------------------------------------------------------------
    def contexts(self) -> ContextSet:
        """Prefixes sampled once per run from the model (seeded with the run's seed)."""
        if self._contexts is None:
            hp = self.hparams
            prefixes = sample_prefixes(
                self.model, self.tok, hp.context_template_length_params,
                seed=self.context.seed, starts=hp.context_template_starts,
            )
            make = ContextSet.grouped if self.grouped_contexts else ContextSet.flat
            self._contexts = make(prefixes, seed=self.context.seed)
        return self._contexts

    def stats_layers(self) -> list[int]:
        return self.layers

    def uses_stats(self) -> bool:
        """Whether this editor needs C (ROME / MEMIT: only with mom2_adjustment)."""
        return bool(self.hparams.mom2_adjustment)

    def stat(self, layer: int) -> SecondMoment:
        """C of ``layer``, computed (with every other layer of this editor) on first use."""
        if layer not in self._stats:
            self._compute_stats()
        return self._stats[layer]

    def second_moment(self, layer: int) -> SecondMoment | None:
        """C of ``layer`` as the update uses it: None when mom2_adjustment is off (C = I)."""
        return self.stat(layer) if self.hparams.mom2_adjustment else None

    def setup(self) -> None:
        """Compute or load everything fixed for the run (C per layer and its factorisation, the
        context prefixes). Idempotent; the first ``apply`` calls it, and a runner calls it earlier
        so that the first edit's time is the edit alone."""
        self.contexts()
        if self.uses_stats():
            self._compute_stats()

    def _compute_stats(self) -> None:
        if all(l in self._stats for l in self.stats_layers()):
            return
        hp = self.hparams
        t0 = time.perf_counter()
        stats = key_statistics(
            self.model, self.tok, self.stats_layers(), self.context.stats,
            dataset=hp.mom2_dataset, n_samples=hp.mom2_n_samples, dtype=hp.mom2_dtype,
            max_length=hp.mom2_max_length, ridge=hp.mom2_ridge, cache_dir=self.context.cache("stats"),
            model_name=self.context.model_name,
        )
        for layer, sm in stats.items():  # C and its factor live where the layer's weight does
            sm.to(module_device(self.model, self.adapter.rewrite_name(layer)))
        self._stats.update(stats)
        meta = next(iter(stats.values())).meta
        self._stats_info = {
            "corpus": meta.get("corpus"), "model_sampled": meta.get("model_sampled"),
            "n_samples": meta.get("n_samples"),
            "layers": {str(l): s.provenance() for l, s in stats.items()},
            "seconds": round(time.perf_counter() - t0, 3),
        }

    def sites(self) -> list[Site]:
        """One site per edited layer, with the C the update solves with: C itself with
        ``mom2_adjustment``, else the C the editor reads anyway (AlphaEdit's projector), else C = I."""
        out = []
        for layer in self.layers:
            if self.hparams.mom2_adjustment:
                c: Any = self.second_moment(layer)
            elif self.uses_stats():
                c = self.stat(layer)
            else:
                c = "identity"
            out.append(Site(layer, self.adapter.rewrite_name(layer), self.adapter.rewrite_param_name(layer),
                            second_moment=c))
        return out

    def provenance(self) -> dict[str, Any]:
        """What a result file needs to reproduce this editor's fixed inputs."""
        ctx = self.contexts()
        return {
            "layers": self.layers,
            "modules": [self.adapter.rewrite_name(l) for l in self.layers],
            "stats": self._stats_info if self.uses_stats() else {"C": "identity (mom2_adjustment off)"},
            "context_templates": ctx.prefixes,
            "context_weights": [round(w, 6) for w in ctx.weights],
            "context_seed": ctx.seed,
        }

    def _info(self, extra: dict[str, Any]) -> dict[str, Any]:
        info = {"editor": self.name, "layers": self.layers, **extra,
                "context_templates_sha": self.contexts().sha}
        if self._applied == 0:
            info["provenance"] = self.provenance()  # full provenance once per run, not per edit
        self._applied += 1
        return info

    def check_requests(self, requests: Sequence[EditRequest]) -> None:
        """Every request must name its subject inside its prompt and have a target; checked before
        any weight changes."""
        if not requests:
            raise ValueError(f"{self.name}: no requests to apply")
        for req in requests:
            where = f"record {req.record_index}" if req.record_index >= 0 else f"request {req.prompt!r}"
            if not req.target_new or not req.target_new.strip():
                raise ValueError(f"{self.name}: {where} has an empty target_new")
            if self.hparams.fact_token == "subject_last":
                if not req.subject:
                    raise ValueError(f"{self.name}: {where} has no subject; {self.name} edits the key at the subject's last token")
                if req.subject not in req.prompt:
                    raise ValueError(
                        f"{self.name}: {where}: subject {req.subject!r} does not occur in prompt {req.prompt!r}"
                    )

    # -- the closed form's reads and writes ---------------------------------------------------
    @torch.no_grad()
    def rewrite_out(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """W k + b of the rewrite module as it is now, in float64, for keys (n, d_in)."""
        mod = self.adapter.rewrite_module(layer)
        w = mod.weight
        return mod(keys.to(dtype=w.dtype, device=w.device)).double()

    def write(self, layer: int, delta_w: torch.Tensor) -> str:
        """W += ΔW (Linear layout); the parameter is snapshotted first for restore()."""
        name = self.adapter.rewrite_param_name(layer)
        p = self.param(name)
        if not torch.isfinite(delta_w).all():
            raise FloatingPointError(f"{self.name}: update for {name} is not finite; nothing written")
        self.adapter.add_to_rewrite_weight(layer, delta_w)
        assert p is not None
        return name
