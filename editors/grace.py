"""GRACE: a discrete key-value codebook around one layer's module (Hartvigsen et al., NeurIPS 2023;
EDITORS.md 6).

One module m of one layer (``module`` at ``layer``: GPT-2 ``transformer.h[L].mlp.c_fc`` / ``c_proj``,
Llama ``model.layers[L].mlp.down_proj``) gets a codebook of n entries

    K (n, d_in)   keys: the module's input at the last prompt token of an edit
    V (n, d_out)  values: trained vectors that replace the module's output there
    ε (n,)        deferral radii;  a label (the target's token ids) and the records per entry

and the base model is never changed. Forward, at every position t of every sequence (also while
generating with a KV cache), with x_t the module's input and h_t = m(x_t) its output:

    j  = argmin_i ‖x_t − K_i‖₂                (Euclidean; ties go to the newest entry)
    h'_t = V_j  if ‖x_t − K_j‖₂ ≤ ε_j,  else h_t   (a position outside every ball is left as it is)

Edit (request: prompt x, target y; s = the index of y's first token in "x y", key position s − 1).
The key q = x_{s−1}; the module's input never depends on the codebook (the codebook changes only
the module's output, which nothing computed before the module reads), so q is the same before and
after any edit. With the
nearest entry j at distance d (EasyEdit's rules, ε₀ = ``eps``):

    empty codebook, or d > ε₀ + ε_j      add (q, ε₀)                                    "add"
    label(y) ≠ label_j                    add (q, d/2); ε_j ← d/2 − 1e-5                  "split"
    label(y) = label_j, d > ε_j           ε_j ← d (coverage; moving_average: K_j ← (K_j+q)/2) "expand"
    label(y) = label_j, d ≤ ε_j           nothing                                         "inside"

then the value of the entry q now routes to (the new one, or j) is trained with Adam (``edit_lr``)
for ``n_iter`` steps on the target's cross-entropy (the mean over y's tokens of −log p(y_k | x, y_<k)
in teacher-forced "x y"), the base model frozen. A new value starts cold (EasyEdit's
``val_init: cold``: V ~ U[0, 1)^d_out from ``torch.manual_seed(context.seed + edit count)``) or warm
(the module's own output at the key position, h_{s−1}); an existing entry continues from its value.
Cold is the default and the shipped yamls' choice (on the embedded model cold values reach a loss
below 0.02 in 1–10 steps, warm ones in 10–100). ``stop_loss`` > 0 ends training once the loss is
below it (not in EasyEdit, which always runs n_iter steps; the embedded and SmolLM2 yamls use 0.02
for CPU time).
Labels match when the target token ids are equal (EasyEdit compares the means of the −100-padded
label tensors, which also compares prompt lengths).

Query token (the deviation from EasyEdit that matters). EasyEdit queries one token per sequence,
``key_id``, set to the last prompt token of the *latest edit* and never reset (only generate() sets
it to −1): teacher-forced evaluation of any later input reads token min(key_id, len − 1), which is
the right token only for the edit just made. Here every position queries the codebook. In
teacher-forced evaluation of "x y" the last prompt token sees exactly the prefix it saw when the edit
was made, so it reproduces its key (to float rounding) and hits; the target's own tokens, other
prompts and other positions hit only if their input lies inside some ball. Only hitting positions are
replaced (EasyEdit's ``replace_last``), so the value at the last prompt token must carry the whole
target: later target tokens read it through the attention of the layers above.

Training cost. The layers below the edited one are frozen and their outputs never depend on the
value, so (``replay``, default) each step re-runs only the blocks from the edited layer up, the final
norm and the LM head, on the block inputs and arguments captured in one full forward pass; every edit
first checks that this reproduces the full model's logits (to 1e-4 of their scale) and falls back
to full forward passes when it does not (a family with more after the last block, e.g. soft-capped
logits). The gradient is the same either way; only the cost of the frozen lower layers is saved.

Modes. Sequential: the codebook grows across ``apply`` calls (one request at a time; an apply of
several requests edits them one after another). Single: ``restore`` removes the hook and the
codebook; the model (outputs and state_dict) is bit-identical to the unedited one, since nothing of
the model was ever written. EasyEdit's ``rolllback(edit_id)`` is :meth:`GRACE.delete`.

Router statistics (``router_stats``). ``rewrite_prompts`` is the identity; when the codebook is not
empty it also runs the model up to the module on the prompts it is handed (bare prompts, each row at
its own positions) and counts, per owner metric, since the last ``apply``: edit / rephrase /
portability prompts whose last token lies in a ball (and in a ball of an entry made for that record),
and locality prompts with any token in a ball (false routing). ``report()`` gives those rates, the
codebook size, adds / splits / expansions and the mean nearest-key distance next to the mean ε.

ε is in raw activation units and does not transfer across models (EDITORS.md 12.6): the embedded
model's value comes from measured distances (editors/hparams/grace-embedded.yaml).

Semantics "easyedit@14cea82" with the deviations above (per-token query instead of the stale
key_id; labels compared by target ids; ties to the newest entry). Hyper-parameters (EasyEdit
hparams/GRACE): llama-7b layer 27 down_proj, n_iter 50; gpt2-xl layer 35 c_fc, n_iter 200; both
edit_lr 1.0, eps 1.0, euclidean, val_init cold, replace_last, eps_expand coverage. The original code
(Thartvigsen/GRACE) uses n_iter 100 and replace_prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from knowbench.devices import input_device
from knowbench.editor import ChangeKind, Editor, EditOutcome, EditRequest, PromptOwner, RunContext
from knowbench.scoring import _fit, _max_positions, readable
from knowbench.tokens import pad_batch, pad_id

from .ft import target_batch
from .hparams_yaml import YamlHparams

log = logging.getLogger(__name__)

SEMANTICS = "easyedit@14cea82"
DEVIATIONS = [
    "every position queries the codebook (EasyEdit: the stale key_id token of the latest edit)",
    "labels match when the target token ids are equal (EasyEdit: equal means of the label tensors)",
    "distance ties go to the newest entry",
]
VAL_INITS = ("cold", "warm")
EPS_EXPANDS = ("coverage", "moving_average")
# metrics whose prompt is an edit's own question: routed by its last token
QUESTION_METRICS = ("edit_succ", "rephrase", "portability")


@dataclass
class GRACEHparams:
    layer: int = -1  # -1: the Llama-7B reference's depth fraction (27 of 32)
    module: str = "rewrite"  # "rewrite" (c_proj / down_proj), "mlp_in" (c_fc / up_proj) or a "{i}" name template
    eps: float = 1.0  # ε₀, initial deferral radius, raw activation units of the module's input
    n_iter: int = 50  # Adam steps per edit
    edit_lr: float = 1.0
    val_init: str = "cold"  # cold: U[0, 1); warm: the module's output at the key token
    eps_expand: str = "coverage"  # coverage | moving_average
    stop_loss: float = 0.0  # stop training once the loss is below this (0: never, as EasyEdit)
    router_stats: bool = True  # count routing decisions on the evaluated prompts (see the docstring)
    replay: bool = True  # train by re-running only the blocks from the edited layer up (see the docstring)


class _Halt(Exception):
    """Raised by a capture hook to stop a forward pass once the module has been reached."""


class Codebook:
    """Keys, values, radii, labels and records of the entries, in rows of growing tensors."""

    def __init__(self, d_in: int, d_out: int):
        self.d_in, self.d_out = d_in, d_out
        self._k = torch.zeros(0, d_in)
        self._v = torch.zeros(0, d_out)
        self._e = torch.zeros(0)
        self.n = 0
        self.labels: list[tuple[int, ...]] = []
        self.records: list[set[int]] = []  # the edits (record indices) each entry was trained for

    @property
    def keys(self) -> torch.Tensor:  # (n, d_in) float32
        return self._k[: self.n]

    @property
    def values(self) -> torch.Tensor:  # (n, d_out) float32
        return self._v[: self.n]

    @property
    def eps(self) -> torch.Tensor:  # (n,) float32
        return self._e[: self.n]

    def add(self, key: torch.Tensor, value: torch.Tensor, eps: float, label: tuple[int, ...], record: int) -> int:
        if self.n == self._k.shape[0]:  # capacity doubling: appends stay O(1) amortised
            cap = max(8, 2 * self.n)
            dev = key.device
            self._k = torch.cat([self._k.to(dev), torch.zeros(cap - self.n, self.d_in, device=dev)])
            self._v = torch.cat([self._v.to(dev), torch.zeros(cap - self.n, self.d_out, device=dev)])
            self._e = torch.cat([self._e.to(dev), torch.zeros(cap - self.n, device=dev)])
        i = self.n
        self._k[i] = key.detach().float()
        self._v[i] = value.detach().float()
        self._e[i] = float(eps)
        self.labels.append(tuple(label))
        self.records.append({record})
        self.n += 1
        return i

    def delete(self, i: int) -> None:
        keep = [r for r in range(self.n) if r != i]
        self._k, self._v, self._e = self.keys[keep].clone(), self.values[keep].clone(), self.eps[keep].clone()
        del self.labels[i], self.records[i]
        self.n -= 1

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) of each query's nearest key, queries (N, d_in) -> (N,), (N,).

        Direct differences, not the ‖q‖² + ‖k‖² − 2qᵀk expansion, so a query equal to a key is at
        distance 0 and not at the expansion's rounding (~1e-3 at these norms)."""
        d = torch.cdist(queries.float(), self.keys, compute_mode="donot_use_mm_for_euclid_dist")  # (N, n)
        # argmin returns the first minimum; on the flipped columns that is the newest entry
        idx = (self.n - 1) - torch.argmin(d.flip(1), dim=1)
        return d.gather(1, idx[:, None])[:, 0], idx

    def clear(self) -> None:
        self.__init__(self.d_in, self.d_out)


