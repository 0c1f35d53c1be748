"""The editor contract: a toy editor of each family, installed as a temporary third-party
distribution, runs through the runner with diagnostics; plugins that break the contract are
rejected at load time, naming the plugin and the hook; the core names no plugin."""

from __future__ import annotations

import ast
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from knowbench import registry
from test_registry import make_dist

ROOT = Path(__file__).resolve().parents[1]

TOYS = '''
"""Toy editors of every family, as a third-party distribution would ship them."""
import json
from dataclasses import dataclass

import torch
from torch import nn

from knowbench.editor import Artefact, ChangeKind, Editor, EditOutcome, Site, WeightEditor


@dataclass
class NoHparams:
    pass


class PrefixEditor(Editor):
    """Prompt rewriting (ICE-like): the edited fact is put in front of every prompt of its record."""
    name = "toy-prefix"
    hparams_cls = NoHparams
    kind = ChangeKind.PROMPTS
    supports_batch = True

    def __init__(self, model, tokenizer, hparams, context):
        super().__init__(model, tokenizer, hparams, context)
        self.facts = {}
        self.owners_seen = []

    def apply(self, requests):
        for r in requests:
            self.facts[r.record_index] = f"New Fact: {r.prompt} {r.target_new}\\nPrompt:"
        return EditOutcome(changed_params=[])

    def rewrite_prompts(self, prompts, owners):
        self.owners_seen.extend((o.record, o.metric) for o in owners)
        return [f"{self.facts[o.record]} {p}" if o.record in self.facts else p for p, o in zip(prompts, owners)]

    def report(self):
        return {"facts_in_context": len(self.facts)}

    def restore(self):
        self.facts.clear()


class Shift(nn.Module):
    """inner(x) + delta: a module wrapped around the last MLP."""

    def __init__(self, inner, dim):
        super().__init__()
        self.inner = inner
        self.delta = nn.Parameter(torch.zeros(dim))

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs) + self.delta


class WrapEditor(Editor):
    """Module wrapping (GRACE/WISE-like): the last block's MLP is wrapped; restore unwraps it."""
    name = "toy-wrap"
    hparams_cls = NoHparams
    kind = ChangeKind.MODULES

    def __init__(self, model, tokenizer, hparams, context):
        super().__init__(model, tokenizer, hparams, context)
        self.path = self.adapter.mlp_name(self.adapter.n_layers - 1)
        self.parent_name, _, self.attr = self.path.rpartition(".")
        self.wrapper = None

    def apply(self, requests):
        parent = self.model.get_submodule(self.parent_name)
        if self.wrapper is None:
            inner = getattr(parent, self.attr)
            self.wrapper = Shift(inner, self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.n_embd)
            setattr(parent, self.attr, self.wrapper)
        with torch.no_grad():
            self.wrapper.delta.add_(0.5)
        return EditOutcome(changed_params=[self.path + ".delta"])

    def report(self):
        return {"wrapped": int(self.wrapper is not None), "shift": float(self.wrapper.delta.detach()[0]) if self.wrapper is not None else 0.0}

    def restore(self):
        if self.wrapper is not None:
            setattr(self.model.get_submodule(self.parent_name), self.attr, self.wrapper.inner)
            self.wrapper = None


class MemoEditor(Editor):
    """Trained on a split (SERAC-like memory): training stores the split's targets; in scope
    (a prompt of an edited record) the memory answers by putting the new target in context."""
    name = "toy-memo"
    hparams_cls = NoHparams
    kind = ChangeKind.MEMORY
    trainable = True
    supports_batch = True

    def __init__(self, model, tokenizer, hparams, context):
        super().__init__(model, tokenizer, hparams, context)
        self.memory = {}
        self.vocab = None
        self.trained_calls = 0

    def train(self, split):
        targets = sorted({r.target_new for r in split.report.records})
        (self.context.artefact_dir / "targets.json").write_text(json.dumps(targets))
        type(self).train_count = getattr(type(self), "train_count", 0) + 1
        return Artefact(self.context.artefact_dir, {"n_train": len(split.report.records)})

    def load_artefact(self, artefact):
        self.vocab = json.loads((artefact.path / "targets.json").read_text())

    def apply(self, requests):
        for r in requests:
            self.memory[r.record_index] = r.target_new
        return EditOutcome(changed_params=[])

    def rewrite_prompts(self, prompts, owners):
        return [f"{self.memory[o.record]}. {p}" if o.record in self.memory and o.metric != "locality" else p
                for p, o in zip(prompts, owners)]

    def report(self):
        return {"memory_size": len(self.memory), "vocab": len(self.vocab or [])}

    def restore(self):
        self.memory.clear()


@dataclass
class ScaleHparams:
    factor: float = 0.9


class ScaleEditor(WeightEditor):
    """Weight editing: scales the last rewrite weight, which it declares as its site."""
    name = "toy-scale"
    hparams_cls = ScaleHparams

    def sites(self):
        layer = self.adapter.n_layers - 1
        return [Site(layer, self.adapter.rewrite_name(layer), self.adapter.rewrite_param_name(layer))]

    def apply(self, requests):
        name = self.adapter.rewrite_param_name(self.adapter.n_layers - 1)
        with torch.no_grad():
            self.param(name).mul_(self.hparams.factor)
        return EditOutcome(changed_params=[name])


# -- contract violations --------------------------------------------------------------------
class NoApply(Editor):
    hparams_cls = NoHparams

    def restore(self):
        pass


class OldRewrite(PrefixEditor):
    def rewrite_prompts(self, prompts):
        return prompts


class TrainableWithoutTrain(Editor):
    hparams_cls = NoHparams
    trainable = True

    def apply(self, requests):
        return EditOutcome([])

    def restore(self):
        pass


class NotAnEditor:
    pass
'''

