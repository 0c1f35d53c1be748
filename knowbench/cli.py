"""The ``knowbench`` command line.

Data (tables, result paths) goes to stdout; progress bars and logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

log = logging.getLogger("knowbench")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="edit a model on a task and evaluate it",
        description="Apply edits from a task's records to a model under a protocol (single, batch or "
        "sequential), evaluate KnowEdit's metrics before and after, and write a result JSON.",
    )
    p.add_argument("--editor", default=None, help="editor name (see `knowbench ls`), e.g. ft-m, rome (required "
                   "unless --resume)")
    p.add_argument("--task", default=None, help="task name or KnowEdit spelling: zsre, wiki_recent, "
                   "counterfact, wikibio, convsent, sanitation (see `knowbench ls`)")
    p.add_argument("--model", default=None, help="Hugging Face model id, local folder, or a built-in name "
                   "(embedded, smollm2-135m, random-gpt2, random-llama); default: the embedded world model")
    p.add_argument("--data", default=None, help="task data file, a folder holding KnowEdit's file for "
                   "this task, or a Hugging Face dataset id OWNER/NAME[@REVISION] (e.g. zjunlp/KnowEdit: the "
                   "task's file is fetched into the hub cache, HF_HUB_CACHE / HF_HOME; HF_HUB_OFFLINE=1 uses the "
                   "cache only); default: the embedded world's file for the task")
    p.add_argument("--limit", type=int, default=None, help="edit a seeded sample of N records (kept in "
                   "file order; the chosen indices are recorded in the result)")
    p.add_argument("--sequential", type=int, default=None, metavar="T", help="lifelong protocol: apply T "
                   "edits one after another without restoring the weights")
    p.add_argument("--eval-timing", choices=("each", "final", "both"), default="each", help="sequential "
                   "protocol: evaluate each edit right after it is applied (each), all edits on the final model "
                   "(final), or both from one stream of edits (both: two result files, --output FILE giving "
                   "FILE-each.json and FILE-final.json)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B", help="edits per update: without "
                   "--sequential this is the batch protocol; with it, T edits are applied B at a time")
    p.add_argument("--curve-every", type=int, default=None, metavar="K", help="sequential protocol: "
                   "evaluate a fixed probe subset every K edits (the lifelong curve; default T/20, 0 = off)")
    p.add_argument("--curve-probes", type=int, default=50, metavar="N", help="records in the curve's probe "
                   "subset (the first N edits; default 50)")
    p.add_argument("--stop-below", type=float, default=None, metavar="PCT", help="sequential protocol: stop "
                   "at the first curve point whose probe Edit Succ. is below PCT %% (the collapse point); the "
                   "edits made so far are scored and the result records protocol.stopped_at")
    p.add_argument("--seed", type=int, default=0, help="seed for data selection, sampling and editor "
                   "randomness (default 0)")
    p.add_argument("--output", default=None, help="result JSON path (default: results/<editor>_<task>_"
                   "<model>_<protocol>_s<seed>_<time>.json)")
    p.add_argument("--log-records", default=None, metavar="FILE", help="also write per-record scores "
                   "(JSON lines, each naming its record's index in the source file)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps, or auto (a Hugging Face / "
                   "local model spread over every GPU, then the CPU, with accelerate; built-in models go to "
                   "cuda:0, else the CPU) (default cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16, bfloat16 (default float32)")
    p.add_argument("--hparams", default=None, metavar="FILE", help="YAML/JSON file of editor "
                   "hyper-parameters overriding the defaults for this model")
    p.add_argument("--stats-corpus", default=None, metavar="PATH", help="text for the key statistics "
                   "C = E[kkᵀ] of locate-then-edit editors: a .txt/.json/.jsonl file or a folder of them")
    p.add_argument("--stats-source", default=None, choices=("auto", "corpus", "wikipedia", "wikitext", "model"),
                   help="where C's text comes from (default auto: --stats-corpus, the embedded world's corpus, "
                   "else the hub); 'model' samples text from the model itself (recorded in the result)")
    p.add_argument("--stats-samples", type=int, default=None, metavar="N", help="texts C is computed over")
    p.add_argument("--eval-batch-size", type=int, default=32, help="prompts per evaluation forward pass")
    p.add_argument("--train-data", default=None, metavar="FILE",
                   help="training split for trainable editors (default: the task's training file beside --data)")
    p.add_argument("--no-fluency", action="store_true", help="skip the generation-based fluency metric")
    p.add_argument("--metrics", default="knowedit", choices=("knowedit", "knowbench"),
                   help="metric protocol: knowedit (default: the reference's definitions, artefacts "
                   "included) or knowbench (every fix); see `knowbench metric-protocols`")
    p.add_argument("--metric-fix", action="append", default=[], metavar="FIX",
                   help="add one fix of a reference artefact to --metrics (repeatable), e.g. strip_whitespace")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the per-edit superposition diagnostics")
    from .study import add_run_arguments

    add_run_arguments(p)
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="K", help="write a checkpoint "
                   "(edited weights, the editor's state, scores so far, random states) every K edits and when "
                   "SIGINT / SIGTERM stops the run; removed once the result is written")
    p.add_argument("--checkpoint", default=None, metavar="FILE", help="where checkpoints go (default: --output "
                   "with .ckpt, else checkpoints/EDITOR_TASK_PROTOCOL_sSEED.ckpt)")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT", help="go on with the run that wrote "
                   "CHECKPOINT (its options are taken from it; --output may move the result); the metrics "
                   "equal those of the run done in one go")
    p.add_argument("--json", action="store_true", help="print the result JSON to stdout instead of the table")
    p.set_defaults(func=cmd_run)


def _curve_every(args: argparse.Namespace) -> int | None:
    """A sequential run draws its lifelong curve by default (20 points), so that a collapse shows."""
    if not args.sequential:
        return args.curve_every or None
    if args.curve_every is None:
        return max(1, args.sequential // 20)
    return args.curve_every or None


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import RunConfig, resume_all, run_all

    if args.resume:
        return _print_results(args, resume_all(args.resume, output=args.output), remove=args.resume)
    if not args.editor or not args.task:
        raise ValueError("knowbench run: --editor and --task are required (unless --resume CHECKPOINT)")
    cfg = RunConfig(
        editor=args.editor, task=args.task, model=args.model, data=args.data, limit=args.limit,
        sequential=args.sequential, eval_timing=args.eval_timing, batch_size=args.batch_size,
        seed=args.seed, output=args.output, device=args.device, dtype=args.dtype, hparams=args.hparams,
        eval_batch_size=args.eval_batch_size, fluency=not args.no_fluency, curve_every=_curve_every(args),
        curve_probes=args.curve_probes, log_records=args.log_records, diagnostics=not args.no_diagnostics,
        train_data=args.train_data, metrics=args.metrics, metric_fixes=list(args.metric_fix),
        checkpoint_every=args.checkpoint_every, checkpoint=args.checkpoint, stop_below=args.stop_below,
    )
    from .study import run_options

    cfg.extra["diagnostics"] = run_options(args.diagnostics_probes, args.diagnostics_max_probes)
    stats = {"corpus": args.stats_corpus, "source": args.stats_source, "samples": args.stats_samples}
    cfg.extra["stats"] = {k: v for k, v in stats.items() if v is not None}
    if not args.output:  # the default result folder must be writable too, before the run
        from .preflight import check_writable
        from .runner import RunError

        try:
            check_writable(Path("results") / "result.json", "--output")
        except RunError as exc:
            why = str(exc).split(": ", 1)[-1]
            raise RunError(f"--output not given, and its default folder results/ cannot be written: {why}; "
                           "pass --output FILE") from None
    from .runner import checkpoint_path

    remove = (cfg.checkpoint or str(checkpoint_path(cfg))) if cfg.checkpoint_every or cfg.checkpoint else None
    return _print_results(args, run_all(cfg), remove=remove)


def _print_results(args: argparse.Namespace, results: list[dict[str, Any]], remove: str | None = None) -> int:
    """Write the run's result file(s), print each, and remove the run's checkpoint (now finished)."""
    from rich.console import Console

    from .report import print_result
    from .runner import PROGRESS, write_results

    output = args.output or (results[0]["config"].get("output") if args.resume else None)
    log_records = args.log_records or (results[0]["config"].get("log_records") if args.resume else None)
    for out, result in write_results(results, output, log_records):
        PROGRESS.stage, PROGRESS.output = "written", str(out)
        if args.json:
            import json

            print(json.dumps(result, indent=1))
        else:
            print_result(result, Console())
        log.info("result written to %s", out)
    if remove and Path(remove).is_file():
        Path(remove).unlink()
        log.info("checkpoint %s removed (the run is finished)", remove)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a trainable editor (SERAC, MEND) on a task's training split",
        description="Train an editor that has a training phase on the task's training split and store it "
        "in the cache (keyed by editor, model, training data sha256, hyper-parameters and seed, with its "
        "provenance and validation curve), where `knowbench run` with the same options finds it. A killed "
        "training resumes from its last checkpoint when the same command is run again.",
    )
    p.add_argument("--editor", required=True, help="a trainable editor, e.g. mend, serac")
    p.add_argument("--task", required=True, help="task name (its training split is used)")
    p.add_argument("--model", default=None, help="model (default: the embedded world model)")
    p.add_argument("--data", default=None, help="the task's test file or folder, or a Hugging Face dataset "
                   "id OWNER/NAME[@REVISION] such as zjunlp/KnowEdit (the training split is looked for beside it, "
                   "in the same commit; default: the embedded world's)")
    p.add_argument("--train-data", default=None, metavar="FILE", help="the training split itself")
    p.add_argument("--hparams", default=None, metavar="FILE", help="YAML/JSON hyper-parameter overrides")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps, or auto (a Hugging Face / "
                   "local model spread over every GPU, then the CPU, with accelerate; built-in models go to "
                   "cuda:0, else the CPU) (default cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    p.add_argument("--force", action="store_true", help="train again even if a finished artefact exists")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    import json

    from .runner import RunConfig, train

    cfg = RunConfig(editor=args.editor, task=args.task, model=args.model, data=args.data, seed=args.seed,
                    device=args.device, dtype=args.dtype, hparams=args.hparams, train_data=args.train_data)
    meta = train(cfg, force=args.force)
    summary = {k: meta[k] for k in ("path", "key", "model", "train_data", "seed", "train_s", "reused") if k in meta}
    print(json.dumps(summary, indent=1))
    log.info("trained %s stored in %s; `knowbench run --editor %s --task %s ...` with the same options uses it",
             cfg.editor, meta["path"], cfg.editor, cfg.task)
    return 0


def _add_ls(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list installed tasks and editors with the distribution providing each",
                       description="List task and editor plugins found through entry points (no plugin is imported).")
    p.set_defaults(func=cmd_ls)


def cmd_ls(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import registry

    console = Console()
    for group, title in ((registry.TASK_GROUP, "Tasks"), (registry.EDITOR_GROUP, "Editors")):
        table = Table(title=title, title_justify="left")
        for col in ("name", "aliases", "provided by", "object"):
            table.add_column(col)
        for info, aliases in registry.group_aliases(registry.discover(group)):
            table.add_row(info.name, ", ".join(aliases), f"{info.dist} {info.dist_version}", info.value)
        console.print(table)
    return 0


def _add_world(sub: argparse._SubParsersAction) -> None:
    # every argument (--help included) goes to knowbench.world.cli, which has its own parser
    p = sub.add_parser("world", help="build or evaluate the embedded synthetic world and its model",
                       add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_world)


def cmd_world(args: argparse.Namespace) -> int:
    try:
        from .world.cli import world_main
    except ImportError as exc:
        raise SystemExit(f"knowbench world is not available in this installation: {exc}")
    try:
        return int(world_main(args.rest) or 0)
    except SystemExit as exc:  # its parser's --help (0) and usage errors (2)
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knowbench",
        description="knowbench: benchmark harness for knowledge editing (KnowEdit tasks, lifelong editing, "
        "superposition diagnostics).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (on stderr)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_train(sub)
    _add_ls(sub)
    _add_world(sub)
    from .knowedit_table import add_knowedit_table
    from .lifelong_table import add_lifelong_table
    from .leaderboard import add_leaderboard, add_submit
    from .metric_protocol import add_metric_protocols
    from .schema import add_schema
    from .sweep import add_sweep
    from .validate import add_validate
    from .verify import add_verify

    add_validate(sub)
    add_verify(sub)
    add_schema(sub)
    add_submit(sub)
    add_leaderboard(sub)
    add_metric_protocols(sub)
    add_knowedit_table(sub)
    add_lifelong_table(sub)
    add_sweep(sub)
    from .plots import add_plot
    from .study import add_superposition

    add_superposition(sub)
    add_plot(sub)
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the program was so that it ends the way Ctrl-C does."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.signame = signal.Signals(signum).name


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` while a command runs (main thread only)."""
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _raise_interrupted)
    except ValueError:  # not the main thread: leave the handlers alone
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupted_message(command: str | None, signame: str) -> str:
    """What a command cut short by ``signame`` finished and what it did not."""
    if command == "run":
        from .runner import PROGRESS

        return PROGRESS.interrupted(signame)
    return f"interrupted ({signame})"


def main(argv: Sequence[str] | None = None) -> int:
    from .progress import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    try:
        with _signals_interrupt():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        log.error("%s", interrupted_message(args.command, getattr(exc, "signame", "SIGINT")))
        return 128 + int(signum)
    except (LookupError, ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        if args.verbose > 1:
            raise
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
