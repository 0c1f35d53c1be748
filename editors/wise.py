"""WISE: a side copy of one FFN output matrix behind an activation router (Wang et al., NeurIPS 2024;
EDITORS.md 7).

Memories. The main memory W_v is the FFN output projection of one layer L, the rewrite module of
:mod:`knowbench.arch` (GPT-2 ``transformer.h[L].mlp.c_proj``, a Conv1D stored (d_in, d_out); Llama
``model.layers[L].mlp.down_proj``, a Linear stored (d_out, d_in)); it is never written. The side
memory W_v′ starts as a copy of W_v and is the only thing trained. Every tensor here is kept in the
module's own storage layout and applied with the module's own op (Conv1D: addmm(b, a, W); Linear:
a Wᵀ), so "the module with W_v′" is computed exactly as a model whose weight were W_v′.

With a = the module's input at a token (the FFN hidden activation, (d_in,)), φ the model's hidden
activation (GPT-2 gelu_new, Llama silu; ``activation: none`` drops it) and a row x of T tokens:

    Δ_act(x; W′) = (1/T) Σ_t ‖φ(W′a_t + b) − φ(W_v a_t + b)‖₂      (max over t if T > infer_max_tokens)

(φ on the module's *outputs*, as EasyEdit does; the paper writes ‖a_t(W′ − W_v)‖ without φ.)

Edit (one request). The batch is the edit "{prompt} {target}" under 1 + 10 templates — the bare
prompt and "{prefix} {prompt}" for prefixes sampled once per run from the model (seeded top-k 5, one
per start word "I", "You", "Because", "Yes", "Q: " and per length 5 and 10 new tokens) — plus
``n_loc_rows`` (1, as EasyEdit) unrelated rows x_i: locality prompts of the task's *training split*
(EasyEdit uses NQ questions from ZsRE-MEND train), in a seeded order, new ones for every edit. With
x_e the 11 edit rows and Δ_in(x_e), Δ_out the in-scope / out-of-scope activations below:

    L = CE(target | x_e)                                   token mean per row, mean over rows
      + mean⁺(Δ_out − Δ_in(x_e) + γ)                        mean over the (pairs of) rows where it is > 0
      + mean⁺(Δ_out − α) + mean⁺(β − Δ_in(x_e))

Which tokens count (``act_mask``): "none" (EasyEdit's general editing) Δ_in over every token of an
edit row, Δ_out over the unrelated rows; "prompt" Δ_in over the prompt and target tokens only (not
the context prefix); "subject" (EasyEdit's act/deact masks of factual editing) Δ_in over the
subject's tokens, Δ_out also over the edit row's other tokens; "from_subject" (knowbench) Δ_in from
the subject's first token to the end of the row, Δ_out also over the edit row's tokens before the
subject (the context prefix and the question's opening words). The last two key the side memory
on the subject: it must fire where the subject has been read and stay quiet on the words every
question of a relation shares ("Where was ... born?"), which otherwise make every memory fire on
every prompt. "subject" leaves no room at the last layer (the target is read off tokens it keeps
quiet); "from_subject" does. An edit without its subject in the prompt falls back to "prompt".

SGD on W′ (lr ``edit_lr``, weight decay), the step masked by a Bernoulli(ρ = ``mask_ratio``) mask M
drawn once per shard, then W′ clamped to W_v ± ``norm_constraint`` element-wise:

    W′ ← clamp(W′ − lr · M ⊙ (∇L + wd·W′), W_v − c, W_v + c)

at most ``n_iter`` steps; training stops when the last two losses differ by ≤ ``stop_delta`` and
the last is ≤ ``stop_loss`` (EasyEdit's EarlyStopMeter). Only the rows' module inputs a and the
residual stream after block L are computed once per edit (neither depends on W′): each step runs
W′a, the blocks above L and the LM head at the target positions. The edit's Δ_act(x_e) — the mean
over the 11 rows of Δ over each row's prompt and target tokens, the tokens of a row the router sees
at evaluation, with the final W′ — is recorded; each shard keeps the minimum over its edits.

Shards. Every ``save_freq`` edits the side memory is full: it is stored with its minimum Δ and the
records it holds, W′ is reset to W_v and the next shard gets a new mask (overlap ≈ ρ²). With
``merge_freq`` = ``save_freq`` every shard is a memory of its own (the TIES "merge" of one shard keeps
it exactly when ρ ≤ the density), the embedded model's choice: one 2048×128 shard holds ~20 edits
before its own edits interfere, and merged shards fire on each other's prompts.

* WISE-Retrieve (``retrieve: true``, EasyEdit's default). Stored shards are memories; every
  ``merge_freq`` edits the last merge_freq/save_freq of them are TIES-merged (weights 1/n) into one
  memory whose minimum Δ is the minimum of theirs. Routing, per sequence (row): with ε_i =
  ``act_ratio`` × min Δ of memory i and ε_0 that of the current side memory,

      choice = W′ if Δ(x; W′) ≥ ε_0 else W_v;  best = Δ(x; W′)
      for each memory i in order: if Δ(x; W_i) > best and Δ(x; W_i) > ε_i: choice = W_i, best = Δ(x; W_i)

* WISE-Merge (``retrieve: false``). Every ``merge_freq`` edits the stored shards are TIES-merged into
  one merged memory M relative to W_v (weights 1/n; once M exists, 0.4/n per shard and 0.6 for M).
  Shards stored since the last merge are merged into M for routing (a cached view; committed at the
  next merge_freq boundary). With ε = ``act_ratio`` × the minimum Δ over all edits: W_v if
  Δ(x; M) < ε and Δ(x; W′) < ε, else M if Δ(x; M) > Δ(x; W′), else W′.

TIES merge (Yadav et al. 2023; EasyEdit's GTA('magnitude', 'sum', normalize)) of tensors W_1..W_n with
weights w_i relative to the base W_v: τ_i = W_i − W_v; trim each τ_i to its ⌊density·numel⌋
largest-|·| entries; elect s = sign(Σ_i w_i τ̃_i) per entry (0 counts as +); keep the entries with
sign(τ̃_i) = s; merged = W_v + Σ_i w_i τ̃_i [agree] / Σ_i w_i [agree] (0/0 → 0).

The router runs in a forward hook on the rewrite module: every row whose choice is W_v keeps the
module's own output object (no edit, a router that never opens, or ``restore``: bit-identical
model); other rows get their memory's output. The attention mask (read by a pre-hook on the model's
body) excludes padding from Δ; with a KV cache each forward routes on the tokens it is given.

Semantics: "easyedit@14cea82" (WISE.py, utils.py, merge/gta.py) with these deviations:

* W_v is the output projection on both layouts (EasyEdit's GPT-2 yaml takes ``c_fc``, a d_ff-output
  matrix); on GPT-2 the Conv1D is used in its own (d_in, d_out) layout;
* Δ over a row excludes its padding (EasyEdit averages over the padded batch); the act masks are an
  hparam (EasyEdit applies its subject masks only when the locality prompt is a substring of the
  prompt) and "from_subject" is knowbench's; the recorded Δ leaves out the context prefixes
  (EasyEdit: every token of the 11 rows);
* the CE is the mean over the target tokens only (EasyEdit's label mask also counts the last prompt
  position in the denominator);
* weight decay is masked with the gradient, so entries outside the mask stay exactly at W_v
  (EasyEdit's SGD decays every entry of W′ by lr·wd per step);
* an edit's Δ is recorded after the last step (EasyEdit: at the start of the last iteration);
* routing is per row of a batch (EasyEdit evaluates one sequence at a time and averages a batch);
* WISE-Merge: EasyEdit merges at merge_freq and, lazily, at the first forward pass after a shard is
  stored (also merging the shard in progress); here shards stored since the last merge are merged
  into a routing view and the shard in progress is a routing candidate of its own, so outputs do
  not depend on when evaluation happens;
* the prefixes are sampled (seeded top-k 5) rather than EasyEdit's greedy beam-1 generation;
* replay (paper App. B.3) is not implemented (EasyEdit: off by default).

Hyper-parameters (EasyEdit hparams/WISE): llama-7b layer 27 down_proj, n_iter 70, α, β, γ = 5, 20, 10,
act_ratio 0.88; gpt2-xl.yaml (small GPT-2) layer 8 c_fc, n_iter 40, act_ratio 0.8; both mask_ratio 0.2,
edit_lr 1.0, norm_constraint 1.0, save_freq 500, merge_freq 1000, ties, densities 0.53, retrieve true.
The margins are in Δ units, which scale with the activation norms (EDITORS.md 12.6), and the step
size with the squared norm of the keys a: the embedded model's and SmolLM2's values are re-tuned
(editors/hparams/wise-embedded.yaml, wise-smollm2.yaml say what was measured).

Router statistics (``router_stats``): ``rewrite_prompts`` is the identity; after an edit it also notes
the token ids of each prompt it is handed with its owner, and the hook attributes its decision on
every forwarded row that starts with a noted prompt (the evaluated "prompt + answer", or the bare
prompt; the longest match) to that owner: per metric, the share of rows sent away from W_v (edit /
rephrase / portability: the hit rate, and how often to a memory holding that record's edit;
locality: the false-routing rate) and their mean Δ. These are the decisions the evaluation itself
got, at no extra forward pass. All rows the hook routes are counted too (``forward_rows_*``).
Counts are reset by each ``apply``.
"""

