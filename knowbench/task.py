"""The task contract: how a benchmark's records are found and loaded, and which metrics they are
scored with.

A task plugin is a :class:`Task` registered under the ``knowbench.tasks`` entry-point group. It
declares its **metric family**: a :class:`MetricFamily` subclass that knows which prompts each of
its metrics scores and how (DESIGN section 4), built on the evaluator's primitives (teacher forcing,
continuation distributions, generation). The core only calls the family's hooks:

    ``spec``                  the metric names and directions (``knowbench.schema.MetricFamily``),
                              recorded in every result and used to validate and rank it;
    ``prepare(records)``      per-run set-up (e.g. how task-wide probes are shared out);
    ``reference(ev, records, rewrite)``   numbers from the unedited model that later scores compare
                              against (locality predictions, ConvSent's pre-edit log-probs);
    ``evaluate(ev, records, ref, rewrite, locality)``   per-record scores (fractions);
    ``fluency_prompt(record)`` the prompt fluency samples are generated from;
    ``probes(records)``       keys of original knowledge the diagnostics watch (one per locality item);
    ``edit_pairs(record)``    the (prompt, target) pairs that say whether an edit holds (retention).

A new kind of task is a new family in its plugin; nothing in the core changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from .records import EditRecord, KeyProbe, LoadReport

if TYPE_CHECKING:
    from .evaluation import EvalConfig, Evaluator, RecordScores, Rewrite


class DataNotFound(FileNotFoundError):
    pass


class MetricFamily(ABC):
    """How one kind of task is scored; one instance per run (it may keep per-run state)."""

    spec: ClassVar[Any]  # knowbench.schema.MetricFamily
    # deviations from the reference this family's metrics can make (knowbench.metric_protocol)
    fixes: ClassVar[tuple[Any, ...]] = ()

    def __init__(self, shared: dict[str, Any] | None, config: "EvalConfig"):
        self.shared = shared or {}
        self.cfg = config

    def prepare(self, records: Sequence[EditRecord]) -> None:
        """Per-run set-up on the selected records (called once, before the reference)."""

    @abstractmethod
    def reference(self, ev: "Evaluator", records: Sequence[EditRecord], rewrite: "Rewrite | None") -> Any: ...

    @abstractmethod
    def evaluate(
        self, ev: "Evaluator", records: Sequence[EditRecord], ref: Any, rewrite: "Rewrite | None", locality: bool
    ) -> list["RecordScores"]: ...

    def fluency_prompt(self, record: EditRecord) -> str:
        return record.prompt

    def probes(self, records: Sequence[EditRecord]) -> list[KeyProbe]:
        return []

    def edit_pairs(self, record: EditRecord) -> list[tuple[str, str]]:
        return [(record.prompt, record.target_new)]


@dataclass
class Task:
    name: str
    kind: str  # the metric family's name, recorded in results
    version: str
    knowedit_name: str  # the name KnowEdit's tables use
    default_files: tuple[str, ...]  # file names to look for when --data is a directory
    reader: Callable[[Path], LoadReport]  # parses one file (any accepted format)
    family: "str | type[MetricFamily]"  # the class, or "module:Class" imported on first use
    description: str = ""
    metrics: tuple[str, ...] = field(default=())
    train_files: tuple[str, ...] = ()  # the training split's file names, looked for beside the data

    is_task: ClassVar[bool] = True

    def resolve(self, data: str | Path | None) -> Path:
        """The file to read: ``data`` itself, this task's file inside a directory, or (``data`` no
        local path but ``owner/name[@revision]``) this task's file of that Hugging Face dataset,
        fetched into the hub's cache (:mod:`knowbench.hub`; e.g. ``zjunlp/KnowEdit``)."""
        if data is None:
            from . import defaults

            return defaults.default_data(self)
        path = Path(data).expanduser()
        if path.is_dir():
            for candidate in self.default_files:
                hit = next(iter(sorted(path.rglob(candidate))), None)
                if hit is not None:
                    return hit
            raise DataNotFound(
                f"no {self.knowedit_name} file in {path}: looked for "
                f"{', '.join(self.default_files)} (pass the file itself with --data FILE)"
            )
        if path.exists():
            return path
        from . import hub

        ref = hub.parse_hub_id(data)
        if ref is not None:  # a local path of that name would have won above
            try:
                return hub.resolve_file(ref, self.default_files, what=f"{self.knowedit_name} file").path
            except hub.HubDataNotFound as exc:
                if ref.repo_id.lower() == hub.KNOWEDIT_REPO.lower():
                    raise
                # perhaps a mistyped local path: say that it was read as a dataset id
                raise hub.HubDataNotFound(f"{exc} (--data {data} is no local file or folder either, so it "
                                          "was taken as a Hugging Face dataset id)") from None
        raise DataNotFound(f"--data {path}: no such file or directory")

    def resolve_train(self, train: str | Path | None, data_file: Path) -> Path:
        """The training split: ``train`` itself, else one of ``train_files`` in ``data_file``'s folder
        (for a file of a hub dataset: that folder of the same commit, fetched when not cached)."""
        if train is not None:
            path = Path(train).expanduser()
            if not path.is_file():
                raise DataNotFound(f"--train-data {path}: no such file")
            return path
        for candidate in self.train_files:
            hit = data_file.parent / candidate
            if hit.is_file():
                return hit
        looked = ", ".join(self.train_files) or "(the task names no training file)"
        from . import hub

        source = hub.parse_cache_path(data_file)
        if source is not None and self.train_files:
            ref = hub.HubRef(source["repo_id"], source["revision"])
            folder = source["path_in_repo"].rpartition("/")[0] or None
            return hub.resolve_file(ref, self.train_files, what=f"training split for task {self.name}",
                                    folder=folder, flag="--train-data").path
        raise DataNotFound(
            f"task {self.name}: no training split beside {data_file} (looked for {looked}); pass --train-data FILE"
        )

    def load(self, data: str | Path | None) -> LoadReport:
        return self.reader(self.resolve(data))

    def family_class(self) -> type[MetricFamily]:
        """The metric family class (imported now if the task names it as "module:Class")."""
        if isinstance(self.family, str):
            import importlib

            module, _, attr = self.family.partition(":")
            self.family = getattr(importlib.import_module(module), attr)
        return self.family


class TaskContractError(TypeError):
    """A task plugin that does not implement the contract; the message names the plugin."""


def check_task(obj: Any, plugin: str) -> Task:
    where = f"task plugin {plugin}"
    if not isinstance(obj, Task):
        raise TaskContractError(f"{where}: must be a knowbench.task.Task, got {type(obj).__name__}")
    try:
        fam = obj.family_class()
    except (ImportError, AttributeError, ValueError) as exc:
        raise TaskContractError(f"{where}: its metric family {obj.family!r} cannot be imported: {exc}") from exc
    if not (isinstance(fam, type) and issubclass(fam, MetricFamily)):
        raise TaskContractError(f"{where}: family must be a knowbench.task.MetricFamily subclass, got {fam!r}")
    import inspect

    if inspect.isabstract(fam):
        raise TaskContractError(f"{where}: metric family {fam.__name__} does not implement "
                                f"{', '.join(sorted(fam.__abstractmethods__))}")
    from .schema import MetricFamily as Spec

    if not isinstance(getattr(fam, "spec", None), Spec):
        raise TaskContractError(f"{where}: metric family {fam.__name__} declares no spec (a knowbench.schema.MetricFamily)")
    if not callable(obj.reader):
        raise TaskContractError(f"{where}: reader must be callable")
    return obj
