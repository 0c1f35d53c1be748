"""The pytest plugin: fixtures, baseline files, one-sided gates, and a weakened editor caught.

Inner pytest sessions run through ``pytester`` with entry-point autoloading off and the plugin
named with ``-p``, so they work whether or not the ``pytest11`` entry point is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import zsre_records
from kb_results import make_result

pytest_plugins = ["pytester"]

PLUGIN = ("-p", "knowbench.pytest_plugin")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_autoload(monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("KNOWBENCH_PROGRESS", "0")


def baseline(path: Path, cases: list[dict], tolerance: dict | None = None) -> Path:
    path.write_text(json.dumps({"knowbench_baseline": 1, "tolerance": tolerance or {"default": 2.0},
                                "cases": cases}))
    return path


def test_pyproject_declares_the_entry_point():
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = data["project"]["entry-points"].get("pytest11", {}).get("knowbench")
    assert declared == "knowbench.pytest_plugin", (
        'pyproject.toml needs [project.entry-points.pytest11] knowbench = "knowbench.pytest_plugin"')


def test_entry_point_loads_the_plugin_without_torch(pytester, monkeypatch):
    """A pytest11 entry point named knowbench (declared here by a stand-in distribution, as
    knowbench's own metadata does) activates the plugin in a plain `pytest` run, importing no torch."""
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    site = pytester.mkdir("site")
    info = site / "kb_entry_point_probe-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kb-entry-point-probe\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[pytest11]\nknowbench = knowbench.pytest_plugin\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    pytester.makepyfile(
        """
        import sys

        def test_plugin_active(kb_gate, request):
            assert request.config.pluginmanager.hasplugin("knowbench")
            assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
        """
    )
    r = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    r.assert_outcomes(passed=1)


def test_loading_the_plugin_imports_no_torch(pytester):
    pytester.makepyfile(
        """
        import sys

        def test_no_torch(kb_run, kb_gate, request):
            assert request.config.pluginmanager.has_plugin("knowbench.pytest_plugin")
            assert "torch" not in sys.modules
        """
    )
    r = pytester.runpytest_subprocess(*PLUGIN, "--kb-baseline", "missing.json")
    r.assert_outcomes(passed=1)
    help_text = pytester.runpytest_subprocess(*PLUGIN, "--help").stdout.str()
    assert "--kb-baseline=FILE" in help_text and "--kb-update-baselines" in help_text


GATE_TESTS = """
import json
from pathlib import Path

def load(name):
    return json.loads(Path(name).read_text())

def test_within_tolerance(kb_gate):
    findings = kb_gate.check(load("within.json"))
    assert kb_gate.updating or [f.metric for f in findings] == ["edit_succ", "locality"]

def test_regressed(kb_gate):
    kb_gate.check(load("regressed.json"))

def test_improved(kb_gate):
    kb_gate.check(load("improved.json"))

def test_metric_not_measured(kb_gate):
    kb_gate.check(load("no_locality.json"))

def test_no_case(kb_gate):
    kb_gate.check(load("other_editor.json"))

def test_kl_ceiling(kb_gate):
    kb_gate.check(load("kl.json"))
"""


def _write_results(pytester) -> None:
    def put(name, **kw):
        (pytester.path / name).write_text(json.dumps(make_result(**kw)))

    put("within.json", post={"edit_succ": 95.5, "locality": 88.0})  # 97 - 2 = 95 floor: passes
    put("regressed.json", post={"edit_succ": 94.0, "locality": 60.0})
    put("improved.json", post={"edit_succ": 99.9, "locality": 88.0})
    put("no_locality.json", post={"edit_succ": 97.0})
    put("other_editor.json", editor="rome")
    put("kl.json", task="convsent", kind="convsent", post={"edit_succ": 70.0, "locality": 0.9})


def test_one_sided_gate_with_tolerances(pytester):
    _write_results(pytester)
    baseline(pytester.path / "baselines.json", [
        {"editor": "ft-m", "task": "zsre", "model": "embedded", "metrics": {"edit_succ": 97.0, "locality": 88.0},
         "tolerance": {"locality": 5.0}},
        {"editor": "ft-m", "task": "convsent", "model": "embedded", "protocol": "single",
         "metrics": {"edit_succ": 70.0, "locality": 0.5}, "tolerance": {"locality": 0.3}},
    ])
    pytester.makepyfile(test_gate=GATE_TESTS)
    r = pytester.runpytest(*PLUGIN, "--kb-baseline", "baselines.json")
    r.assert_outcomes(passed=2, failed=4)
    out = r.stdout.str()
    assert ("knowbench quality gate: ft-m on zsre (model embedded, single) regressed against" in out)
    assert "edit_succ: 94.00 < floor 95.00 (baseline 97.00 − tolerance 2.00)" in out
    assert "locality: 60.00 < floor 83.00 (baseline 88.00 − tolerance 5.00)" in out
    assert "locality: not measured (baseline 88.00)" in out
    assert "no baseline for rome/zsre/embedded/single in" in out and "--kb-update-baselines" in out
    # lower is better: the ceiling is baseline + tolerance
    assert "locality: 0.90 > ceiling 0.80 (baseline 0.50 + tolerance 0.30)" in out
    assert "improved  ft-m/zsre/embedded/single edit_succ: 99.90" in out