from __future__ import annotations

import logging
import math
import random
from functools import partial
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from knowbench.devices import input_device, like
from knowbench.editor import ChangeKind, Editor, EditOutcome, EditRequest, PromptOwner, RunContext, hparams_to_dict
from knowbench.keys import lm_logits, record
from knowbench.scoring import _fit, _max_positions, join_prompt_target, readable, target_spans
from knowbench.stats import one_line, sample_texts
from knowbench.tokens import pad_batch, pad_id

from .hparams_yaml import YamlHparams

log = logging.getLogger(__name__)

SEMANTICS = "easyedit@14cea82"
DEVIATIONS = [
    "W_v is the FFN output projection on both layouts (EasyEdit's GPT-2 yaml: c_fc)",
    "Delta_act excludes padding; act masks by hparam (none = EasyEdit's general editing, subject = its "
    "factual-editing masks, prompt, from_subject = knowbench's)",
    "an edit's recorded Delta_act is over the prompt and target tokens of its rows (not the context "
    "prefixes), after its last step",
    "CE is the mean over target tokens only",
    "weight decay is masked with the gradient (entries outside the mask stay at W_v)",
    "routing per row of a batch (EasyEdit: one sequence at a time)",
    "WISE-Merge: shards stored since the last merge are merged into a routing view; the shard in "
    "progress is its own routing candidate (EasyEdit merges lazily at the next forward pass)",
    "context prefixes sampled top-k 5 with the run's seed (EasyEdit: greedy generation)",
    "no replay (paper App. B.3; off in EasyEdit)",
]
IN_SCOPE_METRICS = ("edit_succ", "rephrase", "portability")  # prompts that ask about an edit
ACT_MASKS = ("none", "prompt", "subject", "from_subject")
MAIN, SIDE = -1, 0  # routing choices: W_v, the side memory in progress; memory i is i + 1


@dataclass
class WISEHparams:
    layer: int = -1  # -1: the Llama-7B reference's depth fraction (27 of 32)
    n_iter: int = 70  # SGD steps per edit at most
    edit_lr: float = 1.0
    weight_decay: float = 1e-5
    mask_ratio: float = 0.2  # ρ: share of W′'s entries a shard may change
    norm_constraint: float = 1.0  # c: |W′ − W_v| ≤ c element-wise (0 disables)
    alpha: float = 5.0  # Δ(x_i) below α
    beta: float = 20.0  # Δ(x_e) above β
    gamma: float = 10.0  # Δ(x_e) − Δ(x_i) above γ
    act_ratio: float = 0.88  # ε = act_ratio × the minimum recorded Δ of a memory
    activation: str = "model"  # φ in Δ: "model" (the model's hidden activation, EasyEdit) or "none" (paper)
    save_freq: int = 500  # edits per shard
    merge_freq: int = 1000  # edits between merges (a multiple of save_freq)
    densities: float = 0.53  # TIES trim density
    retrieve: bool = True  # WISE-Retrieve (true) or WISE-Merge (false)
    stop_loss: float = 0.02  # early stop: last loss ≤ stop_loss ...
    stop_delta: float = 1e-4  # ... and within stop_delta of the one before
    prefix_starts: list[str] = field(default_factory=lambda: ["I", "You", "Because", "Yes", "Q: "])
    prefix_lengths: list[int] = field(default_factory=lambda: [5, 10])  # new tokens per prefix
    infer_max_tokens: int = 100  # a row longer than this routes on its largest token Δ
    n_loc_rows: int = 1  # unrelated rows x_i per edit (EasyEdit: 1)
    act_mask: str = "none"  # in-scope tokens: "none" (all, EasyEdit), "prompt", "subject", "from_subject"
    router_stats: bool = True  # count routing decisions on the evaluated prompts (see the docstring)


