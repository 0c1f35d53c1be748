"""Figures: the superposition study (kurtosis vs layer, KDE of p, P heatmaps, angle histograms) and
a run's lifelong curves (metrics and interference against the number of edits).

matplotlib is an optional extra (``pip install 'knowbench[plots]'``) and is imported only here, only
when a figure is drawn, with the Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

PLOTS_HELP = "figures need matplotlib: pip install 'knowbench[plots]' (or pip install matplotlib)"


def require_matplotlib():
    """The pyplot module, or a clear error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(f"{PLOTS_HELP} ({exc})") from None
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _slug(name: str) -> str:
    return Path(str(name)).name.replace("/", "_") or "model"


def _params(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _pick_layers(layers: list[dict[str, Any]], k: int = 4) -> list[dict[str, Any]]:
    """Up to k layers spread over the depth (first, ..., last)."""
    if len(layers) <= k:
        return layers
    idx = sorted({round(i * (len(layers) - 1) / (k - 1)) for i in range(k)})
    return [layers[i] for i in idx]


# -- the study ------------------------------------------------------------------------------------
def scaling_figure(result: dict[str, Any], path: Path) -> Path:
    """The study's scaling law over a model family: kurtosis of p per layer against parameter count
    (left) and, where measured, each editor's lifelong collapse point against parameter count (right;
    an open marker at T is a model that survived all T edits)."""
    plt = require_matplotlib()
    models = sorted(result["models"], key=lambda m: m["model"]["n_params"] or 0)
    params = [m["model"]["n_params"] for m in models]
    with_collapse = any(m.get("collapse") for m in models)
    fig, axes = plt.subplots(1, 2 if with_collapse else 1, figsize=(11 if with_collapse else 6, 4), squeeze=False)
    ax = axes[0][0]
    layers = sorted({L["layer"] for m in models for L in m["layers"]})
    for layer in layers:
        ks = [next((L["kurtosis"] for L in m["layers"] if L["layer"] == layer), None) for m in models]
        ax.plot(params, [math.nan if k is None else k for k in ks], marker="o", label=f"layer {layer}")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("excess kurtosis of off-diagonal p")
    ax.set_title("superposition vs size (higher κ = weaker)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if with_collapse:
        ax = axes[0][1]
        editors = sorted({c["editor"] for m in models for c in m.get("collapse", [])})
        for e in editors:
            xs, ys, open_x, open_y = [], [], [], []
            for p, m in zip(params, models):
                c = next((c for c in m.get("collapse", []) if c["editor"] == e), None)
                if c is None or c.get("error"):
                    continue
                xs.append(p)
                ys.append(c["max_edits"] if c["survived"] else c["collapse_at"])
                if c["survived"]:
                    open_x.append(p)
                    open_y.append(c["max_edits"])
            line, = ax.plot(xs, ys, marker="o", label=e)
            if open_x:
                ax.plot(open_x, open_y, ls="none", marker="o", mfc="white", mec=line.get_color(), ms=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"edits until probe Edit Succ. < {models[0]['collapse'][0]['below']:g} %")
        ax.set_title("lifelong collapse point vs size")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def study_figures(result: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = require_matplotlib()
    import numpy as np

    out: list[Path] = []
    models = result["models"]
    n = result["data"]["n_used"]

    # kurtosis vs layer (one line per model: the scaling-law figure when several are given)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in models:
        ls = [L["layer"] for L in m["layers"]]
        ks = [L["kurtosis"] if L["kurtosis"] is not None else math.nan for L in m["layers"]]
        label = f"{m['model']['id']} ({_params(m['model']['n_params'])})"
        axes[0].plot(ls, ks, marker="o", ms=3, label=label)
        depth = max(1, m["model"]["n_layers"] - 1)
        axes[1].plot([l / depth for l in ls], ks, marker="o", ms=3, label=label)
    axes[0].set_xlabel("layer")
    axes[1].set_xlabel("relative depth (layer / (L − 1))")
    from matplotlib.ticker import ScalarFormatter

    all_k = [L["kurtosis"] for m in models for L in m["layers"] if L["kurtosis"] is not None]
    for ax in axes:
        ax.set_ylabel("excess kurtosis of off-diagonal p")
        if all_k and min(all_k) > 0:  # kurtosis spans decades across layers and models
            ax.set_yscale("log")
            for axis in (ax.yaxis,):
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(ScalarFormatter())
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Superposition kurtosis per layer ({n} facts; higher = weaker superposition)")
    out.append(_save(fig, out_dir / "kurtosis_by_layer.png"))
    if len(models) > 1:
        out.append(scaling_figure(result, out_dir / "scaling.png"))

    for m in models:
        slug = _slug(m["model"]["id"])
        layers = m["layers"]
        # KDE of off-diagonal p per layer
        fig, ax = plt.subplots(figsize=(7, 4))
        cmap = plt.get_cmap("viridis")
        for i, L in enumerate(layers):
            if L["kde"]["x"]:
                ax.plot(L["kde"]["x"], L["kde"]["density"], color=cmap(i / max(1, len(layers) - 1)),
                        lw=1, label=f"layer {L['layer']} (κ={L['kurtosis']:.1f})" if L["kurtosis"] is not None else None)
        ax.set_xlabel("p(k_i, k_j), i ≠ j")
        ax.set_ylabel("density (Gaussian KDE, Scott)")
        ax.set_yscale("log")
        peak = max((max(L["kde"]["density"]) for L in layers if L["kde"]["density"]), default=1.0)
        ax.set_ylim(1e-3, 2 * peak)
        if len(layers) <= 12:
            ax.legend(fontsize=7)
        ax.set_title(f"{m['model']['id']}: distribution of p per layer")
        out.append(_save(fig, out_dir / f"kde_{slug}.png"))

        # heatmaps of P (from the .npz), all analysed layers in a grid
        npz = Path(m["p_matrices"])
        if npz.exists():
            mats = np.load(npz)
            cols = min(6, len(layers))
            rows = math.ceil(len(layers) / cols)
            fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
            for ax in axes.ravel():
                ax.axis("off")
            for ax, L in zip(axes.ravel(), layers):
                P = mats[f"layer_{L['layer']}"]
                ax.imshow(P, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
                ax.set_title(f"layer {L['layer']}", fontsize=8)
            fig.suptitle(f"{m['model']['id']}: P[i, j] = p(k_i, k_j) ({n}×{n}; colour range ±1)")
            fig.tight_layout()
            out.append(_save(fig, out_dir / f"heatmaps_{slug}.png"))

        # whitened angle vs raw activation angle
        picks = _pick_layers(layers)
        fig, axes = plt.subplots(1, len(picks), figsize=(3.4 * len(picks), 3.2), squeeze=False)
        for ax, L in zip(axes[0], picks):
            for key, label, color in (("whitened_angle", "whitened", "C0"), ("raw_angle", "raw activation", "C3")):
                h = L[key]
                centers = [(a + b) / 2 for a, b in zip(h["bins_deg"][:-1], h["bins_deg"][1:])]
                ax.bar(centers, h["counts"], width=2.0, alpha=0.55, color=color, label=f"{label} ({h['mean_deg']:.0f}°)")
            ax.axvline(90, color="k", lw=0.6, ls=":")
            ax.set_xlim(0, 180)
            ax.set_title(f"layer {L['layer']}", fontsize=9)
            ax.set_xlabel("angle between keys (°)")
            ax.legend(fontsize=7)
        fig.suptitle(f"{m['model']['id']}: whitened-space angles vs raw activation angles")
        fig.tight_layout()
        out.append(_save(fig, out_dir / f"angles_{slug}.png"))
    return out


# -- lifelong curves of a run ---------------------------------------------------------------------
def result_figures(result: dict[str, Any], out: Path) -> list[Path]:
    """Metrics against edits (the run's lifelong curve) and interference against edits (per layer,
    observed and predicted, on probes and on earlier edits)."""
    plt = require_matplotlib()
    curve = result.get("curve") or []
    diag = (result.get("diagnostics") or {}).get("summary") or {}
    layers = diag.get("layers") or {}
    if not curve and not layers:
        raise ValueError("the result has neither a lifelong curve (run with --sequential T --curve-every K) "
                         "nor per-edit diagnostics to plot")
    panels = (1 if curve else 0) + (2 if layers else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4), squeeze=False)
    axes = list(axes[0])
    title = f"{result['editor']['name']} on {result['task']['name']} · {result['model']['id']} · {result['protocol']['name']}"
    if curve:
        ax = axes.pop(0)
        from .schema import KNOWEDIT_METRICS

        for key, label in ((name, spec.label) for name, spec in KNOWEDIT_METRICS.items()):
            pts = [(pt["edits"], pt[key]) for pt in curve if key in pt]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        ax.set_xlabel("edits applied")
        ax.set_ylabel("score (×100, probe subset)")
        ax.set_title("lifelong curve")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if layers:
        ax_p, ax_e = axes
        for i, (layer, info) in enumerate(layers.items()):
            s = info.get("series") or []
            if not str(layer).isdigit():  # several watched modules at one layer: "2 gate_proj"
                layer = f"{info.get('layer', '')} {str(info.get('module', layer)).rsplit('.', 1)[-1]}"
            x = [pt["n_edits"] for pt in s]
            color = f"C{i % 10}"
            for key, ax in (("observed", ax_p), ("predicted", ax_p), ("earlier_observed", ax_e), ("earlier_predicted", ax_e)):
                pts = [(a, pt[key]) for a, pt in zip(x, s) if pt.get(key) is not None]
                if not pts:
                    continue
                if "observed" in key:
                    ax.plot(*zip(*pts), "-", color=color, lw=1.4, label=f"layer {layer} observed")
                else:  # markers, so a prediction lying on the observation stays visible
                    ax.plot(*zip(*pts), "--x", color=color, lw=0.8, ms=5, alpha=0.8, label=f"layer {layer} predicted (closed form)")
        ax_p.set_title("interference on probe keys")
        ax_p.set_ylabel("mean ‖(W_t − W_0)k‖ / ‖W_0 k‖")
        ax_e.set_title("interference on earlier edits")
        ax_e.set_ylabel("mean ‖(W_t − W_j)k_j‖ / ‖W_j k_j‖")
        for ax in (ax_p, ax_e):
            ax.set_xlabel("edits applied")
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured\n(needs a sequential run)", ha="center", va="center",
                        transform=ax.transAxes, color="0.5")
    fig.suptitle(title, fontsize=10)
    return [_save(fig, out)]


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="draw a result's lifelong curves (metrics and interference against edits) as PNG",
        description="Plot a run's lifelong curve (metrics on the probe subset every K edits) and its "
        "superposition diagnostics (observed and predicted interference on probe keys and on earlier "
        "edits, per layer, against the number of edits). Needs matplotlib (pip install 'knowbench[plots]').",
    )
    p.add_argument("result", help="a result JSON written by knowbench run")
    p.add_argument("--out", default=None, metavar="PNG", help="output file (default: <result>_curves.png)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    path = Path(args.result)
    if not path.exists():
        raise FileNotFoundError(f"result file {path} does not exist")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not a JSON result file: {exc}") from None
    if not isinstance(result, dict) or "protocol" not in result or "editor" not in result:
        raise ValueError(f"{path} is not a knowbench result file (no 'protocol' / 'editor')")
    out = Path(args.out) if args.out else path.with_name(path.stem + "_curves.png")
    for f in result_figures(result, out):
        print(f)
    return 0
