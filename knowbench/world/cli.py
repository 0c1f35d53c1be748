"""``knowbench world ...``: rebuild the embedded world model and data, or measure what it knows.

    knowbench world build [--size S] [--out DIR] [--seed S] [--steps N] [--threads T] [--vocab-size V] [--n-inner M]
    knowbench world eval  [--model DIR] [--seed S] [--json]
    knowbench world tasks [--out DIR] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from . import DATA_DIR, DEFAULT_SEED
    from .train import SIZES, BuildConfig

    d = BuildConfig()
    p = argparse.ArgumentParser(prog="knowbench world", description="The embedded synthetic world and its model.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the tokenizer and model on the world; write model, tasks, build info")
    b.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: the package data, {DATA_DIR}, or its sizes/SIZE with --size)")
    b.add_argument("--seed", type=int, default=DEFAULT_SEED)
    b.add_argument("--steps", type=int, default=None, help=f"training steps (default {d.steps}, or the --size's)")
    b.add_argument("--threads", type=int, default=d.threads, help="torch threads (fixed, for reproducibility)")
    b.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help=f"BPE vocabulary (default {d.vocab_size}; 5000 makes most surnames one token)")
    b.add_argument("--n-inner", type=int, default=d.n_inner, help=f"MLP width (default {d.n_inner})")
    b.add_argument("--size", default=None, choices=list(SIZES), help="build a member of the model-size family "
                   "(width x0.25 … x2, depth 4, stage 1 only) into the package's data/sizes/SIZE, where "
                   "`--model embedded-SIZE` finds it; default: the shipped two-stage model")
    b.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="training matmuls: bfloat16 autocast or float32; auto: bf16 where the CPU has it natively")
    b.add_argument("--icl-steps", type=int, default=d.icl_steps,
                   help=f"stage 2 steps: in-context update documents with fact replay (default {d.icl_steps}; 0 skips it)")
    b.add_argument("--from-stage1", type=Path, default=None, metavar="MODEL_DIR",
                   help="skip stage 1: start stage 2 from this saved stage-1 model folder (its tokenizer included)")
    b.add_argument("--no-eval", action="store_true", help="skip measuring the accuracies after training")
    b.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="log the accuracy on a sample of facts every N steps")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    e = sub.add_parser("eval", help="teacher-forced accuracy of a world model on the facts the tasks rely on")
    e.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped model)")
    e.add_argument("--seed", type=int, default=None, help="world seed (default: the model's build seed)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    t = sub.add_parser("tasks", help="write only the six task files")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--seed", type=int, default=DEFAULT_SEED)
    return p


def world_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "build":
        return _build(args)
    if args.cmd == "eval":
        return _eval(args)
    from . import generate, write_tasks

    for task, path in write_tasks(generate(args.seed), args.out).items():
        print(f"{task:12s} {path}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from . import DATA_DIR, size_dir
    from .train import BuildConfig, build, sized

    bf16 = {"auto": None, "bf16": True, "fp32": False}[args.precision]
    cfg = BuildConfig(threads=args.threads, vocab_size=args.vocab_size, n_inner=args.n_inner, icl_steps=args.icl_steps,
                      bf16_autocast=bf16)
    if args.size:
        if args.from_stage1 is not None:
            print("knowbench world build: --size builds stage 1 only; --from-stage1 does not apply", file=sys.stderr)
            return 2
        cfg = sized(cfg, args.size)
    out = args.out or (size_dir(args.size) if args.size else DATA_DIR)
    info = build(out, seed=args.seed, steps=args.steps, config=cfg, progress=not args.quiet,
                 evaluate=not args.no_eval, eval_every=args.eval_every, from_stage1=args.from_stage1,
                 tasks=not args.size)
    print(f"built in {info['build_seconds']:.0f} s ({info['n_params']:,} parameters, final loss {info['final_loss']})")
    if "accuracy" in info:
        for g in ("known", "rephrase", "held_out", "reasoning_pre", "icl_copy", "icl_update", "icl_retain"):
            if g in info["accuracy"]:
                print(f"  {g:14s} {info['accuracy'][g]['accuracy']:6.2f}  (n={info['accuracy'][g]['n']})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import BUILD_INFO, DEFAULT_SEED, MODEL_DIR, generate
    from .evaluate import evaluate_world

    folder = args.model or MODEL_DIR
    if not (folder / "config.json").exists():
        print(f"knowbench world eval: no model in {folder} (build one with `knowbench world build`)", file=sys.stderr)
        return 2
    seed = args.seed
    info_file = folder.parent / "build_info.json" if args.model else BUILD_INFO
    if seed is None:
        seed = json.loads(info_file.read_text()).get("seed", DEFAULT_SEED) if info_file.exists() else DEFAULT_SEED
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    acc = evaluate_world(model, tok, generate(seed))
    if args.json:
        print(json.dumps(acc.as_dict(), indent=1))
    else:
        print(f"world seed {seed}, model {folder}: teacher-forced token accuracy (%)")
        print(acc.table())
    return 0