FAMILIES = {"toy-prefix": "PrefixEditor", "toy-wrap": "WrapEditor", "toy-memo": "MemoEditor", "toy-scale": "ScaleEditor"}
BROKEN = {"no-apply": "NoApply", "old-rewrite": "OldRewrite", "lazy-trainer": "TrainableWithoutTrain",
          "not-an-editor": "NotAnEditor"}


@pytest.fixture
def toys(tmp_path, monkeypatch):
    make_dist(tmp_path, "kb-toys", "kb_toys", TOYS,
              editors={name: f"kb_toys:{cls}" for name, cls in {**FAMILIES, **BROKEN}.items()})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KNOWBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delitem(sys.modules, "kb_toys", raising=False)  # this test's copy, fresh class state
    importlib.invalidate_caches()
    yield importlib.import_module("kb_toys")


def _run(editor, zsre_file, **kw):
    from knowbench.runner import RunConfig, run, train

    kw.setdefault("model", "random-gpt2")
    kw.setdefault("fluency", False)
    if editor == "toy-memo" and kw.get("train_data"):  # `knowbench train` first (a no-op once trained)
        train(RunConfig(editor=editor, task="zsre", data=str(zsre_file), model=kw["model"], train_data=kw["train_data"]))
    return run(RunConfig(editor=editor, task="zsre", data=str(zsre_file), **kw))


@pytest.mark.parametrize("protocol", [{"limit": 3}, {"sequential": 3}])
@pytest.mark.parametrize("editor,kind", [("toy-prefix", "prompts"), ("toy-wrap", "modules"), ("toy-memo", "memory")])
def test_behaviour_families_run_with_diagnostics(toys, zsre_file, editor, kind, protocol):
    r = _run(editor, zsre_file, train_data=str(zsre_file), **protocol)
    assert r["editor"]["kind"] == kind and r["editor"]["distribution"] == "kb-toys"
    d = r["diagnostics"]
    assert d["kind"] == "behaviour" and d["editor_kind"] == kind
    assert len(d["series"]) == 3  # one point per apply
    last = d["series"][-1]
    assert 0 <= last["retention"] <= 100 and 0 <= last["locality_drift"] <= 100
    assert last["n_retention"] == (3 if "sequential" in protocol else 1)
    assert last["editor"]  # the editor's own report() is recorded
    assert "retention" in d["summary"] and "locality_drift" in d["summary"]


def test_behaviour_diagnostics_measure_every_nth_edit_and_the_last(toys, zsre_file, monkeypatch):
    """Long accumulating runs are measured every ``every`` edits and after the last edit."""
    from knowbench import observers

    init = observers.BehaviourDiagnostics.__init__
    monkeypatch.setattr(observers.BehaviourDiagnostics, "__init__",
                        lambda self, *a, **kw: init(self, *a, **{**kw, "every": 2}))
    r = _run("toy-wrap", zsre_file, sequential=3)
    d = r["diagnostics"]
    assert [p["n_edits"] for p in d["series"]] == [2, 3]
    assert d["summary"]["every_n_edits"] == 2 and d["summary"]["n_points"] == 2
    assert d["series"][-1]["n_retention"] == 3


