"""Second-moment statistics, their cache, corpora, and the key/position helpers they rest on."""

from __future__ import annotations

import json

import pytest
import torch

from knowbench import stats as kstats
from knowbench.arch import ArchAdapter
from knowbench.editor import StatsOptions
from knowbench.editors.contexts import sample_prefixes
from knowbench.keys import record, subject_index, subject_indices
from knowbench.tokens import pad_batch, pad_id
from knowbench.stats import Corpus, StatsUnavailable, load_text_files, resolve_corpus, second_moments

from kb_locate import corpus_keys, rewrite_io, toy_corpus


def test_second_moment_equals_brute_force(tiny, tmp_path):
    model, tok = tiny
    texts = toy_corpus(40)
    sms = second_moments(model, tok, [0, 2], Corpus("toy", texts), n_samples=40,
                         cache_dir=tmp_path, model_name="tiny", progress=False, batch_tokens=200)
    for layer in (0, 2):
        k = corpus_keys(model, tok, texts, layer)
        expect = k.T @ k / k.shape[0]
        sm = sms[layer]
        assert sm.count == k.shape[0]
        assert torch.allclose(sm.mom2, expect, rtol=1e-5, atol=1e-7 * float(expect.abs().max()))
        # the factorisation solves with C itself
        b = torch.randn(sm.dim, 3, dtype=torch.float64)
        assert torch.allclose(sm.mom2 @ sm.solve(b), b, atol=1e-6 * float(b.abs().max()) * sm.dim)


def test_cache_is_reused_and_keyed_by_configuration(tiny, tmp_path):
    model, tok = tiny
    corpus = Corpus("toy", toy_corpus(30))
    a = second_moments(model, tok, [1], corpus, n_samples=30, cache_dir=tmp_path, model_name="m/tiny", progress=False)[1]
    assert not a.cached and a.path.exists()
    name = a.path.name
    assert "mlp" in name and "float32" in name and "n30" in name
    assert "toy" in str(a.path.parent.name) and "tiny" in str(a.path.parent.parent.name)
    meta = json.loads(a.path.with_suffix(".json").read_text())
    assert meta["n_samples"] == 30 and meta["layer"] == 1 and meta["n_tokens"] == a.count
    b = second_moments(model, tok, [1], corpus, n_samples=30, cache_dir=tmp_path, model_name="m/tiny", progress=False)[1]
    assert b.cached and torch.equal(a.mom2, b.mom2)
    # a different sample count or dtype is a different file
    c = second_moments(model, tok, [1], corpus, n_samples=20, cache_dir=tmp_path, model_name="m/tiny", progress=False)[1]
    d = second_moments(model, tok, [1], corpus, n_samples=30, dtype="float64", cache_dir=tmp_path,
                       model_name="m/tiny", progress=False)[1]
    assert len({a.path, c.path, d.path}) == 3 and not c.cached and not d.cached
    # a different model (other weights) never reads this model's cache
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    e = second_moments(model, tok, [1], corpus, n_samples=30, cache_dir=tmp_path, model_name="m/tiny", progress=False)[1]
    assert not e.cached and e.path != a.path


def test_corrupt_or_mismatched_cache_is_recomputed(tiny, tmp_path):
    model, tok = tiny
    corpus = Corpus("toy", toy_corpus(10))
    a = second_moments(model, tok, [0], corpus, n_samples=10, cache_dir=tmp_path, progress=False)[0]
    blob = torch.load(a.path, weights_only=True)
    meta = json.loads(blob["meta"])
    meta["max_length"] = 3
    blob["meta"] = json.dumps(meta)
    torch.save(blob, a.path)
    b = second_moments(model, tok, [0], corpus, n_samples=10, cache_dir=tmp_path, progress=False)[0]
    assert not b.cached and torch.allclose(a.mom2, b.mom2)
    a.path.write_bytes(b"garbage")
    c = second_moments(model, tok, [0], corpus, n_samples=10, cache_dir=tmp_path, progress=False)[0]
    assert not c.cached