def test_update_records_new_cases_and_keeps_tolerances(pytester):
    _write_results(pytester)
    path = baseline(pytester.path / "b.json", [
        {"editor": "ft-m", "task": "zsre", "model": "embedded", "metrics": {"edit_succ": 50.0}, "tolerance": {"edit_succ": 1.5}},
    ], tolerance={"default": 3.0, "fluency": 20.0})
    pytester.makepyfile(test_gate=GATE_TESTS)
    r = pytester.runpytest(*PLUGIN, "--kb-baseline", "b.json", "--kb-update-baselines", "-k", "regressed or no_case or kl_ceiling")
    r.assert_outcomes(passed=3)
    assert "recorded ft-m/zsre/embedded/single in" in r.stdout.str()
    data = json.loads(path.read_text())
    assert data["tolerance"] == {"default": 3.0, "fluency": 20.0}
    cases = {(c["editor"], c["task"]): c for c in data["cases"]}
    assert cases[("ft-m", "zsre")]["metrics"] == {"edit_succ": 94.0, "locality": 60.0}
    assert cases[("ft-m", "zsre")]["tolerance"] == {"edit_succ": 1.5}
    assert cases[("rome", "zsre")]["metrics"]["edit_succ"] == 97.25 and cases[("rome", "zsre")]["protocol"] == "single"
    assert cases[("ft-m", "convsent")]["metrics"] == {"edit_succ": 70.0, "locality": 0.9}
    # the recorded values now gate: a better result passes, the old one would still pass at the floor
    r = pytester.runpytest(*PLUGIN, "--kb-baseline", "b.json", "-k", "regressed or no_case or within")
    r.assert_outcomes(passed=3)


def test_update_creates_a_missing_file_and_ini_option(pytester):
    _write_results(pytester)
    pytester.makeini("[pytest]\nkb_baseline = gates/editors.json\n")
    pytester.makepyfile(test_gate=GATE_TESTS)
    r = pytester.runpytest(*PLUGIN, "--kb-update-baselines", "-k", "within")
    r.assert_outcomes(passed=1)
    data = json.loads((pytester.path / "gates/editors.json").read_text())
    assert data["knowbench_baseline"] == 1 and data["cases"][0]["metrics"] == {"edit_succ": 95.5, "locality": 88.0}


def test_kb_case_parametrization_and_marker(pytester):
    sub = pytester.mkdir("sub")
    baseline(sub / "cases.json", [
        {"editor": "ft-m", "task": "zsre", "model": "embedded", "run": {"limit": 2}, "metrics": {"edit_succ": 1.0}},
        {"editor": "ft-l", "task": "zsre", "model": "embedded", "run": {"sequential": 8, "eval_timing": "final"},
         "metrics": {}},
    ])
    (sub / "test_cases.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.kb_baseline('cases.json')\n"
        "def test_case(kb_case, kb_gate):\n"
        "    assert kb_gate.path.name == 'cases.json'\n"
        "    assert kb_case.run.get('limit') == 2 or kb_case.protocol == 'sequential8-final'\n\n"
        "def test_unmarked(kb_case):\n"
        "    pass\n"
    )
    r = pytester.runpytest(*PLUGIN, "-v", "-rs")
    r.assert_outcomes(passed=2, skipped=1)
    out = r.stdout.str()
    assert "test_case[ft-m/zsre/embedded/single] PASSED" in out
    assert "test_case[ft-l/zsre/embedded/sequential8-final] PASSED" in out
    assert "knowbench quality gate skipped: no baseline file" in out


def test_bad_baseline_file_is_a_clear_error(pytester):
    (pytester.path / "b.json").write_text(json.dumps({"knowbench_baseline": 1, "cases": [
        {"editor": "ft-m", "task": "zsre", "model": "embedded", "run": {"limits": 3}}]}))
    pytester.makepyfile("def test_case(kb_case):\n    pass\n")
    r = pytester.runpytest(*PLUGIN, "--kb-baseline", "b.json")
    assert r.ret != 0
    assert "cases[0].run: unknown field(s) limits" in r.stderr.str() + r.stdout.str()
    (pytester.path / "b.json").write_text("{}")
    r = pytester.runpytest(*PLUGIN, "--kb-baseline", "b.json")
    assert "not a knowbench baseline file" in r.stderr.str() + r.stdout.str()


WEAKENED_TESTS = """
def test_gate(kb_case, kb_gate):
    kb_gate.run_case(kb_case)

def test_weakened_editor(kb_case, kb_run, kb_gate):
    # the same run with FT-M cut down to one tiny step: the edit no longer takes
    result = kb_run(kb_case.editor, kb_case.task, model=kb_case.model,
                    **{**kb_case.run, "hparams": {"num_steps": 1, "lr": 1e-6}})
    kb_gate.check(result)
"""


def test_gate_catches_a_weakened_editor(pytester, monkeypatch):
    """End to end on a tiny random model: record a baseline, pass it, then fail with a weakened FT-M."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny model: more threads only contend on a shared machine
    (pytester.path / "zsre.json").write_text(json.dumps(zsre_records(4)))
    path = baseline(pytester.path / "editors.json", [
        {"editor": "ft-m", "task": "zsre", "model": "random-gpt2",
         "run": {"data": "zsre.json", "limit": 2, "diagnostics": False}},
    ])
    pytester.makepyfile(test_quality=WEAKENED_TESTS)
    # in subprocesses: an in-process session would unload the model code it imported when it ends
    r = pytester.runpytest_subprocess(*PLUGIN, "--kb-baseline", str(path), "--kb-update-baselines", "-k", "test_gate")
    r.assert_outcomes(passed=1)
    recorded = json.loads(path.read_text())["cases"][0]["metrics"]
    assert recorded["edit_succ"] >= 50.0, recorded  # FT-M learns two targets on a random model

    r = pytester.runpytest_subprocess(*PLUGIN, "--kb-baseline", str(path), "-rf")
    r.assert_outcomes(passed=1, failed=1)
    out = r.stdout.str()
    assert "test_weakened_editor" in out and "regressed against" in out
    assert "edit_succ: " in out and "< floor" in out
    assert "1 regression(s)" in out or "2 regression(s)" in out
