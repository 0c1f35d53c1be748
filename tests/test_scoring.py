"""Batched scoring equals one-at-a-time scoring, and target positions are indexed correctly."""

from __future__ import annotations

import math

import pytest
import torch

from knowbench.models import prepare_tokenizer, tiny_random_model
from knowbench.scoring import (
    TeacherForced,
    continuation_logprobs,
    generate,
    generate_ids,
    target_spans,
    teacher_forced,
)


PAIRS = [
    ("The capital of France is", "Paris"),
    ("Who wrote Hamlet?", " William Shakespeare"),  # target already has its space
    ("A", "b c d e f g"),
    ("The quick brown fox jumps over the lazy dog and then", "runs away quickly."),
    ("ends with a space ", "x y"),  # prompt already has the space
    ("Question: who is the president of Ümlautland?\nAnswer:", "I don't know."),
]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    model, tok = tiny_random_model(request.param, seed=1, n_layers=2, d_model=32)
    prepare_tokenizer(tok)
    return request.param, model, tok


def full_forward(model, ids: list[int], start: int) -> torch.Tensor:
    """Reference: one unpadded sequence, full-vocab logits everywhere, rows predicting the target."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[start - 1 : len(ids) - 1], dim=-1)


# -- target_spans ------------------------------------------------------------------------------
def test_target_spans_gold_decodes_to_spaced_target(tiny):
    family, _, tok = tiny
    for (prompt, target), (ids, start) in zip(PAIRS, target_spans(tok, PAIRS)):
        gold = tok.decode(ids[start:])
        head = tok.decode(ids[:start], skip_special_tokens=True)
        if prompt.endswith(" "):  # joined as is; the space may go either side of the boundary
            assert head + gold == prompt + target and gold.strip() == target
            continue
        assert gold == (target if target.startswith(" ") else " " + target)
        assert head == prompt
        if family == "llama":  # BOS first, target index shifted by it
            assert ids[0] == tok.bos_token_id
            assert start == 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])
        else:
            assert tok.bos_token_id not in ids


def test_target_space_is_not_doubled(tiny):
    _, _, tok = tiny
    a, b = target_spans(tok, [("Q is", "Paris"), ("Q is", " Paris")])
    assert a == b


def test_empty_target_and_unpredictable_first_token_raise(tiny):
    family, model, tok = tiny
    with pytest.raises(ValueError, match="pair 1: target is empty"):
        teacher_forced(model, tok, [("a", "b"), ("prompt", "  ")])
    if family == "gpt2":  # no BOS: nothing can predict the first token of an empty prompt
        with pytest.raises(ValueError, match="nothing precedes"):
            target_spans(tok, [("", "Paris")])
    else:
        ids, start = target_spans(tok, [("", "Paris")])[0]
        assert start == 1 and tok.decode(ids[1:]) == "Paris"


class SlowView:
    """A fast tokenizer posing as a slow one (no offsets) to exercise the prefix fallback."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, texts, **kw):
        if kw.get("return_offsets_mapping"):
            raise NotImplementedError("slow tokenizers have no offsets")
        return self._tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_slow_tokenizer_fallback_matches_offsets(tiny):
    _, _, tok = tiny
    assert target_spans(SlowView(tok), PAIRS) == target_spans(tok, PAIRS)


