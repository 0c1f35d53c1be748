"""GPU check (issue 17): edit timings at the references' scale and a model spread over devices.

Run by benchmarks/gpu_check.sh, one stage per process (each under its own ``timeout``):

    python benchmarks/gpu_check.py timings --dtype float32     ROME / MEMIT / AlphaEdit on a random
    python benchmarks/gpu_check.py timings --dtype bfloat16    GPT-2 XL-shaped model built on the GPU
    python benchmarks/gpu_check.py spread                      a ~100M model over cuda:0 + cpu
    python benchmarks/gpu_check.py report                      $OUT/gpu_timings.json and a table

Timings: a GPT-2 XL-shaped model (48 layers, width 1600, 25 heads, 1024 positions: the shape the
references publish numbers for, e.g. ROME's) with random weights and the embedded world's tokenizer
and vocabulary (1500 tokens, so the LM head is small; everything edited has GPT-2 XL's shapes:
W of 1600 x 6400, C of 6400 x 6400), the reference hyper-parameters of editors/hparams/*-gpt2-xl.yaml
(matched by model type and depth), C from ``GPU_CHECK_SAMPLES`` texts of the embedded world's corpus
(its time is reported apart: the references spend minutes to hours on 100 000 Wikipedia texts),
then a warm-up edit and ``GPU_CHECK_EDITS`` single edits per editor (each restored), and one batch
of ``GPU_CHECK_BATCH`` edits for MEMIT and AlphaEdit. AlphaEdit's null-space threshold is set to the
median eigenvalue of C (a random model's spectrum says nothing of the reference's 2e-2): r = d/2.

Spread: a 12-layer, width-768 GPT-2 (~85M parameters) saved to a folder and loaded with
``load_model(folder, device="auto", max_memory=...)`` so that the lower blocks sit on cuda:0 and the
upper ones on the CPU; then one edit per weight editor at layers on each side (MEMIT / AlphaEdit
across the boundary), each checked to change exactly its weights, on their own device, finitely,
and to restore exactly; ROME's update is compared with the same edit on the model on one device.

Environment: OUT (default /tmp/gpu_check_out), GPU_CHECK_DEVICE (cuda; cpu for a dry run),
GPU_CHECK_SMALL=1 (4 layers, width 128: a dry run on a CPU), GPU_CHECK_PARTS (where stages leave
their JSON for ``report``), GPU_CHECK_EDITS, GPU_CHECK_BATCH, GPU_CHECK_SAMPLES.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
SMALL = os.environ.get("GPU_CHECK_SMALL", "0") == "1"
PARTS = Path(os.environ.get("GPU_CHECK_PARTS", Path(tempfile.gettempdir()) / "gpu_check_parts"))
OUT = Path(os.environ.get("OUT", Path(tempfile.gettempdir()) / "gpu_check_out"))
N_EDITS = int(os.environ.get("GPU_CHECK_EDITS", "2" if SMALL else "3"))
BATCH = int(os.environ.get("GPU_CHECK_BATCH", "4" if SMALL else "10"))
SAMPLES = int(os.environ.get("GPU_CHECK_SAMPLES", "300" if SMALL else "2000"))

XL = dict(n_layer=48, n_embd=1600, n_head=25)  # GPT-2 XL
TINY = dict(n_layer=4, n_embd=128, n_head=4)
SPREAD = dict(n_layer=4, n_embd=128, n_head=4) if SMALL else dict(n_layer=12, n_embd=768, n_head=12)


def now() -> float:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def world() -> tuple[Any, list[str], list[Any]]:
    """The embedded world's tokenizer, its corpus (C's text) and edit requests from its ZsRE test set."""
    from transformers import AutoTokenizer

    from knowbench import defaults
    from knowbench.editor import EditRequest
    from knowbench.models import prepare_tokenizer
    from knowbench.world import DATA_DIR, MODEL_DIR

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    prepare_tokenizer(tok)
    texts = list(defaults.stats_options("embedded").corpus)
    records = json.loads((DATA_DIR / "tasks" / "ZsRE-test-all.json").read_text())
    reqs = [EditRequest(r["prompt"], r["target_new"], subject=r["subject"], record_index=i)
            for i, r in enumerate(records[:64]) if r["subject"] in r["prompt"]]
    return tok, texts, reqs


def gpt2(tok: Any, shape: dict, device: str, dtype: torch.dtype, seed: int = 0) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(tok), n_positions=1024, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: seconds on a GPU, not minutes on a CPU
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype).eval()


def context(texts: list[str], cache: Path, name: str, samples: int = SAMPLES) -> Any:
    from knowbench.editor import RunContext, StatsOptions

    return RunContext(seed=0, cache_dir=cache, model_name=name,
                      stats=StatsOptions(corpus=texts, corpus_name="knowbench-world", samples=samples, progress=False))


def save(part: str, data: dict) -> None:
    PARTS.mkdir(parents=True, exist_ok=True)
    (PARTS / f"{part}.json").write_text(json.dumps(data, indent=1, default=str))


def cuda_info() -> dict[str, Any]:
    if not DEVICE.startswith("cuda"):
        return {"device": "cpu"}
    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "max_memory_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


# -- timings -----------------------------------------------------------------------------------
def timings(dtype_name: str) -> None:
    from knowbench.editors.alphaedit import AlphaEdit
    from knowbench.editors.memit import MEMIT
    from knowbench.editors.rome import ROME
    from knowbench.models import parse_dtype

    dtype = parse_dtype(dtype_name)
    tok, texts, reqs = world()
    shape = TINY if SMALL else XL
    name = "random-gpt2-small-4l" if SMALL else "random-gpt2-xl-shaped"
    t0 = now()
    model = gpt2(tok, shape, DEVICE, dtype)
    build_s = now() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {name} ({n_params / 1e9:.2f}B parameters, {dtype_name}) on {DEVICE} in {build_s:.1f}s", flush=True)
    cache = Path(tempfile.mkdtemp(prefix="kb-stats-"))
    result: dict[str, Any] = {"model": name, "shape": shape, "vocab": len(tok), "n_params": n_params,
                              "dtype": dtype_name, "device": DEVICE, "build_s": round(build_s, 2),
                              "stats_samples": SAMPLES, "editors": {}}
    part = f"timings_{dtype_name}"
    for cls in (ROME, MEMIT, AlphaEdit):
        row: dict[str, Any] = {}
        result["editors"][cls.name] = row
        try:
            hp = cls.default_hparams(model, name)
            ed = cls(model, tok, hp, context(texts, cache, name))
            row["layers"] = ed.layers
            t0 = now()
            ed._compute_stats()  # C of every layer, factorised (on the CPU in float64), then moved
            row["C_s"] = round(now() - t0, 2)
            row["C_cached"] = all(s.cached for s in ed._stats.values())
            row["C_tokens"] = next(iter(ed._stats.values())).count
            if cls is AlphaEdit:
                evals = ed.stat(ed.layers[0]).eigh()[0]
                ed.hparams.nullspace_threshold = float(evals.median())
            t0 = now()
            ed.setup()  # context prefixes (and AlphaEdit's eigendecompositions)
            row["setup_s"] = round(now() - t0, 2)
            if cls is AlphaEdit:
                row["nullspace_dims"] = {str(l): int(ed.basis(l).shape[1]) for l in ed.layers}
            t0 = now()
            ed.apply([reqs[0]])  # warm-up: kernels, caches, allocator
            row["warmup_s"] = round(now() - t0, 2)
            ed.restore()
            edits = []
            for req in reqs[1 : 1 + N_EDITS]:
                t0 = now()
                out = ed.apply([req])
                dt = now() - t0
                ok = all(bool(torch.isfinite(ed.adapter.rewrite_weight(l)).all()) for l in ed.layers)
                edit = {"s": round(dt, 3), "finite": ok}
                e = out.info["edits"][0]  # the δ optimisation: steps taken, target NLL before / after
                edit.update(steps=e["steps"], nll=[e["nll_init"], e["nll_final"]])
                edits.append(edit)
                ed.restore()
                print(f"  {cls.name} {dtype_name}: edit {req.record_index} {dt:.2f}s", flush=True)
            row["edits"] = edits
            row["edit_s_mean"] = round(sum(e["s"] for e in edits) / max(1, len(edits)), 3)
            if cls is not ROME:
                batch = reqs[1 + N_EDITS : 1 + N_EDITS + BATCH]
                t0 = now()
                ed.apply(batch)
                row[f"batch{len(batch)}_s"] = round(now() - t0, 3)
                ed.restore()
            row["ok"] = all(e["finite"] for e in edits)
        except Exception as exc:  # noqa: BLE001 - one editor's failure is a finding, not the end
            row["ok"] = False
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()[-3000:]
            print(row["traceback"], file=sys.stderr, flush=True)
        finally:
            row["info"] = cuda_info()
            save(part, result)  # what finished so far survives a timeout
        print(f"{cls.name} {dtype_name}: {json.dumps({k: v for k, v in row.items() if k not in ('traceback', 'edits')})}",
              flush=True)


# -- a model spread over devices -----------------------------------------------------------------
def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _check_edit(model, before: dict[str, torch.Tensor], expect: list[str]) -> dict[str, Any]:
    """Which parameters changed (name -> device), all finite; ``expect`` must be among them."""
    changed = {n: str(p.device) for n, p in model.named_parameters()
               if n in before and not torch.equal(p.detach(), before[n])}
    added = {n: str(p.device) for n, p in model.named_parameters() if n not in before}  # adapters
    finite = all(bool(torch.isfinite(p).all()) for n, p in model.named_parameters() if n in changed or n in added)
    missing = [n for n in expect if n not in changed]
    return {"changed": changed, "added": added, "finite": finite, "missing": missing}


def spread() -> None:
    from knowbench.devices import device_summary, input_device, module_device
    from knowbench.editor import RunContext
    from knowbench.editors.alphaedit import AlphaEdit
    from knowbench.editors.ft import FTM, FTHparams
    from knowbench.editors.grace import GRACE, GRACEHparams
    from knowbench.editors.lora import LoRA
    from knowbench.editors.memit import MEMIT
    from knowbench.editors.rome import ROME
    from knowbench.editors.ultraedit import UltraEdit, UltraEditHparams
    from knowbench.editors.wise import WISE, WISEHparams
    from knowbench.models import load_model

    tok, texts, reqs = world()
    folder = Path(tempfile.mkdtemp(prefix="kb-spread-")) / "model"
    src = gpt2(tok, SPREAD, "cpu", torch.float32, seed=1)
    src.save_pretrained(folder)
    tok.save_pretrained(folder)
    block = sum(p.numel() for p in src.transformer.h[0].parameters()) * 4
    emb = (src.transformer.wte.weight.numel() + src.transformer.wpe.weight.numel()) * 4
    gpu = DEVICE.startswith("cuda")
    # cuda:0 gets room for the embeddings and about half the blocks, the CPU the rest
    max_memory = {0: int(emb + (SPREAD["n_layer"] / 2 + 1) * block), "cpu": 32 * 2**30} if gpu else None
    t0 = time.perf_counter()
    lm = load_model(str(folder), "float32", device="auto", max_memory=max_memory)
    model = lm.model
    if not gpu:  # a dry run: every block on the CPU, but with accelerate's hooks as a spread model has
        from knowbench.models import dispatch

        dispatch(model, {**{f"transformer.{m}": "cpu" for m in ("wte", "wpe", "drop", "ln_f")},
                         **{f"transformer.h.{i}": "cpu" for i in range(model.config.n_layer)}, "lm_head": "cpu"},
                 force_hooks=True)
    n = model.config.n_layer
    where = {i: module_device(model, f"transformer.h.{i}") for i in range(n)}
    on_gpu = [i for i, d in where.items() if d.type == "cuda"]
    on_cpu = [i for i, d in where.items() if d.type == "cpu"]
    result: dict[str, Any] = {
        "model": f"gpt2 {SPREAD}", "load_s": round(time.perf_counter() - t0, 2), "max_memory": max_memory,
        "hf_device_map": {k: str(v) for k, v in model.hf_device_map.items()}, "summary": device_summary(model),
        "input_device": str(input_device(model)), "blocks_on_gpu": on_gpu, "blocks_on_cpu": on_cpu,
        "split": bool(on_gpu and on_cpu), "edits": {},
    }
    print(f"spread: {result['summary']}; blocks on GPU {on_gpu}, on CPU {on_cpu}", flush=True)
    save("spread", result)
    if gpu and not result["split"]:
        print("spread: the device map did not split the blocks; the edits below run on one device", flush=True)
    # a layer on each side of the boundary (both the same on one device)
    g, c = (on_gpu[-1], on_cpu[0]) if result["split"] else (1, 2)
    cache = Path(tempfile.mkdtemp(prefix="kb-spread-stats-"))
    name = "kb-spread"
    quick = dict(v_num_grad_steps=5)
    mlp = lambda i: f"transformer.h.{i}.mlp.c_proj.weight"  # noqa: E731

    def locate(cls, layers, **kw):
        hp = dataclasses.replace(cls.default_hparams(model, name), layers=layers, **quick, **kw)
        return cls(model, tok, hp, context(texts, cache, name, samples=SAMPLES))

    runs: list[tuple[str, Callable[[], Any], list[Any], list[str]]] = [
        ("rome@gpu", lambda: locate(ROME, [g]), [reqs[0]], [mlp(g)]),
        ("rome@cpu", lambda: locate(ROME, [c]), [reqs[0]], [mlp(c)]),
        ("memit@gpu+cpu", lambda: locate(MEMIT, [g, c]), reqs[:3], [mlp(g), mlp(c)]),
        ("alphaedit@gpu+cpu", lambda: locate(AlphaEdit, [g, c], nullspace_threshold=1e9), reqs[:3], [mlp(g), mlp(c)]),
        ("ft-m@cpu", lambda: FTM(model, tok, FTHparams(layer=c, num_steps=3, lr=1e-3), RunContext()), [reqs[0]], [mlp(c)]),
        ("ultraedit@gpu+cpu", lambda: UltraEdit(model, tok, UltraEditHparams(inner_params=[mlp(g), mlp(c)]), RunContext()),
         reqs[:3], [mlp(g), mlp(c)]),
        ("grace@cpu", lambda: GRACE(model, tok, GRACEHparams(layer=c, n_iter=5), RunContext(seed=0)), [reqs[0]], []),
        ("wise@cpu", lambda: WISE(model, tok, WISEHparams(layer=c, n_iter=5, prefix_starts=["I"], prefix_lengths=[3]),
                                  RunContext(seed=0)), [reqs[0]], []),
        ("lora", lambda: LoRA(model, tok, dataclasses.replace(LoRA.default_hparams(model, name), num_steps=3),
                              RunContext(seed=0)), [reqs[0]], []),
    ]
    ids = torch.tensor([tok(reqs[0].prompt)["input_ids"]], device=input_device(model))
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits.float().cpu()
    for label, build, batch, expect in runs:
        row: dict[str, Any] = {}
        result["edits"][label] = row
        try:
            before = _weights(model)
            ed = build()
            t0 = now()
            ed.apply(batch)
            row["s"] = round(now() - t0, 3)
            row.update(_check_edit(model, before, expect))
            with torch.no_grad():
                logits = model(input_ids=ids).logits.float().cpu()
            row["output_changed"] = not torch.equal(logits, base_logits)
            row["output_finite"] = bool(torch.isfinite(logits).all())
            if label == "rome@cpu" or label == "rome@gpu":
                row["delta_w"] = ed.last[0].delta_w.detach().cpu()
            ed.restore()
            row["restored"] = all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
            with torch.no_grad():
                row["restored_output"] = torch.equal(model(input_ids=ids).logits.float().cpu(), base_logits)
            expect_devices = {mlp(l): str(where[l]) for l in (g, c)}
            row["on_own_device"] = all(row["changed"].get(p) == expect_devices.get(p, row["changed"].get(p))
                                       for p in expect)
            row["ok"] = (not row["missing"] and row["finite"] and row["output_changed"] and row["output_finite"]
                         and row["restored"] and row["restored_output"] and row["on_own_device"])
        except Exception as exc:  # noqa: BLE001
            row["ok"] = False
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()[-3000:]
            print(row["traceback"], file=sys.stderr, flush=True)
        print(f"spread {label}: ok={row.get('ok')} {row.get('error', '')} "
              f"changed={row.get('changed')}", flush=True)
        save("spread", {**result, "edits": {k: {kk: vv for kk, vv in v.items() if kk != "delta_w"}
                                              for k, v in result["edits"].items()}})
    # the same ROME edit on the model on one device: the spread must not change the update
    try:
        single = load_model(str(folder), "float32", device=DEVICE if gpu else "cpu").model
        for label, layer in (("rome@gpu", g), ("rome@cpu", c)):
            spread_dw = result["edits"][label].get("delta_w")
            if spread_dw is None:
                continue
            hp = dataclasses.replace(ROME.default_hparams(single, name), layers=[layer], **quick)
            ed = ROME(single, tok, hp, context(texts, cache, name, samples=SAMPLES))
            ed.apply([reqs[0]])
            ref = ed.last[0].delta_w.detach().cpu()
            rel = float((spread_dw - ref).norm() / ref.norm())
            result["edits"][label]["rel_diff_vs_one_device"] = round(rel, 6)
            result["edits"][label]["ok"] = bool(result["edits"][label]["ok"] and rel < 5e-2)
            print(f"spread {label}: ΔW relative difference to the one-device edit {rel:.2e}", flush=True)
            ed.restore()
    except Exception as exc:  # noqa: BLE001
        result["one_device_error"] = f"{type(exc).__name__}: {exc}"
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    for row in result["edits"].values():
        row.pop("delta_w", None)
    result["info"] = cuda_info()
    save("spread", result)


# -- report ---------------------------------------------------------------------------------------
def report() -> None:
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(PARTS.glob("*.json"))} if PARTS.exists() else {}
    stages = (PARTS / "stages").read_text().splitlines() if (PARTS / "stages").exists() else []
    out = {"device": DEVICE, "small": SMALL, "stages": stages, **parts}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_timings.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    print("\nstages:", *stages, sep="\n  ")
    print(f"\n{'editor':<10} {'dtype':<9} {'C s':>7} {'setup s':>8} {'warm-up s':>9} {'edit s (mean)':>13} "
          f"{'batch s':>8}  ok")
    for key in ("timings_float32", "timings_bfloat16"):
        part = parts.get(key)
        if not part:
            continue
        for ed, row in part["editors"].items():
            batch = next((v for k, v in row.items() if k.startswith("batch")), "")
            print(f"{ed:<10} {part['dtype']:<9} {row.get('C_s', ''):>7} {row.get('setup_s', ''):>8} "
                  f"{row.get('warmup_s', ''):>9} {row.get('edit_s_mean', ''):>13} {batch:>8}  "
                  f"{row.get('ok')} {row.get('error', '')}")
    sp = parts.get("spread")
    if sp:
        print(f"\nspread ({sp.get('summary')}; GPU blocks {sp.get('blocks_on_gpu')}, CPU blocks {sp.get('blocks_on_cpu')})")
        for label, row in sp.get("edits", {}).items():
            extra = f" ΔW vs one device {row['rel_diff_vs_one_device']:.1e}" if "rel_diff_vs_one_device" in row else ""
            print(f"  {label:<20} ok={row.get('ok')} {row.get('s', '')}s{extra} {row.get('error', '')}")
    print(f"\nwritten {OUT / 'gpu_timings.json'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["timings", "spread", "report"])
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    if args.stage == "timings":
        timings(args.dtype)
    elif args.stage == "spread":
        spread()
    else:
        report()


if __name__ == "__main__":
    main()
