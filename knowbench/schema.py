"""The typed model of a result file (the JSON ``knowbench run`` writes), as pydantic v2 models.

This module is the one home of what a result file contains: its blocks and their fields, the
metric names with their labels and better directions, the metric families task kinds declare,
and the spelling of protocol keys (``single``, ``batch<B>``, ``sequential<T>-<each|final>[-b<B>]``)
that names leaderboard files, baseline cases and default output files. The validator
(``knowbench.validate``), the leaderboard, the report tables and the pytest plugin read them here.

Versions. ``SCHEMA_VERSION`` is the version knowbench writes. Files of an earlier minor version are
migrated on read (``migrate``); the integrity hash is always checked on the file as written, before
migration. 1.1 adds, over 1.0:

* ``editor.kind``            the kind of change the editor makes: weights, modules, prompts, memory;
* ``editor.artefact``        a trained editor's stored artefact (optional, null for none);
* ``task.metric_family``     the metric family the task declared; its metrics' names, directions, units;
* ``environment.torch_threads``  torch's intra-op thread count (optional, null when unknown);
* ``diagnostics.kind``       ``weights`` (superposition of weight updates) or ``behaviour``.

Migrating 1.0 sets editor.kind = "weights" (every 1.0 editor edited weights), task.metric_family =
the standard family of task.kind, environment.torch_threads = null and diagnostics.kind = "weights".

1.2 adds ``protocol.metrics``, the metric protocol (``knowbench.metric_protocol``): ``knowedit``
(the reference's definitions) or the named fixes of its artefacts. Files of 1.0 and 1.1 computed
every metric with what are now the fixes, so migrating sets ``{"name": "knowbench", "fixes": [...]}``
with the fixes of that time (``LEGACY_FIXES``). A protocol key names a metric protocol other than
``knowedit`` (``single+knowbench``): runs under different metric protocols are not ranked together.
A 1.2 file may carry ``task.data_files[].hub`` (optional; the hub dataset, commit and path a file was
read from, ``--data zjunlp/KnowEdit``).

``knowbench schema`` prints the JSON Schema of ``Result``. Importing this module imports no torch.
"""

from __future__ import annotations

import copy
import json
from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.2"
INTEGRITY_ALGORITHM = "sha256-canonical-json"

NonEmpty = Annotated[str, Field(min_length=1)]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
Duration = Annotated[float, Field(ge=0, allow_inf_nan=False)]

ProtocolName = Literal["single", "batch", "sequential"]
EvalTiming = Literal["each", "final"]
EditorKind = Literal["weights", "modules", "prompts", "memory"]
DiagnosticsKind = Literal["weights", "behaviour"]
Unit = Literal["percent", "entropy", "kl"]


class _Strict(BaseModel):
    """A core block: exact types (no "5" for 5, no true for 1) and no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid")


class _Open(BaseModel):
    """A block that also carries editor-, task- or machine-specific free-form keys."""

    model_config = ConfigDict(strict=True, extra="allow")


# -- metrics ---------------------------------------------------------------------------------------
class MetricSpec(_Strict):
    """One metric: its name in result files, the label tables show, and how to read its value."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    name: NonEmpty
    label: NonEmpty
    higher_is_better: bool
    unit: Unit  # percent: [0, 100] (KnowEdit's ×100 scale); entropy: n-gram entropy ×100, ≥ 0; kl: ≥ 0
    subkeys: bool = False  # also reported per sub-key as "<name>.<Key>", each with this spec
    description: str = ""


class MetricFamily(_Strict):
    """The metrics a kind of task reports (declared by the task plugin, recorded in the result)."""

    name: NonEmpty
    metrics: list[MetricSpec] = Field(min_length=1)

    def names(self) -> list[str]:
        return [m.name for m in self.metrics]

    def spec(self, metric: str) -> MetricSpec | None:
        """The spec of ``metric``; a sub-keyed one (``portability.Reasoning``) inherits its parent's."""
        main, dot, sub = metric.partition(".")
        for m in self.metrics:
            if m.name == main and (not dot or (m.subkeys and sub)):
                return m
        return None

    def same_as(self, other: "MetricFamily") -> bool:
        """Same metric names, directions, units and sub-keys (labels and descriptions aside)."""
        key = lambda f: [(m.name, m.higher_is_better, m.unit, m.subkeys) for m in f.metrics]  # noqa: E731
        return self.name == other.name and key(self) == key(other)


