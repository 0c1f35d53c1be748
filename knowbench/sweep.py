"""``knowbench sweep GRID.yaml`` (being built: the next commit fills it in)."""

from __future__ import annotations

import argparse


def add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a grid of editors x tasks x models x seeds x protocols (not built yet)")
    p.add_argument("grid")
    p.set_defaults(func=lambda args: 2)
