"""The embedded world: deterministic generation, KnowEdit-schema task files that load cleanly,
a corpus without held-out templates, a few real build steps, and the shipped model's knowledge."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from knowbench.world import (
    BUILD_INFO,
    DATA_DIR,
    DEFAULT_SEED,
    MODEL_DIR,
    TASK_FILES,
    build_tasks,
    default_task_file,
    generate,
    world_main,
    write_tasks,
)
from knowbench.world.corpus import epoch_units, icl_documents
from knowbench.world.corpus import test_edits as edits_of_test_files  # not a test: pytest would collect it
from knowbench.world.tasks import TRAIN_FILES, build_train_tasks, relation_of
from knowbench.world.templates import RELATIONS

SHIPPED = (MODEL_DIR / "model.safetensors").exists()
needs_shipped = pytest.mark.skipif(not SHIPPED, reason="no shipped world model (run `knowbench world build`)")


@pytest.fixture(scope="module")
def world():
    return generate(DEFAULT_SEED)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, world):
    out = tmp_path_factory.mktemp("world_tasks")
    write_tasks(world, out)
    return out


def test_same_seed_gives_byte_identical_files(task_dir, tmp_path):
    write_tasks(generate(DEFAULT_SEED), tmp_path / "again")
    write_tasks(generate(DEFAULT_SEED + 1), tmp_path / "other")
    for name in TASK_FILES.values():
        first = (task_dir / name).read_bytes()
        assert first == (tmp_path / "again" / name).read_bytes(), name
        assert first != (tmp_path / "other" / name).read_bytes(), name


def test_sizes_and_schemas(task_dir):
    load = lambda task: json.loads((task_dir / TASK_FILES[task]).read_text())  # noqa: E731
    zsre = load("zsre")
    assert len(zsre) >= 1000
    assert len({r["subject"] for r in zsre}) == len(zsre)  # distinct subjects
    for r in zsre:
        assert r["subject"] in r["prompt"] and r["prompt"].endswith("?")
        assert isinstance(r["ground_truth"], list) and all(isinstance(a, str) for a in r["ground_truth"])
        assert r["target_new"] != r["ground_truth"][0]
        assert r["rephrase_prompt"] != r["prompt"] and r["subject"] in r["rephrase_prompt"]
        assert r["cond"].endswith(" || " + r["prompt"])
        for it in r["locality"]["Relation_Specificity"]:
            assert isinstance(it["ground_truth"], list)
        for items in r["portability"].values():
            assert all(isinstance(it["ground_truth"], str) for it in items)
    keys = {k for r in zsre for k in r["portability"]}
    assert keys == {"Reasoning", "Subject_Aliasing", "Logical_Generalization"}

    cf = load("counterfact")
    assert len(cf) >= 200
    assert {k for r in cf for k in r["locality"]} == {"Relation_Specificity", "Forgetfulness"}
    for r in cf:
        assert r["subject"] in r["prompt"] and isinstance(r["ground_truth"], str)
        for sec in ("portability", "locality"):
            for items in r[sec].values():
                assert all(isinstance(it["ground_truth"], str) for it in items)

    recent = load("wiki_recent")
    assert len(recent) >= 200 and all("ground_truth" not in r for r in recent)
    assert any(not r["portability"] for r in recent)  # like KnowEdit, some records have none
    for r in recent:
        for sec in ("portability", "locality"):
            for items in r[sec].values():
                for it in items:
                    gt = it["ground_truth"]
                    assert isinstance(gt, list) and all(isinstance(a, list) and a and all(a) for a in gt)

    bio = load("wikibio")
    assert len(bio) >= 200
    for r in bio:
        assert r["concept"] in r["text"] and 15 <= len(r["labels"].split()) <= 30

    conv = load("convsent")
    assert len(conv) >= 200 and all(r["pos"] and r["neg"] for r in conv)

    san = load("sanitation")
    assert len(san["success"]) >= 200 and len(san["locality"]) >= 200
    assert all(it["target_new"] == "I don't know." for it in san["success"])


def test_every_file_loads_with_zero_bad_records(task_dir):
    knowedit = pytest.importorskip("knowbench.tasks.knowedit")
    for task, name in TASK_FILES.items():
        t = knowedit.TASKS[task]
        rep = t.load(task_dir)  # found by its KnowEdit file name inside the folder
        assert Path(rep.files[0]).name == name
        assert rep.bad == [], [str(b) for b in rep.bad[:5]]
        assert len(rep.records) == rep.n_raw >= 200


def _held_out_patterns():
    return [re.compile(re.escape(t).replace(re.escape("{s}"), ".+")) for r in RELATIONS.values() for t in r.held_out]


def test_held_out_templates_never_in_corpus(world):
    units = epoch_units(world, DEFAULT_SEED, 0) + epoch_units(world, DEFAULT_SEED, 1)
    text = "\n".join(units)
    for r in RELATIONS.values():
        for t in r.held_out:
            assert not re.search(re.escape(t).replace(re.escape("{s}"), "[A-Z][^\n]*?"), text), t
    # while the trained templates are all there
    for r in RELATIONS.values():
        for t in r.trained:
            assert re.search(re.escape(t).replace(re.escape("{s}"), "[A-Z][^\n]*?"), text), t


def test_known_fact_probes_use_only_trained_templates(world):
    _, probes = build_tasks(world)
    known = [p for p in probes if "/" in p.group]
    assert len(known) > 5000
    patterns = _held_out_patterns()
    assert not [p.prompt for p in known for pat in patterns if pat.fullmatch(p.prompt)]
    assert all(any(pat.fullmatch(p.prompt) for pat in patterns) for p in probes if p.group == "held_out")


def test_default_task_file_maps_every_task_and_spelling():
    for name in ("zsre", "wiki_recent", "wikidata_recent", "recent", "counterfact", "wikidata_counterfact",
                 "wikibio", "convsent", "sanitation"):
        assert default_task_file(name).exists()
    with pytest.raises(KeyError, match="no task"):
        default_task_file("mquake")


def test_shipped_tasks_match_the_generator(tmp_path):
    write_tasks(generate(DEFAULT_SEED), tmp_path)
    for task, name in [*TASK_FILES.items(), *TRAIN_FILES.items()]:
        assert (default_task_file(task).parent / name).read_bytes() == (tmp_path / name).read_bytes(), name


def _edits_in(data: dict) -> dict[str, set[tuple[str, str]]]:
    """(subject, relation) of every edit in a set of task files, read back from the records."""
    out: dict[str, set[tuple[str, str]]] = {}
    for task in ("zsre", "counterfact", "wiki_recent"):
        out[task] = {(r["subject"], relation_of(r["prompt"], r["subject"])) for r in data[task]}
    out["wikibio"] = {(r["concept"], "biography") for r in data["wikibio"]}
    out["convsent"] = {(r["ent"], "opinion") for r in data["convsent"]}
    out["sanitation"] = {(r["subject"], relation_of(r["question"], r["subject"])) for r in data["sanitation"]["success"]}
    return out


def test_training_splits_share_no_edit_with_any_test_file(world):
    """No training record edits a fact that a test file edits (of any task): a trained editor or an
    IKE pool never holds a test edit. Read back from the records, not from the builder's set."""
    test, _ = build_tasks(world)
    train = build_train_tasks(world)
    test_all = set().union(*_edits_in(test).values())
    for task, edits in _edits_in(train).items():
        assert edits and not edits & test_all, task
    assert len(train["zsre"]) >= 900 and len(train["counterfact"]) >= 500
    # the splits load as their tasks' training files, with no bad record
    from knowbench import registry

    for task in TRAIN_FILES:
        _, t = registry.load_task(task)
        path = t.resolve_train(None, default_task_file(task))
        assert path.name == TRAIN_FILES[task]
        rep = t.reader(path)
        assert rep.records and not rep.bad, task