def _spec(name: str, label: str, unit: Unit = "percent", higher_is_better: bool = True, subkeys: bool = False,
          description: str = "") -> MetricSpec:
    return MetricSpec(name=name, label=label, higher_is_better=higher_is_better, unit=unit, subkeys=subkeys,
                      description=description)


KNOWEDIT_METRICS: dict[str, MetricSpec] = {
    m.name: m for m in (
        _spec("edit_succ", "Edit Succ.", description="the edited fact is produced (teacher-forced token accuracy ×100)"),
        _spec("rephrase", "Rephrase", description="the edit holds on paraphrases of the prompt"),
        _spec("portability", "Portability", subkeys=True,
              description="facts that follow from the edit (reasoning, aliases, logic), per sub-key and averaged"),
        _spec("locality", "Locality", subkeys=True,
              description="unrelated facts keep the pre-edit model's answers, per sub-key and averaged"),
        _spec("fluency", "Fluency", unit="entropy",
              description="weighted bi-/tri-gram entropy ×100 of generated text (no upper bound)"),
    )
}
KNOWEDIT_COLUMNS: tuple[str, ...] = tuple(KNOWEDIT_METRICS)  # the leaderboard's column order
# KnowEdit's table order of its tasks, by the names KnowEdit gives them (a result's task.knowedit_name)
KNOWEDIT_TASK_ORDER: tuple[str, ...] = (
    "WikiData_recent", "ZsRE", "WikiBio", "WikiData_counterfact", "ConvSent", "Sanitation")
RANK_ORDER: tuple[str, ...] = ("edit_succ", "portability", "locality", "fluency", "rephrase")
KL_LOCALITY = _spec("locality", "Locality", unit="kl", higher_is_better=False,
                    description="KL divergence of the reply distribution on unrelated topics, pre‖post")
_K = KNOWEDIT_METRICS
STANDARD_FAMILIES: dict[str, MetricFamily] = {
    "qa": MetricFamily(name="qa", metrics=[_K["edit_succ"], _K["rephrase"], _K["portability"], _K["locality"],
                                            _K["fluency"]]),
    "wikibio": MetricFamily(name="wikibio", metrics=[_K["edit_succ"], _K["locality"], _K["fluency"]]),
    "convsent": MetricFamily(name="convsent", metrics=[
        _spec("edit_succ", "Edit Succ.", description="the reply takes the target sentiment"), KL_LOCALITY,
        _K["fluency"]]),
    "sanitation": MetricFamily(name="sanitation", metrics=[
        _spec("edit_succ", "Edit Succ.", description="the model answers \"I don't know.\""),
        _spec("locality", "Locality", description="greedy answers to other questions are unchanged"),
        _K["fluency"]]),
}


class MetricEntry(_Strict):
    value: float = Field(allow_inf_nan=False)
    n: Count
    higher_is_better: bool


class Metrics(_Strict):
    pre: dict[str, MetricEntry]
    post: dict[str, MetricEntry]


# -- protocol --------------------------------------------------------------------------------------
KNOWEDIT_METRICS_NAME = "knowedit"
# the fixes every metric of a schema 1.0 / 1.1 file was computed with
LEGACY_FIXES = ("convsent_next_token", "convsent_pre_unedited", "fluency_continuation", "padding_safe",
                "skip_empty_keys", "strip_whitespace")


def _metrics_name(metrics: Any) -> str:
    if isinstance(metrics, MetricsInfo):
        return metrics.name
    if isinstance(metrics, Mapping) and isinstance(metrics.get("name"), str):
        return metrics["name"]
    return KNOWEDIT_METRICS_NAME


