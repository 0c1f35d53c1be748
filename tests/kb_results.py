"""Synthetic, sealed result dicts shaped exactly like ``knowbench.runner.run()`` output
(``knowbench.schema.Result``, the current schema unless asked for the legacy 1.0 shape).

Validation and leaderboard tests build their inputs here instead of running models.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from knowbench.results import seal
from knowbench.schema import SCHEMA_VERSION, STANDARD_FAMILIES

DEFAULT_METRICS = {
    "qa": {
        "pre": {"edit_succ": 12.5, "rephrase": 11.0, "portability": 40.0, "portability.Reasoning": 40.0},
        "post": {"edit_succ": 97.25, "rephrase": 80.0, "portability": 45.5, "portability.Reasoning": 45.5,
                 "locality": 88.0, "locality.Relation_Specificity": 88.0, "fluency": 560.1},
    },
    "convsent": {"pre": {"edit_succ": 30.0}, "post": {"edit_succ": 71.0, "locality": 0.42, "fluency": 600.0}},
}


def _entry(name: str, value: float, n: int, kind: str) -> dict[str, Any]:
    spec = STANDARD_FAMILIES[kind].spec(name)
    return {"value": value, "n": n, "higher_is_better": spec.higher_is_better if spec else True}


def make_result(
    editor: str = "ft-m",
    task: str = "zsre",
    model: str = "embedded",
    protocol: str = "single",
    seed: int = 0,
    n_edits: int = 4,
    batch_size: int = 1,
    eval_timing: str = "each",
    kind: str = "qa",
    post: dict[str, float] | None = None,
    pre: dict[str, float] | None = None,
    fluency: bool = True,
    hparams: dict[str, Any] | None = None,
    knowedit_name: str | None = None,
    schema_version: str = SCHEMA_VERSION,
) -> dict[str, Any]:
    """A sealed result; ``post``/``pre`` map metric name -> value (absent names are not measured).
    ``schema_version="1.0"`` leaves out what 1.1 added (editor.kind, task.metric_family, ...)."""
    metrics = copy.deepcopy(DEFAULT_METRICS["convsent" if kind == "convsent" else "qa"])
    post = dict(metrics["post"] if post is None else post)
    pre = dict(metrics["pre"] if pre is None else pre)
    if not fluency:
        post.pop("fluency", None)
        pre.pop("fluency", None)
    hp = hparams if hparams is not None else {"layer": -1, "num_steps": 25, "lr": 0.0005}
    n_available = max(12, n_edits)
    indices = list(range(0, n_edits * 2, 2)) if n_edits * 2 <= n_available else list(range(n_edits))
    result: dict[str, Any] = {
        "schema_version": schema_version,
        "knowbench": {"version": "0.1.0", "git_commit": "a3f3942" + "0" * 33},
        "editor": {
            "name": editor, "distribution": "knowbench", "version": "0.1.0", "hparams": hp,
            "hparams_hash": hashlib.sha256(json.dumps(hp, sort_keys=True, default=str).encode()).hexdigest()[:16],
            "hparams_file": None, "kind": "weights", "artefact": None,
        },
        "model": {
            "id": model, "source": "builtin", "path": None, "revision": "seed0", "model_type": "gpt2",
            "dtype": "float32", "device": "cpu", "n_params": 123456, "default": model == "embedded",
        },
        "task": {
            "name": task, "knowedit_name": knowedit_name or {"zsre": "ZsRE", "convsent": "ConvSent"}.get(task, task),
            "kind": kind, "version": "1", "distribution": "knowbench", "format": f"knowedit-{task}",
            "data_files": [{"path": f"/data/{task}.json", "sha256": hashlib.sha256(task.encode()).hexdigest()}],
            "default_data": True, "n_records_in_file": n_available, "n_records_usable": n_available,
            "bad_records": [],
            "selection": {"method": "seeded-sample", "seed": seed, "n_available": n_available,
                          "n_selected": n_edits, "indices": indices},
            "metric_family": STANDARD_FAMILIES[kind].model_dump(),
        },
        "protocol": {
            "name": protocol, "n_edits": n_edits, "sequential": n_edits if protocol == "sequential" else None,
            "eval_timing": eval_timing if protocol == "sequential" else "each", "batch_size": batch_size,
            "seed": seed, "curve_every": None, "curve_probes": 0, "fluency": fluency,
            "metrics": {"name": "knowedit", "fixes": []},
        },
        "metrics": {
            "pre": {k: _entry(k, v, n_edits, kind) for k, v in pre.items()},
            "post": {k: _entry(k, v, n_edits, kind) for k, v in post.items()},
        },
        "curve": [],
        "edits": [{"records": [i], "seconds": 0.01, "changed_params": ["transformer.h.2.mlp.c_proj.weight"]}
                  for i in indices],
        "timings": {"load_model_s": 0.1, "pre_eval_s": 0.2, "edit_s": 0.04, "edit_ms_per_edit": 10.0,
                    "post_eval_s": 0.3, "total_s": 1.0, "peak_memory_mb": 500.0},
        "environment": {"python": "3.11.2", "platform": "Linux", "machine": "x86_64", "cpu_count": 2,
                        "torch_threads": 2,
                        "packages": {"torch": "2.13.0", "transformers": "5.23.0", "numpy": "2.0"}},
        "config": {"editor": editor, "task": task, "model": model, "seed": seed},
    }
    if schema_version == "1.0":
        for block, key in (("editor", "kind"), ("editor", "artefact"), ("task", "metric_family"),
                           ("environment", "torch_threads")):
            del result[block][key]
    return seal(result)


def reseal(result: dict[str, Any]) -> dict[str, Any]:
    """Re-seal after a deliberate, legitimate-looking edit (to test checks other than the hash)."""
    return seal(result)
