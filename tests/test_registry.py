"""Plugin discovery: built-ins through entry points, lazy listing, clashes, third-party plugins."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

from knowbench import registry

THIRD_PARTY_MODULE = '''
"""A third-party editor and task, as another distribution would ship them."""
import json
from dataclasses import dataclass
from pathlib import Path

from knowbench.editor import EditOutcome, WeightEditor
from knowbench.records import EditRecord, LoadReport
from knowbench.task import Task


@dataclass
class ScaleHparams:
    factor: float = 0.5


class ScaleEditor(WeightEditor):
    """Shrinks the last rewrite weight: crude, but it changes the model and restores exactly."""
    name = "scale"
    hparams_cls = ScaleHparams

    def apply(self, requests):
        name = self.adapter.rewrite_param_name(self.adapter.n_layers - 1)
        w = self.param(name)
        w.data.mul_(self.hparams.factor)
        return EditOutcome(changed_params=[name], info={"factor": self.hparams.factor})


def _read(path: Path) -> LoadReport:
    rows = json.loads(Path(path).read_text())
    recs = [EditRecord(index=i, source=str(path), prompt=r["q"], target_new=r["a"]) for i, r in enumerate(rows)]
    return LoadReport(records=recs, bad=[], files=[Path(path)], format="toy", n_raw=len(rows))


toy = Task(name="toy", kind="qa", version="1", knowedit_name="Toy", default_files=("toy.json",), reader=_read,
           family="knowbench.tasks.families:QAFamily")
'''


def make_dist(root, dist: str, module: str, source: str, editors: dict[str, str], tasks: dict[str, str] | None = None):
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    lines = ["[knowbench.editors]"] + [f"{k} = {v}" for k, v in editors.items()]
    if tasks:
        lines += ["", "[knowbench.tasks]"] + [f"{k} = {v}" for k, v in tasks.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def test_builtins_are_entry_points_of_this_distribution():
    tasks = registry.discover(registry.TASK_GROUP)
    editors = registry.discover(registry.EDITOR_GROUP)
    for name in ("zsre", "wiki_recent", "counterfact", "wikibio", "convsent", "sanitation"):
        assert tasks[name].dist == "knowbench"
    assert editors["ft_m"].dist == "knowbench" and editors["ft_l"].value == "knowbench.editors.ft:FTL"


def test_knowedit_spellings_are_aliases():
    assert registry.get(registry.TASK_GROUP, "WikiData_counterfact").value == registry.get(registry.TASK_GROUP, "counterfact").value
    assert registry.get(registry.TASK_GROUP, "ZsRE").name == "zsre"
    assert registry.get(registry.TASK_GROUP, "WikiData_recent").value.endswith(":wiki_recent")


def test_unknown_name_lists_available():
    with pytest.raises(registry.PluginError) as exc:
        registry.get(registry.EDITOR_GROUP, "nope")
    assert "unknown editor 'nope'" in str(exc.value) and "ft-m" in str(exc.value)


@pytest.mark.parametrize("group, typo, meant", [
    (registry.EDITOR_GROUP, "rom", "rome"), (registry.EDITOR_GROUP, "memt", "memit"),
    (registry.EDITOR_GROUP, "alpha", "alphaedit"), (registry.EDITOR_GROUP, "ftm", "ft-m"),
    (registry.TASK_GROUP, "zsr", "zsre"), (registry.TASK_GROUP, "counterfac", "counterfact"),
])
def test_unknown_name_says_did_you_mean(group, typo, meant):
    with pytest.raises(registry.PluginError) as exc:
        registry.get(group, typo)
    assert f"did you mean '{meant}'?" in str(exc.value) and "available" in str(exc.value)


def test_names_are_case_insensitive():
    assert registry.get(registry.EDITOR_GROUP, "ROME").name == "rome"
    assert registry.get(registry.EDITOR_GROUP, "FT_M").name == "ft-m"
    assert registry.get(registry.TASK_GROUP, "ZSRE").value == registry.get(registry.TASK_GROUP, "zsre").value
    with pytest.raises(registry.PluginError) as exc:
        registry.get(registry.EDITOR_GROUP, "nope")
    assert "did you mean" not in str(exc.value)


def test_listing_imports_no_plugin_module():
    code = textwrap.dedent("""
        import sys
        from knowbench import registry
        registry.group_aliases(registry.discover(registry.TASK_GROUP))
        registry.group_aliases(registry.discover(registry.EDITOR_GROUP))
        heavy = [m for m in ("torch", "transformers", "knowbench.editors.ft", "knowbench.tasks.knowedit") if m in sys.modules]
        print(",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_third_party_plugin_is_found_and_runs(tmp_path, monkeypatch):
    make_dist(tmp_path, "kb-thirdparty", "kb_thirdparty", THIRD_PARTY_MODULE,
              editors={"scale": "kb_thirdparty:ScaleEditor"}, tasks={"toy": "kb_thirdparty:toy"})
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    info = registry.get(registry.EDITOR_GROUP, "scale")
    assert (info.dist, info.dist_version) == ("kb-thirdparty", "0.3")
    (tmp_path / "toy.json").write_text('[{"q": "The sky is", "a": "blue"}, {"q": "Grass is", "a": "green"}]')

    from knowbench.runner import RunConfig, run

    result = run(RunConfig(editor="scale", task="toy", model="random-gpt2", data=str(tmp_path), fluency=False))
    assert result["editor"]["distribution"] == "kb-thirdparty"
    assert result["task"]["distribution"] == "kb-thirdparty"
    assert result["metrics"]["post"]["edit_succ"]["n"] == 2
    assert result["edits"][0]["changed_params"] == ["transformer.h.3.mlp.c_proj.weight"]


def test_name_clash_names_both_distributions(tmp_path, monkeypatch):
    make_dist(tmp_path, "kb-impostor", "kb_impostor", "X = 1\n", editors={"ft-m": "kb_impostor:X"})
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(registry.PluginError) as exc:
        registry.discover(registry.EDITOR_GROUP)
    msg = str(exc.value)
    assert "'ft-m'" in msg and "knowbench" in msg and "kb-impostor" in msg


def test_broken_plugin_says_which(tmp_path, monkeypatch):
    make_dist(tmp_path, "kb-broken", "kb_broken", "raise ImportError('missing dependency foo')\n",
              editors={"broken": "kb_broken:Editor"})
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(registry.PluginError, match="broken.*kb-broken.*missing dependency foo"):
        registry.load(registry.EDITOR_GROUP, "broken")
