"""Run checkpoints: what a killed run needs to go on (``knowbench run --checkpoint-every K``,
``knowbench run --resume CHECKPOINT``).

A checkpoint is written after an apply, between two edits, never inside one. It holds

    header   the run's RunConfig, the selected record indices, the hyper-parameter hash, the
             model's fingerprint, how far the run got                           (JSON, first line)
    body     the live objects of the edit loop — the (edited) model, the editor, the observer,
             the scores, edits and curve so far — and the Python / NumPy / torch random states
                                                                                (pickle)

The body is one pickle of the object graph, so whatever an editor keeps (a codebook, side
memories, running statistics, adapters it wrapped the model in, the originals it restores from)
travels without each editor describing its state. What a fresh start of the same run rebuilds
exactly is pickled as a reference, not by value:

    the tokenizer, the evaluator, the editor's RunContext     -> the resumed run's own
    every parameter / buffer of the loaded model that no edit   -> the freshly loaded model's tensor
    changed (its fingerprint still equals the loaded one's)        of that name

    every tensor the editor and the observer   -> the resumed run's tensor at the same place
    held before the first edit (C, its factor,    (their set-up is deterministic; a fingerprint
    probe keys), unchanged since                   per tensor checks it on resume)

so a checkpoint of a large model holds the edited weights and what the edits changed of the editor's
state, not the model or the statistics the editor prepared.
``resume`` rebuilds the run up to its first edit (records, model, editor set-up, the unedited
reference and pre-edit scores: deterministic), loads the body against it and continues the loop at
the next apply with the random states it stopped with, so the metrics equal those of the run done
in one go.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("knowbench")

FORMAT = "knowbench-checkpoint/1"
_CHUNK = 1 << 24  # elements per reduction when fingerprinting a tensor (bounds the temporary)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to the run resumed from it."""


def fingerprint(t: torch.Tensor) -> tuple[float, float, float]:
    """(Σx, Σx², Σx·cos(i)) of a tensor in float64: any edit of its values moves it (a permutation
    moves the last), and it is computed where the tensor lives, without a copy to the host."""
    flat = t.detach().reshape(-1)
    s1 = s2 = s3 = 0.0
    for a in range(0, flat.numel(), _CHUNK):
        x = flat[a: a + _CHUNK].double()
        w = torch.arange(a, a + x.numel(), device=x.device, dtype=torch.float64).cos_()
        s1 += float(x.sum())
        s2 += float((x * x).sum())
        s3 += float((x * w).sum())
    return (s1, s2, s3)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (shared tensors once, under their first name)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


@dataclass
class Loaded:
    """The unedited model's tensors and their fingerprints, taken right after it was loaded."""

    tensors: dict[str, torch.Tensor]
    prints: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: torch.nn.Module) -> "Loaded":
        tensors = model_tensors(model)
        return cls(tensors, {n: fingerprint(t) for n, t in tensors.items()})

    def model_print(self) -> str:
        import hashlib

        blob = json.dumps(sorted((n, list(p)) for n, p in self.prints.items())).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class _Pickler(pickle.Pickler):
    def __init__(self, f: Any, refs: dict[int, Any], loaded: Loaded, changed: set[str],
                 setup: "SetupTensors | None" = None):
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.refs = refs
        self.by_id = {id(t): n for n, t in loaded.tensors.items()}
        self.loaded, self.changed, self.setup = loaded, changed, setup
        self.n_ref = self.n_value = 0

    def persistent_id(self, obj: Any) -> Any:
        ref = self.refs.get(id(obj))
        if ref is not None:
            return ("obj", ref)
        if isinstance(obj, torch.Tensor):
            name = self.by_id.get(id(obj))
            if name is not None and name not in self.changed and fingerprint(obj) == self.loaded.prints[name]:
                self.n_ref += 1
                return ("tensor", name)
            i = self.setup.index.get(id(obj)) if self.setup is not None else None
            if i is not None and fingerprint(obj) == self.setup.prints[i]:
                self.n_ref += 1
                return ("setup", i)
            self.n_value += 1
        return None


class _Sink:
    """A file that keeps nothing (a pickling pass run for what it visits)."""

    def write(self, b: Any) -> int:
        return len(b)


class _Collector(_Pickler):
    """Visits an object graph as pickling does, listing its tensors (not the model's) in order."""

    def __init__(self, refs: dict[int, Any], loaded: Loaded):
        super().__init__(_Sink(), refs, loaded, set())
        self.found: list[torch.Tensor] = []
        self.seen: set[int] = set()

    def persistent_id(self, obj: Any) -> Any:
        pid = super().persistent_id(obj)
        if pid is None and isinstance(obj, torch.Tensor) and id(obj) not in self.seen:
            self.seen.add(id(obj))
            self.found.append(obj)
        return pid


