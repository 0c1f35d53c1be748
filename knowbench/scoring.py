"""Batched scoring primitives: teacher forcing, next-token distributions, and generation.

Teacher forcing (KnowEdit's accuracy): feed ``prompt + " " + target`` as one sequence x_1..x_T whose
target occupies positions s..T (s = index of the first target token). The model's distribution at
position t-1 predicts x_t, so for every target position t we record

    pred_t = argmax_v p(v | x_<t)        logprob_t = log p(x_t | x_<t)

Accuracy is mean(pred_t == x_t) over the target positions; locality compares pred_t before and after
an edit.

Everything here is batched: pairs are sorted by length (less padding), padded on the tokenizer's
padding side, and run with an attention mask *and* explicit position ids (cumsum(mask) - 1) so a
padded row sees exactly the positions it would see alone (transformers 5 does not derive positions
from the mask for GPT-2 / Llama). The LM head runs only on the gathered target positions, never on
every position, which matters for vocabularies of 50k-150k. Results come back in input order and
agree with a one-pair-at-a-time computation (left or right padding, with or without BOS) to float
rounding.
"""

from __future__ import annotations

import inspect
import logging
import sys
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .arch import ArchAdapter, cache_kwargs, returned_cache
from .devices import input_device
from .tokens import pad_batch
from .tokens import pad_id as _pad_id

log = logging.getLogger(__name__)

# Rows of hidden states sent through the LM head at once (bounds memory for 150k-token vocabs).
_HEAD_CHUNK = 256


# -- results -----------------------------------------------------------------------------------
@dataclass
class TeacherForced:
    """Teacher-forced scores of one (prompt, target) pair, one entry per target token."""

    gold: list[int]  # target token ids
    pred: list[int]  # argmax token at each target position given the gold prefix
    logprobs: list[float]  # log p(gold token) at each target position

    def __post_init__(self) -> None:
        if not len(self.gold) == len(self.pred) == len(self.logprobs):
            raise ValueError(
                f"TeacherForced fields differ in length: gold {len(self.gold)}, pred {len(self.pred)}, "
                f"logprobs {len(self.logprobs)}"
            )

    def __len__(self) -> int:
        return len(self.gold)

    @property
    def accuracy(self) -> float:
        """Fraction of target tokens predicted correctly (KnowEdit's token accuracy)."""
        if not self.gold:
            raise ValueError("TeacherForced has no target tokens; token accuracy is undefined")
        return float(np.mean(np.asarray(self.pred) == np.asarray(self.gold)))

    @property
    def mean_logprob(self) -> float:
        """Mean log-probability per target token (ConvSent's per-reply score)."""
        if not self.gold:
            raise ValueError("TeacherForced has no target tokens; mean log-prob is undefined")
        return float(np.mean(self.logprobs))


