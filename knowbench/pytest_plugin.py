"""knowbench's pytest plugin: run an editor on a task inside a test, and gate its quality.

Registered under the ``pytest11`` entry point as ``knowbench``, so it is active wherever
knowbench is installed (``-p no:knowbench`` turns it off). Loading it imports no torch: the
runner and models are imported the first time a fixture runs an edit.

Fixtures
    kb_run     ``kb_run(editor, task, model=None, data=None, limit=None, hparams=None, **config)`` runs
               ``knowbench run`` in-process and returns the sealed result dict (fluency off unless
               asked; ``hparams`` may be a dict of overrides or a YAML/JSON file).
    kb_gate    ``kb_gate.check(result)`` compares a result with its baseline case;
               ``kb_gate.run_case(case)`` runs a case's recorded configuration and checks it.
    kb_case    parametrized over the cases of the baseline file: one test per case.

Options
    --kb-baseline FILE       the baseline file (or ``kb_baseline = FILE`` in the pytest ini file,
                             relative to the rootdir; or ``@pytest.mark.kb_baseline("FILE")`` on a
                             test or module, relative to the test file, which wins over both)
    --kb-update-baselines    record the measured values as the new baselines instead of failing

The gate is one-sided: for a higher-is-better metric a test fails when
``measured < baseline − tolerance``; for a lower-is-better one (ConvSent's KL locality) when
``measured > baseline + tolerance``. Improvements never fail; the terminal summary lists those
beyond the tolerance so the baseline can be raised with ``--kb-update-baselines``.

Baseline file (JSON)::

    {
      "knowbench_baseline": 1,
      "tolerance": {"default": 2.0, "fluency": 15.0},          # absolute, in the metric's units
      "cases": [
        {"editor": "ft-m", "task": "zsre", "model": "embedded", "protocol": "single",
         "run": {"limit": 10, "seed": 0},                      # RunConfig fields for run_case;
                                                               # data/hparams files: relative to this file
         "metrics": {"edit_succ": 99.5, "locality": 91.2},      # baselines (post-edit values)
         "tolerance": {"locality": 4.0}}                        # optional per-case overrides
      ]
    }

A case is keyed by (editor, task, model, protocol) with protocol as on the leaderboard (``single``,
``batch<B>``, ``sequential<T>-<each|final>[-b<B>]``). See docs/pytest-plugin.md for an example.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from .schema import KNOWEDIT_COLUMNS, ProtocolInfo, protocol_key

BASELINE_FORMAT = 1
DEFAULT_TOLERANCE = 2.0
GATED = KNOWEDIT_COLUMNS
# RunConfig fields a case may set in "run" (the rest are fixed by the case key or meaningless here)
RUN_FIELDS = ("data", "limit", "sequential", "eval_timing", "batch_size", "seed", "dtype", "device", "hparams",
              "eval_batch_size", "fluency", "curve_every", "curve_probes", "diagnostics")


# -- baseline file ---------------------------------------------------------------------------------
@dataclass
class Case:
    editor: str
    task: str
    model: str
    protocol: str = "single"
    run: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.editor, self.task, self.model, self.protocol)

    @property
    def id(self) -> str:
        return "/".join(self.key)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"editor": self.editor, "task": self.task, "model": self.model,
                               "protocol": self.protocol, "run": self.run, "metrics": self.metrics}
        if self.tolerance:
            out["tolerance"] = self.tolerance
        return out


def protocol_of_run(run: dict[str, Any]) -> str:
    """The protocol key a run configuration produces (same spelling as the leaderboard's)."""
    return ProtocolInfo.from_run(sequential=run.get("sequential"), batch_size=run.get("batch_size"),
                                 eval_timing=run.get("eval_timing") or "each").key()


class BaselineError(ValueError):
    pass


@dataclass
class Baselines:
    path: Path
    cases: list[Case] = field(default_factory=list)
    tolerance: dict[str, float] = field(default_factory=lambda: {"default": DEFAULT_TOLERANCE})
    dirty: bool = False

    @classmethod
    def load(cls, path: str | Path, missing_ok: bool = False) -> "Baselines":
        path = Path(path)
        if not path.exists():
            if missing_ok:
                return cls(path)
            raise BaselineError(f"baseline file {path} does not exist (create it with --kb-update-baselines)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise BaselineError(f"baseline file {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("knowbench_baseline") != BASELINE_FORMAT:
            raise BaselineError(f"{path}: not a knowbench baseline file (needs \"knowbench_baseline\": "
                                f"{BASELINE_FORMAT})")
        tol = data.get("tolerance", {"default": DEFAULT_TOLERANCE})
        if not isinstance(tol, dict) or not all(_number(v) and v >= 0 for v in tol.values()):
            raise BaselineError(f"{path}: \"tolerance\" must map metric names (or \"default\") to numbers ≥ 0")
        cases = []
        for i, raw in enumerate(data.get("cases", [])):
            where = f"{path}: cases[{i}]"
            if not isinstance(raw, dict):
                raise BaselineError(f"{where} must be an object")
            missing = [k for k in ("editor", "task", "model") if not isinstance(raw.get(k), str) or not raw[k]]
            if missing:
                raise BaselineError(f"{where} needs {', '.join(missing)} (non-empty strings)")
            run = raw.get("run", {})
            unknown = sorted(set(run) - set(RUN_FIELDS)) if isinstance(run, dict) else ["<not an object>"]
            if unknown:
                raise BaselineError(f"{where}.run: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(RUN_FIELDS)}")
            metrics = raw.get("metrics", {})
            if not isinstance(metrics, dict) or not all(_number(v) for v in metrics.values()):
                raise BaselineError(f"{where}.metrics must map metric names to numbers")
            ctol = raw.get("tolerance", {})
            if not isinstance(ctol, dict) or not all(_number(v) and v >= 0 for v in ctol.values()):
                raise BaselineError(f"{where}.tolerance must map metric names to numbers ≥ 0")
            case = Case(raw["editor"], raw["task"], raw["model"], raw.get("protocol") or protocol_of_run(run),
                        dict(run), {k: float(v) for k, v in metrics.items()}, {k: float(v) for k, v in ctol.items()})
            if any(c.key == case.key for c in cases):
                raise BaselineError(f"{where}: a second case for {case.id}")
            cases.append(case)
        return cls(path, cases, {k: float(v) for k, v in tol.items()})

    def find(self, key: tuple[str, str, str, str]) -> Case | None:
        return next((c for c in self.cases if c.key == key), None)

    def tolerance_for(self, case: Case, metric: str) -> float:
        for table in (case.tolerance, self.tolerance):
            if metric in table:
                return table[metric]
        return self.tolerance.get("default", DEFAULT_TOLERANCE)

    def save(self) -> None:
        data = {"knowbench_baseline": BASELINE_FORMAT, "tolerance": self.tolerance,
                "cases": [c.to_json() for c in sorted(self.cases, key=lambda c: c.key)]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, self.path)
        self.dirty = False


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# -- comparing ---------------------------------------------------------------------------------------
@dataclass
class Finding:
    metric: str
    measured: float | None
    baseline: float
    tolerance: float
    higher_is_better: bool = True

    @property
    def bound(self) -> float:
        return self.baseline - self.tolerance if self.higher_is_better else self.baseline + self.tolerance

    @property
    def regressed(self) -> bool:
        if self.measured is None:
            return True
        return self.measured < self.bound if self.higher_is_better else self.measured > self.bound

    @property
    def improved(self) -> bool:
        if self.measured is None:
            return False
        d = self.measured - self.baseline
        return (d if self.higher_is_better else -d) > self.tolerance

    def describe(self) -> str:
        if self.measured is None:
            return f"{self.metric}: not measured (baseline {self.baseline:.2f})"
        op, word, sign = ("<", "floor", "−") if self.higher_is_better else (">", "ceiling", "+")
        if self.regressed:
            return (f"{self.metric}: {self.measured:.2f} {op} {word} {self.bound:.2f} "
                    f"(baseline {self.baseline:.2f} {sign} tolerance {self.tolerance:.2f})")
        return f"{self.metric}: {self.measured:.2f} (baseline {self.baseline:.2f}, tolerance {self.tolerance:.2f})"


def result_key(result: dict[str, Any]) -> tuple[str, str, str, str]:
    return (result["editor"]["name"], result["task"]["name"], result["model"]["id"],
            protocol_key(result["protocol"]))


def compare(result: dict[str, Any], case: Case, baselines: Baselines) -> list[Finding]:
    post = result["metrics"]["post"]
    out = []
    for metric, base in sorted(case.metrics.items()):
        entry = post.get(metric)
        out.append(Finding(
            metric, None if entry is None else float(entry["value"]), base, baselines.tolerance_for(case, metric),
            True if entry is None else bool(entry.get("higher_is_better", True)),
        ))
    return out


class Gate:
    """Checks results against one baseline file, or records them with ``--kb-update-baselines``."""

    def __init__(self, state: "_State", path: Path | None, run: Callable[..., dict[str, Any]]):
        self._state = state
        self.path = path
        self._run = run

    @property
    def baselines(self) -> Baselines:
        return self._state.baselines(self.path)

    @property
    def updating(self) -> bool:
        return self._state.update

    def run_case(self, case: Case) -> dict[str, Any]:
        """Run a case's recorded configuration, check it, and return the result."""
        run = dict(case.run)
        for key in ("data", "hparams"):  # files named in a baseline file are relative to its folder
            if isinstance(run.get(key), str) and self.path is not None:
                run[key] = str((self.path.parent / run[key]).resolve())
        result = self._run(case.editor, case.task, model=case.model, **run)
        self.check(result, case=case)
        return result

    def check(self, result: dict[str, Any], case: Case | None = None) -> list[Finding]:
        """Fail the test when a gated metric fell beyond its tolerance; the findings otherwise."""
        baselines = self.baselines
        key = result_key(result)
        if case is not None and case.key != key:
            pytest.fail(f"baseline case {case.id} produced a result for {'/'.join(key)}: its \"protocol\" does "
                        "not match its \"run\" configuration", pytrace=False)
        case = baselines.find(key) or case
        if self.updating:
            self._record(baselines, result, key, case)
            return []
        if case is None:
            pytest.fail(f"no baseline for {'/'.join(key)} in {baselines.path}; record one with "
                        f"pytest --kb-update-baselines", pytrace=False)
        if not case.metrics:
            pytest.fail(f"baseline case {case.id} in {baselines.path} has no metrics yet; record them with "
                        f"pytest --kb-update-baselines", pytrace=False)
        findings = compare(result, case, baselines)
        self._state.checked.append((baselines.path, case.id, findings))
        bad = [f for f in findings if f.regressed]
        if bad:
            lines = [f"knowbench quality gate: {case.editor} on {case.task} (model {case.model}, {case.protocol}) "
                     f"regressed against {baselines.path}:"]
            lines += [f"  {f.describe()}" for f in bad]
            ok = [f for f in findings if not f.regressed]
            if ok:
                lines.append("  within tolerance: " + "; ".join(f.describe() for f in ok))
            pytest.fail("\n".join(lines), pytrace=False)
        return findings

    def _record(self, baselines: Baselines, result: dict[str, Any], key: tuple[str, str, str, str],
                case: Case | None) -> None:
        post = result["metrics"]["post"]
        measured = {m: round(float(post[m]["value"]), 4) for m in GATED if m in post}
        if case is None:
            case = Case(*key, run=_run_spec(result))
        if case not in baselines.cases:
            baselines.cases.append(case)
        old = dict(case.metrics)
        case.metrics = measured
        baselines.dirty = True
        self._state.updated.append((baselines.path, case.id, old, measured))


# RunConfig defaults a recorded "run" leaves out (kept here so that loading the plugin imports no torch)
_RUN_DEFAULTS = {"eval_timing": "each", "seed": 0, "dtype": "float32", "device": "cpu", "eval_batch_size": 32,
                 "curve_probes": 50, "diagnostics": True}


def _run_spec(result: dict[str, Any]) -> dict[str, Any]:
    """The run configuration of a result, for a new case's "run" (hparams overrides are not kept)."""
    cfg = result.get("config", {})
    spec = {k: cfg[k] for k in RUN_FIELDS
            if k != "hparams" and cfg.get(k) is not None and cfg[k] != _RUN_DEFAULTS.get(k)}
    spec["fluency"] = bool(cfg.get("fluency", False))
    return spec


# -- session state and hooks -----------------------------------------------------------------------
@dataclass
class _State:
    update: bool
    default_path: Path | None  # --kb-baseline, else the kb_baseline ini value
    files: dict[Path, Baselines] = field(default_factory=dict)
    checked: list[tuple[Path, str, list[Finding]]] = field(default_factory=list)
    updated: list[tuple[Path, str, dict[str, float], dict[str, float]]] = field(default_factory=list)

    def baselines(self, path: Path | None) -> Baselines:
        if path is None:
            pytest.fail(NO_BASELINE, pytrace=False)
        if path not in self.files:
            try:
                self.files[path] = Baselines.load(path, missing_ok=self.update)
            except BaselineError as exc:
                pytest.fail(str(exc), pytrace=False)
        return self.files[path]


NO_BASELINE = ("knowbench quality gate: no baseline file; pass --kb-baseline FILE, set kb_baseline in the pytest "
               "ini file, or mark the test with @pytest.mark.kb_baseline(\"FILE\")")
_STATE = pytest.StashKey[_State]()


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("knowbench", "knowbench editor quality gates")
    group.addoption("--kb-baseline", action="store", default=None, metavar="FILE",
                    help="knowbench baseline file: per (editor, task, model, protocol) metric baselines and "
                    "tolerances that kb_gate checks results against")
    group.addoption("--kb-update-baselines", action="store_true", default=False,
                    help="record the measured metrics into the baseline file(s) instead of checking them")
    parser.addini("kb_baseline", "knowbench baseline file (relative to the rootdir); --kb-baseline overrides it")


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "kb_baseline(path): the knowbench baseline file of this test's gate "
                            "(relative to the test file's folder; overrides --kb-baseline)")
    opt = config.getoption("kb_baseline", None)
    ini = config.getini("kb_baseline")
    default = (Path(opt).expanduser().resolve() if opt
               else (Path(config.rootpath) / str(ini)).resolve() if ini else None)
    config.stash[_STATE] = _State(bool(config.getoption("kb_update_baselines", False)), default)


def _state(config: Any) -> _State:
    return config.stash[_STATE]


def _path_for(node_path: Path, marker: Any, state: _State) -> Path | None:
    """The baseline file a test uses: its ``kb_baseline`` marker, else the session default."""
    if marker is not None:
        if not marker.args or not isinstance(marker.args[0], (str, Path)):
            raise pytest.UsageError(f"{node_path}: @pytest.mark.kb_baseline needs the baseline file's path")
        return (Path(node_path).parent / marker.args[0]).resolve()
    return state.default_path


def pytest_generate_tests(metafunc: Any) -> None:
    if "kb_case" not in metafunc.fixturenames:
        return
    state = _state(metafunc.config)
    path = _path_for(metafunc.definition.path, metafunc.definition.get_closest_marker("kb_baseline"), state)
    if path is None:
        skip = pytest.mark.skip(reason=NO_BASELINE.replace("knowbench quality gate: ", "knowbench quality gate skipped: "))
        metafunc.parametrize("kb_case", [pytest.param(None, marks=skip)], ids=["no-baseline"])
        return
    try:
        cases = state.files[path].cases if path in state.files else Baselines.load(path, missing_ok=state.update).cases
    except BaselineError as exc:
        raise pytest.UsageError(str(exc)) from None
    if not cases:
        skip = pytest.mark.skip(reason=f"baseline file {path} has no cases")
        metafunc.parametrize("kb_case", [pytest.param(None, marks=skip)], ids=["no-cases"])
        return
    metafunc.parametrize("kb_case", cases, ids=[c.id for c in cases])


def _gate_path(request: Any) -> Path | None:
    return _path_for(request.node.path, request.node.get_closest_marker("kb_baseline"), _state(request.config))


@pytest.fixture
def kb_case(request: Any) -> Case:
    """One case of the baseline file (tests taking this fixture are parametrized over them)."""
    case: Case = request.param
    # the session's copy of the case, so that recorded values land in the file that is saved
    found = _state(request.config).baselines(_gate_path(request)).find(case.key)
    return found if found is not None else case


@pytest.fixture
def kb_run(tmp_path_factory: Any) -> Callable[..., dict[str, Any]]:
    """``kb_run(editor, task, model=None, data=None, limit=None, hparams=None, **config) -> result``."""

    def run(editor: str, task: str, model: str | None = None, data: str | None = None, limit: int | None = None,
            hparams: dict[str, Any] | str | Path | None = None, fluency: bool = False, **config: Any) -> dict[str, Any]:
        os.environ.setdefault("KNOWBENCH_PROGRESS", "0")
        from .runner import RunConfig, finish
        from .runner import run as run_config

        if isinstance(hparams, dict):
            import yaml  # safe_dump writes 1e-06 as 1.0e-06, which YAML reads back as a float

            f = tmp_path_factory.mktemp("kb_hparams") / "hparams.yaml"
            f.write_text(yaml.safe_dump(hparams))
            hparams = str(f)
        cfg = RunConfig(editor=editor, task=task, model=model, data=None if data is None else str(data),
                        limit=limit, hparams=None if hparams is None else str(hparams), fluency=fluency, **config)
        result = run_config(cfg)
        result.pop("_records", None)
        return finish(result)

    return run


@pytest.fixture
def kb_gate(request: Any, kb_run: Callable[..., dict[str, Any]]) -> Gate:
    """The quality gate: ``kb_gate.check(result)`` / ``kb_gate.run_case(kb_case)``."""
    return Gate(_state(request.config), _gate_path(request), kb_run)


def pytest_sessionfinish(session: Any) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is None or not state.update:
        return
    for baselines in state.files.values():
        if baselines.dirty:
            baselines.save()


def pytest_terminal_summary(terminalreporter: Any, config: Any) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or not (state.checked or state.updated):
        return
    tr = terminalreporter
    tr.section("knowbench quality gate")
    for path, cid, old, new in state.updated:
        changes = ", ".join(f"{m} {old[m]:.2f}→{v:.2f}" if m in old else f"{m} {v:.2f}" for m, v in new.items())
        tr.write_line(f"recorded {cid} in {path}: {changes}")
    if state.checked:
        n = sum(len(fs) for _, _, fs in state.checked)
        bad = [(cid, f) for _, cid, fs in state.checked for f in fs if f.regressed]
        better = [(cid, f) for _, cid, fs in state.checked for f in fs if f.improved]
        tr.write_line(f"{len(state.checked)} case(s), {n} metric(s) checked: {len(bad)} regression(s), "
                      f"{len(better)} improvement(s) beyond tolerance")
        for cid, f in bad:
            tr.write_line(f"  REGRESSED {cid} {f.describe()}")
        for cid, f in better:
            tr.write_line(f"  improved  {cid} {f.describe()}; raise the baseline with --kb-update-baselines")
