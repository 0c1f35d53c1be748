"""Terminal tables laid out like KnowEdit's: one row per metric, pre- and post-edit columns."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from .schema import KNOWEDIT_COLUMNS, KNOWEDIT_METRICS, MetricFamily, MetricSpec, metric_family, protocol_key

DISPLAY = {name: spec.label for name, spec in KNOWEDIT_METRICS.items()}
ORDER = list(KNOWEDIT_COLUMNS)


def metric_rows(pre: dict[str, Any], post: dict[str, Any],
                family: MetricFamily | None = None) -> list[tuple[str, str, str, str]]:
    """(label, pre, post, n) rows: main metrics in KnowEdit's order, sub-keys indented below; labels
    and directions from the task's metric family (``knowbench.schema``)."""
    names = list(dict.fromkeys([*pre, *post]))
    rows = []
    for main in ORDER + sorted({n.split(".")[0] for n in names} - set(ORDER)):
        for name in [main] + sorted(n for n in names if n.startswith(main + ".")):
            if name not in pre and name not in post:
                continue
            entry = post.get(name) or pre.get(name)
            spec = (family.spec(name) if family else None) or KNOWEDIT_METRICS.get(name)
            label = (spec.label if spec else name) if "." not in name else "  " + name.split(".", 1)[1]
            if "." not in name and not entry.get("higher_is_better", True):
                label += " (KL↓)" if spec is not None and spec.unit == "kl" else " ↓"
            rows.append((label, _fmt(pre.get(name), spec), _fmt(post.get(name), spec), str(entry["n"])))
    return rows


def _fmt(entry: dict[str, Any] | None, spec: MetricSpec | None = None) -> str:
    if entry is None:
        return ""
    # divergences are small numbers; percentages read best with two decimals
    small = spec.unit == "kl" if spec is not None else not entry.get("higher_is_better", True)
    return f"{entry['value']:.4f}" if small else f"{entry['value']:.2f}"


def result_table(result: dict[str, Any]) -> Table:
    proto = protocol_key(result["protocol"])  # the spelling of leaderboard files and baseline cases
    title = (
        f"{result['editor']['name']} on {result['task']['knowedit_name']} · model {result['model']['id']} · {proto}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("Metric")
    table.add_column("Pre-edit", justify="right")
    table.add_column("Post-edit", justify="right")
    table.add_column("n", justify="right", style="dim")
    for row in metric_rows(result["metrics"]["pre"], result["metrics"]["post"], metric_family(result)):
        table.add_row(*row)
    return table


def curve_table(result: dict[str, Any]) -> Table | None:
    curve = result.get("curve") or []
    if not curve:
        return None
    keys = [k for k in ORDER if any(k in pt for pt in curve)]
    table = Table(title=f"Lifelong curve ({result['protocol']['curve_probes']} probe records)", title_justify="left")
    table.add_column("Edits", justify="right")
    for k in keys:
        table.add_column(DISPLAY[k], justify="right")
    for pt in curve:
        table.add_row(str(pt["edits"]), *[f"{pt[k]:.2f}" if k in pt else "" for k in keys])
    return table


def print_result(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(result_table(result))
    ct = curve_table(result)
    if ct is not None:
        console.print(ct)
    from .diagnostics import print_diagnostics

    print_diagnostics(result, console)
    t = result["timings"]
    console.print(
        f"[dim]{result['protocol']['n_edits']} edits · {t['edit_ms_per_edit']:.1f} ms/edit · "
        f"total {t['total_s']:.1f} s · peak RSS {t['peak_memory_mb']:.0f} MB[/dim]"
    )
