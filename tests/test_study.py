"""`knowbench superposition` and `knowbench plot`: fact readers, the per-layer analysis, CLI, figures."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from knowbench import superposition as S
from knowbench.cli import main
from knowbench.study import Fact, analyse_model, kde, parse_layers, pick_facts, read_facts


def _cf(i: int, subject: str, template: str = "The mother tongue of {} is") -> dict:
    return {"case_id": i, "requested_rewrite": {"prompt": template, "subject": subject, "relation_id": "P103",
                                                "target_new": {"str": "French"}, "target_true": {"str": "English"}}}


@pytest.fixture
def cf_file(tmp_path):
    recs = [_cf(i, f"Zorb{i} Quux") for i in range(10)]
    recs.insert(3, {"requested_rewrite": {"prompt": "no slot here", "subject": "X"}})
    recs.insert(5, "not a record")
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    return path


def test_read_counterfact_requested_rewrite(cf_file, caplog):
    facts, rep = read_facts(cf_file)
    assert rep.format == "counterfact-requested_rewrite" and rep.n_raw == 12 and len(facts) == 10
    assert facts[0] == Fact("The mother tongue of Zorb0 Quux is", "Zorb0 Quux", "English", 0, 0)
    assert [b.split(":")[0] for b in rep.bad] == ["record 3", "record 5"]
    assert "no '{}'" in rep.bad[0] and "2 of 12 records skipped" in caplog.text


def test_read_knowedit_jsonl_and_errors(tmp_path):
    p = tmp_path / "k.jsonl"
    rows = [{"subject": "Zorb", "prompt": "Where is Zorb?", "target_new": "x"},
            {"subject": "Quux", "prompt": "Where is Zorb?", "target_new": "y"}]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    facts, rep = read_facts(p)
    assert rep.format == "knowedit" and [f.subject for f in facts] == ["Zorb"]
    assert "does not occur" in rep.bad[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_facts(tmp_path / "nope.json")
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(ValueError, match="no usable facts"):
        read_facts(tmp_path / "e.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="neither JSON nor JSON lines"):
        read_facts(tmp_path / "bad.json")


@pytest.mark.realdata
def test_read_the_studys_file(shared_data):
    facts, rep = read_facts(shared_data / "superposition" / "intersected_counterfact_known.json")
    assert rep.n_raw == 436 and not rep.bad and len(facts) == 436
    assert facts[0].prompt == "In United Kingdom, the language spoken is" and facts[0].subject == "United Kingdom"
    # the study's item set: its first 128 records, repeats included
    picked = pick_facts(facts, 128)
    assert [f.index for f in picked] == list(range(128))
    # records 21 and 83 both read "University of Washington" at the start of the prompt: one key;
    # de-duplicating takes record 128 instead
    deduped = pick_facts(facts, 128, dedupe=True)
    assert len(deduped) == 128 and 83 not in [f.index for f in deduped] and deduped[-1].index == 128


def test_pick_facts_keeps_repeats_unless_asked():
    facts = [Fact(f"{s} lives in", s, None, i) for i, s in enumerate(["Ann", "Bo", "Ann", "Cy"])]
    assert [f.index for f in pick_facts(facts, 3)] == [0, 1, 2]
    assert [f.index for f in pick_facts(facts, 3, dedupe=True)] == [0, 1, 3]


def test_ridge_only_where_asked_or_singular():
    """C is whitened as it is when positive definite; a singular C gets the smallest ridge that
    works, and --ridge applies everywhere; each layer records which and why."""
    import torch

    from knowbench.stats import SecondMoment
    from knowbench.study import _whitening

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    full = SecondMoment(0, "m", x.T @ x / 200, 200)
    full.cholesky()
    assert _whitening(full, None) == {"ridge": 0.0, "why": "none: C is positive definite"}
    y = x.clone()
    y[:, 7] = 0.0  # a unit that never fires: C is singular
    singular = SecondMoment(1, "m", y.T @ y / 200, 200)
    singular.cholesky()
    w = _whitening(singular, None)
    assert w["ridge"] > 0 and "not positive definite" in w["why"]
    asked = SecondMoment(0, "m", x.T @ x / 200, 200)
    asked.set_ridge(0.01)
    asked.cholesky()
    w = _whitening(asked, 0.01)
    assert w["ridge"] == pytest.approx(0.01 * float(torch.diagonal(x.T @ x / 200).mean())) and "asked" in w["why"]


def test_world_facts_one_per_entity():
    from knowbench.study import world_facts

    facts, rep = world_facts()
    first = pick_facts(facts, 128)
    assert len(first) == 128 and len({f.subject for f in first}) >= 64
    assert all(f.subject in f.prompt for f in first)


def test_parse_layers():
    assert parse_layers(None, 4) == [0, 1, 2, 3] and parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers("0,2-3", 6) == [0, 2, 3] and parse_layers("-1", 6) == [5] and parse_layers("-2--1", 6) == [4, 5]
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("7", 4)
    with pytest.raises(ValueError, match="cannot read"):
        parse_layers("x", 4)


def test_kde_is_a_density():
    x = np.random.default_rng(0).standard_t(3, 400)
    k = kde(x)
    assert np.trapezoid(k["density"], k["x"]) == pytest.approx(1.0, abs=0.02)
    assert k["bandwidth"] == pytest.approx(x.std(ddof=1) * len(x) ** (-1 / 5), rel=1e-4)  # Scott


def test_analysis_equals_dense_computation_and_uses_one_pass_per_batch():
    from knowbench.diagnostics import capture_keys
    from knowbench.models import prepare_tokenizer, tiny_random_model

    model, tok = tiny_random_model("gpt2")
    prepare_tokenizer(tok)
    facts = [Fact(f"The mother tongue of Person {c}{i} is", f"Person {c}{i}") for i, c in enumerate("abcdefghij")]
    layers = [0, 2, 3]
    gen = torch.Generator().manual_seed(0)
    moments = {}
    d = model.config.n_embd * 4  # c_proj's input
    for l in layers:
        a = torch.randn(d, d, generator=gen, dtype=torch.float64)
        moments[l] = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    calls = []
    h = model.transformer.h[0].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    out, mats, _ = analyse_model(model, tok, facts, layers, moments, batch_size=4)
    h.remove()
    assert calls == [4, 4, 2]  # 10 facts in batches of 4, every layer read in the same pass
    keys = capture_keys(model, tok, [(f.prompt, f.subject) for f in facts], layers)
    for info in out:
        l = info["layer"]
        K = keys[l].double().numpy()
        Cinv = np.linalg.inv(moments[l].numpy())
        dense = (K @ Cinv @ K.T) / np.diag(K @ Cinv @ K.T)[:, None]
        np.testing.assert_allclose(mats[l], dense, rtol=1e-6, atol=1e-9)
        assert info["diag_max_error"] < 1e-9
        assert info["kurtosis"] == pytest.approx(stats.kurtosis(S.offdiagonal(dense)), rel=1e-5)
        assert sum(info["whitened_angle"]["counts"]) == 90 and sum(info["raw_angle"]["counts"]) == 90
        top = info["top_pairs"][0]
        assert abs(top["p"]) == pytest.approx(np.abs(S.offdiagonal(dense)).max(), rel=1e-5)


def test_superposition_cli_writes_json_matrices_and_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KNOWBENCH_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i} says that Zorb{i % 7} lives by the river near town {i}." for i in range(60)))
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([_cf(i, f"Zorb{i}") for i in range(9)]))
    out = tmp_path / "out"
    args = ["superposition", "--model", "random-gpt2", "--data", str(data), "--n", "8", "--layers", "0,-1",
            "--stats-corpus", str(corpus), "--stats-samples", "60", "--out", str(out)]
    pytest.importorskip("matplotlib")
    assert main(args) == 0
    res = json.loads((out / "superposition.json").read_text())
    assert res["data"]["n_used"] == 8 and res["data"]["format"] == "counterfact-requested_rewrite"
    (m,) = res["models"]
    assert [L["layer"] for L in m["layers"]] == [0, 3] and m["timings"]["forward_passes"] == 8
    assert m["statistics"]["n_samples"] == 60
    mats = np.load(m["p_matrices"])
    assert mats["layer_3"].shape == (8, 8)
    for name in ("kurtosis_by_layer", "kde_random-gpt2", "heatmaps_random-gpt2", "angles_random-gpt2"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert "Superposition of 8 facts" in capsys.readouterr().out
    # a second run reuses the cached C (no corpus needed any more would still be read; the cache file exists)
    assert list((tmp_path / "cache").rglob("*.pt"))


def _result_with_diagnostics() -> dict:
    series = [{"n_edits": n, "observed": 0.01 * n, "predicted": 0.011 * n,
               "earlier_observed": 0.02 * n if n > 1 else None, "earlier_predicted": None} for n in range(1, 6)]
    return {
        "editor": {"name": "rome"}, "task": {"name": "zsre"}, "model": {"id": "random-gpt2"},
        "protocol": {"name": "sequential"},
        "curve": [{"edits": 0, "locality": 100.0}, {"edits": 5, "edit_succ": 80.0, "locality": 90.0}],
        "diagnostics": {"edits": [], "summary": {"layers": {"2": {"series": series}}}},
    }


def test_plot_cli_draws_curves(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_result_with_diagnostics()))
    assert main(["plot", str(path)]) == 0
    png = tmp_path / "r_curves.png"
    assert png.stat().st_size > 1000 and str(png) in capsys.readouterr().out
    (tmp_path / "x.json").write_text(json.dumps({"a": 1}))
    assert main(["plot", str(tmp_path / "x.json")]) == 2
    bare = {k: v for k, v in _result_with_diagnostics().items() if k not in ("curve", "diagnostics")}
    (tmp_path / "b.json").write_text(json.dumps(bare))
    assert main(["plot", str(tmp_path / "b.json")]) == 2
    assert "neither a lifelong curve" in capsys.readouterr().err


def test_missing_matplotlib_is_a_clear_message(monkeypatch):
    from knowbench import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match=r"knowbench\[plots\]"):
        plots.require_matplotlib()
