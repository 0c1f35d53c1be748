"""Stored artefacts of trainable editors (SERAC, MEND, ...): found by what they were trained for.

An artefact lives in ``<cache>/editors/<editor>/<key>/`` where the key hashes the model, the
training split's sha256, the hyper-parameters' hash and the seed; ``knowbench.json`` beside the
editor's own files records them (and the editor's own metadata: steps, validation curve, ...), so a
result can name exactly which trained editor it used. ``knowbench.json`` is written last: a folder
without it is a training in progress (or a killed one, which ``knowbench train`` resumes from the
checkpoint the editor left there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from .editor import Artefact, Editor
from .results import write_json_atomic
from .runconfig import RunError

log = logging.getLogger("knowbench")
META = "knowbench.json"


def artefact_key(editor: str, model: str, split_sha256: str, hparams_hash: str, seed: int) -> str:
    blob = json.dumps([editor, model, split_sha256, hparams_hash, seed]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _folder(editor: Editor, name: str, model_name: str, hparams_hash: str, seed: int) -> tuple[Path, str]:
    split = editor.context.train_split
    if split is None:
        raise ValueError(f"editor {name} is trainable but the run has no training split")
    key = artefact_key(name, model_name, split.sha256, hparams_hash, seed)
    return editor.context.cache("editors", name, key), key


def find_trained(editor: Editor, name: str, model_name: str, hparams_hash: str, seed: int,
                 train_command: str) -> dict[str, Any]:
    """Load the artefact that matches (model, training split, hparams, seed) and return its
    description; a RunError with the ``knowbench train`` command that makes it when there is none."""
    folder, key = _folder(editor, name, model_name, hparams_hash, seed)
    meta_path = folder / META
    if not meta_path.is_file():
        split = editor.context.train_split
        partial = " (a training was started there and not finished; the command resumes it)" \
            if any(folder.iterdir()) else ""
        raise RunError(
            f"editor {name} has no trained artefact for model {model_name}, training split {split.path} "
            f"(sha256 {split.sha256[:12]}), these hyper-parameters and seed {seed}{partial}; train it first:\n"
            f"  {train_command}"
        )
    meta = json.loads(meta_path.read_text())
    log.info("%s: loading the trained editor %s", name, folder)
    editor.load_artefact(Artefact(folder, meta.get("editor", {})))
    return {**meta, "path": str(folder), "key": key, "reused": True}


def train_and_store(editor: Editor, name: str, model_name: str, hparams_hash: str, seed: int,
                    force: bool = False) -> dict[str, Any]:
    """Train the editor (resuming a killed training from its checkpoint) and store the artefact;
    an artefact that is already complete is kept unless ``force``. Returns its description."""
    folder, key = _folder(editor, name, model_name, hparams_hash, seed)
    meta_path = folder / META
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        log.info("%s: already trained: %s (pass --force to train again)", name, folder)
        return {**meta, "path": str(folder), "key": key, "reused": True}
    if meta_path.is_file():
        meta_path.unlink()
        for stale in folder.iterdir():  # --force: start over, checkpoint included
            if stale.is_file():
                stale.unlink()
    split = editor.context.train_split
    log.info("%s: training on %s into %s", name, split.path, folder)
    t0 = time.perf_counter()
    editor.context.artefact_dir = folder
    artefact = editor.train(split)
    if Path(artefact.path).resolve() != folder.resolve():
        raise ValueError(f"editor {editor.name}: train() must store its artefact in context.artefact_dir "
                         f"({folder}), not {artefact.path}")
    meta = {
        "editor": artefact.meta, "model": model_name, "train_data": {"path": str(split.path), "sha256": split.sha256},
        "hparams_hash": hparams_hash, "seed": seed, "train_s": round(time.perf_counter() - t0, 3),
    }
    write_json_atomic(meta_path, meta)
    return {**meta, "path": str(folder), "key": key, "reused": False}