def _key(name: str, n_edits: Any, eval_timing: str, batch_size: int | None, metrics: Any = None) -> str:
    batch = batch_size or 1
    if name == "single":
        key = "single"
    elif name == "batch":
        key = f"batch{batch}"
    else:
        key = f"sequential{n_edits}-{eval_timing}" + (f"-b{batch}" if batch > 1 else "")
    m = _metrics_name(metrics)
    return key if m == KNOWEDIT_METRICS_NAME else f"{key}+{m}"


def _label(name: str, n_edits: Any, eval_timing: str, batch_size: int | None, metrics: Any = None) -> str:
    batch = batch_size or 1
    if name == "single":
        label = "single"
    elif name == "batch":
        label = f"batch B={batch}"
    else:
        when = "each edit right after it" if eval_timing == "each" else "all on the final model"
        label = f"sequential T={n_edits} ({when})" + (f", B={batch}" if batch > 1 else "")
    m = _metrics_name(metrics)
    return label if m == KNOWEDIT_METRICS_NAME else f"{label} · metrics: {m}"


class MetricsInfo(_Strict):
    """The metric protocol: ``knowedit`` (the reference's definitions), ``knowbench`` (every fix of
    its artefacts) or ``knowedit+<fix>+...``; ``fixes`` lists the fixes applied."""

    name: NonEmpty
    fixes: list[NonEmpty]


class ProtocolInfo(_Strict):
    """How edits were applied and evaluated: single edits, a batch of B, or T sequential edits."""

    name: ProtocolName
    n_edits: Positive
    sequential: Positive | None  # T of a sequential run (= n_edits); null otherwise
    eval_timing: EvalTiming  # sequential: each edit right after it, or all on the final model
    batch_size: Positive
    seed: int
    curve_every: Count | None
    curve_probes: Count
    fluency: bool
    metrics: MetricsInfo
    # --stop-below: the probe Edit Succ. (%) under which the stream stops, and after how many edits it
    # did (null: it ran all T); a stopped run records the n_edits it made, fewer than sequential
    stop_below: float | None = None
    stopped_at: Positive | None = None

    def key(self) -> str:
        """``single``, ``batch<B>`` or ``sequential<T>-<each|final>[-b<B>]``, followed by
        ``+<metric protocol>`` unless that is ``knowedit``; a stopped run's ends in ``-stopped``."""
        return _key(self.name, self.n_edits, self.eval_timing, self.batch_size, self.metrics) + (
            "-stopped" if self.stopped_at else "")

    def label(self) -> str:
        """The leaderboard's heading, e.g. ``sequential T=100 (each edit right after it)``."""
        return _label(self.name, self.n_edits, self.eval_timing, self.batch_size, self.metrics)

    @classmethod
    def from_run(cls, *, sequential: int | None = None, batch_size: int | None = None, eval_timing: str = "each",
                 n_edits: int | None = None, seed: int = 0, fluency: bool = False, curve_every: int | None = None,
                 curve_probes: int = 0, metrics: Mapping[str, Any] | None = None) -> "ProtocolInfo":
        """The protocol run options give (any editor): sequential when T is set, else batch when B > 1,
        else single. ``n_edits`` defaults to T (sequential) or B; only a sequential key depends on it."""
        batch = batch_size or 1
        name = "sequential" if sequential else "batch" if batch > 1 else "single"
        return cls(
            name=name, n_edits=n_edits or sequential or batch, sequential=sequential or None,
            eval_timing=eval_timing if name == "sequential" else "each", batch_size=batch, seed=seed,
            curve_every=curve_every, curve_probes=curve_probes, fluency=fluency,
            metrics=MetricsInfo.model_validate(metrics or {"name": KNOWEDIT_METRICS_NAME, "fixes": []}),
        )


def protocol_key(protocol: Mapping[str, Any] | ProtocolInfo) -> str:
    """The key of a result's ``protocol`` block (a dict needs name, n_edits, eval_timing, batch_size)."""
    if isinstance(protocol, ProtocolInfo):
        return protocol.key()
    return _key(protocol["name"], protocol.get("n_edits"), protocol.get("eval_timing", "each"),
                protocol.get("batch_size"), protocol.get("metrics"))


