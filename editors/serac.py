"""SERAC: semi-parametric editing with a retrieval-augmented counterfactual model (EDITORS.md 2).

No weight of the base model f changes. The editor keeps

* an **edit cache** c_1..c_m: each edit is the string c_j = "{prompt} {target_new}"; the scope
  classifier sees c_j with the target removed, i.e. the edit's prompt;
* a **scope classifier** g: the frozen sentence encoder e = all-MiniLM-L6-v2 (384-d, unit-normalised,
  embeddings cached) followed by a small trained head h (``head``: "linear", a map 384→``head_dim``,
  or "mlp", h(u) = u + W₂ relu(W₁u + b₁)). For a prompt x and entry c_j

      d_j = ‖h(e(x)) − h(e(c_j))‖²          (EasyEdit's square=true, cos=false)
      s_j = exp(−τ d_j),  j* = argmax_j s_j,  in scope ⇔ s_{j*} > threshold  (τ 1.0, threshold 0.5)

* a **counterfactual model**: the base model itself with the edit in context (EasyEdit's
  freeze_cntr option: one checkpoint, in-context editing gated by the classifier). An in-scope
  prompt x is rewritten to ``template`` = "New Fact: {prompt} {target}\\nPrompt: {query}" (the
  in-context editing prompt of ICE) with c_{j*}; an out-of-scope prompt is left as it is, i.e. it
  goes to the base model.

Routing is hard (s_{j*} > threshold), as EasyEdit's generate() and the paper's inference do.
EasyEdit's teacher-forced evaluation mixes the two models softly, p = (1 − s)·p_f(·|x) + s·p_h(·|c, x);
a mixture of two distributions cannot be written as one rewritten prompt, so knowbench does not
reproduce it (its locality on ZsRE, 30.23 in KnowEdit's table, comes largely from that mixture).
Routing reads only the prompt text and the cache, never ``owner.request`` / ``owner.record``;
the owners are used only to count the router statistics of :meth:`SERAC.report`.

Modes: ``apply`` appends (batch: several entries at once; sequential: the cache grows, top-1 over
all edits); ``restore`` empties the cache, which gives the unedited model back exactly.

Training (``knowbench train``), semantics "scope classifier: paper (BCE on in/out pairs);
counterfactual model: freeze_cntr (EasyEdit option)". Only h is trained (the encoder and the base
model are frozen), with binary cross-entropy on s as the probability of "in scope":

    L = mean_pos τ·d  +  ½·mean_hard −log(1 − e^{−τd})  +  ½·mean_rand −log(1 − e^{−τd})

over pairs (edit prompt of record r, query):
  positives  r's rephrases (and the portability items of ``positive_portability_keys``, none by
             default: an alias of the subject is a name the encoder cannot link to it, and teaching h
             that a different name is in scope contradicts the negatives below);
  hard neg.  r's own locality prompts (same subject, another relation);
  random neg. ``random_negatives`` texts (prompts, rephrases, locality prompts) of other records,
             except texts equal to one of r's positives.
Adam (``lr``), ``steps`` steps of ``batch_size`` records; ``val_records`` records are held out
(≥ 20 where the split allows it) and every ``val_every`` steps the curve records the BCE loss, the
rephrase recall, the false-routing rates on the held-out locality prompts and on other held-out
records, and top-1 retrieval with every held-out edit in the cache; the head with the best balanced
score (recall + (1 − fpr_locality) + (1 − fpr_other)) / 3 is kept. Checkpoints every
``checkpoint_every`` steps (knowbench.training), resumed when ``train`` runs again on the same folder.

EasyEdit (easyedit@14cea82, serac_main.py / trainer/algs/SERAC.py) uses distilbert-base-cased for g,
fine-tunes all of g and h with c_edit·NLL_edit + c_loc·KL on the locality prompts (g's signal coming
from the KL), and drops the last word of c_j as crude target removal; distilbert is not available
offline, so the encoder is all-MiniLM-L6-v2 and only a head on top of it trains.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from knowbench.editor import (
    Artefact, ChangeKind, Editor, EditOutcome, EditRequest, PromptOwner, RunContext, TrainSplit, hparams_to_dict,
)

from .hparams_yaml import YamlHparams

log = logging.getLogger(__name__)

SEMANTICS = "scope classifier: paper (BCE on in/out pairs); counterfactual model: freeze_cntr (EasyEdit option)"
HEAD_FILE = "scope_head.pt"
IN_SCOPE_METRICS = ("edit_succ", "rephrase")  # the owner metrics whose prompts ask for the edited fact


@dataclass
class SERACHparams:
    encoder: str = "all-MiniLM-L6-v2"  # sentence encoder e (frozen)
    head: str = "linear"  # "linear" (u -> W u) or "mlp" (u -> u + W2 relu(W1 u + b1))
    head_dim: int = 384  # output size of the linear head (384: initialised to the identity)
    mlp_hidden: int = 768
    tau: float = 1.0  # s = exp(-tau d), EasyEdit's fixed buffer
    threshold: float = 0.5  # in scope when s > threshold (EasyEdit's generate, the paper)
    template: str = "New Fact: {prompt} {target}\nPrompt: {query}"  # counterfactual input (ICE's)
    # -- training of the head
    steps: int = 1500
    batch_size: int = 32  # records per step, each with all its positives and hard negatives
    random_negatives: int = 8  # texts of other records per record and step
    lr: float = 1e-3
    weight_decay: float = 0.0
    positive_portability_keys: list[str] = field(default_factory=list)  # e.g. ["Subject_Aliasing"]
    val_records: int = 100  # held out for the validation curve (fewer only when the split is small)
    val_every: int = 100
    checkpoint_every: int = 250


class ScopeHead(nn.Module):
    """h: (n, 384) encoder embeddings -> (n, head_dim) points whose squared distance is d."""

    def __init__(self, kind: str, d_in: int, head_dim: int, hidden: int):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"serac: head must be 'linear' or 'mlp', got {kind!r}")
        self.kind = kind
        if kind == "linear":
            # no bias: it cancels in h(x) - h(c)
            self.proj = nn.Linear(d_in, head_dim, bias=False)
            with torch.no_grad():
                if head_dim == d_in:  # start at the encoder's own distance
                    self.proj.weight.copy_(torch.eye(d_in))
                else:
                    nn.init.orthogonal_(self.proj.weight)
        else:
            self.up = nn.Linear(d_in, hidden)
            self.down = nn.Linear(hidden, d_in, bias=False)
            nn.init.zeros_(self.down.weight)  # residual branch starts at zero: h = identity

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.proj(u)
        return u + self.down(F.relu(self.up(u)))


def squared_distances(hq: torch.Tensor, hc: torch.Tensor) -> torch.Tensor:
    """(n, m) ‖hq_i − hc_j‖², computed in float64 so that d of a text with itself is 0 to rounding."""
    hq, hc = hq.double(), hc.double()
    d = (hq * hq).sum(1, keepdim=True) + (hc * hc).sum(1)[None, :] - 2.0 * hq @ hc.T
    return d.clamp_min(0.0)


def bce_terms(d: torch.Tensor, tau: float, positive: bool) -> torch.Tensor:
    """−log s (positives) or −log(1 − s) (negatives) with s = exp(−τd), elementwise."""
    x = tau * d
    if positive:
        return x
    return -torch.log(-torch.expm1(-x.clamp_min(1e-6)))  # log(1 - e^{-x}), stable near 0


@dataclass
class _Entry:
    prompt: str
    target: str
    record_index: int


@dataclass
class _Pairs:
    """Training pairs as indices into the pool of distinct texts."""

    anchor: list[int]  # per record: the pool index of its edit prompt
    positives: list[list[int]]
    hard: list[list[int]]
    exclude: list[set[int]]  # texts that must not serve as this record's random negatives
    owner: list[int]  # pool index -> the record (position in the list) it came from, first seen


class SERAC(YamlHparams, Editor):
    name = "serac"
    hparams_cls: ClassVar[type] = SERACHparams
    kind: ClassVar[ChangeKind] = ChangeKind.MEMORY
    supports_batch: ClassVar[bool] = True
    trainable: ClassVar[bool] = True


    def __init__(self, model: nn.Module, tokenizer: Any, hparams: SERACHparams, context: RunContext):
        super().__init__(model, tokenizer, hparams, context)
        self.head = ScopeHead(hparams.head, 384, hparams.head_dim, hparams.mlp_hidden)
        self.tau = float(hparams.tau)
        self.threshold = float(hparams.threshold)
        self.trained: dict[str, Any] | None = None  # what load_artefact read
        self.cache_entries: list[_Entry] = []
        self._cache_emb = torch.zeros(0, 384)  # (m, 384) e(c_j)
        self._memo: dict[str, torch.Tensor] = {}  # text -> e(text), the encoder is frozen
        self._stats: dict[str, dict[str, float]] = {}

    # -- the scope classifier -------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, 384) e(texts), each distinct text encoded once per editor."""
        from knowbench.encoder import encode

        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if todo:
            for t, e in zip(todo, encode(todo, self.hparams.encoder)):
                self._memo[t] = e.clone()
        if not texts:
            return torch.zeros(0, 384)
        return torch.stack([self._memo[t] for t in texts])

    @torch.no_grad()
    def similarity(self, prompts: Sequence[str]) -> torch.Tensor:
        """(n, m) s_j = exp(−τ‖h(e(x)) − h(e(c_j))‖²) of every prompt against every cache entry."""
        if not self.cache_entries or not prompts:
            return torch.zeros(len(prompts), len(self.cache_entries), dtype=torch.float64)
        hq = self.head(self.embed(prompts))
        hc = self.head(self._cache_emb)
        return torch.exp(-self.tau * squared_distances(hq, hc))

    def scope(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_{j*}, j*) per prompt: the best entry and its similarity (j* = −1 with an empty cache)."""
        s = self.similarity(prompts)
        if s.shape[1] == 0:
            return torch.zeros(len(prompts), dtype=torch.float64), torch.full((len(prompts),), -1)
        best, j = s.max(dim=1)
        return best, j

    # -- the contract -----------------------------------------------------------------------------
    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        if self.trained is None:
            log.warning("serac: the scope head is untrained (no artefact loaded): routing uses its initial weights")
        new = [_Entry(r.prompt, r.target_new, r.record_index) for r in requests]
        self._cache_emb = torch.cat([self._cache_emb, self.embed([e.prompt for e in new])])
        self.cache_entries.extend(new)
        return EditOutcome(changed_params=[], info={"cache_size": len(self.cache_entries)})

    def rewrite_prompts(self, prompts: Sequence[str], owners: Sequence[PromptOwner]) -> list[str]:
        prompts = list(prompts)
        if not self.cache_entries or not prompts:
            return prompts
        s, j = self.scope(prompts)
        cached = {e.record_index for e in self.cache_entries}  # for the statistics only
        out = []
        for x, sx, jx, o in zip(prompts, s.tolist(), j.tolist(), owners):
            routed = sx > self.threshold
            if routed:
                c = self.cache_entries[jx]
                out.append(self.hparams.template.format(prompt=c.prompt, target=c.target, query=x))
            else:
                out.append(x)
            self._count(o, routed, sx, self.cache_entries[jx].record_index if routed else None, cached)
        return out

    def restore(self) -> None:
        self.cache_entries = []
        self._cache_emb = torch.zeros(0, 384)

    def report(self) -> dict[str, Any]:
        """Router statistics, counted over every prompt evaluated while the cache was not empty
        since the editor was built (``restore`` empties the cache, not these counts): per owner
        metric how many prompts went to the counterfactual model; the hit rate on edit / rephrase
        prompts, the false-routing rate on locality prompts, the share of routed in-scope prompts
        whose entry was another record's edit, and mean s of routed / unrouted prompts. Edit /
        rephrase prompts of records whose edit is not in the cache (a sequential run's curve probes
        before their edit) are counted apart, as ``{metric}/not_cached``, outside the hit rate."""
        out: dict[str, Any] = {"cache_size": len(self.cache_entries)}
        st = self._stats
        if not st:
            return out
        out["routing"] = {m: {"prompts": int(v["n"]), "routed": int(v["routed"]),
                              "rate": round(100 * v["routed"] / v["n"], 4)} for m, v in sorted(st.items())}
        n_in = sum(st[m]["n"] for m in IN_SCOPE_METRICS if m in st)
        hit = sum(st[m]["routed"] for m in IN_SCOPE_METRICS if m in st)
        wrong = sum(st[m]["wrong_entry"] for m in IN_SCOPE_METRICS if m in st)
        if n_in:
            out["hit_rate"] = round(100 * hit / n_in, 4)
            out["wrong_entry_rate"] = round(100 * wrong / hit, 4) if hit else 0.0
        if "locality" in st:
            out["false_routing_locality"] = round(100 * st["locality"]["routed"] / st["locality"]["n"], 4)
        routed = sum(v["routed"] for v in st.values())
        unrouted = sum(v["n"] - v["routed"] for v in st.values())
        if routed:
            out["mean_s_routed"] = round(sum(v["s_routed"] for v in st.values()) / routed, 6)
        if unrouted:
            out["mean_s_unrouted"] = round(sum(v["s_unrouted"] for v in st.values()) / unrouted, 6)
        return out

    def _count(self, o: PromptOwner, routed: bool, s: float, entry_record: int | None, cached: set[int]) -> None:
        metric = o.metric
        if metric in IN_SCOPE_METRICS and o.record not in cached:
            # its edit is not (yet) in the cache (a lifelong curve's probe): no hit is possible
            metric = f"{metric}/not_cached"
        v = self._stats.setdefault(metric, {"n": 0, "routed": 0, "wrong_entry": 0, "s_routed": 0.0, "s_unrouted": 0.0})
        v["n"] += 1
        if routed:
            v["routed"] += 1
            v["s_routed"] += s
            v["wrong_entry"] += int(entry_record != o.record)
        else:
            v["s_unrouted"] += s

    def provenance(self) -> dict[str, Any]:
        from knowbench.encoder import encoder_identity

        return {
            "semantics": SEMANTICS,
            "routing": "hard (s > threshold); EasyEdit's soft mixture in teacher-forced evaluation is not "
                       "expressible as a prompt rewrite",
            "counterfactual_model": "base model with the edit in context (freeze_cntr)",
            "template": self.hparams.template,
            "encoder": encoder_identity(self.hparams.encoder),
            "hparams": hparams_to_dict(self.hparams),
            "head": self.trained,
        }

    # -- training -----------------------------------------------------------------------------------
    def load_artefact(self, artefact: Artefact) -> None:
        blob = torch.load(Path(artefact.path) / HEAD_FILE, map_location="cpu", weights_only=True)
        cfg = blob["config"]
        self.head = ScopeHead(cfg["head"], 384, cfg["head_dim"], cfg["mlp_hidden"])
        self.head.load_state_dict(blob["state"])
        self.head.eval()
        self.tau, self.threshold = float(cfg["tau"]), float(cfg["threshold"])
        self.trained = {"path": str(artefact.path), "best_step": blob.get("best_step"),
                        "validation": blob.get("validation")}

    def _build_pairs(self, records: Sequence[Any]) -> tuple[list[str], _Pairs]:
        """The pool of distinct texts of ``records`` and, per record, its anchor, positives, hard
        negatives and the texts that cannot be its random negatives."""
        pool: dict[str, int] = {}
        owner: list[int] = []

        def idx(text: str, r: int) -> int:
            if text not in pool:
                pool[text] = len(pool)
                owner.append(r)
            return pool[text]

        pairs = _Pairs([], [], [], [], owner)
        keys = set(self.hparams.positive_portability_keys)
        for r, rec in enumerate(records):
            a = idx(rec.prompt, r)
            pos_texts = [t for t in rec.rephrase if t and t != rec.prompt]
            for key in keys:
                pos_texts += [p.prompt for p in rec.portability.get(key, [])]
            pos = [idx(t, r) for t in dict.fromkeys(pos_texts)]
            hard = [idx(p.prompt, r) for items in rec.locality.values() for p in items
                    if p.prompt != rec.prompt and p.prompt not in pos_texts]
            pairs.anchor.append(a)
            pairs.positives.append(pos)
            pairs.hard.append(list(dict.fromkeys(hard)))
            pairs.exclude.append({a, *pos})
        # a text of another record that is one of r's own texts (a shared subject's locality prompt
        # that is r's rephrase, ...) is r's positive/hard negative, never a random negative
        return list(pool), pairs

    def _loss(self, E: torch.Tensor, pairs: _Pairs, rows: Sequence[int], rand: list[list[int]]) -> torch.Tensor:
        """The BCE of the docstring over ``rows`` (record positions) with their random negatives."""
        a_pos, q_pos, a_hard, q_hard, a_rand, q_rand = [], [], [], [], [], []
        for r, neg in zip(rows, rand):
            a = pairs.anchor[r]
            a_pos += [a] * len(pairs.positives[r]); q_pos += pairs.positives[r]
            a_hard += [a] * len(pairs.hard[r]); q_hard += pairs.hard[r]
            a_rand += [a] * len(neg); q_rand += neg
        tau = self.tau
        terms = []
        for a, q, positive, weight in ((a_pos, q_pos, True, 1.0), (a_hard, q_hard, False, 0.5),
                                       (a_rand, q_rand, False, 0.5)):
            if a:
                d = ((self.head(E[a]) - self.head(E[q])) ** 2).sum(1)  # (pairs,)
                terms.append(weight * bce_terms(d, tau, positive).mean())
        return torch.stack(terms).sum()

    def _random_negatives(self, pairs: _Pairs, rows: Sequence[int], members: list[int], gen: torch.Generator) -> list[list[int]]:
        """``random_negatives`` pool texts per row, drawn from ``members`` (pool indices of the
        training records' texts), none of them the row's own or equal to one of its positives."""
        k = self.hparams.random_negatives
        out = []
        for r in rows:
            own = pairs.exclude[r]
            picked: list[int] = []
            for _ in range(20):  # rejection: own texts are a tiny fraction of the pool
                draw = torch.randint(len(members), (2 * k,), generator=gen).tolist()
                picked += [members[i] for i in draw if pairs.owner[members[i]] != r and members[i] not in own]
                if len(picked) >= k:
                    break
            out.append(picked[:k])
        return out

    @torch.no_grad()
    def _validate(self, E: torch.Tensor, pairs: _Pairs, val_rows: list[int]) -> dict[str, float]:
        """Held-out numbers: BCE loss (weighted as in training, over all held-out pairs), rephrase
        recall and false-routing rates at the threshold, and top-1 retrieval of rephrases with every
        held-out edit in the cache."""
        H = self.head(E)
        thr, tau = self.threshold, self.tau
        hc = H[[pairs.anchor[r] for r in val_rows]]  # (v, D) the held-out edits, as a cache
        pos_q, pos_r, loc_q, loc_r = [], [], [], []
        for i, r in enumerate(val_rows):
            pos_q += pairs.positives[r]; pos_r += [i] * len(pairs.positives[r])
            loc_q += pairs.hard[r]; loc_r += [i] * len(pairs.hard[r])
        out: dict[str, float] = {}
        terms = []
        if pos_q:
            d = squared_distances(H[pos_q], hc)  # (p, v)
            own = d[torch.arange(len(pos_q)), pos_r]
            out["rephrase_recall"] = float((torch.exp(-tau * own) > thr).double().mean())
            best, j = torch.exp(-tau * d).max(1)
            out["retrieval_top1"] = float(((j == torch.tensor(pos_r)) & (best > thr)).double().mean())
            terms.append(bce_terms(own, tau, True).mean())
        if loc_q:
            own = squared_distances(H[loc_q], hc)[torch.arange(len(loc_q)), loc_r]
            out["fpr_locality"] = float((torch.exp(-tau * own) > thr).double().mean())
            terms.append(0.5 * bce_terms(own, tau, False).mean())
        if len(val_rows) > 1:
            # every text of held-out record k against held-out edit i != k (r's own texts excluded)
            texts = [(q, i) for i, r in enumerate(val_rows)
                     for q in (pairs.anchor[r], *pairs.positives[r], *pairs.hard[r])]
            d = squared_distances(H[[q for q, _ in texts]], hc)  # (t, v)
            mask = torch.ones_like(d, dtype=torch.bool)
            for row, (q, i) in enumerate(texts):
                mask[row, i] = False
                for col, r in enumerate(val_rows):
                    if q in pairs.exclude[r]:
                        mask[row, col] = False
            other = d[mask]
            out["fpr_other"] = float((torch.exp(-tau * other) > thr).double().mean())
            terms.append(0.5 * bce_terms(other, tau, False).mean())
        out["loss"] = float(torch.stack(terms).sum()) if terms else float("nan")
        parts = [out.get("rephrase_recall"), 1 - out["fpr_locality"] if "fpr_locality" in out else None,
                 1 - out["fpr_other"] if "fpr_other" in out else None]
        parts = [p for p in parts if p is not None]
        out["score"] = float(sum(parts) / len(parts)) if parts else 0.0
        return {k: round(v, 6) for k, v in out.items()}

    def train(self, split: TrainSplit) -> Artefact:
        from knowbench.encoder import cached_encode, encoder_identity
        from knowbench.progress import progress_bar
        from knowbench.training import drop_checkpoint, load_checkpoint, save_checkpoint

        hp: SERACHparams = self.hparams
        folder = Path(self.context.artefact_dir)
        t_start = time.perf_counter()
        records = [r for r in split.report.records if r.prompt]
        if len(records) < 2:
            raise ValueError(f"serac: the training split {split.path} has {len(records)} usable record(s); need ≥ 2")
        # held-out records: a seeded shuffle, ≥ 20 where the split allows (at most a fifth of it)
        order = list(range(len(records)))
        random.Random(self.context.seed).shuffle(order)
        n_val = min(hp.val_records, max(1, len(records) // 5))
        if n_val < min(20, hp.val_records):
            log.warning("serac: only %d validation records (split of %d)", n_val, len(records))
        val_rows, train_rows = sorted(order[:n_val]), sorted(order[n_val:])

        texts, pairs = self._build_pairs(records)
        n_pos = sum(len(pairs.positives[r]) for r in train_rows)
        if n_pos == 0:
            log.warning("serac: the training records have no rephrase (positive pair); the head learns only "
                        "from negatives and in scope is then the edit's own prompt")
        t0 = time.perf_counter()
        # (N, 384); a clone: the encoder returns inference-mode tensors, which autograd refuses
        E = cached_encode(texts, self.context.cache("serac", "embeddings"), hp.encoder).clone()
        encode_s = time.perf_counter() - t0
        train_set = set(train_rows)
        members = [i for i, r in enumerate(pairs.owner) if r in train_set]

        opt = torch.optim.Adam(self.head.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        gen = torch.Generator().manual_seed(self.context.seed)
        step, curve, best, elapsed = 0, [], None, 0.0
        state = load_checkpoint(folder)
        if state is not None and state.get("split_sha256") == split.sha256 and state.get("hparams") == hparams_to_dict(hp):
            self.head.load_state_dict(state["head"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            step, curve, best, elapsed = state["step"], state["curve"], state["best"], state["elapsed_s"]
            log.info("serac: resuming the training from step %d (%s)", step, folder)
        elif state is not None:
            log.warning("serac: ignoring a checkpoint in %s made for other data or hyper-parameters", folder)
            step = 0

        def checkpoint() -> None:
            save_checkpoint(folder, {
                "step": step, "head": self.head.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                "curve": curve, "best": best, "elapsed_s": elapsed + time.perf_counter() - t_loop,
                "split_sha256": split.sha256, "hparams": hparams_to_dict(hp),
            })

        bar = self.context.progress or progress_bar
        t_loop = time.perf_counter()
        if step == 0:
            point = {"step": 0, **self._validate(E, pairs, val_rows)}
            curve.append(point)
            best = {"step": 0, "score": point["score"], "loss": point["loss"],
                    "state": {k: v.clone() for k, v in self.head.state_dict().items()}}
        with bar("serac · training the scope classifier", hp.steps) as advance:
            if step:
                advance(step)
            self.head.train()
            while step < hp.steps:
                perm = torch.randperm(len(train_rows), generator=gen)[: hp.batch_size].tolist()
                rows = [train_rows[i] for i in perm]
                rand = self._random_negatives(pairs, rows, members, gen)
                with torch.enable_grad():
                    opt.zero_grad(set_to_none=True)
                    loss = self._loss(E, pairs, rows, rand)
                    loss.backward()
                    opt.step()
                step += 1
                if step % hp.val_every == 0 or step == hp.steps:
                    point = {"step": step, "train_loss": round(float(loss.detach()), 6),
                             **self._validate(E, pairs, val_rows)}
                    curve.append(point)
                    if (point["score"], -point["loss"]) > (best["score"], -best["loss"]):
                        best = {"step": step, "score": point["score"], "loss": point["loss"],
                                "state": {k: v.clone() for k, v in self.head.state_dict().items()}}
                if step % hp.checkpoint_every == 0 and step < hp.steps:
                    checkpoint()
                advance(1)
        self.head.load_state_dict(best["state"])
        self.head.eval()
        validation = next(p for p in curve if p["step"] == best["step"])
        torch.save({
            "config": {"head": hp.head, "head_dim": hp.head_dim, "mlp_hidden": hp.mlp_hidden,
                       "tau": hp.tau, "threshold": hp.threshold},
            "state": self.head.state_dict(), "best_step": best["step"], "validation": validation,
        }, folder / HEAD_FILE)
        drop_checkpoint(folder)
        train_s = elapsed + time.perf_counter() - t_loop
        meta = {
            "semantics": SEMANTICS, "hparams": hparams_to_dict(hp), "encoder": encoder_identity(hp.encoder),
            "steps": step, "best_step": best["step"], "validation": validation, "curve": curve,
            "n_train_records": len(train_rows), "n_val_records": len(val_rows), "n_texts": len(texts),
            "n_positive_pairs": n_pos, "encode_s": round(encode_s, 3), "loop_s": round(train_s, 3),
            "train_s": round(time.perf_counter() - t_start, 3),
        }
        (folder / "serac_train.json").write_text(json.dumps(meta, indent=1))
        self.trained = {"path": str(folder), "best_step": best["step"], "validation": validation}
        return Artefact(folder, meta)
