"""SERAC: the scope classifier routes in-scope prompts to the counterfactual model (the base model
with the edit in context) and leaves the rest alone, computes s as an independent numpy formula
does, ignores who owns a prompt, restores to the identity, resumes a killed training exactly, and
runs through ``knowbench train`` / ``knowbench run``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import zsre_records
from knowbench.editor import Artefact, EditRequest, PromptOwner, RunContext, TrainSplit
from knowbench.editors.serac import HEAD_FILE, SERAC, SERACHparams
from knowbench.records import EditRecord, Probe

EDIT = EditRequest(prompt="Who is the spouse of Vruth Gevyaskya?", target_new="Tribak Cherur",
                   subject="Vruth Gevyaskya", record_index=7)
OTHER = EditRequest(prompt="What does Saflu Skevak do for a living?", target_new="dancer",
                    subject="Saflu Skevak", record_index=8)
IN_SCOPE = [EDIT.prompt, "Who is Vruth Gevyaskya married to?"]
OUT_OF_SCOPE = ["Who is the spouse of Turk Thotrem?",  # other subject, same relation
                "What is the capital city of Mlorbia?", "Name the river that flows through Quendor."]


@pytest.fixture(scope="module")
def encoder():
    """all-MiniLM-L6-v2, loaded once for the module (load_encoder keeps it per process)."""
    from knowbench.encoder import load_encoder

    return load_encoder()


@pytest.fixture(scope="module")
def lm():
    from knowbench.models import prepare_tokenizer, tiny_random_model

    model, tok = tiny_random_model("gpt2")
    prepare_tokenizer(tok)
    return model, tok


def _editor(lm, tmp_path, **hp) -> SERAC:
    model, tok = lm
    return SERAC(model, tok, SERACHparams(**hp), RunContext(cache_dir=tmp_path / "cache"))


def _hand_head(editor: SERAC, seed: int = 0) -> np.ndarray:
    """Set the linear head to W = 1.2·I + 0.3·R (R Gaussian, non-symmetric, so a transposed W
    would give other distances) and return W as numpy."""
    g = torch.Generator().manual_seed(seed)
    w = 1.2 * torch.eye(384) + 0.3 * torch.randn(384, 384, generator=g) / 384**0.5
    with torch.no_grad():
        editor.head.proj.weight.copy_(w)
    return w.double().numpy()


def _owners(prompts, request=None, record=7, metric="rephrase"):
    return [PromptOwner(record=record, metric=metric, request=request) for _ in prompts]


def test_similarity_matches_independent_numpy(encoder, lm, tmp_path):
    ed = _editor(lm, tmp_path)
    w = _hand_head(ed)
    ed.apply([EDIT, OTHER])
    queries = IN_SCOPE + OUT_OF_SCOPE + [OTHER.prompt]
    # independent: encode with sentence-transformers directly, s_j = exp(−τ‖W e(x) − W e(c_j)‖²)
    e = lambda texts: encoder.encode(texts, normalize_embeddings=True, convert_to_numpy=True).astype(np.float64)
    hq, hc = e(queries) @ w.T, e([EDIT.prompt, OTHER.prompt]) @ w.T
    d = ((hq[:, None, :] - hc[None, :, :]) ** 2).sum(-1)
    want = np.exp(-1.0 * d)
    got = ed.similarity(queries).numpy()
    assert got.shape == (len(queries), 2)
    np.testing.assert_allclose(got, want, atol=2e-5)
    s, j = ed.scope(queries)
    np.testing.assert_allclose(s.numpy(), want.max(1), atol=2e-5)
    assert j.tolist() == want.argmax(1).tolist()


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_in_scope_routed_out_of_scope_unchanged(encoder, lm, tmp_path, head):
    ed = _editor(lm, tmp_path, head=head)
    if head == "linear":
        _hand_head(ed)
    else:  # residual MLP: h(u) = u + W2 relu(W1 u + b1) with hand-set weights
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            ed.head.up.weight.copy_(torch.randn(768, 384, generator=g) / 384**0.5)
            ed.head.up.bias.zero_()
            ed.head.down.weight.copy_(0.1 * torch.randn(384, 768, generator=g) / 768**0.5)
    ed.apply([EDIT])
    s, _ = ed.scope(IN_SCOPE + OUT_OF_SCOPE)
    assert (s[:2] > 0.5).all() and (s[2:] < 0.5).all(), s  # the hand-set head separates them
    out = ed.rewrite_prompts(IN_SCOPE + OUT_OF_SCOPE, _owners(IN_SCOPE + OUT_OF_SCOPE))
    for x, y in zip(IN_SCOPE, out[:2]):
        assert y == f"New Fact: {EDIT.prompt} {EDIT.target_new}\nPrompt: {x}"
    assert out[2:] == OUT_OF_SCOPE
    ed.rewrite_prompts(IN_SCOPE, _owners(IN_SCOPE, record=99))  # a record whose edit is not cached
    rep = ed.report()
    assert rep["cache_size"] == 1 and rep["routing"]["rephrase"] == {"prompts": 5, "routed": 2, "rate": 40.0}
    assert rep["routing"]["rephrase/not_cached"] == {"prompts": 2, "routed": 2, "rate": 100.0}
    assert rep["hit_rate"] == 40.0 and rep["wrong_entry_rate"] == 0.0


def test_routing_ignores_the_owner(encoder, lm, tmp_path):
    """Routing reads only the prompt and the cache: owners without a request, with another record's
    request, another record and another metric route the same."""
    ed = _editor(lm, tmp_path)
    _hand_head(ed)
    ed.apply([EDIT, OTHER])
    prompts = IN_SCOPE + OUT_OF_SCOPE + ["What is the occupation of Saflu Skevak?"]
    base = ed.rewrite_prompts(prompts, _owners(prompts, request=EDIT))
    assert base[-1].startswith(f"New Fact: {OTHER.prompt} {OTHER.target_new}\n")  # top-1 over the cache
    for owners in (_owners(prompts, request=None), _owners(prompts, request=OTHER, record=8, metric="locality"),
                   _owners(prompts, request=EditRequest("x", "y"), record=-1, metric="portability")):
        assert ed.rewrite_prompts(prompts, owners) == base


def test_restore_empties_the_cache_and_gives_the_identity(encoder, lm, tmp_path):
    ed = _editor(lm, tmp_path)
    _hand_head(ed)
    before = {k: v.clone() for k, v in lm[0].state_dict().items()}
    prompts = IN_SCOPE + OUT_OF_SCOPE
    assert ed.rewrite_prompts(prompts, _owners(prompts)) == prompts  # empty cache
    out = ed.apply([EDIT])
    assert out.changed_params == [] and ed.rewrite_prompts(prompts, _owners(prompts)) != prompts
    ed.apply([OTHER])  # sequential: the cache grows
    assert ed.report()["cache_size"] == 2
    ed.restore()
    assert ed.report()["cache_size"] == 0 and ed.cache_entries == []
    assert ed.rewrite_prompts(prompts, _owners(prompts)) == prompts
    assert all(torch.equal(before[k], v) for k, v in lm[0].state_dict().items())  # no weight ever changes


# -- training --------------------------------------------------------------------------------------
def _records(n: int) -> list[EditRecord]:
    out = []
    for i, r in enumerate(zsre_records(n)):
        out.append(EditRecord(
            index=i, source="mem", prompt=r["prompt"], target_new=r["target_new"], subject=r["subject"],
            rephrase=[r["rephrase_prompt"]],
            locality={"Relation_Specificity": [Probe(p["prompt"], p["ground_truth"][0]) for p in r["locality"]["Relation_Specificity"]]},
        ))
    return out


SMALL = dict(steps=30, batch_size=8, random_negatives=4, val_records=5, val_every=10, checkpoint_every=10, lr=3e-3)


class Killed(RuntimeError):
    pass


def _progress(kill_after: int | None, seen: list[int]):
    @contextlib.contextmanager
    def bar(description, total):
        def advance(n=1):
            seen.append(n)
            if kill_after is not None and sum(seen) >= kill_after:
                raise Killed
        yield advance
    return bar


def _train(lm, folder: Path, cache: Path, split, kill_after=None, seen=None):
    model, tok = lm
    folder.mkdir(parents=True, exist_ok=True)
    seen = [] if seen is None else seen
    ctx = RunContext(seed=3, cache_dir=cache, artefact_dir=folder, progress=_progress(kill_after, seen))
    ed = SERAC(model, tok, SERACHparams(**SMALL), ctx)
    return ed, ed.train(split)


def test_killed_training_resumes_to_the_uninterrupted_result(encoder, lm, tmp_path):
    split = TrainSplit(report=SimpleNamespace(records=_records(30)), path=tmp_path / "train.json", sha256="s" * 64)
    cache = tmp_path / "cache"
    full, art_full = _train(lm, tmp_path / "full", cache, split)

    with pytest.raises(Killed):
        _train(lm, tmp_path / "killed", cache, split, kill_after=25)
    assert (tmp_path / "killed" / "checkpoint.pt").is_file() and not (tmp_path / "killed" / HEAD_FILE).exists()
    seen: list[int] = []
    resumed, art_res = _train(lm, tmp_path / "killed", cache, split, seen=seen)
    assert seen[0] == 20  # resumed from the step-20 checkpoint, not from scratch
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()

    assert all(torch.equal(a, b) for a, b in zip(full.head.state_dict().values(), resumed.head.state_dict().values()))
    assert art_res.meta["curve"] == art_full.meta["curve"] and art_res.meta["best_step"] == art_full.meta["best_step"]
    assert [p["step"] for p in art_full.meta["curve"]] == [0, 10, 20, 30]
    assert art_full.meta["steps"] == 30 and art_full.meta["n_val_records"] == 5
    assert not torch.equal(full.head.proj.weight, torch.eye(384))  # it did train

    # the stored head loads into a fresh editor and routes as the trained one
    fresh = _editor(lm, tmp_path)
    fresh.load_artefact(Artefact(art_full.path, art_full.meta))
    assert torch.equal(fresh.head.proj.weight, full.head.proj.weight)
    for ed in (full, fresh):
        ed.apply([EDIT])
    q = IN_SCOPE + OUT_OF_SCOPE
    assert torch.equal(full.similarity(q), fresh.similarity(q))


def test_train_and_run_end_to_end(encoder, zsre_file, tmp_path, monkeypatch):
    from knowbench.runner import RunConfig, run, train

    monkeypatch.setenv("KNOWBENCH_CACHE", str(tmp_path / "kbcache"))
    hp = tmp_path / "serac.yaml"
    hp.write_text("steps: 60\nval_every: 20\ncheckpoint_every: 30\nbatch_size: 8\n")
    cfg = dict(editor="serac", task="zsre", data=str(zsre_file), model="random-gpt2",
               train_data=str(zsre_file), hparams=str(hp))
    made = train(RunConfig(**cfg))
    assert made["reused"] is False and made["editor"]["steps"] == 60
    assert made["editor"]["semantics"].startswith("scope classifier: paper (BCE")
    assert Path(made["path"], HEAD_FILE).is_file() and not Path(made["path"], "checkpoint.pt").exists()

    r = run(RunConfig(**cfg, limit=3, fluency=False))
    assert r["editor"]["kind"] == "memory" and r["editor"]["artefact"]["reused"] is True
    prov = r["editor"]["provenance"]
    assert prov["encoder"]["name"] == "all-MiniLM-L6-v2" and "freeze_cntr" in prov["semantics"]
    rep = r["diagnostics"]["summary"]["editor_final"]
    assert rep["cache_size"] == 1
    assert rep["routing"]["edit_succ"]["rate"] == 100.0  # the edit's own prompt: d = 0, s = 1
    assert all(e["changed_params"] == [] for e in r["edits"])
    assert "false_routing_locality" in rep and "hit_rate" in rep
    if rep["false_routing_locality"] == 0.0:
        assert r["metrics"]["post"]["locality"]["value"] == 100.0  # unrouted prompts are scored exactly as before the edit
    json.dumps(rep)  # JSON-serialisable
