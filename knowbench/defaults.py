"""What a run uses when the user names no model or data."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .task import Task

KNOWEDIT_HELP = (
    "Download KnowEdit (https://huggingface.co/datasets/zjunlp/KnowEdit) and pass a task file or "
    "the folder holding it with --data."
)


def default_data(task: "Task") -> Path:
    from .task import DataNotFound

    raise DataNotFound(f"task {task.name}: no --data given and no embedded data yet. {KNOWEDIT_HELP}")
