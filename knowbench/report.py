"""Terminal tables laid out like KnowEdit's: one row per metric, pre- and post-edit columns."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

DISPLAY = {
    "edit_succ": "Edit Succ.",
    "rephrase": "Rephrase",
    "portability": "Portability",
    "locality": "Locality",
    "fluency": "Fluency",
}
ORDER = ["edit_succ", "rephrase", "portability", "locality", "fluency"]


def metric_rows(pre: dict[str, Any], post: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(label, pre, post, n) rows: main metrics in KnowEdit's order, sub-keys indented below."""
    names = list(dict.fromkeys([*pre, *post]))
    rows = []
    for main in ORDER + sorted({n.split(".")[0] for n in names} - set(ORDER)):
        for name in [main] + sorted(n for n in names if n.startswith(main + ".")):
            if name not in pre and name not in post:
                continue
            label = DISPLAY.get(name, name) if "." not in name else "  " + name.split(".", 1)[1]
            if name == "locality" and not (post.get(name) or pre.get(name) or {}).get("higher_is_better", True):
                label += " (KL↓)"
            entry = post.get(name) or pre.get(name)
            rows.append((label, _fmt(pre.get(name)), _fmt(post.get(name)), str(entry["n"])))
    return rows


def _fmt(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    # divergences are small numbers; percentages read best with two decimals
    return f"{entry['value']:.2f}" if entry.get("higher_is_better", True) else f"{entry['value']:.4f}"


def result_table(result: dict[str, Any]) -> Table:
    p = result["protocol"]
    proto = p["name"] if p["name"] == "single" else f"{p['name']} T={p['n_edits']} ({p['eval_timing']})"
    if p["batch_size"] > 1:
        proto += f", batch {p['batch_size']}"
    title = (
        f"{result['editor']['name']} on {result['task']['knowedit_name']} · model {result['model']['id']} · {proto}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("Metric")
    table.add_column("Pre-edit", justify="right")
    table.add_column("Post-edit", justify="right")
    table.add_column("n", justify="right", style="dim")
    for row in metric_rows(result["metrics"]["pre"], result["metrics"]["post"]):
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
