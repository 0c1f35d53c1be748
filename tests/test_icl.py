"""ICE and IKE: the exact in-context prompt, the identity before apply and after restore, every
metric's prompt rewritten (locality included), one fact per prompt; IKE's demonstrations equal a
brute-force nearest-neighbour search, fitting to the context drops the least similar demos, the pool
is embedded once; both run through ``knowbench.runner.run``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import zsre_records
from knowbench.editor import EditRequest, PromptOwner, RunContext, TrainSplit
from knowbench.editors.icl import ICE, IKE, ICEHparams, IKEHparams

EDIT = EditRequest(prompt="Who is the spouse of Vruth Gevyaskya?", target_new="Tribak Cherur",
                   subject="Vruth Gevyaskya", record_index=7)
OTHER = EditRequest(prompt="Which family does Zorb3 belong to?", target_new="Noct5", subject="Zorb3",
                    record_index=8)
METRICS = [("edit_succ", None, EDIT.prompt), ("rephrase", None, "Who is Vruth Gevyaskya married to?"),
           ("portability", "Logical_Generalization", "Who is the spouse of Tribak Cherur?"),
           ("locality", "Relation_Specificity", "Vruth Gevyaskya is by profession a"),
           ("fluency", None, EDIT.prompt)]


@pytest.fixture(scope="module")
def encoder():
    """all-MiniLM-L6-v2, loaded once for the module (load_encoder keeps it per process)."""
    from knowbench.encoder import load_encoder

    return load_encoder()


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ike") / "ZsRE-train-all.json"
    path.write_text(json.dumps(zsre_records(12)))
    return path


@pytest.fixture(scope="module")
def split(train_file) -> TrainSplit:
    from knowbench.registry import load_task
    from knowbench.results import sha256_file

    _, task = load_task("zsre")
    return TrainSplit(report=task.reader(train_file), path=train_file, sha256=sha256_file(train_file))


def _owners(request: EditRequest | None, record: int = 7):
    return [PromptOwner(record=record, metric=m, key=k, request=request) for m, k, _ in METRICS]


def _ike(lm, split, tmp_path, **hp) -> IKE:
    model, tok = lm
    ed = IKE(model, tok, IKEHparams(**hp), RunContext(cache_dir=tmp_path / "cache", train_split=split))
    ed.setup()
    return ed


# -- ICE --------------------------------------------------------------------------------------------
def test_ice_prompt_is_exact_for_every_metric_and_identity_outside_the_edit(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ed = ICE(model, tok, ICEHparams(), RunContext())
    prompts = [q for _, _, q in METRICS]
    assert ed.rewrite_prompts(prompts, _owners(EDIT)) == prompts  # before any apply: identity

    out = ed.apply([EDIT])
    assert out.changed_params == []
    got = ed.rewrite_prompts(prompts, _owners(EDIT))
    assert got[0] == "New Fact: Who is the spouse of Vruth Gevyaskya? Tribak Cherur\nPrompt: Who is the spouse of Vruth Gevyaskya?"
    assert got[3] == ("New Fact: Who is the spouse of Vruth Gevyaskya? Tribak Cherur\n"
                      "Prompt: Vruth Gevyaskya is by profession a")  # locality is rewritten too
    assert got == [f"New Fact: {EDIT.prompt} {EDIT.target_new}\nPrompt: {q}" for q in prompts]
    # owner.request absent: the record index decides; a record that is not applied is left alone
    assert ed.rewrite_prompts(prompts, _owners(None, record=7)) == got
    assert ed.rewrite_prompts(prompts, _owners(OTHER, record=8)) == prompts
    assert ed.rewrite_prompts(prompts, _owners(None, record=-1)) == prompts

    ed.restore()
    assert ed.rewrite_prompts(prompts, _owners(EDIT)) == prompts
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    prov = ed.provenance()
    assert prov["semantics"] == "easyedit@14cea82" and prov["locality_baseline"] == "the prompt without the fact"


def test_one_fact_per_prompt_when_edits_accumulate(tiny):
    model, tok = tiny
    ed = ICE(model, tok, ICEHparams(), RunContext())
    ed.apply([EDIT])
    ed.apply([OTHER])  # sequential: no restore in between
    got = ed.rewrite_prompts(["Q1", "Q2"], [PromptOwner(7, "rephrase", request=EDIT),
                                            PromptOwner(8, "locality", "Relation_Specificity", request=OTHER)])
    assert got == [f"New Fact: {EDIT.prompt} {EDIT.target_new}\nPrompt: Q1",
                   f"New Fact: {OTHER.prompt} {OTHER.target_new}\nPrompt: Q2"]
    assert ed.report() == {"facts_in_context": 2}


# -- IKE --------------------------------------------------------------------------------------------
def _expected_pool(records: list[dict]) -> list[str]:
    """EasyEdit's encode_ike_facts, written out for the conftest ZsRE records."""
    out = []
    for r in records:
        fact = f"New Fact: {r['prompt']} {r['target_new']}\nPrompt: "
        out.append(fact + f"{r['prompt']} {r['target_new']}\n\n")
        out.append(fact + f"{r['rephrase_prompt']} {r['target_new']}\n\n")
        for item in r["locality"]["Relation_Specificity"]:
            out.append(fact + f"{item['prompt']} {item['ground_truth'][0]}\n\n")
    return out


