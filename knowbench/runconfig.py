"""A run's options (what ``knowbench run`` takes) and the error a run that cannot go on raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunConfig:
    editor: str
    task: str
    model: str | None = None
    data: str | None = None
    limit: int | None = None
    sequential: int | None = None
    eval_timing: str = "each"
    batch_size: int | None = None  # edits per update; None: one
    seed: int = 0
    output: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    hparams: str | None = None
    eval_batch_size: int = 32
    fluency: bool = True
    curve_every: int | None = None
    curve_probes: int = 50
    log_records: str | None = None
    diagnostics: bool = True
    train_data: str | None = None  # a trainable editor's training split (default: beside --data)
    metrics: str = "knowedit"  # metric protocol preset: knowedit (the reference) | knowbench (every fix)
    metric_fixes: list[str] = field(default_factory=list)  # fixes added to the preset (--metric-fix)
    checkpoint_every: int | None = None  # write a checkpoint every K edits (and on SIGINT / SIGTERM)
    checkpoint: str | None = None  # where (default: the output's path with .ckpt)
    stop_below: float | None = None  # stop a sequential run once the curve's probe Edit Succ. (%) falls below this
    extra: dict[str, Any] = field(default_factory=dict)


class RunError(ValueError):
    """A run that cannot go on; the message names the option (``--limit``, ``--device``, ...) or
    the data at fault."""
