"""The task interface: how a benchmark's records are found, loaded and which metrics apply.

A task plugin is an object registered under the ``knowbench.tasks`` entry-point group. Its
``kind`` tells the evaluator which metric family applies (DESIGN section 4):

* ``qa``: ZsRE, WikiData_counterfact, WikiData_recent — edit_succ, rephrase, portability,
  locality, fluency;
* ``wikibio``: edit_succ over the whole continuation, locality, fluency;
* ``convsent``: sentiment edit_succ and KL locality (``extra`` carries the replies);
* ``sanitation``: "I don't know." rate, greedy-answer locality over ``LoadReport.shared``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from .records import LoadReport

KINDS = ("qa", "wikibio", "convsent", "sanitation")


class DataNotFound(FileNotFoundError):
    pass


@dataclass
class Task:
    name: str
    kind: str
    version: str
    knowedit_name: str  # the name KnowEdit's tables use
    default_files: tuple[str, ...]  # file names to look for when --data is a directory
    reader: Callable[[Path], LoadReport]  # parses one file (any accepted format)
    description: str = ""
    metrics: tuple[str, ...] = field(default=())

    is_task: ClassVar[bool] = True

    def resolve(self, data: str | Path | None) -> Path:
        """The file to read: ``data`` itself, or this task's file inside a directory."""
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
        if not path.exists():
            raise DataNotFound(f"--data {path}: no such file or directory")
        return path

    def load(self, data: str | Path | None) -> LoadReport:
        return self.reader(self.resolve(data))