def test_retrieval_equals_brute_force_nearest_neighbours(encoder, split, tmp_path):
    from knowbench.models import prepare_tokenizer, tiny_random_model

    model, tok = tiny_random_model("gpt2")
    prepare_tokenizer(tok)
    k = 7
    ed = _ike((model, tok), split, tmp_path, k=k)
    pool = _expected_pool(zsre_records(12))
    assert sorted(ed.pool.texts) == sorted(pool) and len(ed.pool.texts) == len(pool)
    assert ed.pool.sizes() == {"copy": 12, "update": 12, "retain": 12}

    def vec(text: str) -> list[float]:  # one text at a time, unit length computed by hand
        v = [float(x) for x in encoder.encode([text], convert_to_numpy=True)[0]]
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    pool_vecs = [vec(t) for t in pool]
    for req in (EDIT, OTHER):
        q = vec(f"New Fact: {req.prompt} {req.target_new}\nPrompt: {req.prompt}\n\n")
        cos = [sum(a * b for a, b in zip(q, v)) for v in pool_vecs]
        best = sorted(range(len(pool)), key=lambda j: -cos[j])[:k]
        got = ed.demonstrations(req)
        assert got == [pool[j] for j in best]
        ranked = ed._ranked[(req.prompt, req.target_new)]
        assert [s for _, s in ranked] == pytest.approx([cos[j] for j in best], abs=1e-5)


@pytest.mark.parametrize("order", ["most_similar_first", "most_similar_last"])
def test_fitting_drops_the_least_similar_demos(tiny, encoder, split, tmp_path, order):
    model, tok = tiny
    ed = _ike(tiny, split, tmp_path, k=6, order=order, reserve_tokens=4)
    ranked = ed.demonstrations(EDIT)
    assert len(ranked) == 6
    n = lambda text: len(tok(text, add_special_tokens=True)["input_ids"])
    tail = f"New Fact: {EDIT.prompt} {EDIT.target_new}\nPrompt: {METRICS[3][2]}"
    reserve = max(4, len(tok(" " + EDIT.target_new, add_special_tokens=False)["input_ids"]))
    # a context that holds the fact and exactly the first 2 demos (+ a few tokens to spare)
    limit = n("".join(ranked[:2]) + tail) + reserve + 3
    assert n("".join(ranked[:3]) + tail) + reserve > limit

    def expected(m: int) -> str:
        kept = ranked[:m] if order == "most_similar_first" else ranked[:m][::-1]
        return "".join(kept) + tail

    for how in ("max_tokens", "model positions"):
        if how == "max_tokens":
            ed.hparams.max_tokens = limit
        else:
            ed.hparams.max_tokens = 0
            name = "n_positions" if hasattr(model.config, "n_positions") else "max_position_embeddings"
            setattr(model.config, name, limit)
        ed.apply([EDIT])
        got = ed.rewrite_prompts([METRICS[3][2]], [PromptOwner(7, "locality", "Relation_Specificity", EDIT)])
        assert got == [expected(2)], how
        assert n(got[0]) + reserve <= limit
        ed.restore()
    rep = ed.report()
    assert rep["prompts_cut"] == 2 and rep["mean_demos"] == 2 and rep["prompts_over_context"] == 0

    # a context large enough for all k: nothing is cut, every metric's prompt gets demos and fact
    setattr(model.config, name, 100_000)
    ed.apply([EDIT])
    prompts = [q for _, _, q in METRICS]
    demos = "".join(ranked if order == "most_similar_first" else ranked[::-1])
    assert ed.rewrite_prompts(prompts, _owners(EDIT)) == [
        ("" if m == "fluency" else demos) + f"New Fact: {EDIT.prompt} {EDIT.target_new}\nPrompt: {q}"
        for m, _, q in METRICS]  # fluency: the fact alone, as EasyEdit generates it
    assert ed.report()["prompts_cut"] == 2
    ed.restore()
    assert ed.rewrite_prompts(prompts, _owners(EDIT)) == prompts


