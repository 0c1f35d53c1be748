"""The embedded synthetic fact world and the small model that knows it.

``generate(seed)`` builds the world (fictional people, places, organisations, products, awards
and their relations, aliases and 2-hop chains); ``write_tasks(world, out_dir)`` writes the six
KnowEdit tasks from it under KnowEdit's file names; ``render_corpus`` renders the training text;
``build(out_dir, seed, steps)`` trains the tokenizer and the GPT-2-architecture model on it. The
shipped copies live in ``data/`` (``data/model``, ``data/tasks``, ``data/build_info.json``) and are
what ``knowbench run`` uses when no ``--model`` / ``--data`` is given.

Importing this package is cheap: torch / transformers are imported only by the functions that
train or load a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .corpus import render_corpus
from .tasks import TASK_FILES, TaskSizes, build_tasks, write_tasks
from .world import World, WorldSizes, generate

DATA_DIR = Path(__file__).parent / "data"
MODEL_DIR = DATA_DIR / "model"
TASKS_DIR = DATA_DIR / "tasks"
BUILD_INFO = DATA_DIR / "build_info.json"
DEFAULT_SEED = 0
SIZES_DIR = DATA_DIR / "sizes"  # the model-size family: sizes/<size>/model, sizes/<size>/build_info.json


def size_dir(size: str) -> Path:
    """Where ``knowbench world build --size SIZE`` writes, and ``--model embedded-SIZE`` reads."""
    return SIZES_DIR / size

# task names and KnowEdit's spellings of them -> canonical task name
_TASK_ALIASES = {
    "zsre": "zsre",
    "wiki_recent": "wiki_recent",
    "wikidata_recent": "wiki_recent",
    "recent": "wiki_recent",
    "counterfact": "counterfact",
    "wikidata_counterfact": "counterfact",
    "wikibio": "wikibio",
    "convsent": "convsent",
    "sanitation": "sanitation",
}


def fact_file() -> Path:
    """The world's file of plain pre-edit facts the model was trained on (its CounterFact-style
    task file), which the superposition study analyses by default."""
    return default_task_file("counterfact")


def default_task_file(task_name: str) -> Path:
    """The shipped world file of a task (zsre, wiki_recent, counterfact, wikibio, convsent,
    sanitation; KnowEdit's spellings accepted)."""
    key = _TASK_ALIASES.get(task_name.strip().lower().replace("-", "_"))
    if key is None:
        raise KeyError(f"the embedded world has no task {task_name!r}; it has {', '.join(TASK_FILES)}")
    path = TASKS_DIR / TASK_FILES[key]
    if not path.exists():
        raise FileNotFoundError(
            f"embedded task file {path} is missing; recreate it with `knowbench world build` "
            f"(or only the data: `knowbench world tasks`)"
        )
    return path


def build(out_dir: str | Path = DATA_DIR, seed: int = DEFAULT_SEED, steps: int | None = None, **kwargs: Any) -> dict:
    """Train the world model and write model, tasks and build info under ``out_dir``."""
    from .train import build as _build

    return _build(out_dir, seed=seed, steps=steps, **kwargs)


def world_main(argv: list[str] | None = None) -> int:
    from .cli import world_main as _main

    return _main(argv)


__all__ = [
    "BUILD_INFO", "DATA_DIR", "SIZES_DIR", "size_dir", "MODEL_DIR", "TASKS_DIR", "TASK_FILES", "TaskSizes", "World", "WorldSizes",
    "build", "build_tasks", "default_task_file", "generate", "render_corpus", "world_main", "write_tasks",
]