def test_in_context_documents_never_update_a_test_fact(world):
    excluded = edits_of_test_files(world)
    docs = icl_documents(world, DEFAULT_SEED, 0, excluded, n_docs=300)
    blocks = [b for d in docs for b in d.split("\n\n")]
    assert len(blocks) > len(docs)  # documents with demonstrations before the last block
    facts = [b.split("\n")[0].removeprefix("New Fact: ") for b in blocks]
    assert all(b.startswith("New Fact: ") and "\nPrompt: " in b for b in blocks)
    people = world.names("person")
    for fact in facts:  # "{prompt} {new object}": find the (subject, prompt) it was rendered from
        found = [(p, fact[: i]) for p in people if p in fact for i in range(len(fact), 0, -1)
                 if fact[i:i + 1] == " " and _is_prompt(fact[: i], p)]
        assert found, fact
        for subject, prompt in found:
            assert (subject, relation_of(prompt, subject)) not in excluded, fact
    assert icl_documents(world, DEFAULT_SEED, 0, excluded, n_docs=300) == docs  # seeded


def _is_prompt(text: str, subject: str) -> bool:
    try:
        relation_of(text, subject)
    except ValueError:
        return False
    return True


@needs_shipped
def test_shipped_data_is_small_and_reports_its_quality():
    size = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    info = json.loads(BUILD_INFO.read_text())
    assert info["config"]["n_layer"] >= 4
    assert info["accuracy"]["known"]["accuracy"] >= 95.0


