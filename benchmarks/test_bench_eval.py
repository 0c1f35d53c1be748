"""Speed of batched teacher-forced scoring against scoring one pair at a time.

Workload: 200 synthetic ZsRE-like records (rewrite prompt, rephrase, locality probe -> 600 pairs),
built deterministically. Two model set-ups:

* ``gpt2-vocab`` (the target: >= 5x): a GPT-2-shaped random model (4 layers, d_model 256) with
  GPT-2's vocabulary size, 50257, and a BPE tokenizer trained on the records so sequences have
  word-piece lengths (~11 tokens, ~1-2 target tokens) as with a real GPT-2 tokenizer.
* ``byte-vocab`` (reported, no target): ``tiny_random_model("gpt2", n_layers=4, d_model=256)`` with
  its 259-token byte-level vocabulary. Sequences are ~5x longer and the LM head costs nothing, so
  both paths are bound by the transformer body's arithmetic and batching gains little on a CPU.

Baselines: a loop of ``teacher_forced`` on one pair at a time, and the reference-style loop (one
unpadded forward per pair with full-vocabulary logits at every position, as EasyEdit scores).

    pytest benchmarks/test_bench_eval.py --benchmark-enable
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from knowbench.models import prepare_tokenizer, tiny_random_model
from knowbench.scoring import target_spans, teacher_forced

N_RECORDS = 200
BATCH_SIZE = 32

FIRST = ["Alan", "Marie", "Nikola", "Ada", "Isaac", "Rosalind", "Niels", "Lise", "Carl", "Emmy"]
LAST = ["Turing", "Curie", "Tesla", "Lovelace", "Newton", "Franklin", "Bohr", "Meitner", "Gauss"]
RELATIONS = [  # (question, rephrase)
    ("What is the native language of {}?", "Which language did {} speak natively?"),
    ("Which country is {} a citizen of?", "{} holds citizenship of which country?"),
    ("Who was the employer of {}?", "{} worked for which organisation?"),
    ("In which city did {} die?", "Where did {} pass away?"),
]
ANSWERS = ["English", "French", "Polish", "Serbian", "German", "Danish", "IBM", "Bell Labs",
           "the University of Cambridge", "Paris", "Vienna", "New York City", "Copenhagen"]


def zsre_like_records(n: int = N_RECORDS, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        subject = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        question, rephrase = RELATIONS[i % len(RELATIONS)]
        records.append({
            "subject": subject,
            "prompt": question.format(subject),
            "target_new": rng.choice(ANSWERS),
            "rephrase_prompt": rephrase.format(subject),
            "locality": {"prompt": f"nq question: who sang the song number {i} in the charts",
                         "ground_truth": rng.choice(ANSWERS)},
        })
    return records


def record_pairs(records: list[dict]) -> list[tuple[str, str]]:
    pairs = []
    for r in records:
        pairs += [(r["prompt"], r["target_new"]), (r["rephrase_prompt"], r["target_new"]),
                  (r["locality"]["prompt"], r["locality"]["ground_truth"])]
    return pairs


def word_piece_tokenizer(pairs):
    """A GPT-2-style byte-level BPE trained on the workload (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator([p + " " + t for p, t in pairs], trainer)
    core.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def build(setup: str):
    torch.set_num_threads(1)
    pairs = record_pairs(zsre_like_records())
    if setup == "gpt2-vocab":
        from transformers import GPT2Config, GPT2LMHeadModel

        tok = word_piece_tokenizer(pairs)
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=50257, n_embd=256, n_layer=4, n_head=4, n_positions=256,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg).eval()
    else:
        model, tok = tiny_random_model("gpt2", seed=0, n_layers=4, d_model=256)
        prepare_tokenizer(tok)
    return model, tok, pairs


def reference_loop(model, tok, pairs) -> list[list[int]]:
    """One pair at a time, full-vocabulary logits at every position."""
    preds = []
    with torch.no_grad():
        for pair in pairs:
            ids, start = target_spans(tok, [pair])[0]
            logits = model(torch.tensor([ids])).logits[0]
            preds.append(logits[start - 1 : len(ids) - 1].argmax(-1).tolist())
    return preds


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


@pytest.mark.parametrize("setup", ["gpt2-vocab", "byte-vocab"])
def test_teacher_forced_batched_vs_loop(benchmark, report_speedup, setup):
    model, tok, pairs = build(setup)
    spans = target_spans(tok, pairs)
    mean_len = sum(len(ids) for ids, _ in spans) / len(spans)
    mean_tgt = sum(len(ids) - s for ids, s in spans) / len(spans)

    teacher_forced(model, tok, pairs[:BATCH_SIZE], batch_size=BATCH_SIZE)  # warm-up
    batched = benchmark.pedantic(
        teacher_forced, args=(model, tok, pairs), kwargs={"batch_size": BATCH_SIZE},
        rounds=3, iterations=1,
    )
    t_batched = benchmark.stats.stats.min
    t_loop, looped = timed(lambda: [teacher_forced(model, tok, [p])[0] for p in pairs])
    t_ref, ref_preds = timed(reference_loop, model, tok, pairs)

    # same numbers, whichever way they were computed
    assert [t.pred for t in batched] == [t.pred for t in looped] == ref_preds
    for a, b in zip(batched, looped):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4

    s_loop, s_ref = t_loop / t_batched, t_ref / t_batched
    benchmark.extra_info.update(
        pairs=len(pairs), mean_tokens=round(mean_len, 2), mean_target_tokens=round(mean_tgt, 2),
        loop_teacher_forced_s=round(t_loop, 3), loop_reference_s=round(t_ref, 3),
        speedup_vs_loop=round(s_loop, 2), speedup_vs_reference=round(s_ref, 2),
    )
    report_speedup(
        f"{setup}: {len(pairs)} pairs, {mean_len:.1f} tokens ({mean_tgt:.1f} target) per pair | "
        f"batched {t_batched:.2f}s | loop of teacher_forced {t_loop:.2f}s ({s_loop:.1f}x) | "
        f"reference loop, full logits {t_ref:.2f}s ({s_ref:.1f}x)"
    )
    if setup == "gpt2-vocab":
        assert s_loop >= 5.0, f"batched scoring only {s_loop:.1f}x faster than one pair at a time"