def test_prompt_editor_sees_each_prompts_owner(toys, zsre_file):
    """rewrite_prompts gets, for every prompt, the record and metric it belongs to."""
    from knowbench.runner import RunConfig, run

    seen = []
    orig = toys.PrefixEditor.rewrite_prompts

    def spy(self, prompts, owners):
        seen.extend((o.record, o.metric, o.key, o.request.target_new) for o in owners)
        return orig(self, prompts, owners)

    toys.PrefixEditor.rewrite_prompts = spy
    try:
        r = run(RunConfig(editor="toy-prefix", task="zsre", data=str(zsre_file), model="random-gpt2", limit=2, fluency=False))
    finally:
        toys.PrefixEditor.rewrite_prompts = orig
    records = json.loads(Path(zsre_file).read_text())
    chosen = r["task"]["selection"]["indices"]
    metrics = {(rec, m) for rec, m, _, _ in seen}
    for i in chosen:
        assert {(i, "edit_succ"), (i, "rephrase"), (i, "portability"), (i, "locality")} <= metrics
    for rec, metric, key, target in seen:
        assert target == records[rec]["target_new"]
        assert (key is None) == (metric in ("edit_succ", "rephrase"))


def test_prompt_editor_edits_in_context(toys):
    """The toy prompt editor changes what is scored (its facts are in the prompts), touches no weight."""
    from knowbench.runner import RunConfig, run

    r = run(RunConfig(editor="toy-prefix", task="zsre", limit=5, fluency=False))  # the embedded world
    assert all(e["changed_params"] == [] for e in r["edits"])
    pre = [x["pre"]["edit_succ"] for x in r["_records"]]
    post = [x["post"]["edit_succ"] for x in r["_records"]]
    assert pre != post


def test_run_names_the_train_command_then_uses_what_train_stored(toys, zsre_file):
    from knowbench.runconfig import RunError
    from knowbench.runner import RunConfig, run, train

    cfg = dict(editor="toy-memo", task="zsre", data=str(zsre_file), model="random-gpt2", train_data=str(zsre_file))
    with pytest.raises(RunError) as err:  # run never trains: it names the command that does
        run(RunConfig(**cfg, limit=2, fluency=False))
    assert f"knowbench train --editor toy-memo --task zsre --model random-gpt2 --data {zsre_file}" in str(err.value)
    assert toys.MemoEditor.__dict__.get("train_count", 0) == 0
    made = train(RunConfig(**cfg))
    assert made["reused"] is False and made["editor"]["n_train"] == len(json.loads(Path(zsre_file).read_text()))
    assert train(RunConfig(**cfg))["reused"] is True  # a finished artefact is kept
    first = run(RunConfig(**cfg, limit=2, fluency=False))
    art = first["editor"]["artefact"]
    assert art["reused"] is True and art["key"] == made["key"]
    assert art["train_data"]["sha256"] == first["task"]["data_files"][0]["sha256"]
    assert toys.MemoEditor.train_count == 1
    with pytest.raises(RunError, match="no training phase"):
        train(RunConfig(editor="toy-scale", task="zsre", data=str(zsre_file), model="random-gpt2"))


def test_trained_editor_without_split_names_the_flag(toys, zsre_file):
    from knowbench.task import DataNotFound

    with pytest.raises(DataNotFound, match="--train-data"):
        _run("toy-memo", zsre_file, limit=2)


def test_weight_editor_gets_weight_diagnostics_at_its_site(toys, zsre_file):
    r = _run("toy-scale", zsre_file, sequential=3)
    d = r["diagnostics"]
    assert d["kind"] == "weights"
    assert d["summary"]["watched_layers"] == [3] and d["summary"]["edited_layers"] == [3]
    obs = d["summary"]["layers"]["3"]["interference"]["final"]["observed"]
    assert obs["mean"] > 0  # scaling W by 0.9³ changes W k by 27 %
    assert abs(obs["mean"] - (1 - 0.9**3)) < 1e-4


def test_module_wrapper_restores_exactly(toys):
    from knowbench.editor import EditRequest, RunContext
    from knowbench.models import tiny_random_model

    for family in ("gpt2", "llama"):
        model, tok = tiny_random_model(family)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        modules = dict(model.named_modules())
        ed = toys.WrapEditor(model, tok, toys.NoHparams(), RunContext())
        ids = torch.tensor([[1, 2, 3]])
        base = model(ids).logits
        ed.apply([EditRequest("a b", "c")])
        assert not torch.equal(model(ids).logits, base)
        ed.restore()
        assert dict(model.named_modules()).keys() == modules.keys()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert torch.equal(model(ids).logits, base)


@pytest.mark.parametrize("name,hook", [("no-apply", "apply"), ("old-rewrite", "rewrite_prompts"),
                                       ("lazy-trainer", "train"), ("not-an-editor", "Editor")])
def test_contract_violation_names_plugin_and_hook(toys, name, hook):
    with pytest.raises(registry.PluginError) as exc:
        registry.load_editor(name)
    msg = str(exc.value)
    assert f"'{name}'" in msg and "kb-toys" in msg and hook in msg