# -- TIES merging ------------------------------------------------------------------------------
def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ⌊density·numel⌋ largest-magnitude entries set to 0."""
    if density >= 1:
        return delta.clone()
    k = int(density * delta.numel())
    if k <= 0:
        raise ValueError(f"wise: TIES density {density} keeps no entry of a {delta.numel()}-entry tensor")
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat.abs().float(), k, largest=True).indices] = 1
    return (flat * keep).view_as(delta)


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
               density: float) -> torch.Tensor:
    """TIES merge of ``tensors`` relative to ``base``: trim, elect sign, disjoint (weighted) mean."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("wise: ties_merge needs one weight per tensor and at least one tensor")
    deltas = torch.stack([trim_magnitude(t - base, density) for t in tensors])  # (n, ...)
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device).view(-1, *[1] * base.dim())
    weighted = deltas * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)  # 0 counts as +
    agree = (weighted.sign() == elected).to(deltas.dtype)  # a trimmed entry (0) never agrees
    divisor = (w * agree).sum(0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (base + (weighted * agree).sum(0) / divisor).to(base.dtype)


# -- memories ----------------------------------------------------------------------------------
@dataclass
class Memory:
    """A stored side memory: its weight (the module's layout), the minimum Δ of its edits, the
    records it holds, how many shards it merges and how many edits it holds."""

    weight: torch.Tensor
    min_act: float
    records: set[int]
    shards: int = 1
    edits: int = 0
    sum_act: float = 0.0  # Σ Δ of its edits (mean Δ in the report)


class _Halt(Exception):
    """Raised by a capture hook once the module has been reached."""


@dataclass
class _Rows:
    """One edit's batch: ids (B, T) right-padded, mask, positions; per row the first column after the
    context prefix and the subject's columns [s0, s1) (None: not found / not asked for); the target
    predictions (row, column, label, weight)."""

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    n_edit_rows: int
    first: list[int]
    subject: list[tuple[int, int] | None]
    targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class _Step:
    """One edit's fixed tensors and its loss as a function of W′.

    Only the real (unpadded) tokens are computed: a (N, d_in) their module inputs, out₀ / φ(out₀)
    their unedited outputs, ``row`` the row of each. When L is the last block only the target
    positions' residual stream is needed; otherwise the blocks above L rerun on the whole batch.

    Token weights per real token (``act_mask``, see the module docstring): ``w_in`` the in-scope
    tokens of the edit rows, ``w_not`` the edit rows' own out-of-scope tokens ("subject" and
    "from_subject" only), ``w_prompt`` the prompt and target tokens (what an edit records). The
    unrelated rows are out of scope over all their tokens in every mode."""

    def __init__(self, ed: "WISE", rec: Any, rows: _Rows):
        # per-token work happens where the edited module lives; the rows were fed from the inputs' device
        L, dev = ed.layer, ed.w0.device
        self.ed, self.rec = ed, rec
        self.flat = rows.mask.bool().to(dev)  # (B, T)
        self.a = rec.keys[L]  # (N, d_in), real tokens in row-major order (record's flattening)
        B, T = rows.ids.shape
        self.row = torch.arange(B, device=dev)[:, None].expand(B, T)[self.flat]  # (N,)
        col = torch.arange(T, device=dev)[None, :].expand(B, T)[self.flat]  # (N,)
        self.n_rows, self.n_edit_rows = B, rows.n_edit_rows
        first = torch.tensor(rows.first, device=dev)[self.row]
        s0 = torch.tensor([sp[0] if sp else -1 for sp in rows.subject], device=dev)[self.row]
        s1 = torch.tensor([sp[1] if sp else -1 for sp in rows.subject], device=dev)[self.row]
        self.w_all = torch.ones_like(col, dtype=torch.float32)
        self.w_prompt = (col >= first).float()
        mode = ed.hparams.act_mask
        if mode == "subject":  # EasyEdit: in scope the subject, out of scope the row's other tokens
            self.w_subj = ((col >= s0) & (col < s1)).float()
        else:  # from_subject: in scope from the subject on, out of scope before it
            self.w_subj = (col >= s0).float()
        self.w_not = (col < s0).float() if mode == "from_subject" else self.w_all - self.w_subj
        self.subject_rows = ([r for r in range(self.n_edit_rows) if rows.subject[r] is not None]
                             if mode in ("subject", "from_subject") else [])
        self.w_in = {"none": self.w_all, "prompt": self.w_prompt}.get(mode, self.w_subj)
        if self.subject_rows:  # rows without the subject fall back to their prompt tokens
            no_subj = torch.tensor([sp is None for sp in rows.subject], device=dev)[self.row]
            self.w_in = torch.where(no_subj, self.w_prompt, self.w_subj)
        self.out0 = ed.lin(self.a, ed.w0)  # (N, d_out)
        self.phi0 = ed.phi(self.out0.float())
        self.h0 = rec.block_out[L]  # (B, T, d)
        self.last = L + 1 >= ed.adapter.n_layers
        t_rows, t_cols, self.labels, self.weights = rows.targets
        self.t_rows, self.t_cols = t_rows, t_cols
        index = torch.full((B, T), -1, dtype=torch.long, device=dev)
        index[self.flat] = torch.arange(int(self.flat.sum()), device=dev)
        self.t_flat = index[t_rows, t_cols]  # flat index of each target-predicting position

    def dist(self, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) ‖φ(out) − φ(out₀)‖ per token."""
        out = self.ed.lin(self.a, w) if out is None else out
        return (self.ed.phi(out.float()) - self.phi0).norm(dim=-1)

    def mean(self, dist: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(B,) per-row mean of ``dist`` over the tokens ``weight`` selects (0 where none)."""
        z = torch.zeros(self.n_rows, device=dist.device, dtype=dist.dtype)
        return z.index_add(0, self.row, dist * weight) / z.index_add(0, self.row, weight).clamp(min=1)

    def recorded(self, w: torch.Tensor) -> tuple[float, float]:
        """The edit's Δ (mean over edit rows, prompt and target tokens) and the unrelated rows' Δ."""
        d = self.dist(w)
        edit = self.mean(d, self.w_prompt)[: self.n_edit_rows].mean()
        return float(edit), float(self.mean(d, self.w_all)[self.n_edit_rows :].mean())

    def loss(self, w: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """CE on the edit rows plus the three activation margins (EasyEdit's means over the
        positive entries)."""
        hp, ed = self.ed.hparams, self.ed
        out = ed.lin(self.a, w)  # (N, d_out)
        diff = (out - self.out0).to(self.h0.dtype)
        if self.last:
            h = self.h0[self.t_rows, self.t_cols] + diff[self.t_flat]  # block L's output at the targets
        else:
            h = self.h0.index_put((self.flat.nonzero(as_tuple=True)), diff, accumulate=True)
            h = self.rec.replay(h, ed.layer + 1)
            h = h[like(self.t_rows, h), like(self.t_cols, h)]
        logits = lm_logits(ed.adapter, h).float().to(out.device)  # (n_target_tokens, vocab)
        ce = (F.cross_entropy(logits, self.labels, reduction="none") * self.weights).sum()
        dist = self.dist(w, out)
        d_in = self.mean(dist, self.w_in)[: self.n_edit_rows]
        d_out = self.mean(dist, self.w_all)[self.n_edit_rows :]
        if self.subject_rows:  # the edit rows' own non-subject tokens are out of scope too
            d_out = torch.cat([self.mean(dist, self.w_not)[self.subject_rows], d_out])

        def pos_mean(x: torch.Tensor) -> torch.Tensor:
            keep = x > 0
            return x[keep].mean() if bool(keep.any()) else x.new_zeros(())

        l_gap = pos_mean(d_out[None, :] - d_in[:, None] + hp.gamma)
        l_out = pos_mean(d_out - hp.alpha)
        l_in = pos_mean(hp.beta - d_in)
        loss = ce + l_gap + l_out + l_in
        return loss, {"ce_last": float(ce.detach()), "act_loss_last": float((l_gap + l_out + l_in).detach())}


class WISE(YamlHparams, Editor):
    name = "wise"
    hparams_cls: ClassVar[type] = WISEHparams
    kind: ClassVar[ChangeKind] = ChangeKind.MODULES
    supports_batch: ClassVar[bool] = False  # one apply may hold several requests, edited in turn
    uses_train_split: ClassVar[bool] = True  # the unrelated rows x_i


    def __init__(self, model: nn.Module, tokenizer: Any, hparams: WISEHparams, context: RunContext):
        super().__init__(model, tokenizer, hparams, context)
        from transformers.pytorch_utils import Conv1D

        hp = hparams
        if hp.act_mask not in ACT_MASKS:
            raise ValueError(f"wise: act_mask must be one of {', '.join(ACT_MASKS)}, got {hp.act_mask!r}")
        if hp.activation not in ("model", "none"):
            raise ValueError(f"wise: activation must be 'model' or 'none', got {hp.activation!r}")
        if hp.save_freq < 1 or hp.merge_freq < hp.save_freq or hp.merge_freq % hp.save_freq:
            raise ValueError(f"wise: merge_freq ({hp.merge_freq}) must be a positive multiple of "
                             f"save_freq ({hp.save_freq})")
        if not 0 < hp.mask_ratio <= 1:
            raise ValueError(f"wise: mask_ratio must be in (0, 1], got {hp.mask_ratio}")
        n = self.adapter.n_layers
        self.layer = hp.layer if hp.layer >= 0 else min(n - 1, int(n * 27 / 32))
        self.module_name = self.adapter.rewrite_name(self.layer)
        self.module = self.adapter.rewrite_module(self.layer)
        if not isinstance(self.module, (nn.Linear, Conv1D)):
            raise ValueError(f"wise: {self.module_name} is a {type(self.module).__name__}, not a Linear or Conv1D")
        self.conv1d = isinstance(self.module, Conv1D)
        act_name = getattr(model.config, "hidden_act", None) or getattr(model.config, "activation_function", None)
        self.act_name = act_name if hp.activation == "model" else "identity"
        if hp.activation == "model":
            from transformers.activations import ACT2FN

            if act_name not in ACT2FN:
                raise ValueError(f"wise: unknown hidden activation {act_name!r}; set activation: none")
            self.phi: Any = ACT2FN[act_name]
            if act_name in ("gelu_new", "gelu_pytorch_tanh"):
                # the same tanh approximation, as torch's fused kernel (the router applies φ to
                # every memory's output at every token: transformers' composed version is 5x slower)
                self.phi = partial(F.gelu, approximate="tanh")
        else:
            self.phi = nn.Identity()
        self.prefixes: list[str] | None = None  # sampled at setup
        self.loc_pool: list[str] | None = None
        self.loc_source = ""
        self._handles: list[Any] = []
        self._mask_now: torch.Tensor | None = None  # the body's attention mask during a forward pass
        self._ids_now: torch.Tensor | None = None  # and its input ids
        self._active = True  # False while the editor runs the model itself
        self._loc_cursor = 0  # next unrelated prompt of the pool
        self._reset_state()

    def _reset_state(self) -> None:
        self.n_edits = 0
        self.side: torch.Tensor | None = None  # W′ of the shard in progress
        self.side_mem = Memory(torch.empty(0), math.inf, set())  # its statistics (weight unused)
        self.grad_mask: torch.Tensor | None = None
        self.n_shards = 0  # shards started
        self.memories: list[Memory] = []  # retrieve: stored shards / merged memories
        self._stack: torch.Tensor | None = None  # their weights side by side (routing)
        self.pending: list[Memory] = []  # merge: shards stored since the last merge
        self.merged: Memory | None = None  # merge: the committed merged memory
        self._view: Memory | None = None  # merge: merged + pending, cached for routing
        self.min_all = math.inf  # merge: minimum Δ over every edit
        self.n_merges = 0
        self.acts: list[float] = []  # Δ(x_e) per edit
        self._stats: dict[str, list[float]] = {}
        self._owned: dict[tuple[int, ...], list[PromptOwner]] = {}  # noted prompt ids -> owners
        self._owned_lengths: set[int] = set()
        self._fwd = {"rows": 0, "main": 0, "side": 0, "memory": 0}
        self._last: dict[str, Any] = {}

    # -- fixed inputs -------------------------------------------------------------------------------
    def setup(self) -> None:
        """The context prefixes (sampled from the model once) and the pool of unrelated prompts."""
        if self.prefixes is None:
            self.prefixes = self._sample_prefixes()
        if self.loc_pool is None:
            self.loc_pool, self.loc_source = self._locality_pool()

    def _sample_prefixes(self) -> list[str]:
        hp = self.hparams
        out: list[str] = []
        was = self._active
        self._active = False
        try:
            for j, n_new in enumerate(hp.prefix_lengths):
                for i, start in enumerate(hp.prefix_starts):
                    n_start = len(self.tok(start, add_special_tokens=True)["input_ids"])
                    seed = self.context.seed * 1000 + 10 * j + i
                    text = sample_texts(self.model, self.tok, [[n_start + int(n_new), 1]], seed, starts=[start])[0]
                    out.append(one_line(text))
        finally:
            self._active = was
        return out

    def _locality_pool(self) -> tuple[list[str], str]:
        """Locality prompts of the training split (all sub-keys), in a seeded order; without a
        split (a model-only use of the editor), the sampled prefixes themselves."""
        split = self.context.train_split
        texts: list[str] = []
        if split is not None:
            for r in split.report.records:
                for probes in (getattr(r, "locality", None) or {}).values():
                    texts.extend(p.prompt for p in probes if getattr(p, "prompt", None))
            texts = list(dict.fromkeys(t for t in texts if t.strip()))
        if texts:
            source = f"train split {split.path.name} locality prompts ({len(texts)})"
        else:
            if split is not None:
                log.warning("wise: the training split %s has no locality prompt; using the sampled prefixes",
                            split.path)
            texts = list(self.prefixes or [])
            source = f"sampled prefixes ({len(texts)}; no training split)"
        random.Random(self.context.seed).shuffle(texts)
        return texts, source

    # -- the module, its inputs and the router --------------------------------------------------------
    @property
    def w0(self) -> torch.Tensor:
        """W_v in the module's layout (the live parameter, never written)."""
        return self.module.weight.detach()

    def lin(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The module's output for input ``a`` (..., d_in) with weight ``w`` in place of its own."""
        bias = self.module.bias
        if self.conv1d:
            out = torch.addmm(bias, a.reshape(-1, a.size(-1)), w) if bias is not None else a.reshape(-1, a.size(-1)) @ w
            return out.view(a.size()[:-1] + (w.shape[1],))
        return F.linear(a, w, bias)

    def row_delta(self, out: torch.Tensor, phi0: torch.Tensor, mask: torch.Tensor, infer: bool) -> torch.Tensor:
        """Δ_act of each row: mean over its tokens of ‖φ(out) − φ(out₀)‖ (max when ``infer`` and the
        row is longer than infer_max_tokens). ``out`` (B, T, d) gives (B,); (B, T, n, d), n
        candidates at once, gives (B, n). ``phi0`` = φ(out₀) (B, T, d); ``mask`` (B, T) 0/1."""
        many = out.dim() == phi0.dim() + 1
        dist = (self.phi(out.float()) - (phi0.unsqueeze(-2) if many else phi0)).norm(dim=-1)  # (B, T[, n])
        m = mask.unsqueeze(-1) if many else mask
        n = mask.sum(1)
        n_b = n.unsqueeze(-1) if many else n
        mean = (dist * m).sum(1) / n_b.clamp(min=1)
        if not infer:
            return mean
        top = dist.masked_fill(m == 0, float("-inf")).max(1).values
        return torch.where(n_b > self.hparams.infer_max_tokens, top, mean)

    def _memory_outputs(self, a: torch.Tensor) -> torch.Tensor:
        """(..., n, d_out): the module's output for ``a`` (..., d_in) with each retrieve memory's
        weight, in one matmul of the memories' weights side by side (cached until they change)."""
        n = len(self.memories)
        if self._stack is None:
            self._stack = torch.cat([m.weight for m in self.memories], dim=1 if self.conv1d else 0)
        bias = self.module.bias
        if self.conv1d:
            flat = a.reshape(-1, a.size(-1))
            out = torch.addmm(bias.repeat(n), flat, self._stack) if bias is not None else flat @ self._stack
        else:
            out = F.linear(a, self._stack, bias.repeat(n) if bias is not None else None)
        return out.view(*a.shape[:-1], n, -1)

    def _candidates(self) -> list[Memory]:
        """The routing candidates after the side memory: retrieve's memories, merge's merged view."""
        if self.hparams.retrieve:
            return self.memories
        view = self._merge_view()
        return [view] if view is not None else []

    def has_edits(self) -> bool:
        return self.n_edits > 0

    def threshold(self, mem: Memory | None = None) -> float:
        """ε of a memory (default: of the side memory in progress); merge mode has one global ε."""
        if not self.hparams.retrieve:
            return self.hparams.act_ratio * self.min_all
        m = self.side_mem if mem is None else mem
        return self.hparams.act_ratio * m.min_act

    @torch.no_grad()
    def route(self, a: torch.Tensor, out0: torch.Tensor,
              mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[Any, torch.Tensor]]:
        """Per row: the choice (MAIN, SIDE or memory i + 1), its Δ, and the candidate outputs
        (SIDE: (B, T, d_out); merge's M under 1; retrieve's memories under "memories", (N, n, d_out)
        at the N real tokens that "flat" (B, T) marks)."""
        B = a.shape[0]
        phi0 = self.phi(out0.float())
        outs: dict[Any, torch.Tensor] = {}
        if self.side is not None and self.side_mem.edits > 0:
            outs[SIDE] = self.lin(a, self.side)
            d_side = self.row_delta(outs[SIDE], phi0, mask, True)
        else:
            d_side = torch.zeros(B, device=a.device)
        choice = torch.full((B,), MAIN, dtype=torch.long, device=a.device)
        if self.hparams.retrieve:
            choice = torch.where(d_side >= self.threshold(), torch.full_like(choice, SIDE), choice)
            best = d_side.clone()
            if self.memories:
                # memories only at real tokens (padding costs nothing): (N, n, d_out)
                flat = mask.bool()
                row = torch.arange(B, device=a.device)[:, None].expand_as(flat)[flat]  # (N,)
                mem_out = self._memory_outputs(a[flat])
                dist = (self.phi(mem_out.float()) - phi0[flat].unsqueeze(1)).norm(dim=-1)  # (N, n)
                n_tok = flat.sum(1)
                mean = torch.zeros(B, dist.shape[1], device=a.device).index_add(0, row, dist)
                mean = mean / n_tok.clamp(min=1)[:, None]
                long = n_tok > self.hparams.infer_max_tokens
                d_mem = mean  # (B, n)
                if bool(long.any()):  # a long row routes on its largest token Δ
                    top = torch.full_like(mean, float("-inf")).scatter_reduce(
                        0, row[:, None].expand_as(dist), dist, reduce="amax")
                    d_mem = torch.where(long[:, None], top, mean)
                outs["memories"] = mem_out
                outs["flat"] = flat
                for i, mem in enumerate(self.memories):  # in order: a later memory must beat the best so far
                    d = d_mem[:, i]
                    take = (d > best) & (d > self.threshold(mem))
                    choice = torch.where(take, torch.full_like(choice, i + 1), choice)
                    best = torch.where(take, d, best)
        else:
            view = self._merge_view()
            d_m = torch.zeros(B, device=a.device)
            if view is not None:
                outs[1] = self.lin(a, view.weight)
                d_m = self.row_delta(outs[1], phi0, mask, True)
            eps = self.threshold()
            opened = (d_m >= eps) | (d_side >= eps)
            pick = torch.where(d_m > d_side, torch.full_like(choice, 1), torch.full_like(choice, SIDE))
            choice = torch.where(opened, pick, choice)
            best = torch.maximum(d_m, d_side)
        return choice, best, outs

    def _row_mask(self, a: torch.Tensor) -> torch.Tensor:
        """(B, T) 1 at real tokens of the rows the module sees now (the last T columns of the body's
        attention mask: also right with a KV cache), all ones when there is no usable 2-D mask."""
        B, T = a.shape[0], a.shape[1]
        m = self._mask_now
        if m is not None and m.dim() == 2 and m.shape[0] == B and m.shape[1] >= T:
            return m[:, -T:].to(device=a.device, dtype=torch.float32)
        return torch.ones(B, T, device=a.device)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self._active or not self.has_edits():
            return None
        a = args[0]
        if a.dim() != 3:
            a3, out3 = a.reshape(1, -1, a.shape[-1]), output.reshape(1, -1, output.shape[-1])
        else:
            a3, out3 = a, output
        mask = self._row_mask(a3)
        choice, best, outs = self.route(a3, out3, mask)
        if self._owned and self._ids_now is not None and self._ids_now.shape == mask.shape:
            self._attribute(choice, best, mask)
        self._fwd["rows"] += int(choice.numel())
        self._fwd["main"] += int((choice == MAIN).sum())
        self._fwd["side"] += int((choice == SIDE).sum())
        self._fwd["memory"] += int((choice > SIDE).sum())
        if bool((choice == MAIN).all()):
            return None  # the module's own output object: bit-identical
        new = out3.clone()
        for c, o in outs.items():
            if c == "memories":  # (N, n, d_out) at the real tokens: each token its row's memory
                flat = outs["flat"]
                row = torch.arange(flat.shape[0], device=flat.device)[:, None].expand_as(flat)[flat]
                at = choice[row]  # (N,)
                sel = (at > SIDE).nonzero().squeeze(1)
                if sel.numel():
                    real = new[flat]
                    real[sel] = o[sel, at[sel] - 1].to(new.dtype)
                    new[flat] = real
            elif c != "flat":
                rows = choice == c
                if bool(rows.any()):
                    new[rows] = o[rows].to(new.dtype)
        return new.view(output.shape)

    def _body_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._mask_now = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._ids_now = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None

    def _body_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._mask_now = self._ids_now = None

    def _attach(self) -> None:
        if not self._handles:
            body = self.adapter.body
            self._handles = [
                body.register_forward_pre_hook(self._body_pre, with_kwargs=True),
                body.register_forward_hook(self._body_post, with_kwargs=True),
                self.module.register_forward_hook(self._hook),
            ]

    def _capture(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's input (B, T, d_in) and its own (unrouted) output for a batch, by a forward
        pass of the body stopped at the module."""
        got: dict[str, torch.Tensor] = {}

        def grab(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            got["a"], got["out"] = args[0].detach(), out.detach()
            raise _Halt

        was, self._active = self._active, False
        handle = self.module.register_forward_hook(grab, prepend=True)
        try:
            with torch.no_grad():
                self.adapter.body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        except _Halt:
            pass
        finally:
            handle.remove()
            self._active = was
        return got["a"], got["out"]

    # -- shards and merging ---------------------------------------------------------------------------
    def _new_shard(self) -> None:
        """W′ ← W_v and a fresh Bernoulli(ρ) gradient mask, seeded by (seed, shard index)."""
        gen = torch.Generator(device="cpu").manual_seed(self.context.seed * 100003 + self.n_shards)
        w0 = self.w0
        self.grad_mask = (torch.rand(w0.shape, generator=gen) < self.hparams.mask_ratio).to(w0.device, w0.dtype)
        self.side = w0.clone()
        self.side_mem = Memory(torch.empty(0), math.inf, set())
        self.n_shards += 1

    def _store_shard(self) -> None:
        """The full side memory becomes a stored shard; W′ is reset at the next edit."""
        shard = Memory(self.side.clone(), self.side_mem.min_act, set(self.side_mem.records),
                       1, self.side_mem.edits, self.side_mem.sum_act)
        (self.memories if self.hparams.retrieve else self.pending).append(shard)
        self.side, self.side_mem = None, Memory(torch.empty(0), math.inf, set())
        self._view = self._stack = None

    def _merge(self) -> None:
        hp = self.hparams
        if hp.retrieve:
            n = hp.merge_freq // hp.save_freq
            group, self.memories = self.memories[-n:], self.memories[:-n]
            self.memories.append(self._combine(group, [1.0 / n] * n))
            self._stack = None
        else:
            if not self.pending:
                return
            self.merged = self._merge_group(self.pending, self.merged)
            self.pending, self._view = [], None
        self.n_merges += 1

    def _merge_group(self, shards: list[Memory], merged: Memory | None) -> Memory:
        n = len(shards)
        if merged is None:
            return self._combine(shards, [1.0 / n] * n)
        return self._combine(shards + [merged], [0.4 / n] * n + [0.6])

    def _combine(self, group: list[Memory], weights: list[float]) -> Memory:
        w = ties_merge(self.w0, [m.weight for m in group], weights, self.hparams.densities)
        records: set[int] = set().union(*(m.records for m in group))
        return Memory(w, min(m.min_act for m in group), records, sum(m.shards for m in group),
                      sum(m.edits for m in group), sum(m.sum_act for m in group))

    def _merge_view(self) -> Memory | None:
        if self._view is None and (self.pending or self.merged is not None):
            self._view = self._merge_group(self.pending, self.merged) if self.pending else self.merged
        return self._view

    # -- the edit -------------------------------------------------------------------------------------
    def _batch(self, req: EditRequest, loc_prompts: Sequence[str]) -> _Rows:
        """The 11 edit rows "{prefix} {prompt} {target}" and the unrelated rows, right-padded."""
        texts = [req.prompt] + [f"{p} {req.prompt}" for p in self.prefixes]
        starts = [0] + [len(p) + 1 for p in self.prefixes]  # where the prompt begins in each text
        limit, bos = _max_positions(self.model), getattr(self.tok, "bos_token_id", None)
        spans = target_spans(self.tok, [(t, req.target_new) for t in texts])
        full = [ids for ids, _ in spans]
        try:
            spans = [_fit(ids, start, limit, req.record_index, bos) for ids, start in spans]
        except ValueError as exc:
            raise ValueError(f"wise: {exc}") from None
        locs = []
        for p in loc_prompts:
            loc = list(self.tok(readable(p), add_special_tokens=True)["input_ids"])
            locs.append(_fit(loc, len(loc), limit, req.record_index, bos)[0])
        first = [0] * (len(spans) + len(locs))
        subject: list[tuple[int, int] | None] = [None] * len(first)
        for r, (text, c0) in enumerate(zip(texts, starts)):
            if len(spans[r][0]) != len(full[r]):
                continue  # truncated to fit the context: count every token (rare)
            joined = join_prompt_target(text, req.target_new)[0]
            first[r] = self._first_token_at(joined, full[r], c0)
            if self.hparams.act_mask in ("subject", "from_subject") and req.subject:
                at = text.find(req.subject, c0)
                if at >= 0:
                    subject[r] = self._token_span(joined, full[r], at, at + len(req.subject))
        device = self.w0.device  # the targets' indices: used with the module's tensors
        ids, mask, pos, _ = pad_batch([s for s, _ in spans] + locs, pad_id(self.tok), "right", input_device(self.model))
        rows, cols, labels, weights = [], [], [], []
        for r, (s, start) in enumerate(spans):
            n_t = len(s) - start
            for j in range(start, len(s)):
                rows.append(r)
                cols.append(j - 1)  # position j − 1 predicts token j
                labels.append(s[j])
                weights.append(1.0 / (n_t * len(spans)))  # token mean per row, mean over rows
        t = lambda v, dt: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
        return _Rows(ids, mask, pos, len(spans), first, subject,
                     (t(rows, torch.long), t(cols, torch.long), t(labels, torch.long), t(weights, torch.float32)))

    def _offsets(self, text: str, ids: list[int]) -> list[tuple[int, int]] | None:
        """Character span of each token of ``text`` (None for a slow tokenizer or other ids)."""
        if not getattr(self.tok, "is_fast", False):
            return None
        enc = self.tok(readable(text), add_special_tokens=True, return_offsets_mapping=True)
        if list(enc["input_ids"][: len(ids)]) != list(ids):
            return None
        return [tuple(o) for o in enc["offset_mapping"][: len(ids)]]

    def _first_token_at(self, text: str, ids: list[int], char: int) -> int:
        """Index of the first token of ``ids`` (``text`` tokenised) that ends after ``char``."""
        if char <= 0:
            return 0
        offs = self._offsets(text, ids)
        if offs is None:  # slow tokenizer: the prefix's own tokens are a prefix of the row's
            own = list(self.tok(readable(text[: char - 1]), add_special_tokens=True)["input_ids"])
            j = 0
            while j < min(len(own), len(ids)) and own[j] == ids[j]:
                j += 1
            return j
        return next((j for j, (a, b) in enumerate(offs) if b > char and b > a), 0)

    def _token_span(self, text: str, ids: list[int], c0: int, c1: int) -> tuple[int, int] | None:
        """Tokens [s0, s1) of ``ids`` overlapping the characters [c0, c1)."""
        offs = self._offsets(text, ids)
        if offs is None:
            return None
        hit = [j for j, (a, b) in enumerate(offs) if b > a and a < c1 and b > c0]
        return (hit[0], hit[-1] + 1) if hit else None

    def _edit_one(self, req: EditRequest) -> dict[str, Any]:
        hp = self.hparams
        if self.side is None:
            self._new_shard()
        k = max(1, hp.n_loc_rows)
        pool = self.loc_pool
        # the pool's cursor outlives restore: single edits get different unrelated rows too
        loc_prompts = [pool[(self._loc_cursor + j) % len(pool)] for j in range(k)]
        self._loc_cursor += k
        rows = self._batch(req, loc_prompts)
        ids, mask, pos = rows.ids, rows.mask, rows.pos
        L, n_layers = self.layer, self.adapter.n_layers
        self._active = False
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            # the module's input a and the residual stream after block L do not depend on W′
            rec = record(self.model, self.adapter, ids, mask, pos, key_layers=[L], block_out_layers=[L],
                         calls_from=L + 1 if L + 1 < n_layers else None)
            step = _Step(self, rec, rows)
            w0, gmask, c = self.w0, self.grad_mask, hp.norm_constraint
            w = self.side.clone()
            losses: list[float] = []
            parts: dict[str, float] = {}
            for p, _ in flags:
                p.requires_grad_(False)
            for _ in range(hp.n_iter):
                if len(losses) >= 2 and abs(losses[-1] - losses[-2]) <= hp.stop_delta and losses[-1] <= hp.stop_loss:
                    break
                w.requires_grad_(True)
                with torch.enable_grad():
                    loss, parts = step.loss(w)
                    (grad,) = torch.autograd.grad(loss, [w])
                losses.append(float(loss.detach()))
                with torch.no_grad():
                    w = w.detach() - hp.edit_lr * gmask * (grad + hp.weight_decay * w.detach())
                    if c > 0:
                        w = torch.clamp(w, w0 - c, w0 + c)
            with torch.no_grad():
                d_edit, d_loc = step.recorded(w)
        finally:
            for p, f in flags:
                p.requires_grad_(f)
            self._active = True
        self.side = w.detach()
        sm = self.side_mem
        sm.edits += 1
        sm.sum_act += d_edit
        sm.min_act = min(sm.min_act, d_edit)
        sm.records.add(req.record_index)
        self.min_all = min(self.min_all, d_edit)
        self.acts.append(d_edit)
        self.n_edits += 1
        info = {"steps": len(losses), "loss_first": round(losses[0], 5) if losses else None,
                "loss_last": round(losses[-1], 5) if losses else None,
                **{k: round(v, 5) for k, v in parts.items()},
                "delta_edit": round(d_edit, 5), "delta_loc": round(d_loc, 5),
                "threshold": round(self.threshold(), 5), "shard": self.n_shards}
        if self.n_edits % hp.save_freq == 0:
            self._store_shard()
            info["stored_shard"] = True
        if self.n_edits % hp.merge_freq == 0:
            self._merge()
            info["merged"] = True
        self._view = None
        return info

    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        self.setup()
        self._attach()
        infos = [self._edit_one(r) for r in requests]
        self._stats, self._owned, self._owned_lengths = {}, {}, set()  # counts describe the model after this apply
        self._fwd = {k: 0 for k in self._fwd}
        self._last = infos[-1]
        info = infos[0] if len(infos) == 1 else {"edits": infos}
        return EditOutcome(changed_params=[f"{self.module_name}.wise_side_memory"], info=info)

    # -- router statistics ------------------------------------------------------------------------------
    def rewrite_prompts(self, prompts: Sequence[str], owners: Sequence[PromptOwner]) -> list[str]:
        """The identity. With ``router_stats``, each prompt's token ids are noted with its owner, so
        that the hook can attribute its routing decision on a row that starts with them (the
        evaluated "prompt + answer", or the bare prompt) to that owner's metric."""
        if self.hparams.router_stats and self.has_edits() and prompts:
            limit, bos = _max_positions(self.model), getattr(self.tok, "bos_token_id", None)
            for i, (p, o) in enumerate(zip(prompts, owners)):
                if o.metric in IN_SCOPE_METRICS or o.metric == "locality":
                    ids = list(self.tok(readable(p), add_special_tokens=True)["input_ids"])
                    ids = _fit(ids, len(ids), limit, i, bos)[0]
                    self._owned.setdefault(tuple(ids), []).append(o)
                    self._owned_lengths.add(len(ids))
        return list(prompts)

    def _attribute(self, choice: torch.Tensor, best: torch.Tensor, mask: torch.Tensor) -> None:
        """Count the decision on every row whose tokens start with a noted prompt (the longest)."""
        lengths = sorted(self._owned_lengths, reverse=True)
        for r, (ids, m) in enumerate(zip(self._ids_now.tolist(), mask.bool().tolist())):
            real = [t for t, keep in zip(ids, m) if keep]
            owners = next((self._owned[key] for n in lengths if n <= len(real)
                           and (key := tuple(real[:n])) in self._owned), None)
            for o in owners or ():
                self._count(o, int(choice[r]), float(best[r]))

    def _count(self, o: PromptOwner, c: int, d: float) -> None:
        s = self._stats
        routed = float(c != MAIN)
        if o.metric == "locality":
            s.setdefault("locality_routed", []).append(routed)
            s.setdefault("locality_delta", []).append(d)
        else:
            s.setdefault(f"{o.metric}_hit", []).append(routed)
            s.setdefault(f"{o.metric}_own", []).append(routed * float(o.record in self._memory_records(c)))
            s.setdefault(f"{o.metric}_delta", []).append(d)

    def decisions(self, prompts: Sequence[str]) -> tuple[list[int], list[float]]:
        """The router's choice (MAIN = −1, SIDE = 0, memory i + 1) and Δ for each bare prompt."""
        limit, bos = _max_positions(self.model), getattr(self.tok, "bos_token_id", None)
        seqs = []
        for i, p in enumerate(prompts):
            ids = list(self.tok(readable(p), add_special_tokens=True)["input_ids"])
            seqs.append(_fit(ids, len(ids), limit, i, bos)[0])
        ids, mask, pos, _ = pad_batch(seqs, pad_id(self.tok), "right", input_device(self.model))
        a, out0 = self._capture(ids, mask, pos)
        choice, best, _ = self.route(a, out0, mask.float().to(a.device))
        return choice.tolist(), best.tolist()

    def _memory_records(self, choice: int) -> set[int]:
        if choice == SIDE:
            return self.side_mem.records
        cands = self._candidates()
        return cands[choice - 1].records if 0 < choice <= len(cands) else set()

    def report(self) -> dict[str, Any]:
        hp = self.hparams
        out: dict[str, Any] = {
            "edits": self.n_edits, "shards_started": self.n_shards, "merges": self.n_merges,
            "mode": "retrieve" if hp.retrieve else "merge",
        }
        if hp.retrieve:
            out["memories"] = len(self.memories)
            out["memory_edits"] = [m.edits for m in self.memories]
            out["memory_shards"] = [m.shards for m in self.memories]
            out["memory_thresholds"] = [round(self.threshold(m), 5) for m in self.memories]
        else:
            out["pending_shards"] = len(self.pending)
            out["merged_shards"] = self.merged.shards if self.merged is not None else 0
        out["side_edits"] = self.side_mem.edits
        eps = self.threshold()
        out["threshold"] = round(eps, 5) if math.isfinite(eps) else None
        if self.acts:
            out["delta_edit_mean"] = round(sum(self.acts) / len(self.acts), 5)
            out["delta_edit_min"] = round(min(self.acts), 5)
        names = {
            "edit_succ_hit": "hit_rate_edit", "edit_succ_own": "own_rate_edit", "edit_succ_delta": "delta_edit_prompts",
            "rephrase_hit": "hit_rate_rephrase", "rephrase_own": "own_rate_rephrase",
            "rephrase_delta": "delta_rephrase",
            "portability_hit": "hit_rate_portability", "portability_own": "own_rate_portability",
            "portability_delta": "delta_portability",
            "locality_routed": "false_routing_locality", "locality_delta": "delta_locality",
        }
        for key, vals in self._stats.items():
            if vals:
                out[names.get(key, key)] = round(sum(vals) / len(vals), 5)
        for metric, key in (*((m, f"{m}_hit") for m in IN_SCOPE_METRICS), ("locality", "locality_routed")):
            if self._stats.get(key):
                out[f"n_prompts_{metric}"] = len(self._stats[key])
        if self._fwd["rows"]:
            out.update({f"forward_rows_{k}": v for k, v in self._fwd.items()})
        return out

    # -- back to the model as handed over ----------------------------------------------------------------
    def restore(self) -> None:
        """Remove the hooks and drop every memory: the model object was never written, so its
        outputs and state_dict are bit-identical to the unedited model's. The run's fixed inputs
        (prefixes, the pool of unrelated prompts and its cursor) stay."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._mask_now = self._ids_now = None
        self._active = True
        self._reset_state()

    def provenance(self) -> dict[str, Any]:
        hp = self.hparams
        return {
            "semantics": SEMANTICS,
            "deviations": list(DEVIATIONS),
            "module": self.module_name,
            "layout": "Conv1D (d_in, d_out)" if self.conv1d else "Linear (d_out, d_in)",
            "activation": self.act_name,
            "mode": "WISE-Retrieve" if hp.retrieve else "WISE-Merge",
            "merge": {"alg": "ties", "density": hp.densities,
                      "weights": "1/n per shard; 0.4/n per shard + 0.6 for an existing merged memory (merge mode)"},
            "templates": ["{prompt}"] + [f"{p} {{prompt}}" for p in (self.prefixes or [])],
            "unrelated_rows": self.loc_source or "(set at the first edit)",
            "train_split": ({"path": str(self.context.train_split.path), "sha256": self.context.train_split.sha256}
                            if self.context.train_split is not None else None),
            "optimizer": {"name": "sgd", "lr": hp.edit_lr, "weight_decay": hp.weight_decay, "n_iter": hp.n_iter,
                          "mask_ratio": hp.mask_ratio, "norm_constraint": hp.norm_constraint,
                          "early_stop": f"|dloss| <= {hp.stop_delta} and loss <= {hp.stop_loss}"},
            "seed": f"prefixes: context.seed*1000 + 10*length + start; masks: context.seed*100003 + shard "
                    f"({self.context.seed}); unrelated rows: Random(context.seed) order",
            "hparams": hparams_to_dict(hp),
        }