@dataclass
class SetupTensors:
    """The tensors an editor and an observer hold before the first edit (key statistics, their
    factors, probe keys), in the order pickling visits them: a deterministic set-up rebuilds the same
    list on resume, so a checkpoint names them by position instead of storing them."""

    tensors: list[torch.Tensor]
    prints: list[tuple[float, float, float]]
    index: dict[int, int]

    @classmethod
    def of(cls, objs: Any, refs: dict[str, Any], loaded: Loaded) -> "SetupTensors":
        c = _Collector({id(o): name for name, o in refs.items()}, loaded)
        try:
            c.dump(objs)
        except Exception as exc:  # noqa: BLE001 - unpicklable state: the checkpoint write says so
            log.debug("checkpoint: set-up tensors not collected (%s)", exc)
            c.found = []
        prints = [fingerprint(t) for t in c.found]
        return cls(c.found, prints, {id(t): i for i, t in enumerate(c.found)})


class _Unpickler(pickle.Unpickler):
    def __init__(self, f: Any, objs: dict[str, Any], loaded: Loaded, setup: SetupTensors | None = None):
        super().__init__(f)
        self.objs, self.loaded, self.setup = objs, loaded, setup

    def persistent_load(self, pid: Any) -> Any:
        kind, key = pid
        if kind == "obj":
            if key not in self.objs:
                raise CheckpointError(f"the checkpoint refers to {key!r}, which the resumed run does not have")
            return self.objs[key]
        if kind == "tensor":
            if key not in self.loaded.tensors:
                raise CheckpointError(f"the checkpoint refers to the model's {key}, which the loaded model has not")
            return self.loaded.tensors[key]
        if kind == "setup":
            if self.setup is None or key >= len(self.setup.tensors):
                raise CheckpointError(f"the checkpoint refers to set-up tensor {key}, which the resumed run has not")
            return self.setup.tensors[key]
        raise CheckpointError(f"unknown reference {pid!r} in the checkpoint")


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(path: str | Path, header: dict[str, Any], body: dict[str, Any], refs: dict[str, Any],
         loaded: Loaded, changed: set[str], setup: SetupTensors | None = None) -> dict[str, int]:
    """Write a checkpoint atomically (a temporary file beside it, then a rename): ``header`` as a
    JSON line, ``body`` pickled with the objects of ``refs`` (name -> object) and the loaded model's
    unchanged tensors as references. Returns how many tensors went by reference and by value."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    p = _Pickler(buf, {id(o): name for name, o in refs.items()}, loaded, changed, setup)
    try:
        p.dump(body)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"cannot checkpoint this run: part of its state cannot be pickled ({exc}); an editor that "
            "keeps such state (a lambda, an open file, a thread) must keep it picklable") from exc
    header = {**header, "setup_prints": [list(x) for x in setup.prints] if setup is not None else []}
    head = json.dumps({"format": FORMAT, **header}, default=str).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head + b"\n")
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"by_reference": p.n_ref, "by_value": p.n_value, "bytes": len(head) + 1 + buf.tell()}


def read_header(path: str | Path) -> dict[str, Any]:
    """The checkpoint's JSON header (the run's config and how far it got)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint")
    with open(path, "rb") as f:
        line = f.readline()
    try:
        head = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        head = None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise CheckpointError(f"--resume {path}: not a knowbench checkpoint (expected a {FORMAT} header)")
    return head


def load_body(path: str | Path, objs: dict[str, Any], loaded: Loaded, setup: SetupTensors | None = None) -> dict[str, Any]:
    """Unpickle the checkpoint's body against the resumed run's ``objs``, loaded model and set-up
    tensors (checked against the fingerprints the checkpoint recorded for them)."""
    with open(path, "rb") as f:
        head = json.loads(f.readline())
        want = [tuple(x) for x in head.get("setup_prints", [])]
        if want:
            have = setup.prints[: len(want)] if setup is not None else []
            if len(have) < len(want) or any(a != b for a, b in zip(want, have)):
                raise CheckpointError(f"--resume {path}: the editor's or the observer's set-up differs from that of "
                                      "the run that wrote the checkpoint")
        try:
            return _Unpickler(f, objs, loaded, setup).load()
        except CheckpointError:
            raise
        except Exception as exc:  # a truncated or foreign file
            raise CheckpointError(f"--resume {path}: the checkpoint cannot be read ({type(exc).__name__}: {exc})") from exc
