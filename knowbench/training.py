"""Checkpoints for trainable editors: atomic writes, resume from the last one.

A trainable editor's ``train`` keeps everything it needs to continue (its networks' and optimiser's
state, the step, the validation curve so far, the RNG states) in one ``checkpoint.pt`` inside
``context.artefact_dir``, written every few steps with :func:`save_checkpoint`. When ``train`` is
called again on the same folder (``knowbench train`` after a kill), :func:`load_checkpoint` gives
that state back and training continues from the step it stopped at, with the same random stream.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the RNG states) to ``folder/checkpoint.pt`` atomically: a kill during
    the write leaves the previous checkpoint intact."""
    path = Path(folder) / CHECKPOINT
    tmp = path.with_suffix(".pt.tmp")
    torch.save({**state, "_rng": rng_state()}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(folder: str | Path) -> dict[str, Any] | None:
    """The last checkpoint in ``folder`` with the RNG states restored, or None when there is none."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_rng_state(state.pop("_rng"))
    return state


def drop_checkpoint(folder: str | Path) -> None:
    """Remove the checkpoint once the final artefact is stored (it is no longer needed)."""
    (Path(folder) / CHECKPOINT).unlink(missing_ok=True)
