"""Editing protocols (DESIGN section 5) as small objects the runner drives.

* :class:`Single`      each edit on the original model, evaluated, weights restored exactly;
* :class:`Batch`       B edits in one update on the original model, evaluated, restored;
* :class:`Sequential`  T edits applied one after another (in updates of B) without restoring,
                       evaluated right after each update (``each``) or all on the final model
                       (``final``), or both from one stream (``both``: the runner writes one
                       result per timing); locality always against the unedited model.
                       ``curve_every`` adds a lifelong curve: a fixed probe subset evaluated every
                       k edits; ``stop_below`` ends the stream at the first curve point whose
                       probe Edit Succ. falls below it (the collapse point), the edits so far
                       scored and recorded (``protocol.stopped_at``).

A protocol says how the selected records are cut into applies, whether the model is restored
after each apply, when records are scored, and writes its block of the result
(``knowbench.schema.ProtocolInfo``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence


def _metrics_info(metrics: dict[str, Any] | None) -> Any:
    """The result's ``protocol.metrics``: the run's metric protocol, KnowEdit's when not given."""
    from .metric_protocol import MetricProtocol
    from .schema import MetricsInfo

    return MetricsInfo.model_validate(metrics or MetricProtocol().info())


@dataclass
class Single:
    name = "single"
    batch_size: int = 1
    accumulates = False  # the model is restored after every apply
    eval_timing = "each"
    curve_every: int | None = None
    curve_probes: int = 0

    def chunks(self, records: Sequence[Any]) -> list[Sequence[Any]]:
        b = self.batch_size
        return [records[i : i + b] for i in range(0, len(records), b)]

    @property
    def score_after_apply(self) -> bool:
        """Whether an apply's records are scored right after it."""
        return self.eval_timing in ("each", "both")

    @property
    def score_at_end(self) -> bool:
        """Whether all records are scored on the final model."""
        return self.eval_timing in ("final", "both")

    @property
    def timings(self) -> tuple[str, ...]:
        """The evaluation timings this protocol reports: one result each."""
        return ("each", "final") if self.eval_timing == "both" else (self.eval_timing,)

    def with_timing(self, timing: str) -> "Single":
        """This protocol as the result of one of its timings records it."""
        return dataclasses.replace(self, eval_timing=timing) if self.eval_timing != timing else self

    def n_wanted(self, limit: int | None) -> int | None:
        return limit

    def info(self, n_edits: int, seed: int, fluency: bool, n_curve_probes: int = 0,
             metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        from .schema import ProtocolInfo

        return ProtocolInfo(
            name=self.name, n_edits=n_edits, sequential=None, eval_timing=self.eval_timing,
            batch_size=self.batch_size, seed=seed, curve_every=None, curve_probes=0, fluency=fluency,
            metrics=_metrics_info(metrics),
        ).model_dump(exclude={"stop_below", "stopped_at"})


@dataclass
class Batch(Single):
    name = "batch"


@dataclass
class Sequential(Single):
    name = "sequential"
    accumulates = True
    n_edits: int = 1
    eval_timing: str = "each"  # type: ignore[misc]
    stop_below: float | None = None  # probe Edit Succ. (%) under which the stream stops

    def n_wanted(self, limit: int | None) -> int | None:
        return self.n_edits

    def info(self, n_edits: int, seed: int, fluency: bool, n_curve_probes: int = 0,
             metrics: dict[str, Any] | None = None, stopped_at: int | None = None) -> dict[str, Any]:
        from .schema import ProtocolInfo

        extra = {} if self.stop_below is None else {"stop_below": self.stop_below, "stopped_at": stopped_at}
        return ProtocolInfo(
            name=self.name, n_edits=n_edits, sequential=self.n_edits, eval_timing=self.eval_timing,
            batch_size=self.batch_size, seed=seed, curve_every=self.curve_every if n_curve_probes else None,
            curve_probes=n_curve_probes, fluency=fluency,
            metrics=_metrics_info(metrics), **extra,
        ).model_dump(exclude={k for k in ("stop_below", "stopped_at") if k not in extra})


def from_options(*, sequential: int | None, batch_size: int | None, eval_timing: str,
                 curve_every: int | None, curve_probes: int, stop_below: float | None = None) -> Single:
    """The protocol that run options name; bad options are a ValueError naming the flag."""
    if stop_below is not None:
        if not sequential or not curve_every or not curve_probes:
            raise ValueError("--stop-below needs --sequential T with a curve (--curve-every K > 0, --curve-probes N > 0)")
        if isinstance(stop_below, bool) or not isinstance(stop_below, (int, float)) or not 0 < stop_below <= 100:
            raise ValueError(f"--stop-below needs a percentage in (0, 100], got {stop_below!r}")
    if eval_timing not in ("each", "final", "both"):
        raise ValueError(f"--eval-timing must be 'each', 'final' or 'both', not {eval_timing!r}")
    if eval_timing == "both" and not sequential:
        raise ValueError("--eval-timing both needs --sequential T (single and batch edits are scored once)")
    if sequential is not None and sequential < 1:
        raise ValueError("--sequential T needs T >= 1")
    if batch_size is not None and batch_size < 1:
        raise ValueError("--batch-size B needs B >= 1")
    batch = batch_size or 1
    if sequential:
        return Sequential(batch_size=batch, curve_every=curve_every, curve_probes=curve_probes,
                          n_edits=sequential, eval_timing=eval_timing,
                          stop_below=None if stop_below is None else float(stop_below))
    return Batch(batch_size=batch) if batch > 1 else Single()