# -- tokenization ------------------------------------------------------------------------------
def readable(text: str) -> str:
    """``text`` as tokenizers can read it: a lone surrogate (half of a UTF-16 pair, e.g. from an
    emoji cut in two in a JSON file) becomes U+FFFD, one character for one, so character offsets
    hold. Any other text comes back as it is."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def join_prompt_target(prompt: str, target: str, reference: bool = False) -> tuple[str, int]:
    """The scored text and the character index where the prompt ends.

    KnowEdit joins with one space. With ``reference`` the space is always added, as the reference
    does (a target that starts with a space gets a second one); otherwise a target that already
    starts with whitespace, or a prompt that already ends with it, is joined as is so the space is
    never doubled.
    """
    if reference:
        return prompt + " " + target, len(prompt)
    if target[:1].isspace() or prompt[-1:].isspace() or not prompt:
        return prompt + target, len(prompt)
    return prompt + " " + target, len(prompt)


def _check_pairs(pairs: Sequence[tuple[str, str]]) -> None:
    for i, (prompt, target) in enumerate(pairs):
        if not isinstance(prompt, str) or not isinstance(target, str):
            raise TypeError(
                f"pair {i}: prompt and target must be str, got {type(prompt).__name__} and "
                f"{type(target).__name__}"
            )
        if not target.strip():
            raise ValueError(f"pair {i}: target is empty (prompt {prompt!r}); nothing to score")


def target_spans(
    tok: Any, pairs: Sequence[tuple[str, str]], reference_join: bool = False
) -> list[tuple[list[int], int]]:
    """For each (prompt, target): ids of the joined text (with special tokens such as BOS) and the
    index of the first target token; the target is ``ids[start:]``.

    With a fast tokenizer the start is the first token whose character span ends after the prompt
    (robust to merges across the boundary and to a prompt ending in a space). Slow tokenizers fall
    back to the longest common prefix of the prompt's own ids and the joined ids. Special tokens a
    tokenizer appends after the text (EOS) are dropped: they are not part of the target.
    """
    pairs = list(pairs)
    _check_pairs(pairs)
    if not pairs:
        return []
    joined = [join_prompt_target(p, t, reference_join) for p, t in pairs]
    texts = [readable(text) for text, _ in joined]
    use_offsets = bool(getattr(tok, "is_fast", False))
    enc = tok(
        texts,
        add_special_tokens=True,
        return_offsets_mapping=use_offsets,
        return_special_tokens_mask=True,
    )
    prompt_ids = None
    if not use_offsets:
        prompt_ids = tok([readable(p) for p, _ in pairs], add_special_tokens=True)["input_ids"]

    spans: list[tuple[list[int], int]] = []
    for i, (prompt, target) in enumerate(pairs):
        ids = list(enc["input_ids"][i])
        special = list(enc["special_tokens_mask"][i])
        prompt_chars = joined[i][1]
        # drop special tokens the tokenizer appended after the text (e.g. EOS)
        end = len(ids)
        while end > 0 and special[end - 1]:
            end -= 1
        if use_offsets:
            offsets = enc["offset_mapping"][i]
            start = next(
                (j for j in range(end) if not special[j] and offsets[j][1] > prompt_chars), end
            )
        else:
            p_ids = list(prompt_ids[i])
            while p_ids and p_ids[-1] in getattr(tok, "all_special_ids", ()):  # trailing EOS
                p_ids.pop()
            start = 0
            while start < min(len(p_ids), end) and p_ids[start] == ids[start]:
                start += 1
        ids = ids[:end]
        if start >= len(ids):
            raise ValueError(
                f"pair {i}: target {target!r} produced no tokens after prompt {prompt!r}"
            )
        if start == 0:
            raise ValueError(
                f"pair {i}: nothing precedes the target {target!r} (empty prompt and the tokenizer "
                f"adds no BOS), so its first token cannot be predicted"
            )
        spans.append((ids, start))
    return spans


# -- batching helpers --------------------------------------------------------------------------
@contextmanager
def _progress(total: int, progress: bool | str, default_desc: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (plain periodic log lines when stderr is not a terminal, see
    :mod:`knowbench.progress`), or a no-op when progress is False."""
    if not progress:
        yield lambda n: None
        return
    from .progress import PlainProgress, _interactive

    if not _interactive():
        plain = PlainProgress(progress if isinstance(progress, str) else default_desc, total)
        yield plain.advance
        plain.finish()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn,
    )

    desc = progress if isinstance(progress, str) else default_desc
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(file=sys.stderr), transient=True,
    ) as bar:
        task = bar.add_task(desc, total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while scoring; the caller's train/eval state is restored afterwards."""
    was_training = model.training
    if was_training:  # toggling walks every module; skip it in the usual eval case
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _model_device(model: torch.nn.Module) -> torch.device:
    """Where token rows go: the input embeddings' device (see :mod:`knowbench.devices`)."""
    return input_device(model)


def _max_positions(model: torch.nn.Module) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _fit(
    ids: list[int], start: int, limit: int | None, i: int, bos_id: int | None
) -> tuple[list[int], int]:
    """Left-truncate the prompt (keeping a leading BOS) so the sequence fits the model's context."""
    if limit is None or len(ids) <= limit:
        return ids, start
    n_target = len(ids) - start
    if n_target + 1 > limit:  # (generation passes start = len(ids): no target)
        raise ValueError(
            f"pair {i}: target has {n_target} tokens, more than the model's context of {limit} allows"
        )
    drop = len(ids) - limit
    keep_head = 1 if bos_id is not None and ids[0] == bos_id and start > drop + 1 else 0
    head = ids[:keep_head]
    ids = head + ids[keep_head + drop :]
    log.warning("prompt %d truncated by %d tokens to fit a context of %d", i, drop, limit)
    return ids, start - drop


def _target_logits(
    model: torch.nn.Module,
    tok: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int,
    progress: bool | str,
    padding_side: str | None,
    max_length: int | None,
    desc: str,
    groups: Sequence[Sequence[int]] | None = None,
    reference_join: bool = False,
    own_positions: bool = False,
) -> Iterator[tuple[int, list[int], torch.Tensor]]:
    """Yield (pair index, gold target ids, float32 logits (n_target, vocab)) batch by batch, in
    length-sorted order. Logits at row t are the model's prediction for gold[t] -- or, with
    ``own_positions``, the logits at gold[t]'s own position (which predict the token after it).

    ``groups`` (lists of pair indices) switches to the reference's batching (see
    :func:`_reference_logits`); ``reference_join`` joins prompt and target as the reference does."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if groups is not None:
        yield from _reference_logits(model, tok, pairs, groups, progress=progress, max_length=max_length,
                                     desc=desc, own_positions=own_positions)
        return
    side = padding_side or getattr(tok, "padding_side", "right") or "right"
    spans = target_spans(tok, pairs, reference_join)
    limit = max_length or _max_positions(model)
    bos = getattr(tok, "bos_token_id", None)
    spans = [_fit(ids, s, limit, i, bos) for i, (ids, s) in enumerate(spans)]
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i][0]))
    adapter = ArchAdapter(model)
    body, head = adapter.body, adapter.lm_head
    device = _model_device(model)
    pad_id = _pad_id(tok)

    with _eval_mode(model), _progress(len(spans), progress, desc) as advance:
        for b0 in range(0, len(order), batch_size):
            idx = order[b0 : b0 + batch_size]
            seqs = [spans[i][0] for i in idx]
            ids, mask, pos, offs = pad_batch(seqs, pad_id, side, device)
            hidden = body(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False
            ).last_hidden_state
            # the distribution at position t-1 predicts token t: gather those rows only
            rows, cols, sizes = [], [], []
            for r, i in enumerate(idx):
                seq, start = spans[i]
                n = len(seq) - start
                rows.extend([r] * n)
                first = offs[r] + start - (0 if own_positions else 1)
                cols.extend(range(first, first + n))
                sizes.append(n)
            # the last hidden state comes from the final norm's device, not necessarily the inputs'
            h = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)]
            logits = torch.cat(
                [head(h[c : c + _HEAD_CHUNK]).float() for c in range(0, h.shape[0], _HEAD_CHUNK)]
            )
            for i, part in zip(idx, logits.split(sizes)):
                seq, start = spans[i]
                yield i, seq[start:], part
            advance(len(idx))


def _reference_logits(
    model: torch.nn.Module,
    tok: Any,
    pairs: Sequence[tuple[str, str]],
    groups: Sequence[Sequence[int]],
    *,
    progress: bool | str,
    max_length: int | None,
    desc: str,
    own_positions: bool,
) -> Iterator[tuple[int, list[int], torch.Tensor]]:
    """The reference's teacher forcing (KnowEdit's scorer), one group of pairs per forward pass.

    A group is what the reference scores in one call: a record's rewrite prompt, its rephrases, or
    the items of one portability / locality sub-key. Its texts ``prompt + " " + target`` are
    left-padded into one batch and run with the attention mask but with positions 0..L-1 counted
    over the padding (the reference passes no position ids), so with absolute position embeddings
    a shorter text is read at later positions. The target is what follows

        n_pad_id(text row) + n_non_pad(prompt tokenized alone)

    tokens of the padded row: the padding, plus the prompt's own token count (a pad-id token inside
    a text counts as padding there, as in the reference).
    """
    _check_pairs(pairs)
    limit = max_length or _max_positions(model)
    bos = getattr(tok, "bos_token_id", None)
    pad_id = _pad_id(tok)
    adapter = ArchAdapter(model)
    body, head = adapter.body, adapter.lm_head
    device = _model_device(model)
    with _eval_mode(model), _progress(len(pairs), progress, desc) as advance:
        for group in groups:
            group = list(group)
            texts = [readable(pairs[i][0] + " " + pairs[i][1]) for i in group]
            ids = [list(x) for x in tok(texts, add_special_tokens=True)["input_ids"]]
            prompt_ids = tok([readable(pairs[i][0]) for i in group], add_special_tokens=True)["input_ids"]
            spans = []
            for r, i in enumerate(group):
                # unpadded: pad-id tokens of the text, plus the prompt's non-pad tokens
                start = sum(t == pad_id for t in ids[r]) + sum(t != pad_id for t in prompt_ids[r])
                if start >= len(ids[r]):
                    raise ValueError(f"pair {i}: target {pairs[i][1]!r} produced no tokens after prompt "
                                     f"{pairs[i][0]!r}")
                if start == 0:
                    raise ValueError(f"pair {i}: nothing precedes the target {pairs[i][1]!r}")
                spans.append(_fit(ids[r], start, limit, i, bos))
            batch, mask, _, offs = pad_batch([seq for seq, _ in spans], pad_id, "left", device)
            # the reference's positions: 0..L-1 over the padding, not pad_batch's per-row ones
            positions = torch.arange(batch.shape[1], device=device).expand_as(batch)
            hidden = body(input_ids=batch, attention_mask=mask, position_ids=positions,
                          use_cache=False).last_hidden_state
            for r, i in enumerate(group):
                seq, start = spans[r]
                first = offs[r] + start - (0 if own_positions else 1)
                n = len(seq) - start
                logits = torch.cat([head(hidden[r, c: min(c + _HEAD_CHUNK, first + n)]).float()
                                    for c in range(first, first + n, _HEAD_CHUNK)])
                yield i, seq[start:], logits
            advance(len(group))


# -- public scoring functions ------------------------------------------------------------------
def teacher_forced(
    model: torch.nn.Module,
    tok: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 32,
    progress: bool | str = False,
    padding_side: str | None = None,
    max_length: int | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    reference_join: bool = False,
    own_positions: bool = False,
) -> list[TeacherForced]:
    """Teacher-forced argmax and gold log-probs for each (prompt, target) pair, in input order.

    ``padding_side`` overrides the tokenizer's; ``max_length`` (default: the model's context) bounds a
    sequence, left-truncating over-long prompts with a warning. ``groups`` scores as the reference
    does, one group per batch (:func:`_reference_logits`); ``reference_join`` always joins with a
    space; ``own_positions`` reads each target token's log-prob from the logits at its own position
    (the reference's ConvSent alignment) instead of from those that predict it.
    """
    out: list[TeacherForced | None] = [None] * len(pairs)
    for i, gold, logits in _target_logits(
        model, tok, pairs, batch_size=batch_size, progress=progress, padding_side=padding_side,
        max_length=max_length, desc="teacher forcing", groups=groups, reference_join=reference_join,
        own_positions=own_positions,
    ):
        lp = torch.log_softmax(logits, dim=-1)
        gold_t = torch.tensor(gold, device=lp.device)
        out[i] = TeacherForced(
            gold=list(gold),
            pred=lp.argmax(-1).tolist(),
            logprobs=lp.gather(-1, gold_t[:, None])[:, 0].tolist(),
        )
    return out  # type: ignore[return-value]


def continuation_logprobs(
    model: torch.nn.Module,
    tok: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 32,
    progress: bool | str = False,
    padding_side: str | None = None,
    max_length: int | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    reference_join: bool = False,
    own_positions: bool = False,
) -> list[torch.Tensor]:
    """Per pair, the (n_target, vocab) float32 log-softmax distributions that predict each target
    token given the gold prefix (row t predicts target token t), on the CPU, in input order.

    For ConvSent's locality KL. EasyEdit masks the positions *of* the reply tokens instead, i.e. the
    distributions one step later (its last row predicts the token after the reply); both give one
    row per reply token, ours are the ones that score the reply itself.
    """
    out: list[torch.Tensor | None] = [None] * len(pairs)
    for i, _gold, logits in _target_logits(
        model, tok, pairs, batch_size=batch_size, progress=progress, padding_side=padding_side,
        max_length=max_length, desc="next-token distributions", groups=groups, reference_join=reference_join,
        own_positions=own_positions,
    ):
        out[i] = torch.log_softmax(logits, dim=-1).cpu()
    return out  # type: ignore[return-value]


# -- generation --------------------------------------------------------------------------------
def _eos_ids(model: torch.nn.Module, tok: Any) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for src in (tok.eos_token_id, getattr(gen_cfg, "eos_token_id", None)):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return ids


def _row_generator(seed: int, row: int, device: torch.device) -> torch.Generator:
    """One generator per prompt, so a prompt's sample does not depend on batch size or order."""
    state = np.random.SeedSequence([seed, row]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


def generate(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool | str = False,
) -> list[str]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; return only the new text.

    Greedy when ``top_k`` is None, else top-k sampling. Sampling draws from one torch.Generator per
    prompt seeded from (seed, prompt index), so the same call gives the same texts whatever the batch
    size. Rows are left-padded with explicit position ids and decoded with the model's KV cache; a
    row stops at EOS (which is not part of the returned text).
    """
    ids = generate_ids(
        model, tok, prompts, max_new_tokens=max_new_tokens, top_k=top_k, seed=seed,
        batch_size=batch_size, progress=progress,
    )
    return [tok.decode(t, skip_special_tokens=True) for t in ids]


def generate_ids(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool | str = False,
    max_total: int | None = None,
    stop_at_eos: bool = True,
    batch_tail: bool = False,
) -> list[list[int]]:
    """:func:`generate`, returning each prompt's new token ids (EOS excluded) instead of text, e.g.
    for per-position agreement of greedy answers without a decode/encode round trip.

    ``batch_tail=True`` returns what a batched Hugging Face ``generate`` call leaves after each
    prompt (KnowEdit's Sanitation reads that): the prompts are batched in the order given, a
    row's EOS is kept, and a row that has finished gets a pad token at every further step of its
    batch, so each row is as long as its batch's longest continuation.

    ``max_total`` caps prompt + continuation at that many tokens (a prompt that long gets no new
    token); ``stop_at_eos=False`` keeps sampling after an end-of-sequence token, which is then part
    of the returned ids (KnowEdit's Fluency sampling does both)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i}: expected str, got {type(p).__name__}")
    encoded = tok([readable(p) for p in prompts], add_special_tokens=True)["input_ids"] if prompts else []
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(
                f"prompt {i} is empty and the tokenizer adds no BOS: nothing to continue"
            )
    limit = _max_positions(model)
    if limit is not None and max_total is not None:  # the cap is at most the context
        max_total = min(max_total, limit)
        bos = getattr(tok, "bos_token_id", None)
        encoded = [_fit(ids, len(ids), limit, i, bos)[0] for i, ids in enumerate(encoded)]
    elif limit is not None:  # prompt + continuation must fit the context: prompts lose their start
        if max_new_tokens >= limit:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                f"context of {limit} tokens"
            )
        bos = getattr(tok, "bos_token_id", None)
        room = limit - max_new_tokens
        encoded = [_fit(ids, len(ids), room, i, bos)[0] for i, ids in enumerate(encoded)]
    budget = [max_new_tokens if max_total is None else max(0, min(max_new_tokens, max_total - len(ids)))
              for ids in encoded]
    device = _model_device(model)
    pad_id = _pad_id(tok)
    eos = _eos_ids(model, tok) if stop_at_eos else set()
    order = (list(range(len(prompts))) if batch_tail
             else sorted(range(len(prompts)), key=lambda i: -len(encoded[i])))
    # only the last position's logits are needed; older model classes lack the argument
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if takes_keep else {}
    new_tokens: list[list[int]] = [[] for _ in prompts]

    with _eval_mode(model), _progress(len(prompts), progress, "generating") as advance:
        for b0 in range(0, len(order), batch_size):
            idx = order[b0 : b0 + batch_size]
            ids, mask, pos, _ = pad_batch([encoded[i] for i in idx], pad_id, "left", device)
            gens = [_row_generator(seed, i, device) for i in idx] if top_k is not None else None
            done = torch.tensor([budget[i] == 0 for i in idx], dtype=torch.bool, device=device)
            past = None
            step_ids, step_pos = ids, pos
            for _ in range(max(budget[i] for i in idx)):
                out = model(
                    input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                    **cache_kwargs(model, past), **extra,
                )
                past = returned_cache(out)
                logits = out.logits[:, -1].float()
                nxt = _pick(logits, top_k, gens)
                nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                for r, i in enumerate(idx):
                    t = int(nxt[r])
                    if not done[r]:
                        if t in eos:
                            done[r] = True
                            if batch_tail:
                                new_tokens[i].append(t)
                        else:
                            new_tokens[i].append(t)
                            done[r] = len(new_tokens[i]) >= budget[i]
                    elif batch_tail:  # the batch goes on: a finished row is padded
                        new_tokens[i].append(t)
                if bool(done.all()):
                    break
                step_ids = nxt[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            advance(len(idx))
    return new_tokens


def sample_with_prompt(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    *,
    max_total: int,
    top_k: int,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """KnowEdit's Fluency samples: top-k sampling until prompt + continuation reach ``max_total``
    tokens, not stopping at end-of-sequence; each text is the prompt *and* its continuation, decoded
    without special tokens, NFKD-normalised, with blank lines ("\n\n") turned into spaces."""
    new = generate_ids(model, tok, prompts, max_new_tokens=max_total, top_k=top_k, seed=seed,
                       batch_size=batch_size, max_total=max_total, stop_at_eos=False)
    prompt_ids = tok([readable(p) for p in prompts], add_special_tokens=True)["input_ids"] if prompts else []
    texts = [tok.decode(list(p) + n, skip_special_tokens=True) for p, n in zip(prompt_ids, new)]
    return [unicodedata.normalize("NFKD", t).replace("\n\n", " ") for t in texts]


def _pick(logits: torch.Tensor, top_k: int | None, gens: list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row: argmax, or a top-k sample using each row's own generator."""
    if top_k is None:
        return logits.argmax(-1)
    k = min(top_k, logits.shape[-1])
    vals, cand = logits.topk(k, dim=-1)
    probs = torch.softmax(vals, dim=-1)
    assert gens is not None
    choice = torch.stack(
        [torch.multinomial(probs[r], 1, generator=gens[r])[0] for r in range(probs.shape[0])]
    )
    return cand.gather(-1, choice[:, None])[:, 0]