def test_local_text_and_json_corpora(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n{"text": "fourth"}\n')
    c = load_text_files(tmp_path)
    assert sorted(c.texts) == ["first line", "fourth", "second line", "third"]
    assert c.name.startswith("file-")
    (tmp_path / "bad.json").write_text('[{"id": 1, "a": "x", "b": "y"}]')
    with pytest.raises(StatsUnavailable, match="bad.json.*'text' field"):
        load_text_files(tmp_path / "bad.json")
    with pytest.raises(StatsUnavailable, match="does not exist"):
        load_text_files(tmp_path / "missing.txt")


def test_no_corpus_reachable_is_a_clear_error(monkeypatch):
    def offline(name, n, seed=0):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(kstats, "load_hub_corpus", offline)
    with pytest.raises(StatsUnavailable) as err:
        resolve_corpus(StatsOptions(), "wikipedia", 10)
    msg = str(err.value)
    assert "wikipedia" in msg and "wikitext" in msg and "--stats-corpus" in msg and "stats-source model" in msg


def test_list_corpus_and_model_sampled_corpus(tiny):
    model, tok = tiny
    c = resolve_corpus(StatsOptions(corpus=["x y", "z"], corpus_name="w"), "wikipedia", 5)
    assert c.name.startswith("w-") and not c.model_sampled
    c2 = resolve_corpus(StatsOptions(corpus=["x y", "zz"], corpus_name="w"), "wikipedia", 5)
    assert c2.name != c.name  # content is in the name: a changed corpus never hits a stale cache
    m = resolve_corpus(StatsOptions(source="model"), "wikipedia", 3, model, tok)
    assert m.model_sampled and m.name.startswith("model-sampled")
    assert m.texts is None and m.n_texts() == 3  # lazy: nothing generated yet
    assert len(m.sample(10)) == 3 and len(m.texts) == 3


def test_lazy_corpus_is_not_produced_when_the_statistics_are_cached(tiny, tmp_path):
    model, tok = tiny
    calls = []

    def make():
        calls.append(1)
        return toy_corpus(20)

    for _ in range(2):
        lazy = Corpus("lazy-toy", loader=make, size=20, model_sampled=True)
        sm = second_moments(model, tok, [1], lazy, n_samples=20, cache_dir=tmp_path, progress=False)[1]
    assert calls == [1] and sm.cached and sm.meta["model_sampled"] is True
    assert sm.provenance()["model_sampled"] is True
    with pytest.raises(ValueError, match="stats_source"):
        resolve_corpus(StatsOptions(source="nope"), "wikipedia", 3)


def test_subject_index_under_bos_prefixes_and_multibyte(tiny):
    model, tok = tiny
    text = "Say. The capital of Zorbia is"
    ids = tok(text)["input_ids"]
    i = subject_index(tok, text, "Zorbia")
    # decoding up to and including the index ends with the subject, one more token does not
    assert tok.decode(ids[: i + 1], skip_special_tokens=True).endswith("Zorbia")
    assert not tok.decode(ids[: i + 2], skip_special_tokens=True).endswith("Zorbia")
    has_bos = ids[0] == tok.bos_token_id and tok.bos_token_id is not None
    assert has_bos == (model.config.model_type == "llama")
    # a later occurrence is found when searching from after the prefix
    t2 = "Zorbia. Zorbia is"
    assert subject_index(tok, t2, "Zorbia", start_char=6) > subject_index(tok, t2, "Zorbia")
    # multi-byte characters: several byte tokens share one character; the last one is the index
    t3 = "Ørsted lives in"
    j = subject_index(tok, t3, "Ørsted")
    assert tok.decode(tok(t3)["input_ids"][: j + 1], skip_special_tokens=True) == "Ørsted"
    assert subject_indices(tok, [t3], ["x"], fact_token="last")[0][1] == len(tok(t3)["input_ids"]) - 1
    with pytest.raises(ValueError, match="does not occur"):
        subject_index(tok, text, "Nowhere")


def test_recorded_keys_do_not_depend_on_padding(tiny):
    model, tok = tiny
    adapter = ArchAdapter(model)
    texts = ["The capital of Zorbia is", "Mirvo works as a painter in the north", "Oskel"]
    subj = ["Zorbia", "Mirvo", "Oskel"]
    located = subject_indices(tok, texts, subj)
    ids, mask, pos, _ = pad_batch([ids for ids, _ in located], pad_id(tok))
    rows = torch.arange(3)
    cols = torch.tensor([i for _, i in located])
    rec = record(model, adapter, ids, mask, pos, positions=(rows, cols), key_layers=[1], stop_after=1)
    for r, (text, (_, idx)) in enumerate(zip(texts, located)):
        k, v = rewrite_io(model, tok, text, 1, idx)
        assert torch.allclose(rec.keys[1][r], k, atol=1e-5) and torch.allclose(rec.values[1][r], v, atol=1e-5)


def test_replay_above_a_block_equals_the_full_forward_with_the_edit(tiny):
    """δ added to the block output and rerunning only the blocks above = δ added to the MLP output
    inside a normal forward pass (what the optimisation relies on)."""
    model, tok = tiny
    adapter = ArchAdapter(model)
    texts = ["The capital of Zorbia is", "Mirvo works as a"]
    located = subject_indices(tok, texts, ["Zorbia", "Mirvo"])
    ids, mask, pos, _ = pad_batch([i for i, _ in located], pad_id(tok))
    rows, cols = torch.arange(2), torch.tensor([i for _, i in located])
    layer = 1
    rec = record(model, adapter, ids, mask, pos, positions=(rows, cols), block_out_layers=[layer],
                 calls_from=layer + 1)
    delta = torch.randn(2, model.config.hidden_size)
    h = rec.block_out[layer].index_put((rows, cols), delta, accumulate=True)
    fast = rec.head(rec.replay(h, layer + 1))

    def add(mod, args, out):
        out = out.clone()
        out[rows, cols] += delta
        return out

    hk = adapter.rewrite_module(layer).register_forward_hook(add)
    try:
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    finally:
        hk.remove()
    m = mask.bool()
    assert torch.allclose(fast[m], full[m], atol=1e-4)


def test_prefixes_are_seeded(tiny):
    model, tok = tiny
    a = sample_prefixes(model, tok, [[5, 3]], seed=1)
    b = sample_prefixes(model, tok, [[5, 3]], seed=1)
    c = sample_prefixes(model, tok, [[5, 3]], seed=2)
    assert a == b and a != c and len(a) == 3 and all(p.endswith(". ") for p in a)
    d = sample_prefixes(model, tok, [[8, 4]], seed=1, starts=["The", "I"])
    assert len(d) == 4 and d[0].startswith("The") and d[2].startswith("I")


def test_ridge_regularises_a_singular_second_moment():
    from knowbench.stats import SecondMoment

    k = torch.randn(200, 6, dtype=torch.float64)
    k[:, 5] = 0.0  # a unit that never fires: C is singular
    c = k.T @ k / 200
    sm = SecondMoment(layer=0, module="m", mom2=c, count=200)
    b = torch.randn(6, dtype=torch.float64)
    sm.set_ridge(0.01)
    lam = 0.01 * float(torch.diagonal(c).mean())
    expected = torch.linalg.solve(c + lam * torch.eye(6, dtype=torch.float64), b)
    assert torch.allclose(sm.solve(b), expected, rtol=1e-9, atol=1e-12)
    assert torch.allclose(sm.eigh()[0], torch.linalg.eigvalsh(c) + lam, atol=1e-12)
    assert sm.provenance()["ridge"] == pytest.approx(lam)