def test_pool_embedded_once_and_retrieval_once_per_edit(encoder, split, tmp_path, monkeypatch):
    import knowbench.encoder as enc
    from knowbench.models import prepare_tokenizer, tiny_random_model

    calls: list[int] = []
    real = enc.encode

    def counting(texts, *a, **kw):
        calls.append(len(texts))
        return real(texts, *a, **kw)

    monkeypatch.setattr(enc, "encode", counting)
    model, tok = tiny_random_model("gpt2")
    prepare_tokenizer(tok)
    first = _ike((model, tok), split, tmp_path, k=3)
    assert calls == [36]  # the pool
    second = _ike((model, tok), split, tmp_path, k=3)  # same cache folder: read back
    assert calls == [36]
    assert torch.equal(first.pool.embeddings, second.pool.embeddings)
    second.apply([EDIT, OTHER])
    assert calls == [36, 2]  # both queries in one call
    owners = _owners(EDIT)
    second.rewrite_prompts([q for _, _, q in METRICS], owners)
    second.restore()
    second.apply([EDIT])
    second.rewrite_prompts([q for _, _, q in METRICS], owners)
    assert calls == [36, 2]  # not per prompt, not again after restore


def test_no_usable_training_records_names_the_file(tiny, tmp_path):
    model, tok = tiny
    empty = TrainSplit(report=SimpleNamespace(records=[]), path=tmp_path / "my-empty-train.json", sha256="0")
    ed = IKE(model, tok, IKEHparams(), RunContext(cache_dir=tmp_path, train_split=empty))
    with pytest.raises(ValueError, match="my-empty-train.json"):
        ed.setup()
    with pytest.raises(ValueError, match="training split"):
        IKE(model, tok, IKEHparams(), RunContext(cache_dir=tmp_path)).setup()


# -- through the runner -----------------------------------------------------------------------------
@pytest.mark.parametrize("editor", ["ice", "ike"])
def test_runs_through_the_runner(encoder, editor, zsre_file, tmp_path, monkeypatch):
    from knowbench.editors import icl
    from knowbench.runner import RunConfig, run

    monkeypatch.setenv("KNOWBENCH_CACHE", str(tmp_path / "kbcache"))
    seen = []
    real = icl._InContext.rewrite_prompts

    def spy(self, prompts, owners):
        out = real(self, prompts, owners)
        seen.append((dict(self.applied), list(prompts), out, list(owners)))
        return out

    monkeypatch.setattr(icl._InContext, "rewrite_prompts", spy)
    extra = {"train_data": str(zsre_file)} if editor == "ike" else {}
    r = run(RunConfig(editor=editor, task="zsre", data=str(zsre_file), model="random-gpt2", limit=3,
                      fluency=False, **extra))
    assert r["editor"]["kind"] == "prompts"
    assert all(e["changed_params"] == [] for e in r["edits"])
    assert r["editor"]["provenance"]["locality_baseline"] == "the prompt without the fact"
    n_rewritten = 0
    metrics = set()
    for applied, prompts, out, owners in seen:
        for p, q, o in zip(prompts, out, owners):
            if o.record in applied:  # post-edit: the record's own fact is in the prompt
                req = applied[o.record]
                assert q != p and q.endswith(f"New Fact: {req.prompt} {req.target_new}\nPrompt: {p}")
                n_rewritten += 1
                metrics.add(o.metric)
            else:  # pre-edit reference, and other records: untouched
                assert q == p
    assert n_rewritten and {"edit_succ", "rephrase", "locality"} <= metrics
    assert any(not applied for applied, *_ in seen)  # the unedited reference went through the hook
    if editor == "ike":
        prov = r["editor"]["provenance"]
        assert prov["pool"]["total"] == 36 and prov["k"] == 16 and prov["order"] == "most_similar_first"
        assert prov["train_split"]["sha256"] and prov["encoder"]["name"] == "all-MiniLM-L6-v2"
        rep = r["diagnostics"]["summary"]["editor_final"]
        assert rep["mean_demos"] > 0 and rep["pool_size"] == 36
        json.dumps(rep)