@needs_shipped
def test_shipped_model_loads_and_knows_its_facts(world):
    from knowbench.models import load_model
    from knowbench.world.evaluate import evaluate_probes

    lm = load_model("embedded")
    assert lm.source == "builtin" and lm.revision.startswith("world-seed")
    assert next(lm.model.parameters()).dtype.is_floating_point
    assert lm.model.config.n_layer >= 4
    _, probes = build_tasks(world)
    sample = random.Random(1).sample([p for p in probes if "/" in p.group], 300)
    acc = evaluate_probes(lm.model, lm.tokenizer, sample)
    assert acc.known >= 93.0
    # and it is no lookup table of strings: wrong answers score low
    wrong = [type(p)(p.prompt, "Nonexistent", p.group) for p in sample[:50]]
    assert evaluate_probes(lm.model, lm.tokenizer, wrong).known < 30.0


@needs_shipped
def test_shipped_tokenizer_splits_subjects_into_several_tokens(world):
    """Locate-then-edit editors need what real models have: a subject whose identity is only
    complete at its last token. With one token per surname the model looks facts up from the
    surname's embedding at the answer position, and edits at the subject token stall (72-78 %)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    surname_tokens = [len(tok(" " + name.split()[-1])["input_ids"]) for name in world.names("person")]
    assert sum(n >= 2 for n in surname_tokens) >= 0.9 * len(surname_tokens)


def _tiny_config(steps: int):
    from knowbench.world.train import BuildConfig

    return BuildConfig(steps=steps, batch_size=8, warmup=2, vocab_size=400, n_layer=2, n_embd=32, n_head=2, n_inner=None,
                       n_positions=128, threads=1, tokenizer_epochs=1, icl_steps=2, icl_warmup=1, icl_docs=40)


def test_a_few_build_steps_are_deterministic(tmp_path):
    from safetensors.torch import load_file

    from knowbench.world.train import build

    infos = [build(tmp_path / str(i), seed=3, config=_tiny_config(3), progress=False, evaluate=False) for i in range(2)]
    assert infos[0]["final_loss"] == infos[1]["final_loss"] and infos[0]["final_loss"] > 0
    a = load_file(tmp_path / "0" / "model" / "model.safetensors")
    b = load_file(tmp_path / "1" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (tmp_path / "0" / "tasks" / TASK_FILES["zsre"]).exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "0" / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "0" / "model")
    ids = tok("Where was it born?", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tok)


def test_stage2_from_a_saved_stage1_equals_the_whole_build(tmp_path):
    """Stage 2 (in-context updates) started from the saved stage-1 model gives the same weights as
    the whole build: the float16 rounding between the stages is part of the build."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from knowbench.world.train import build

    whole = build(tmp_path / "whole", seed=3, config=_tiny_config(3), progress=False, evaluate=False)
    build(tmp_path / "s1", seed=3, config=replace(_tiny_config(3), icl_steps=0), progress=False, evaluate=False)
    resumed = build(tmp_path / "s2", seed=3, config=_tiny_config(3), progress=False, evaluate=False,
                    from_stage1=tmp_path / "s1" / "model")
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "s2" / "model" / "model.safetensors")
    assert all(torch_equal(a[k], b[k]) for k in a)
    assert whole["stage2"]["final_loss"] == resumed["stage2"]["final_loss"] > 0
    assert resumed["stage1_from"]["path"].endswith("model") and whole["stage1_from"] is None
    assert resumed["final_loss"] == whole["final_loss"]  # stage 1's statistics carried from its build_info


