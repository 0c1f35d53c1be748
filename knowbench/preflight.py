"""Everything about a run's options that can be checked before a model or a record is loaded.

Each failure is a :class:`~knowbench.runconfig.RunError` that names its option: a bad option costs
the user a second, not a model load or a run.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import protocols, registry
from .editor import Editor, load_hparams_file, override_hparams
from .metric_protocol import CORE_FIXES, MetricProtocol, MetricProtocolError
from .runconfig import RunConfig, RunError


@dataclass
class Preflight:
    """What :func:`preflight` checked and resolved: the protocol, the task and editor plugins (their
    canonical names in ``task_info.name`` / ``editor_info.name``) and the ``--hparams`` values."""

    protocol: Any
    task_info: registry.PluginInfo
    task: Any
    editor_info: registry.PluginInfo
    editor_cls: type[Editor]
    hparams: dict[str, Any] | None = None
    metrics: MetricProtocol = MetricProtocol()


def preflight(cfg: RunConfig) -> Preflight:
    """Everything about ``cfg`` that can be checked before a model or a record is loaded, each
    failure a :class:`RunError` naming its option: protocol options, ``--limit``, the task and
    editor names (case-insensitive, with "did you mean"), batch support, ``--device``, ``--dtype``,
    ``--hparams`` (every value against its field's type), ``--train-data``, ``--metrics`` and
    ``--metric-fix`` (against the fixes the task's metrics know), and whether ``--output`` /
    ``--log-records`` can be written."""
    try:
        protocol = protocols.from_options(
            sequential=cfg.sequential, batch_size=cfg.batch_size, eval_timing=cfg.eval_timing,
            curve_every=cfg.curve_every, curve_probes=cfg.curve_probes, stop_below=cfg.stop_below,
        )
    except ValueError as exc:
        raise RunError(str(exc)) from None
    _check_count(cfg.limit, "--limit N", allow_none=True)
    _check_count(cfg.eval_batch_size, "--eval-batch-size N")
    if cfg.curve_every is not None and (not isinstance(cfg.curve_every, int) or cfg.curve_every < 0):
        raise RunError(f"--curve-every K needs K >= 0 (0: no curve), got {cfg.curve_every!r}")
    if not isinstance(cfg.curve_probes, int) or isinstance(cfg.curve_probes, bool) or cfg.curve_probes < 0:
        raise RunError(f"--curve-probes N needs N >= 0, got {cfg.curve_probes!r}")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise RunError(f"--seed S needs an integer, got {cfg.seed!r}")
    if cfg.sequential and cfg.limit is not None and cfg.limit < cfg.sequential:
        raise RunError(f"--limit {cfg.limit} is smaller than --sequential {cfg.sequential}")
    try:
        task_info, task = registry.load_task(cfg.task)
    except registry.PluginError as exc:
        raise RunError(f"--task {cfg.task}: {exc}") from None
    try:
        editor_info, editor_cls = registry.load_editor(cfg.editor)
    except registry.PluginError as exc:
        raise RunError(f"--editor {cfg.editor}: {exc}") from None
    try:
        metrics = MetricProtocol.build(cfg.metrics, cfg.metric_fixes, (*CORE_FIXES, *task.family_class().fixes))
    except MetricProtocolError as exc:
        raise RunError(str(exc)) from None
    if protocol.batch_size > 1 and not editor_cls.supports_batch:
        raise RunError(f"editor {editor_info.name} edits one fact at a time; drop --batch-size")
    check_device(cfg.device)
    from .models import parse_dtype

    try:
        parse_dtype(cfg.dtype)
    except ValueError as exc:
        raise RunError(f"--dtype {cfg.dtype}: {exc}") from None
    values = None
    if cfg.hparams:
        source = f"--hparams {cfg.hparams}"
        try:
            values = load_hparams_file(cfg.hparams)
        except FileNotFoundError:
            raise RunError(f"{source}: no such file") from None
        except (ValueError, OSError) as exc:
            raise RunError(f"{source}: {exc}") from None
        try:
            override_hparams(editor_cls.hparams_cls(), values, source=source)
        except ValueError as exc:
            raise RunError(str(exc)) from None
    if cfg.train_data is not None and not Path(cfg.train_data).expanduser().is_file():
        raise RunError(f"--train-data {cfg.train_data}: no such file")
    if cfg.output is not None:
        check_writable(cfg.output, "--output")
    if cfg.log_records is not None:
        check_writable(cfg.log_records, "--log-records")
    return Preflight(protocol, task_info, task, editor_info, editor_cls, values, metrics)


def _check_count(value: Any, flag: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RunError(f"{flag} needs N >= 1, got {value!r}")


def check_device(device: str) -> None:
    """``--device`` names a device this machine has, or is ``auto`` (the model spread over the GPUs,
    then the CPU: :func:`knowbench.models.load_model`); a :class:`RunError` saying why not."""
    if str(device).lower() == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise RunError(f"--device {device}: not a torch device ({exc}); e.g. cpu, cuda, cuda:1, mps, auto") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {device}: this machine has no CUDA GPU (torch.cuda.is_available() is False)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise RunError(f"--device {device}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
        return
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RunError(f"--device {device}: this machine has no MPS (Apple GPU) device "
                           "(torch.backends.mps.is_available() is False)")
        return
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise RunError(f"--device {device}: no {dev.type} device is available on this machine")


def check_writable(path: str | Path, flag: str) -> None:
    """That a file can be written at ``path``: its folder exists or can be created, and a file can
    be created in it. Leaves nothing behind (folders it had to create are removed again)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise RunError(f"{flag} {path}: is a folder; give a file path")
    folder = p.parent
    missing: list[Path] = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RunError(f"{flag} {path}: {probe} is a file, not a folder")
    created: list[Path] = []
    try:
        for m in reversed(missing):
            m.mkdir()
            created.append(m)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".check", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise RunError(f"{flag} {path}: cannot write there ({why}: {exc.filename or folder})") from None
    finally:
        for m in reversed(created):
            try:
                m.rmdir()
            except OSError:
                pass
