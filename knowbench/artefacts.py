"""Stored artefacts of trainable editors (SERAC, MEND, ...): found by what they were trained for.

An artefact lives in ``<cache>/editors/<editor>/<key>/`` where the key hashes the model, the
training split's sha256, the hyper-parameters' hash and the seed; ``knowbench.json`` beside the
editor's own files records them (and the editor's own metadata), so a result can name exactly
which trained editor it used.
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

log = logging.getLogger("knowbench")
META = "knowbench.json"


def artefact_key(editor: str, model: str, split_sha256: str, hparams_hash: str, seed: int) -> str:
    blob = json.dumps([editor, model, split_sha256, hparams_hash, seed]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def find_or_train(editor: Editor, name: str, model_name: str, hparams_hash: str, seed: int) -> dict[str, Any]:
    """Load the artefact that matches, or train one now and store it; returns its description."""
    split = editor.context.train_split
    if split is None:
        raise ValueError(f"editor {name} is trainable but the run has no training split")
    key = artefact_key(name, model_name, split.sha256, hparams_hash, seed)
    folder = editor.context.cache("editors", name, key)
    meta_path = folder / META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        log.info("%s: loading the trained editor %s", name, folder)
        editor.load_artefact(Artefact(folder, meta.get("editor", {})))
        return {**meta, "path": str(folder), "key": key, "reused": True}
    log.info("%s: no trained editor for this model, split and hparams; training on %s", name, split.path)
    t0 = time.perf_counter()
    editor.context.artefact_dir = folder
    artefact = _train(editor, folder)
    meta = {
        "editor": artefact.meta, "model": model_name, "train_data": {"path": str(split.path), "sha256": split.sha256},
        "hparams_hash": hparams_hash, "seed": seed, "train_s": round(time.perf_counter() - t0, 3),
    }
    write_json_atomic(meta_path, meta)
    editor.load_artefact(Artefact(folder, artefact.meta))
    return {**meta, "path": str(folder), "key": key, "reused": False}


def _train(editor: Editor, folder: Path) -> Artefact:
    artefact = editor.train(editor.context.train_split)
    if Path(artefact.path).resolve() != folder.resolve():
        raise ValueError(f"editor {editor.name}: train() must store its artefact in context.artefact_dir "
                         f"({folder}), not {artefact.path}")
    return artefact
