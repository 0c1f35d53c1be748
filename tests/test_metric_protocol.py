"""The metric protocol: KnowEdit's definitions by default, each fix named; the reference's scoring,
sampling and batched generation checked against independent loops on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from kb_results import make_result, reseal

from knowbench.cli import main
from knowbench.leaderboard import load_entries
from knowbench.metric_protocol import (
    CORE_FIXES,
    MetricProtocol,
    MetricProtocolError,
)
from knowbench.models import prepare_tokenizer, tiny_random_model
from knowbench.records import EditRecord, Probe
from knowbench.scoring import generate_ids, sample_with_prompt, teacher_forced

PAIRS = [
    ("The capital of France is", "Paris"),
    ("Who wrote Hamlet?", " William Shakespeare"),  # the reference doubles this space
    ("A", "b c d e f g"),
    ("ends with a space ", "x y"),
    ("The quick brown fox jumps over the lazy dog and then", "runs away quickly."),
]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    model, tok = tiny_random_model(request.param, seed=1, n_layers=2, d_model=32)
    prepare_tokenizer(tok)
    return request.param, model, tok


# -- the reference's teacher forcing -------------------------------------------------------------
def brute_force_reference(model, tok, pairs, group):
    """The reference's scorer written out for one group: texts prompt + " " + target tokenized,
    left-padded to the group's longest, one forward pass per row with the attention mask and the
    model's default positions; the target starts after the padding plus the prompt's own tokens;
    prediction at t - 1 scored against the token at t."""
    texts = [pairs[i][0] + " " + pairs[i][1] for i in group]
    ids = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    pad = tok.pad_token_id
    out = []
    for i, seq in zip(group, ids):
        n_pad = width - len(seq)
        row = torch.tensor([[pad] * n_pad + seq])
        mask = torch.tensor([[0] * n_pad + [1] * len(seq)])
        with torch.no_grad():
            logits = model(input_ids=row, attention_mask=mask).logits[0].float()
        start = n_pad + len(tok(pairs[i][0])["input_ids"])
        gold = row[0, start:].tolist()
        lp = torch.log_softmax(logits[start - 1: width - 1], -1)
        out.append((gold, lp.argmax(-1).tolist(), lp.gather(-1, torch.tensor(gold)[:, None])[:, 0]))
    return out


def test_reference_scorer_equals_a_brute_force_loop(tiny):
    arch, model, tok = tiny
    groups = [[0], [1, 2, 3], [4]]
    got = teacher_forced(model, tok, PAIRS, batch_size=32, groups=groups, reference_join=True)
    for group in groups:
        for i, (gold, pred, lp) in zip(group, brute_force_reference(model, tok, PAIRS, group)):
            assert got[i].gold == gold and got[i].pred == pred, (arch, i)
            assert torch.allclose(torch.tensor(got[i].logprobs), lp, atol=1e-4)
    # the doubled space is a target token of its own, so the gold differs from the fixed join
    fixed = teacher_forced(model, tok, PAIRS, batch_size=32)
    assert len(got[1].gold) == len(fixed[1].gold) + 1


def test_reference_batches_depend_on_their_group_under_absolute_positions(tiny):
    """Why padding_safe exists: with GPT-2's absolute positions a prompt scored beside a longer one
    is read at later positions; with Llama's rotary positions the shift does not matter."""
    arch, model, tok = tiny
    alone = teacher_forced(model, tok, PAIRS, groups=[[0], [1], [2], [3], [4]], reference_join=True)[2]
    beside = teacher_forced(model, tok, PAIRS, groups=[[0], [1], [2, 4], [3]], reference_join=True)[2]
    diff = max(abs(a - b) for a, b in zip(alone.logprobs, beside.logprobs))
    assert (diff > 1e-3) if arch == "gpt2" else (diff < 1e-4)


# -- KnowEdit's Fluency sampling and Sanitation's batched generation -----------------------------
def test_sample_with_prompt_runs_to_the_cap_through_eos(tiny):
    """KnowEdit's Fluency sampling: prompt + continuation = the cap, an EOS does not stop it."""
    _, model, tok = tiny
    prompts = ["The capital of France is", "A"]
    free = generate_ids(model, tok, prompts, max_new_tokens=40, max_total=40, top_k=5, seed=0, stop_at_eos=False)
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    assert [len(x) for x in free] == [40 - n for n in lengths]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = free[1][0]  # the first sampled token now means EOS
    try:
        again = generate_ids(model, tok, prompts, max_new_tokens=40, max_total=40, top_k=5, seed=0, stop_at_eos=False)
        stopped = generate_ids(model, tok, prompts, max_new_tokens=40, max_total=40, top_k=5, seed=0)
        texts = sample_with_prompt(model, tok, prompts, max_total=40, top_k=5, seed=0)
        by_one = sample_with_prompt(model, tok, prompts, max_total=40, top_k=5, seed=0, batch_size=1)
    finally:
        model.generation_config.eos_token_id = old
    assert again == free and stopped[1] == []
    assert all(t.startswith(p) for t, p in zip(texts, prompts))
    assert texts == by_one  # seeded per prompt: the batch size does not matter


