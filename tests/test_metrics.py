"""Metric functions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from knowbench.metrics import (
    accuracy,
    aggregate,
    agreement,
    contains_idk,
    convsent_edit_succ,
    fluency,
    greedy_agreement,
    kl_divergence,
    mean_of_keys,
    ngram_entropy,
    word_tokenize,
)
from knowbench.scoring import TeacherForced


def tf(gold, pred):
    return TeacherForced(gold=list(gold), pred=list(pred), logprobs=[-1.0] * len(gold))


# -- accuracy / agreement ----------------------------------------------------------------------
def test_accuracy_is_token_fraction():
    assert accuracy(tf([5, 6, 7, 8], [5, 0, 7, 0])) == 0.5
    assert accuracy(tf([5, 6, 7], [5, 6, 7])) == 1.0
    assert accuracy(tf([5, 6, 7], [1, 2, 3])) == 0.0


def test_agreement_compares_predictions_not_gold():
    pre = tf([1, 2, 3, 4], [9, 2, 8, 4])  # pre is itself wrong at two positions
    post = tf([1, 2, 3, 4], [9, 2, 3, 0])
    assert agreement(pre, post) == 0.5  # positions 0 and 1 agree
    assert agreement(pre, pre) == 1.0
    with pytest.raises(ValueError, match="post has 3"):
        agreement(pre, tf([1, 2, 3], [1, 2, 3]))
    with pytest.raises(ValueError, match="gold ids differ"):
        agreement(pre, tf([1, 2, 3, 5], [9, 2, 8, 4]))


# -- aggregation -------------------------------------------------------------------------------
def test_mean_of_keys():
    # (mean(1, 0) + mean(1)) / 2; the empty key does not count
    assert mean_of_keys({"Reasoning": [1.0, 0.0], "Subject_Aliasing": [1.0], "Logical": []}) == 0.75
    assert mean_of_keys({"a": [0.2, 0.4, 0.6]}) == pytest.approx(0.4)
    assert mean_of_keys({}) is None
    assert mean_of_keys({"a": [], "b": []}) is None


def test_aggregate_scales_and_counts():
    assert aggregate([0.5, None, 1.0]) == (75.0, 2)
    assert aggregate([0.0]) == (0.0, 1)  # a measured 0 stays 0
    assert aggregate([None, None]) == (None, 0)  # unmeasured is None, never 0
    assert aggregate([]) == (None, 0)
    with pytest.raises(ValueError, match="NaN"):
        aggregate([float("nan")])


# -- fluency -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("The capital of France is Paris.", ["The", "capital", "of", "France", "is", "Paris", "."]),
        ("She can't go, won't she?", ["She", "ca", "n't", "go", ",", "wo", "n't", "she", "?"]),
        ('He said "hello there" (quickly)!',
         ["He", "said", "``", "hello", "there", "''", "(", "quickly", ")", "!"]),
        ("It cost $1,000 at 10:30 on Jan. 5th; we're sure.",
         ["It", "cost", "$", "1,000", "at", "10:30", "on", "Jan.", "5th", ";", "we", "'re", "sure", "."]),
        ("The U.S. Army isn't here... maybe later.",
         ["The", "U.S.", "Army", "is", "n't", "here", "...", "maybe", "later", "."]),
        ("Dogs' bowls: they'll eat -- I'm sure.",
         ["Dogs", "'", "bowls", ":", "they", "'ll", "eat", "--", "I", "'m", "sure", "."]),
        ("I cannot believe you're gonna win", ["I", "can", "not", "believe", "you", "'re", "gon", "na", "win"]),
        ("He said 'hello' to me.", ["He", "said", "'", "hello", "'", "to", "me", "."]),
        # two sentences: like NLTK's Punkt split, the inner sentence-final period stands alone
        ("I went home. Then I slept.", ["I", "went", "home", ".", "Then", "I", "slept", "."]),
        ("Mr. Smith met Dr. J. Doe.", ["Mr.", "Smith", "met", "Dr.", "J.", "Doe", "."]),
    ],
)
def test_word_tokenize_matches_nltk_behaviour(text, expected):
    assert word_tokenize(text) == expected


def test_word_tokenize_splits_sentences_with_punkt():
    """Punkt's trained English parameters decide where a sentence ends: after "p.m." followed by a
    capitalised word it ends one (the period stands alone), inside "Mr. Smith" it does not."""
    assert word_tokenize("We met at 5 p.m. They left.") == ["We", "met", "at", "5", "p.m", ".", "They", "left", "."]
    assert word_tokenize("Mr. Smith left.") == ["Mr.", "Smith", "left", "."]


def H(*counts):
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts)


def test_ngram_entropy_hand_computed():
    text = "the cat sat on the cat sat"
    # bigrams: (the cat) x2, (cat sat) x2, (sat on), (on the)
    # trigrams: (the cat sat) x2, (cat sat on), (sat on the), (on the cat)
    h2, h3 = H(2, 2, 1, 1), H(2, 1, 1, 1)
    assert h2 == pytest.approx(2 / 3 * math.log2(3) + 1 / 3 * math.log2(6))
    assert ngram_entropy(text) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    # punctuation is a word; all n-grams distinct -> log2(count)
    assert ngram_entropy("a b c d.") == pytest.approx((2 / 3 * math.log2(4) + 4 / 3 * math.log2(3)) / 2)
    # a degenerate repetition has zero entropy
    assert ngram_entropy("la la la la la la") == 0.0
    # too short for trigrams: H_3 = 0 (the reference would give NaN)
    assert ngram_entropy("hello world") == 0.0
    assert ngram_entropy("") == 0.0
    assert ngram_entropy(text, ns=(2,), weights=(1.0,)) == pytest.approx(h2)


def test_fluency_is_mean_over_texts():
    texts = ["the cat sat on the cat sat", "a b c d."]
    assert fluency(texts) == pytest.approx((ngram_entropy(texts[0]) + ngram_entropy(texts[1])) / 2)
    with pytest.raises(ValueError):
        fluency([])


# -- ConvSent ----------------------------------------------------------------------------------
def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_convsent_edit_succ_hand_computed():
    # target after: mean -2, opposite: -4 -> sigmoid(2); target improved vs before -> factor 1
    assert convsent_edit_succ([-1.0, -3.0], [-4.0], [-2.5, -2.5]) == pytest.approx(sigmoid(2.0))
    # target got worse by 1 nat -> factor exp(-1)
    assert convsent_edit_succ([-2.0], [-2.0], [-1.0]) == pytest.approx(0.5 * math.exp(-1.0))
    # token-weighted (pooled) means: target (-1*1 + -4*3)/4 = -3.25, opposite -3
    got = convsent_edit_succ([-1.0, -4.0], [-3.0], [-3.25, -3.25], target_counts=[1, 3],
                             opposite_counts=[5])
    assert got == pytest.approx(sigmoid(-0.25))
    # extreme log-probs neither overflow nor leave [0, 1]
    assert convsent_edit_succ([-800.0], [0.0], [-800.0]) == pytest.approx(0.0, abs=1e-300)
    assert convsent_edit_succ([0.0], [-800.0], [-900.0]) == 1.0
    with pytest.raises(ValueError, match="2 target replies after"):
        convsent_edit_succ([-1.0, -2.0], [-1.0], [-1.0])


def test_kl_divergence_hand_computed():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]]).log()
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(p, q) == pytest.approx(kl0 / 2)  # second row contributes 0
    assert kl_divergence(p, p) == 0.0
    # asymmetric: KL(q || p) differs
    assert kl_divergence(q, p) != pytest.approx(kl_divergence(p, q))
    # raw logits work (shift-invariant rows)
    assert kl_divergence(p + 3.0, q - 1.0) == pytest.approx(kl0 / 2)
    with pytest.raises(ValueError, match="equal shape"):
        kl_divergence(p, q[:1])


# -- Sanitation --------------------------------------------------------------------------------
def test_contains_idk():
    assert contains_idk("Well, I DON'T KNOW. Sorry")
    assert contains_idk("i don't know.")
    assert not contains_idk("I don't know")  # the period is part of the reference string
    assert not contains_idk("I do not know.")


def test_greedy_agreement():
    assert greedy_agreement([1, 2, 3], [1, 5, 3]) == pytest.approx(2 / 3)
    assert greedy_agreement([1, 2], [1, 2, 3]) == pytest.approx(2 / 3)  # missing token disagrees
    assert greedy_agreement([4, 4, 4, 4], [4, 4, 4, 4]) == 1.0
    assert greedy_agreement([], []) == 1.0
    assert greedy_agreement([1], []) == 0.0
