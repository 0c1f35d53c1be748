"""ICE and IKE: in-context knowledge editing (EDITORS.md 3).

No weight changes. The edit of record r, (p, t) = (prompt, target_new), is put in front of every
prompt x evaluated for r (edit, rephrase, portability, locality and fluency prompts alike):

    ICE   x' = "New Fact: {p} {t}\\nPrompt: {x}"
    IKE   x' = d_σ(1) ‖ d_σ(2) ‖ … ‖ d_σ(m) ‖ "New Fact: {p} {t}\\nPrompt: {x}"

Only prompts whose owner's record has been applied are rewritten (``owner.request`` /
``owner.record``), with that record's own edit: one fact per prompt, as EasyEdit (no multi-fact
context, also in sequential runs). Before any apply, and after ``restore``, the rewrite is the
identity, so the unedited reference, and with it Locality, is the prompt *without* the fact: KnowEdit's
ICE locality compares the locality prompt with the New-Fact prefix against no prefix at all, which is
why it is low by construction (23–33 on KnowEdit) and not comparable with parametric editors.

IKE's demonstrations (EasyEdit's encode_ike_facts on the task's training split). For each training
record (p_i, t_i):

    copy     "New Fact: {p_i} {t_i}\\nPrompt: {p_i} {t_i}\\n\\n"
    update   "New Fact: {p_i} {t_i}\\nPrompt: {rephrase} {t_i}\\n\\n"           for each rephrase
    retain   "New Fact: {p_i} {t_i}\\nPrompt: {loc_prompt} {loc_answer}\\n\\n"  for each locality probe

(exact duplicate texts are kept once). With e(·) the sentence encoder (all-MiniLM-L6-v2, 384-d),
the pool D (N, 384) is embedded once and cached on disk per (encoder, texts). For an applied edit
the retrieval query is q = "New Fact: {p} {t}\\nPrompt: {p}\\n\\n" and

    s_j = e(q)ᵀ e(d_j) / (‖e(q)‖ ‖e(d_j)‖)      (normalised dot product, EasyEdit's dot_score)
    σ   = the k indices of largest s_j, most similar first (ties: lower pool index first)

computed once per applied request. The demos are concatenated most similar first (EasyEdit's
order; ``order: most_similar_last`` puts the most similar next to the query, as the paper does).
Fluency prompts get the fact without demonstrations, as EasyEdit generates IKE's Fluency text.

Fitting to the context. With L = the model's positions (or ``max_tokens`` when smaller) and
R = max(``reserve_tokens``, |tok(" " + t)|) positions kept free for the scored answer, m ≤ k is the
largest number of the most similar demos with |tok(x')| ≤ L − R: the least similar demos are
dropped first. ``report()`` counts the prompts cut that way, the mean demos used and the mean
prompt length in tokens.

Semantics: "easyedit@14cea82" (ICE = IKE with use_icl_examples=False; IKE pool, query, retrieval and
order as encode_ike_facts / apply_ike_to_model), except that the pool holds every rephrase and every
locality probe of a record (EasyEdit: one of each, and on KnowEdit's files none, i.e. copy-only pools;
``pool_kinds: [copy]`` gives those) and that demos that do not fit the context are dropped.
Hyper-parameters (IKE): k = 16 (EasyEdit's llama-7b / gpt2-xl yaml; the paper used 32 for GPT-J),
encoder all-MiniLM-L6-v2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, Sequence

import torch

from knowbench.editor import ChangeKind, Editor, EditOutcome, EditRequest, PromptOwner, RunContext
from knowbench.encoder import DEFAULT_ENCODER
from knowbench.scoring import _max_positions, readable

from .hparams_yaml import YamlHparams

log = logging.getLogger(__name__)

SEMANTICS = "easyedit@14cea82"
LOCALITY_BASELINE = "the prompt without the fact"
DemoKind = Literal["copy", "update", "retain"]
Order = Literal["most_similar_first", "most_similar_last"]
# EasyEdit generates the Fluency text of IKE from the fact alone (test_generation_quality on
# "New Fact: {p} {t}\nPrompt: {p}"), without the demonstrations
FACT_ONLY_METRICS = ("fluency",)


def new_fact(request: EditRequest, query: str) -> str:
    """The in-context edit of ICE (and IKE's last block): the fact, then the prompt evaluated."""
    return f"New Fact: {request.prompt} {request.target_new}\nPrompt: {query}"


def retrieval_query(request: EditRequest) -> str:
    """What IKE embeds to find the demonstrations of an edit (EasyEdit's query_sentence)."""
    return f"New Fact: {request.prompt} {request.target_new}\nPrompt: {request.prompt}\n\n"


def demonstration(prompt: str, target: str, query: str, answer: str) -> str:
    """One demonstration: a fact, a prompt about it and the answer the fact implies."""
    return f"New Fact: {prompt} {target}\nPrompt: {query} {answer}\n\n"


@dataclass
class ICEHparams:
    """ICE has no hyper-parameters: the fact is put in front of the prompt, nothing else."""


@dataclass
class IKEHparams:
    k: int = 16  # demonstrations retrieved per edit (EasyEdit's yaml; 0 makes IKE ICE)
    order: Order = "most_similar_first"  # EasyEdit; "most_similar_last": the paper
    pool_kinds: list[DemoKind] = field(default_factory=lambda: ["copy", "update", "retain"])
    encoder: str = DEFAULT_ENCODER
    reserve_tokens: int = 8  # context positions kept free after the prompt for the scored answer
    max_tokens: int = 0  # cap on the rewritten prompt + answer (0: the model's context alone)


class _InContext(Editor):
    """What ICE and IKE share: the set of applied edits and the per-owner rewrite."""

    kind: ClassVar[ChangeKind] = ChangeKind.PROMPTS
    supports_batch: ClassVar[bool] = True

    def __init__(self, model: Any, tokenizer: Any, hparams: Any, context: RunContext):
        super().__init__(model, tokenizer, hparams, context)
        self.applied: dict[int, EditRequest] = {}  # record index -> its edit

    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        for r in requests:
            self.applied[r.record_index] = r
        return EditOutcome(changed_params=[])

    def restore(self) -> None:
        self.applied.clear()

    def edit_for(self, owner: PromptOwner) -> EditRequest | None:
        """The applied edit of the prompt's own record, None when that record is not applied."""
        key = owner.request.record_index if owner.request is not None else owner.record
        return self.applied.get(key)

    def rewrite_prompts(self, prompts: Sequence[str], owners: Sequence[PromptOwner]) -> list[str]:
        if len(prompts) != len(owners):
            raise ValueError(f"{self.name}: {len(prompts)} prompts but {len(owners)} owners")
        out = []
        for prompt, owner in zip(prompts, owners):
            request = self.edit_for(owner)
            out.append(prompt if request is None else self._rewrite(request, prompt, owner))
        return out

    def _rewrite(self, request: EditRequest, prompt: str, owner: PromptOwner) -> str:
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        return {"semantics": SEMANTICS, "locality_baseline": LOCALITY_BASELINE,
                "template": new_fact(EditRequest("{prompt}", "{target_new}"), "{query}")}


class ICE(_InContext):
    """In-context editing with the fact alone (KnowEdit's ICE column)."""

    name = "ice"
    hparams_cls: ClassVar[type] = ICEHparams

    def _rewrite(self, request: EditRequest, prompt: str, owner: PromptOwner) -> str:
        return new_fact(request, prompt)

    def report(self) -> dict[str, Any]:
        return {"facts_in_context": len(self.applied)}


@dataclass
class Pool:
    """IKE's demonstrations: texts, their kind, and unit embeddings (N, d)."""

    texts: list[str]
    kinds: list[str]
    embeddings: torch.Tensor | None = None
    duplicates: int = 0

    def sizes(self) -> dict[str, int]:
        return {kind: self.kinds.count(kind) for kind in ("copy", "update", "retain")}


class Fitted(NamedTuple):
    """One rewritten IKE prompt: its text, the demos it kept of those retrieved, its token count and
    the budget it had to fit (None: no context limit)."""

    text: str
    used: int
    tokens: int
    retrieved: int
    limit: int | None


def build_pool(records: Sequence[Any], kinds: Sequence[str]) -> Pool:
    """The demonstration texts of ``records`` (EditRecords), in record order: copy, update, retain."""
    texts: list[str] = []
    out_kinds: list[str] = []
    seen: set[str] = set()
    duplicates = 0

    def add(text: str, kind: str) -> None:
        nonlocal duplicates
        if text in seen:
            duplicates += 1
            return
        seen.add(text)
        texts.append(text)
        out_kinds.append(kind)

    for r in records:
        p, t = r.prompt, r.target_new
        if not (isinstance(p, str) and p.strip() and isinstance(t, str) and t.strip()):
            continue
        if "copy" in kinds:
            add(demonstration(p, t, p, t), "copy")
        if "update" in kinds:
            for reph in r.rephrase:
                if reph and reph.strip():
                    add(demonstration(p, t, reph, t), "update")
        if "retain" in kinds:
            for probes in r.locality.values():
                for probe in probes:
                    if probe.prompt.strip() and probe.answer.strip():
                        add(demonstration(p, t, probe.prompt, probe.answer), "retain")
    return Pool(texts, out_kinds, duplicates=duplicates)


class IKE(YamlHparams, _InContext):
    """In-context editing with k demonstrations retrieved from the task's training split."""

    name = "ike"
    hparams_cls: ClassVar[type] = IKEHparams
    uses_train_split: ClassVar[bool] = True


    def __init__(self, model: Any, tokenizer: Any, hparams: IKEHparams, context: RunContext):
        super().__init__(model, tokenizer, hparams, context)
        if hparams.k < 0 or hparams.reserve_tokens < 0 or hparams.max_tokens < 0:
            raise ValueError(f"ike: k, reserve_tokens and max_tokens must be >= 0, got {hparams}")
        if hparams.order not in ("most_similar_first", "most_similar_last"):
            raise ValueError(f"ike: order must be most_similar_first or most_similar_last, got {hparams.order!r}")
        self.pool: Pool | None = None
        self._ranked: dict[tuple[str, str], list[tuple[int, float]]] = {}  # (p, t) -> [(pool index, s)]
        self._demo_tokens: dict[int, int] = {}
        self.stats = {"prompts": 0, "demos": 0, "tokens": 0, "cut": 0, "over_context": 0}

    # -- the pool ------------------------------------------------------------------------------
    def setup(self) -> None:
        from knowbench.encoder import cached_encode, load_encoder

        split = self.context.train_split
        if split is None:
            raise ValueError("ike: needs the task's training split for its demonstrations (pass --train-data FILE)")
        hp: IKEHparams = self.hparams
        pool = build_pool(split.report.records, hp.pool_kinds)
        if not pool.texts:
            raise ValueError(
                f"ike: the training split {split.path} has no usable record (a prompt and a target_new, "
                f"pool kinds {list(hp.pool_kinds)}) to build demonstrations from"
            )
        emb = cached_encode(pool.texts, self.context.cache("ike", "embeddings"), hp.encoder)  # (N, d)
        pool.embeddings = emb.float() / emb.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.pool = pool
        if hp.k > 0:  # the queries are encoded at apply: load the encoder now, outside edit time
            load_encoder(hp.encoder)
        log.info("ike: %d demonstrations (%s) from %s", len(pool.texts), pool.sizes(), split.path)

    def demonstrations(self, request: EditRequest) -> list[str]:
        """The k retrieved demonstrations of ``request``, most similar first (before fitting)."""
        return [self.pool.texts[j] for j, _ in self._retrieve([request])[0]]

    def _retrieve(self, requests: Sequence[EditRequest]) -> list[list[tuple[int, float]]]:
        """(pool index, s) of the top-k demos per request, most similar first; retrieved once per edit."""
        from knowbench import encoder

        if self.pool is None:
            self.setup()
        todo = [r for r in dict.fromkeys((r.prompt, r.target_new) for r in requests) if r not in self._ranked]
        if todo and self.hparams.k > 0:
            q = encoder.encode([retrieval_query(EditRequest(p, t)) for p, t in todo], self.hparams.encoder)
            q = q.float() / q.float().norm(dim=1, keepdim=True).clamp_min(1e-12)  # (n, d)
            sims = q @ self.pool.embeddings.T  # (n, N)
            # a stable sort: among equal similarities the earlier pool entry wins
            order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, : self.hparams.k]
            for row, key in enumerate(todo):
                self._ranked[key] = [(int(j), float(sims[row, j])) for j in order[row]]
        for key in todo:
            self._ranked.setdefault(key, [])
        return [self._ranked[(r.prompt, r.target_new)] for r in requests]

    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        ranked = self._retrieve(requests)
        out = super().apply(requests)
        out.info = {"demos_retrieved": [len(r) for r in ranked],
                    "top_similarity": [round(r[0][1], 6) if r else None for r in ranked]}
        return out

    # -- the rewrite ---------------------------------------------------------------------------
    def _n_tokens(self, text: str, special: bool = True) -> int:
        return len(self.tok(readable(text), add_special_tokens=special)["input_ids"])

    def _demo_len(self, j: int) -> int:
        if j not in self._demo_tokens:
            self._demo_tokens[j] = self._n_tokens(self.pool.texts[j], special=False)
        return self._demo_tokens[j]

    def budget(self, request: EditRequest) -> int | None:
        """Tokens the rewritten prompt may take: L − R (None: the model states no context)."""
        limits = [n for n in (_max_positions(self.model), self.hparams.max_tokens) if n]
        if not limits:
            return None
        reserve = max(self.hparams.reserve_tokens, self._n_tokens(" " + request.target_new, special=False))
        return min(limits) - reserve

    def compose(self, demos: Sequence[str], request: EditRequest, prompt: str) -> str:
        """The prompt with ``demos`` (most similar first) in the configured order, then the fact."""
        demos = list(demos) if self.hparams.order == "most_similar_first" else list(demos)[::-1]
        return "".join(demos) + new_fact(request, prompt)

    def fit(self, request: EditRequest, prompt: str) -> Fitted:
        """The rewritten prompt with the most similar demos that fit the budget."""
        ranked = [j for j, _ in self._retrieve([request])[0]]
        texts = [self.pool.texts[j] for j in ranked]
        limit = self.budget(request)
        if limit is None:
            text = self.compose(texts, request, prompt)
            return Fitted(text, len(texts), self._n_tokens(text), len(texts), None)
        # token counts of the parts add up (demos end in "\n\n"); the exact length is checked after
        used = self._n_tokens(new_fact(request, prompt))
        m = 0
        while m < len(ranked) and used + self._demo_len(ranked[m]) <= limit:
            used += self._demo_len(ranked[m])
            m += 1
        text = self.compose(texts[:m], request, prompt)
        n = self._n_tokens(text)
        while n > limit and m > 0:  # a tokenizer that merges across the joins: drop one more
            m -= 1
            text = self.compose(texts[:m], request, prompt)
            n = self._n_tokens(text)
        return Fitted(text, m, n, len(texts), limit)

    def _rewrite(self, request: EditRequest, prompt: str, owner: PromptOwner) -> str:
        if owner.metric in FACT_ONLY_METRICS:
            return new_fact(request, prompt)
        f = self.fit(request, prompt)
        self.stats["prompts"] += 1
        self.stats["demos"] += f.used
        self.stats["tokens"] += f.tokens
        self.stats["cut"] += int(f.used < f.retrieved)
        self.stats["over_context"] += int(f.limit is not None and f.tokens > f.limit)
        return f.text

    def report(self) -> dict[str, Any]:
        s = self.stats
        n = max(s["prompts"], 1)
        return {
            "facts_in_context": len(self.applied),
            "prompts_rewritten": s["prompts"],
            "mean_demos": round(s["demos"] / n, 4),
            "mean_tokens": round(s["tokens"] / n, 2),
            "prompts_cut": s["cut"],  # prompts that lost their least similar demos to fit the context
            "prompts_over_context": s["over_context"],  # too long even without demos (scoring cuts them)
            "pool_size": len(self.pool.texts) if self.pool is not None else 0,
        }

    def provenance(self) -> dict[str, Any]:
        from knowbench.encoder import encoder_identity

        hp: IKEHparams = self.hparams
        split = self.context.train_split
        semantics = SEMANTICS if hp.order == "most_similar_first" else f"{SEMANTICS}; demo order: paper"
        return {
            **super().provenance(),
            "semantics": semantics,
            "encoder": encoder_identity(hp.encoder),
            "pool": ({**self.pool.sizes(), "total": len(self.pool.texts), "duplicates_dropped": self.pool.duplicates}
                     if self.pool is not None else None),
            "train_split": {"path": str(split.path), "sha256": split.sha256} if split is not None else None,
            "k": hp.k,
            "order": hp.order,
            "context_positions": _max_positions(self.model),
        }