def test_batch_tail_equals_hugging_face_generate(tiny):
    """generate_ids(batch_tail=True) returns what a batched HF ``generate`` leaves after each prompt
    (left padding, greedy): the rows of a batch padded after their EOS to the batch's length."""
    _, model, tok = tiny
    prompts = ["The capital of France is", "A", "Who wrote Hamlet?", "x y z", "ends"]
    free = generate_ids(model, tok, prompts, max_new_tokens=6, stop_at_eos=False, batch_size=2)
    # make a token the model does produce end some answers early
    stop = free[1][1]
    old = (model.generation_config.eos_token_id, model.generation_config.pad_token_id)
    model.generation_config.eos_token_id = stop
    try:
        got = generate_ids(model, tok, prompts, max_new_tokens=6, batch_size=2, batch_tail=True)
        side = tok.padding_side
        tok.padding_side = "left"
        want = []
        for b in range(0, len(prompts), 2):
            enc = tok(prompts[b: b + 2], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=[tok.eos_token_id, stop],
                                     pad_token_id=tok.pad_token_id)
            want += out[:, enc["input_ids"].shape[1]:].tolist()
        tok.padding_side = side
    finally:
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = old
    assert got == want
    assert any(stop in row[:-1] for row in got), "no answer stopped early: the check would be empty"


# -- the protocol itself -------------------------------------------------------------------------
def test_protocol_names_and_errors():
    assert MetricProtocol.build().name == "knowedit" and not MetricProtocol.build().fixes
    everything = MetricProtocol.build("knowbench")
    assert everything.name == "knowbench" and set(everything.fixes) == {f.name for f in CORE_FIXES}
    one = MetricProtocol.build(fixes=["strip_whitespace"])
    assert one.name == "knowedit+strip_whitespace" and one.info() == {"name": one.name, "fixes": ["strip_whitespace"]}
    with pytest.raises(MetricProtocolError, match="--metric-fix 'nope'.*known: strip_whitespace"):
        MetricProtocol.build(fixes=["nope"])
    with pytest.raises(MetricProtocolError, match="--metrics 'exact'"):
        MetricProtocol.build("exact")


def test_refusal_and_whitespace():
    r = EditRecord(index=3, source="f.json", prompt=" Who? ", target_new=" x", subject="Who",
                   locality={"K": [Probe(" a ", " b")]}, reference_stops=["portability.R has no item with an answer"])
    assert "portability.R" in MetricProtocol.build().refusal(r) and "--metric-fix skip_empty_keys" in MetricProtocol.build().refusal(r)
    assert MetricProtocol.build(fixes=["skip_empty_keys"]).refusal(r) is None
    kept = MetricProtocol.build().prepare(r)
    assert (kept.prompt, kept.target_new) == (" Who? ", " x")  # the reference scores raw strings
    stripped = MetricProtocol.build(fixes=["strip_whitespace"]).prepare(r)
    assert (stripped.prompt, stripped.target_new, stripped.locality["K"][0]) == ("Who?", "x", Probe("a", "b"))


def test_leaderboard_never_ranks_metric_protocols_together(tmp_path, capsys):
    lb = tmp_path / "lb"
    exact = make_result(editor="rome", post={"edit_succ": 90.0})
    fixed = make_result(editor="rome", post={"edit_succ": 95.0})
    fixed["protocol"]["metrics"] = {"name": "knowbench", "fixes": sorted(f.name for f in CORE_FIXES)}
    files = []
    for name, r in (("exact.json", exact), ("fixed.json", reseal(fixed))):
        (tmp_path / name).write_text(json.dumps(r))
        files.append(str(tmp_path / name))
    assert main(["submit", *files, "--leaderboard", str(lb)]) == 0
    entries = load_entries(lb)
    assert sorted(e.key.protocol for e in entries) == ["single", "single+knowbench"]
    readme = (lb / "README.md").read_text()
    # two tables, one per metric protocol, the knowedit one first; each ranks one row
    assert readme.count("### single") == 2 and "metrics: knowbench" in readme
    assert readme.index("### single\n") < readme.index("metrics: knowbench")


def test_cli_lists_the_fixes(capsys):
    assert main(["metric-protocols", "--markdown"]) == 0
    out = capsys.readouterr().out
    for name in ("strip_whitespace", "padding_safe", "fluency_continuation", "skip_empty_keys",
                 "convsent_pre_unedited", "convsent_next_token", "sanitation_symmetric_agreement"):
        assert f"`{name}`" in out
    assert main(["metric-protocols", "--task", "zsre", "--markdown"]) == 0
    assert "convsent_pre_unedited" not in capsys.readouterr().out