def protocol_label(protocol: Mapping[str, Any] | ProtocolInfo) -> str:
    if isinstance(protocol, ProtocolInfo):
        return protocol.label()
    return _label(protocol["name"], protocol.get("n_edits"), protocol.get("eval_timing", "each"),
                  protocol.get("batch_size"), protocol.get("metrics"))


def protocol_sort(protocol: Mapping[str, Any]) -> tuple:
    """Tables in order: single, batch, then sequential by T, each before final, then B."""
    name = protocol["name"]
    return ({"single": 0, "batch": 1, "sequential": 2}.get(name, 3),
            protocol.get("n_edits", 0) if name == "sequential" else 0, protocol.get("eval_timing") != "each",
            protocol.get("batch_size") or 1, _metrics_name(protocol.get("metrics")) != KNOWEDIT_METRICS_NAME,
            _metrics_name(protocol.get("metrics")))


# -- the blocks --------------------------------------------------------------------------------------
class KnowbenchInfo(_Strict):
    version: NonEmpty
    git_commit: str | None  # "<sha>[-dirty]"; null outside a git checkout


class EditorInfo(_Strict):
    name: NonEmpty
    distribution: NonEmpty
    version: NonEmpty
    hparams: dict[str, Any]
    hparams_hash: NonEmpty  # sha256 (first 16 hex digits) of the sorted JSON of hparams
    hparams_file: str | None
    provenance: dict[str, Any] = Field(default_factory=dict)  # editor-specific
    kind: EditorKind  # 1.1: what the editor changes
    artefact: dict[str, Any] | None = None  # 1.1: a trained editor's stored artefact


class ModelInfo(_Strict):
    id: NonEmpty
    source: NonEmpty  # builtin, hub or local
    path: str | None = None
    revision: str | None
    model_type: NonEmpty
    dtype: NonEmpty
    device: NonEmpty
    n_params: Positive
    default: bool | None = None


class HubSource(_Strict):
    """Where a data file came from on the Hugging Face hub (``--data owner/name[@revision]``)."""

    repo_id: NonEmpty  # the dataset, e.g. zjunlp/KnowEdit
    revision: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]  # the commit the file was read at
    path_in_repo: NonEmpty  # e.g. benchmark/ZsRE/ZsRE-test-all.json


class DataFile(_Strict):
    path: NonEmpty
    sha256: Sha256Hex
    hub: HubSource | None = None  # 1.2, optional: set when the file came from a hub dataset


class Selection(_Strict):
    method: NonEmpty
    seed: int
    n_available: Count
    n_selected: Count
    indices: list[Count]


class TaskInfo(_Strict):
    name: NonEmpty
    knowedit_name: NonEmpty
    kind: NonEmpty  # the evaluator's task kind (qa, wikibio, convsent, sanitation)
    version: NonEmpty
    distribution: NonEmpty
    format: str | None
    data_files: list[DataFile] = Field(min_length=1)
    default_data: bool
    n_records_in_file: Count
    n_records_usable: Count
    bad_records: list[dict[str, Any]]
    selection: Selection
    metric_family: MetricFamily  # 1.1


class Timings(_Open):
    """Seconds (``*_s``), ms per edit and peak memory (MB); any further key is also a number ≥ 0."""

    __pydantic_extra__: dict[str, Duration] = Field(init=False)

    load_model_s: Duration | None = None
    editor_prepare_s: Duration | None = None
    pre_eval_s: Duration | None = None
    edit_s: Duration | None = None
    edit_ms_per_edit: Duration
    post_eval_s: Duration | None = None
    total_s: Duration
    peak_memory_mb: Duration


class Environment(_Open):
    python: NonEmpty
    platform: str | None = None
    machine: str | None = None
    cpu_count: int | None = None
    packages: dict[str, str]
    gpu: str | None = None
    torch_threads: Positive | None = None  # 1.1


class Integrity(_Strict):
    algorithm: Literal["sha256-canonical-json"]
    sha256: Sha256Hex  # of the canonical JSON of everything but this block (knowbench.results.content_hash)


class Diagnostics(_Open):
    kind: DiagnosticsKind  # 1.1
    edits: list[dict[str, Any]] = Field(default_factory=list)
    summary: dict[str, Any] = Field(default_factory=dict)