class GRACE(YamlHparams, Editor):
    name: ClassVar[str] = "grace"
    hparams_cls: ClassVar[type] = GRACEHparams
    kind: ClassVar[ChangeKind] = ChangeKind.MODULES
    supports_batch: ClassVar[bool] = False  # EasyEdit's batch size 1


    def __init__(self, model: nn.Module, tokenizer: Any, hparams: GRACEHparams, context: RunContext):
        super().__init__(model, tokenizer, hparams, context)
        hp = hparams
        if hp.val_init not in VAL_INITS:
            raise ValueError(f"grace: val_init must be one of {', '.join(VAL_INITS)}, got {hp.val_init!r}")
        if hp.eps_expand not in EPS_EXPANDS:
            raise ValueError(f"grace: eps_expand must be one of {', '.join(EPS_EXPANDS)}, got {hp.eps_expand!r}")
        if hp.eps < 0:
            raise ValueError(f"grace: eps must be >= 0, got {hp.eps}")
        n = self.adapter.n_layers
        self.layer = hp.layer if hp.layer >= 0 else min(n - 1, int(n * 27 / 32))
        self.module_name = self._module_name(hp.module)
        self.module = self.model.get_submodule(self.module_name)
        d_in, d_out = self._shape(self.module)
        self.codebook = Codebook(d_in, d_out)
        self._handle: Any = None  # the forward hook, while the codebook is in
        self._train: tuple[int, nn.Parameter] | None = None  # (entry, value being trained)
        self.n_edits = 0
        self.counts = {"add": 0, "split": 0, "expand": 0, "inside": 0}
        self._stats: dict[str, list[float]] = {}
        self._last: dict[str, Any] = {}
        self._replay_warned = False

    # -- where -------------------------------------------------------------------------------
    def _module_name(self, spec: str) -> str:
        if spec == "rewrite":
            return self.adapter.rewrite_name(self.layer)
        if spec == "mlp_in":
            if self.adapter.spec.mlp_in is None:
                raise ValueError(f"grace: no mlp_in module known for {self.adapter.model_type}; give a name template")
            return self.adapter.spec.mlp_in.format(i=self.layer)
        if "{i}" not in spec:
            raise ValueError(f"grace: module must be 'rewrite', 'mlp_in' or a name template with {{i}}, got {spec!r}")
        return spec.format(i=self.layer)

    def _shape(self, module: nn.Module) -> tuple[int, int]:
        """(d_in, d_out) of a Linear (weight (d_out, d_in)) or GPT-2 Conv1D (weight (d_in, d_out))."""
        from transformers.pytorch_utils import Conv1D

        w = getattr(module, "weight", None)
        if isinstance(module, Conv1D):
            return w.shape[0], w.shape[1]
        if isinstance(module, nn.Linear):
            return w.shape[1], w.shape[0]
        raise ValueError(f"grace: {self.module_name} is a {type(module).__name__}, not a Linear or Conv1D layer")

    # -- the adaptor ----------------------------------------------------------------------------
    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Replace the output at every position whose input lies in its nearest key's ball."""
        cb = self.codebook
        if cb.n == 0:
            return None
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])  # (N, d_in)
        dist, idx = cb.nearest(flat)
        hit = dist <= cb.eps[idx]  # (N,)
        if not bool(hit.any()):
            return None  # the output object itself: bit-identical
        chosen = cb.values[idx]  # (N, d_out)
        if self._train is not None:
            slot, value = self._train
            chosen = torch.where((idx == slot)[:, None], value[None, :], chosen)
        out = output.reshape(-1, output.shape[-1])
        out = torch.where(hit[:, None], chosen.to(out.dtype), out)
        return out.reshape(output.shape)

    def _attach(self) -> None:
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)

    def _capture(self, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                 output: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The module's input (B, T, d_in) (and its unedited output) for a batch, by a forward pass
        stopped at the module."""
        got: dict[str, torch.Tensor] = {}

        def grab(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            got["x"] = args[0].detach()
            got["h"] = out.detach()
            raise _Halt

        handle = self.module.register_forward_hook(grab, prepend=True)  # before the codebook's hook
        try:
            with torch.no_grad():
                self.adapter.body(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        except _Halt:
            pass
        finally:
            handle.remove()
        return got["x"], (got["h"] if output else None)

    def _prepare(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """One full forward pass without gradients: the module's input x and unedited output h
        (B, T, ·) and, with ``replay``, a function that recomputes the logits from the edited
        layer's block up, with every block's captured arguments (None when that check fails)."""
        got: dict[str, torch.Tensor] = {}
        blocks = [self.adapter.block(i) for i in range(self.layer, self.adapter.n_layers)]
        calls: list[Any] = [None] * len(blocks)

        def grab_io(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            got["x"], got["h"] = args[0].detach(), out.detach()

        def grab_block(n: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                calls[n] = (args, kwargs)
            return hook

        handles = [self.module.register_forward_hook(grab_io, prepend=True)]  # before the codebook's hook
        if self.hparams.replay:
            handles += [b.register_forward_pre_hook(grab_block(n), with_kwargs=True) for n, b in enumerate(blocks)]
        try:
            with torch.no_grad():
                full = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        if not self.hparams.replay or any(c is None for c in calls):
            return got["x"], got["h"], None

        def replay() -> torch.Tensor:
            hidden = calls[0][0][0]  # the edited block's input: the frozen layers below never change
            for block, (args, kwargs) in zip(blocks, calls):
                out = block(hidden, *args[1:], **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            return self.adapter.lm_head(self.adapter.final_norm(hidden))

        with torch.no_grad():
            again = replay()
        scale = float(full.float().abs().max()) + 1.0
        if again.shape != full.shape or float((again.float().to(full.device) - full.float()).abs().max()) > 1e-4 * scale:
            if not self._replay_warned:
                log.warning("grace: re-running the blocks from layer %d up does not reproduce the model's logits "
                            "(%s); training with full forward passes", self.layer, type(self.model).__name__)
                self._replay_warned = True
            return got["x"], got["h"], None
        return got["x"], got["h"], replay

    # -- the edit -------------------------------------------------------------------------------
    def _update_codebook(self, q: torch.Tensor, h0: torch.Tensor, label: tuple[int, ...],
                         record: int) -> tuple[int, str, float | None]:
        """Apply EasyEdit's rules for key q; returns (entry to train, action, distance to the nearest)."""
        hp, cb = self.hparams, self.codebook
        if hp.val_init == "cold":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.context.seed + self.n_edits)
                init = torch.rand(cb.d_out)
        else:
            init = h0.float()
        if cb.n == 0:
            return cb.add(q, init, hp.eps, label, record), "add", None
        dist, idx = cb.nearest(q[None])
        d, j = float(dist[0]), int(idx[0])
        if d > hp.eps + float(cb.eps[j]):
            return cb.add(q, init, hp.eps, label, record), "add", d
        if label != cb.labels[j]:
            i = cb.add(q, init, d / 2, label, record)
            cb._e[j] = d / 2 - 1e-5
            return i, "split", d
        cb.records[j].add(record)
        if d > float(cb.eps[j]):
            if hp.eps_expand == "moving_average":
                cb._k[j] = 0.5 * cb._k[j] + 0.5 * q.float()
            cb._e[j] = d
            return j, "expand", d
        return j, "inside", d

    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        infos = [self._edit_one(r) for r in requests]
        self._stats = {}  # routing counts are per apply
        info = infos[0] if len(infos) == 1 else {"edits": infos}
        return EditOutcome(changed_params=[f"{self.module_name}.grace_codebook"], info=info)

    def _edit_one(self, req: EditRequest) -> dict[str, Any]:
        hp, cb = self.hparams, self.codebook
        input_ids, mask, labels, spans = target_batch(self.tok, self.model, [req], self.name)
        device = input_device(self.model)
        input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
        ids, start = spans[0]
        key_pos = start - 1  # the last prompt token
        x, h, replay = self._prepare(input_ids, mask)
        q, h0 = x[0, key_pos], h[0, key_pos]
        slot, action, d = self._update_codebook(q, h0, tuple(ids[start:]), req.record_index)
        self.counts[action] += 1
        self.n_edits += 1
        self._attach()
        value = nn.Parameter(cb.values[slot].clone())
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        self._train = (slot, value)
        opt = torch.optim.Adam([value], lr=hp.edit_lr)
        losses: list[float] = []
        try:
            with torch.enable_grad():
                for _ in range(hp.n_iter):
                    if replay is not None:
                        logits = replay()
                    else:
                        logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
                    # position t predicts token t + 1; only the target's tokens are labelled
                    # replay's logits come from the LM head's device, which may not be the inputs'
                    loss = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:].to(logits.device), ignore_index=-100)
                    losses.append(float(loss.detach()))
                    if losses[-1] < hp.stop_loss:
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            self._train = None
            for p in frozen:
                p.requires_grad_(True)
        cb._v[slot] = value.detach().float()
        self._last = {"action": action, "entry": slot, "steps": len(losses), "replay": replay is not None,
                      "loss_first": round(losses[0], 5) if losses else None,
                      "loss_last": round(losses[-1], 5) if losses else None,
                      "nearest_distance": None if d is None else round(d, 5), "codebook_size": cb.n}
        return dict(self._last)

    def delete(self, record: int) -> int:
        """Remove the entries made for ``record`` (EasyEdit's ``rolllback``); returns how many."""
        gone = [i for i in range(self.codebook.n) if self.codebook.records[i] == {record}]
        for i in reversed(gone):
            self.codebook.delete(i)
        return len(gone)

    # -- routing statistics ------------------------------------------------------------------------
    def rewrite_prompts(self, prompts: Sequence[str], owners: Sequence[PromptOwner]) -> list[str]:
        if self.hparams.router_stats and self.codebook.n and prompts:
            rows = [(p, o) for p, o in zip(prompts, owners) if o.metric in QUESTION_METRICS or o.metric == "locality"]
            for b in range(0, len(rows), 64):
                self._route_stats(rows[b : b + 64])
        return list(prompts)

    def _route_stats(self, rows: list[tuple[str, PromptOwner]]) -> None:
        """Route each prompt's tokens and count what the forward passes that follow will do."""
        limit, bos = _max_positions(self.model), getattr(self.tok, "bos_token_id", None)
        seqs = []
        for i, (p, _) in enumerate(rows):
            ids = list(self.tok(readable(p), add_special_tokens=True)["input_ids"])
            seqs.append(_fit(ids, len(ids), limit, i, bos)[0])  # as scoring fits an over-long prompt
        ids, mask, pos, _ = pad_batch(seqs, pad_id(self.tok), "right", input_device(self.model))
        x, _ = self._capture(ids, mask, pos)
        cb = self.codebook
        dist, idx = cb.nearest(x.reshape(-1, x.shape[-1]))
        dist, idx = dist.view(x.shape[:2]), idx.view(x.shape[:2])
        eps = cb.eps[idx]
        for r, (seq, (_, o)) in enumerate(zip(seqs, rows)):
            n = len(seq)
            s = self._stats
            if o.metric == "locality":
                inside = (dist[r, :n] <= eps[r, :n])
                s.setdefault("locality_routed", []).append(float(inside.any()))
                s.setdefault("locality_tokens_routed", []).append(float(inside.float().mean()))
                t = int(torch.argmin(dist[r, :n] / eps[r, :n].clamp(min=1e-12)))
                s.setdefault("locality_nearest", []).append(float(dist[r, t]))
                s.setdefault("locality_nearest_over_eps", []).append(float(dist[r, t] / eps[r, t].clamp(min=1e-12)))
            else:
                t = n - 1
                j = int(idx[r, t])
                hit = float(dist[r, t] <= eps[r, t])
                s.setdefault(f"{o.metric}_hit", []).append(hit)
                s.setdefault(f"{o.metric}_own", []).append(hit * float(o.record in cb.records[j]))
                s.setdefault(f"{o.metric}_nearest", []).append(float(dist[r, t]))

    def report(self) -> dict[str, Any]:
        cb = self.codebook
        out: dict[str, Any] = {"codebook_size": cb.n, "edits": self.n_edits,
                               **{f"n_{k}": v for k, v in self.counts.items()}}
        if cb.n:
            out["eps_mean"] = round(float(cb.eps.mean()), 5)
            out["eps_min"] = round(float(cb.eps.min()), 5)
        names = {
            "edit_succ_hit": "hit_rate_edit", "edit_succ_own": "own_rate_edit", "edit_succ_nearest": "nearest_edit",
            "rephrase_hit": "hit_rate_rephrase", "rephrase_own": "own_rate_rephrase",
            "rephrase_nearest": "nearest_rephrase",
            "portability_hit": "hit_rate_portability", "portability_own": "own_rate_portability",
            "portability_nearest": "nearest_portability",
            "locality_routed": "false_routing_locality", "locality_tokens_routed": "false_routing_locality_tokens",
            "locality_nearest": "nearest_locality", "locality_nearest_over_eps": "nearest_over_eps_locality",
        }
        for key, vals in self._stats.items():
            if vals:
                out[names.get(key, key)] = round(sum(vals) / len(vals), 5)
        for metric in (*QUESTION_METRICS, "locality"):
            vals = self._stats.get(f"{metric}_hit" if metric != "locality" else "locality_routed")
            if vals:
                out[f"n_prompts_{metric}"] = len(vals)
        return out

    # -- back to the model as handed over -------------------------------------------------------------
    def restore(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.codebook.clear()
        self._train = None
        self.n_edits = 0
        self.counts = {k: 0 for k in self.counts}
        self._stats = {}

    def provenance(self) -> dict[str, Any]:
        hp: GRACEHparams = self.hparams
        return {
            "semantics": SEMANTICS,
            "deviations": list(DEVIATIONS),
            "module": self.module_name,
            "key": "module input at the last prompt token (d_in %d)" % self.codebook.d_in,
            "value": "module output replaced where the query is inside its nearest key's ball (d_out %d)"
                     % self.codebook.d_out,
            "query": "every position (per-token nearest key)",
            "distance": "euclidean",
            "eps_init": hp.eps,
            "eps_expand": hp.eps_expand,
            "val_init": hp.val_init,
            "optimizer": {"name": "adam", "lr": hp.edit_lr, "n_iter": hp.n_iter, "stop_loss": hp.stop_loss},
            "loss": "token-mean NLL of the target of '{prompt} {target}', base frozen",
            "replay": "training re-runs the blocks from the edited layer up (checked against the full logits)"
                      if hp.replay else "full forward passes",
            "seed": f"cold values: context.seed + edit count ({self.context.seed} + n)",
        }