def torch_equal(x, y) -> bool:
    return bool((x == y).all())


def test_cli_tasks_and_eval(tmp_path, capsys):
    assert world_main(["tasks", "--out", str(tmp_path / "t"), "--seed", "5"]) == 0
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == sorted([*TASK_FILES.values(), *TRAIN_FILES.values()])
    assert world_main(["eval", "--model", str(tmp_path / "nothing")]) == 2


def test_size_family_members_differ_only_in_width_and_build_without_tasks(tmp_path):
    from dataclasses import replace

    from knowbench.world.train import SIZES, BuildConfig, build, sized

    base = BuildConfig()
    for size, preset in SIZES.items():
        cfg = sized(base, size)
        assert (cfg.n_layer, cfg.vocab_size, cfg.icl_steps, cfg.extra["size"]) == (base.n_layer, base.vocab_size, 0, size)
        assert cfg.n_inner == 16 * cfg.n_embd and cfg.n_embd // cfg.n_head in (16, 32)
    assert [sized(base, s).n_embd for s in SIZES] == sorted(sized(base, s).n_embd for s in SIZES)
    with pytest.raises(ValueError, match="the family has sizes"):
        sized(base, "x3")
    cfg = replace(sized(_tiny_config(2), "x0.5"), icl_steps=0)
    info = build(tmp_path / "m", seed=3, config=cfg, progress=False, evaluate=False, tasks=False)
    assert info["config"]["extra"]["size"] == "x0.5" and isinstance(info["config"]["bf16_autocast"], bool)
    assert not (tmp_path / "m" / "tasks").exists()  # a family member shares the shipped task files
    conf = json.loads((tmp_path / "m" / "model" / "config.json").read_text())
    assert (conf["n_embd"], conf["n_inner"]) == (64, 1024)


@pytest.mark.parametrize("size", ["x0.25", "x0.5", "x1", "x2"])
def test_shipped_family_members_load_and_score_what_their_build_info_says(size, world):
    from knowbench.models import load_model
    from knowbench.world import size_dir
    from knowbench.world.evaluate import evaluate_probes
    from knowbench.world.train import SIZES

    folder = size_dir(size)
    if not (folder / "model" / "model.safetensors").exists():
        with pytest.raises(FileNotFoundError, match=f"knowbench world build --size {size}"):
            load_model(f"embedded-{size}")
        pytest.skip(f"embedded-{size} is not shipped (build it with `knowbench world build --size {size}`)")
    info = json.loads((folder / "build_info.json").read_text())
    assert info["config"]["extra"]["size"] == size and info["config"]["icl_steps"] == 0
    lm = load_model(f"embedded-{size}")
    assert lm.model.config.n_embd == SIZES[size]["n_embd"] and lm.model.config.n_layer == 4
    assert lm.n_params == info["n_params"]
    _, probes = build_tasks(world)
    sample = random.Random(2).sample([p for p in probes if "/" in p.group], 300)
    # the shipped weights are the ones build_info measured (its "known" is over all 6,435 facts;
    # the README reports which members reach the 99 % target and which fall short)
    assert abs(evaluate_probes(lm.model, lm.tokenizer, sample).known - info["accuracy"]["known"]["accuracy"]) < 6.0