def test_every_builtin_editor_and_task_meets_the_contract():
    for info, _ in registry.group_aliases(registry.discover(registry.EDITOR_GROUP)):
        registry.load_editor(info.name)
    for info, _ in registry.group_aliases(registry.discover(registry.TASK_GROUP)):
        _, task = registry.load_task(info.name)
        assert task.family_class().spec.name == task.kind


# -- the core names no plugin ----------------------------------------------------------------------
def _plugin_names() -> set[str]:
    names = set()
    for group in (registry.EDITOR_GROUP, registry.TASK_GROUP):
        for info in registry.discover(group).values():
            if info.dist == "knowbench":
                names |= {info.name.lower(), info.name.lower().replace("-", "_")}
                names.add(info.value.rpartition(":")[2].lower())
    return names | {"r-rome"}


# KnowEdit's vocabulary in the result model: the standard metric families carry the names of the
# kinds of task they score, and KnowEdit's table order names its tasks; data, not logic.
ALLOWED = {
    "knowbench/schema.py": {"wikibio", "convsent", "sanitation", "zsre", "wikidata_recent", "wikidata_counterfact"},
    # KnowEdit's column headers and the literature's spellings of editor names (display data)
    "knowbench/knowedit_table.py": {"serac", "ice", "adalora", "mend", "rome", "memit", "ft-l", "ft-m", "alphaedit",
                                    "ike", "lora", "r-rome", "grace", "wise", "ultraedit", "pmet", "emmet", "malmen",
                                    "rledit", "nse", "prune", "rect", "melo"},
    # the lifelong literature's task (WISE, AlphaEdit, UltraEdit report ZsRE): the table's default
    "knowbench/lifelong_table.py": {"zsre"},
    # ... and of the superposition study's collapse runs (`knowbench superposition --collapse-task`)
    "knowbench/study.py": {"zsre"},
}


def _code_strings(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """String constants and identifiers of ``tree`` (docstrings left out) and the absolute names of
    the modules it imports (``module``: the dotted name of the file's package)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, f"import {alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".")[: len(module.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out += [(node.lineno, f"import {mod}.{alias.name}") for alias in node.names]
    return out


def test_core_imports_and_names_no_plugin():
    """knowbench/ (the core) imports nothing from editors/ or tasks/ and names no built-in editor or
    task in its code. knowbench/world/ is the embedded world's data generator, which writes KnowEdit's
    task files under their names; it is data for the task plugins and imports none of them either."""
    names = _plugin_names()
    problems = []
    for path in sorted((ROOT / "knowbench").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        tree = ast.parse(path.read_text(), filename=rel)
        for line, text in _code_strings(tree, package):
            if text.startswith("import "):
                mod = text[len("import "):]
                if mod.startswith(("knowbench.editors", "knowbench.tasks", "editors", "tasks")):
                    problems.append(f"{rel}:{line}: {text}")
                continue
            if rel.startswith("knowbench/world/"):
                continue
            # a name used as logic: an identifier, or a string that is the name itself (prose such as
            # help texts may mention plugins as examples)
            if text.strip().lower() in names - ALLOWED.get(rel, set()):
                problems.append(f"{rel}:{line}: {text!r}")
    assert not problems, "\n".join(problems)


def test_train_command_line_and_resume_message(toys, zsre_file, capsys):
    """`knowbench train` from the command line stores the artefact `knowbench run` then uses; a
    folder left by a killed training is named as resumable in run's message."""
    from knowbench.artefacts import artefact_key
    from knowbench.cli import main
    from knowbench.editor import hparams_hash
    from knowbench.runconfig import RunError
    from knowbench.runner import RunConfig, run
    from knowbench.results import sha256_file

    args = ["--editor", "toy-memo", "--task", "zsre", "--data", str(zsre_file), "--model", "random-gpt2",
            "--train-data", str(zsre_file)]
    key = artefact_key("toy-memo", "random-gpt2", sha256_file(zsre_file), hparams_hash(toys.NoHparams()), 0)
    folder = Path(__import__("os").environ["KNOWBENCH_CACHE"]) / "editors" / "toy-memo" / key
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"partial")
    cfg = RunConfig(editor="toy-memo", task="zsre", data=str(zsre_file), model="random-gpt2",
                    train_data=str(zsre_file), limit=2, fluency=False)
    with pytest.raises(RunError, match="not finished; the command resumes it"):
        run(cfg)
    assert main(["train", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["key"] == key and out["reused"] is False
    assert run(cfg)["editor"]["artefact"]["key"] == key
    assert main(["train", *args]) == 0 and json.loads(capsys.readouterr().out)["reused"] is True