def trained_bpe(metaspace: bool):
    """A small BPE with real merges: GPT-2 style (byte-level, trimmed offsets) or sentencepiece style
    (metaspace, BOS, like Llama)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [p + " " + t for p, t in PAIRS] * 20 + ["Paris is the capital", "William wrote plays"] * 20
    core = Tokenizer(models.BPE(unk_token="<unk>" if metaspace else None))
    if metaspace:
        core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        core.decoder = decoders.Metaspace(prepend_scheme="first")
        specials = ["<unk>", "<s>", "</s>"]
    else:
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=[] if metaspace else pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(corpus, trainer)
    if metaspace:
        bos = core.token_to_id("<s>")
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
        tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="</s>", padding_side="left")
    else:
        core.post_processor = processors.ByteLevel(trim_offsets=True)
        tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>")
    return tok


@pytest.mark.parametrize("metaspace", [False, True], ids=["bytelevel", "metaspace"])
def test_merging_tokenizers_index_the_target(metaspace):
    tok = trained_bpe(metaspace)
    pairs = [("The capital of France is", "Paris"), ("Who wrote Hamlet?", "William Shakespeare")]
    for (prompt, target), (ids, start) in zip(pairs, target_spans(tok, pairs)):
        assert tok.decode(ids[start:]).strip() == target
        assert len(ids[start:]) < len(target)  # merges happened: fewer tokens than characters
        # same start as the prefix rule when no token straddles the boundary
        assert target_spans(SlowView(tok), [(prompt, target)])[0] == (ids, start)
        if metaspace:
            assert ids[0] == tok.bos_token_id


# -- teacher_forced / continuation_logprobs ----------------------------------------------------
def test_teacher_forced_equals_unpadded_full_forward(tiny):
    _, model, tok = tiny
    spans = target_spans(tok, PAIRS)
    for side in ("left", "right"):
        for bs in (1, 2, 32):
            got = teacher_forced(model, tok, PAIRS, batch_size=bs, padding_side=side)
            for (ids, start), tf in zip(spans, got):
                ref = full_forward(model, ids, start)
                gold = torch.tensor(ids[start:])
                assert tf.gold == ids[start:]
                assert tf.pred == ref.argmax(-1).tolist()
                lp = ref.gather(-1, gold[:, None])[:, 0]
                assert torch.allclose(torch.tensor(tf.logprobs), lp, atol=1e-4)


def test_left_and_right_padding_identical(tiny):
    _, model, tok = tiny
    left = teacher_forced(model, tok, PAIRS, batch_size=4, padding_side="left")
    right = teacher_forced(model, tok, PAIRS, batch_size=4, padding_side="right")
    for a, b in zip(left, right):
        assert a.gold == b.gold and a.pred == b.pred
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    # the tokenizer's own padding side is the default
    default = teacher_forced(model, tok, PAIRS, batch_size=4)
    assert [t.pred for t in default] == [t.pred for t in left]


def test_continuation_logprobs_rows(tiny):
    _, model, tok = tiny
    spans = target_spans(tok, PAIRS)
    for side in ("left", "right"):
        rows = continuation_logprobs(model, tok, PAIRS, batch_size=3, padding_side=side)
        for (ids, start), r in zip(spans, rows):
            ref = full_forward(model, ids, start)
            assert r.shape == (len(ids) - start, len(tok)) and r.dtype == torch.float32
            assert torch.allclose(r, ref, atol=1e-4)
            assert torch.allclose(r.exp().sum(-1), torch.ones(r.shape[0]), atol=1e-5)


def constant_predictor(token_id: int, margin: float = 10.0):
    """A tiny GPT-2 whose every position predicts ``token_id``: ln_f outputs a fixed vector e_0·margin
    and the LM head maps e_0 to token_id only, so p(token_id) = e^m / (e^m + V - 1) everywhere."""
    model, tok = tiny_random_model("gpt2", seed=0, n_layers=1, d_model=16)
    prepare_tokenizer(tok)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = margin
        model.lm_head.weight.zero_()  # tied to wte: harmless, the body output is constant anyway
        model.lm_head.weight[token_id, 0] = 1.0
    return model, tok


def test_hand_computed_accuracy_and_logprobs():
    _, tok = tiny_random_model("gpt2", n_layers=1, d_model=16)
    tok_a = tok.convert_tokens_to_ids("a")  # byte-level: "a" is its own token
    model, tok = constant_predictor(tok_a)
    (tf,) = teacher_forced(model, tok, [("xyz", "aaa")])
    # target " aaa" = [" ", "a", "a", "a"]: the space is mispredicted, the three a's are right
    assert tok.decode(tf.gold) == " aaa" and len(tf.gold) == 4
    assert tf.pred == [tok_a] * 4
    assert tf.accuracy == pytest.approx(0.75)
    V = len(tok)
    log_z = math.log(math.exp(10.0) + V - 1)
    assert tf.logprobs[0] == pytest.approx(-log_z, abs=1e-5)
    assert tf.logprobs[1:] == pytest.approx([10.0 - log_z] * 3, abs=1e-5)
    assert tf.mean_logprob == pytest.approx((3 * (10.0 - log_z) - log_z) / 4, abs=1e-5)


def test_teacher_forced_restores_train_mode_and_ignores_dropout():
    model, tok = tiny_random_model("gpt2", seed=2, n_layers=2, d_model=32)
    prepare_tokenizer(tok)
    ref = teacher_forced(model, tok, PAIRS)
    model.config.resid_pdrop = 0.5
    model.train()
    again = teacher_forced(model, tok, PAIRS)
    assert model.training
    assert [t.logprobs for t in again] == [t.logprobs for t in ref]
    model.eval()


def test_long_prompt_is_left_truncated(tiny, caplog):
    family, model, tok = tiny
    prompt, target = "word " * 20 + "end", "Paris"
    full = teacher_forced(model, tok, [(prompt, target)])[0]
    with caplog.at_level("WARNING"):
        cut = teacher_forced(model, tok, [(prompt, target)], max_length=12)[0]
    assert "truncated" in caplog.text
    assert cut.gold == full.gold and len(cut.gold) == len(" Paris")
    with pytest.raises(ValueError, match="more than the model's context"):
        teacher_forced(model, tok, [("a", "a long target string")], max_length=5)


def test_empty_teacher_forced_accuracy_raises():
    with pytest.raises(ValueError, match="no target tokens"):
        _ = TeacherForced([], [], []).accuracy
    with pytest.raises(ValueError, match="differ in length"):
        TeacherForced([1, 2], [1], [0.0, 0.0])


# -- generate ----------------------------------------------------------------------------------
def greedy_loop(model, tok, prompt: str, n: int) -> str:
    """Reference: one prompt, no cache, no padding, full forward per step."""
    ids = tok(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


def test_greedy_generate_equals_unbatched_loop(tiny):
    _, model, tok = tiny
    prompts = [p for p, _ in PAIRS]
    ref = [greedy_loop(model, tok, p, 6) for p in prompts]
    for bs in (1, 4, 16):
        assert generate(model, tok, prompts, max_new_tokens=6, batch_size=bs) == ref
    assert any(len(set(r)) > 1 for r in ref)  # not a degenerate constant output


def test_sampling_is_seeded_and_batch_independent(tiny):
    _, model, tok = tiny
    prompts = [p for p, _ in PAIRS]
    a = generate(model, tok, prompts, max_new_tokens=8, top_k=5, seed=7, batch_size=2)
    b = generate(model, tok, prompts, max_new_tokens=8, top_k=5, seed=7, batch_size=16)
    c = generate(model, tok, prompts, max_new_tokens=8, top_k=5, seed=8, batch_size=16)
    greedy = generate(model, tok, prompts, max_new_tokens=8)
    assert a == b
    assert a != c and a != greedy


def test_generate_stops_at_eos_and_returns_only_new_text():
    _, tok = tiny_random_model("gpt2", n_layers=1, d_model=16)
    model, tok = constant_predictor(tok.eos_token_id)
    assert generate(model, tok, ["hello", "a longer prompt"], max_new_tokens=5) == ["", ""]
    model, tok = constant_predictor(tok.convert_tokens_to_ids("z"))
    assert generate(model, tok, ["hello", "hi"], max_new_tokens=4, top_k=1) == ["zzzz", "zzzz"]


def test_generate_truncates_prompts_beyond_the_context(tiny, caplog):
    family, model, tok = tiny
    limit = model.config.max_position_embeddings
    long_prompt = "".join(chr(97 + i % 26) for i in range(limit + 20))  # one token per character
    with caplog.at_level("WARNING"):
        out = generate(model, tok, [long_prompt, "short"], max_new_tokens=3)
    assert "truncated" in caplog.text and len(out) == 2
    # the truncated prompt continues exactly like its last (limit - 3) tokens alone would
    keep = limit - 3 - (1 if family == "llama" else 0)  # the BOS is kept in front
    assert out[0] == generate(model, tok, [long_prompt[-keep:]], max_new_tokens=3)[0]
    with pytest.raises(ValueError, match="leaves no room"):
        generate(model, tok, ["a"], max_new_tokens=limit)


def test_progress_bars_and_empty_inputs(tiny):
    _, model, tok = tiny
    assert teacher_forced(model, tok, []) == []
    assert continuation_logprobs(model, tok, []) == []
    assert generate(model, tok, [], max_new_tokens=3) == []
    with_bar = teacher_forced(model, tok, PAIRS, batch_size=2, progress="scoring")
    assert [t.pred for t in with_bar] == [t.pred for t in teacher_forced(model, tok, PAIRS)]
    assert len(generate(model, tok, ["a", "b"], max_new_tokens=2, progress=True)) == 2


def test_generate_ids_are_the_generated_tokens(tiny):
    _, model, tok = tiny
    prompts = [p for p, _ in PAIRS]
    ids = generate_ids(model, tok, prompts, max_new_tokens=5, batch_size=3)
    assert all(len(t) <= 5 for t in ids) and any(len(t) == 5 for t in ids)
    assert [tok.decode(t, skip_special_tokens=True) for t in ids] == generate(
        model, tok, prompts, max_new_tokens=5
    )