class RecordValues(_Strict):
    """One record's scores as fractions (before aggregation): ``metric: value`` or, for sub-keyed
    metrics, ``metric: {sub-key: [item values]}`` (what ``knowbench verify`` recomputes)."""

    index: Count  # the record's position in the task file
    pre: dict[str, Any]
    post: dict[str, Any]


class ResultBody(_Strict):
    """A result before it is sealed: everything the integrity hash covers (what a runner validates
    before ``knowbench.results.seal`` adds the ``integrity`` block)."""

    schema_version: Annotated[str, Field(pattern=r"^1\.[0-9]+$")]
    knowbench: KnowbenchInfo
    editor: EditorInfo
    model: ModelInfo
    task: TaskInfo
    protocol: ProtocolInfo
    metrics: Metrics
    curve: list[dict[str, Any]]  # lifelong curve points: {"edits": k, <metric>: value, ...}
    edits: list[dict[str, Any]]  # one entry per editor call, editor-specific
    timings: Timings
    environment: Environment
    config: dict[str, Any]  # the run configuration as given
    diagnostics: Diagnostics | None = None  # absent when the run had diagnostics off
    records: list[RecordValues] | None = None  # 1.1: per-record scores, in selection order

    @property
    def family(self) -> MetricFamily:
        return self.task.metric_family


class Result(ResultBody):
    """One result file: a sealed ``ResultBody``."""

    model_config = ConfigDict(strict=True, extra="forbid", title="knowbench result",
                              json_schema_extra={"$comment": f"knowbench result file, schema {SCHEMA_VERSION}"})

    integrity: Integrity


# -- versions --------------------------------------------------------------------------------------
def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a result of schema 1.0 or 1.1 shaped as ``SCHEMA_VERSION`` (a copy as it is for
    the current version and anything else).

    Tolerates malformed input (the validator reports what is wrong with the migrated copy)."""
    out = copy.deepcopy(raw)
    if not isinstance(out, dict) or out.get("schema_version") not in ("1.0", "1.1"):
        return out
    if isinstance(out.get("protocol"), dict):
        out["protocol"]["metrics"] = {"name": "knowbench", "fixes": list(LEGACY_FIXES)}
    if out["schema_version"] == "1.1":
        out["schema_version"] = SCHEMA_VERSION
        return out
    if isinstance(out.get("editor"), dict):
        out["editor"]["kind"] = "weights"
    task = out.get("task")
    if isinstance(task, dict) and isinstance(task.get("kind"), str) and task["kind"] in STANDARD_FAMILIES:
        task["metric_family"] = STANDARD_FAMILIES[task["kind"]].model_dump()
    if isinstance(out.get("environment"), dict):
        out["environment"]["torch_threads"] = None
    if isinstance(out.get("diagnostics"), dict):
        out["diagnostics"]["kind"] = "weights"
    out["schema_version"] = SCHEMA_VERSION
    return out


def metric_family(result: Mapping[str, Any]) -> MetricFamily | None:
    """The metric family of a result dict of any version read (1.0: the standard family of its kind)."""
    task = result.get("task") or {}
    fam = task.get("metric_family")
    if isinstance(fam, MetricFamily):
        return fam
    if isinstance(fam, dict):
        return MetricFamily.model_validate(fam)
    return STANDARD_FAMILIES.get(task.get("kind"))


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a result file of version ``SCHEMA_VERSION``."""
    schema = Result.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


# -- command line ------------------------------------------------------------------------------------
def add_schema(sub: Any) -> None:
    p = sub.add_parser(
        "schema",
        help="print the JSON Schema of result files",
        description=f"Print the JSON Schema of a result file (schema {SCHEMA_VERSION}) to stdout. Files of schema "
        f"1.0 are migrated on read; `knowbench validate` also checks what a schema cannot say (hashes, ranges, "
        "metric directions).",
    )
    p.add_argument("--indent", type=int, default=2, help="JSON indentation (default 2)")
    p.set_defaults(func=cmd_schema)


def cmd_schema(args: Any) -> int:
    print(json.dumps(json_schema(), indent=getattr(args, "indent", 2), ensure_ascii=False))
    return 0
