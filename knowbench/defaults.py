"""What a run uses when the user names no model or data: the embedded world and its model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .editor import StatsOptions
    from .models import LoadedModel
    from .task import Task

EMBEDDED_MODEL = "embedded"
KNOWEDIT_HELP = (
    "Download KnowEdit (https://huggingface.co/datasets/zjunlp/KnowEdit) and pass a task file or "
    "the folder holding it with --data."
)


def _world():
    try:
        from . import world

        return world if hasattr(world, "default_task_file") else None
    except ImportError:
        return None


def default_data(task: "Task") -> Path:
    from .task import DataNotFound

    world = _world()
    if world is None:
        raise DataNotFound(f"task {task.name}: no --data given and no embedded data installed. {KNOWEDIT_HELP}")
    return world.default_task_file(task.name)


def default_model() -> str:
    from .models import BUILTIN_MODELS

    if EMBEDDED_MODEL not in BUILTIN_MODELS:
        raise RuntimeError(
            "no --model given and the embedded model is not installed; pass --model with a Hugging "
            "Face id or local folder (or random-gpt2 for a smoke test)"
        )
    return EMBEDDED_MODEL


def is_world_model(model_name: str) -> bool:
    """``embedded`` or a member of its size family (``embedded-x0.5`` ...): trained on the world's corpus."""
    return model_name == EMBEDDED_MODEL or model_name.startswith(EMBEDDED_MODEL + "-")


def stats_options(model_name: str, lm: "LoadedModel | None" = None) -> "StatsOptions":
    """Where the key statistics C = E[kkᵀ] come from by default: the embedded model's own training
    text for the embedded model, else nothing named (each editor's ``mom2_dataset``). The runner
    applies ``--stats-corpus / --stats-source / --stats-samples`` on top."""
    from .editor import StatsOptions

    world = _world()
    if is_world_model(model_name) and world is not None:
        # the embedded model's own training text: its key statistics come from what it was trained on
        return StatsOptions(
            corpus=world.render_corpus(world.generate(world.DEFAULT_SEED), world.DEFAULT_SEED),
            corpus_name=f"knowbench-world-s{world.DEFAULT_SEED}",
        )
    return StatsOptions()
