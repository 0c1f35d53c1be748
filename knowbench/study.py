"""``knowbench superposition``: the "Knowledge in Superposition" analysis of a model (DESIGN 7).

For m known facts (subject s_i in a bare prompt), take the key k_i^l at the last subject token of
every layer l — one forward pass per fact (batched) with every rewrite module hooked, not m² —
and, with C^l = E[kkᵀ] of that layer,

    P^l[i, j] = p(k_i, k_j) = k_iᵀC⁻¹k_j / k_iᵀC⁻¹k_i          (the m×m superposition matrix)

The off-diagonal entries of P^l are the study's object: their excess (Fisher) kurtosis (biased,
scipy's default; higher = less superposition), a Gaussian KDE (Scott bandwidth), heatmaps, and the
whitened angle arccos(k_iᵀC⁻¹k_j / √(k_iᵀC⁻¹k_i k_jᵀC⁻¹k_j)) next to the raw activation angle
arccos(cos(k_i, k_j)). Expected: zero-mean, heavy-tailed, high-kurtosis p; whitened angles near
90°; kurtosis rising with model size within a family and higher in early layers. Several models
give the kurtosis-vs-layer figure of the scaling law.

Over a model family (several ``--model``, e.g. the embedded world's ``embedded-x0.25`` …
``embedded-x1``) the analysis gives the study's scaling law: kurtosis per layer against parameter
count. ``--collapse EDITOR`` adds, per model, the lifelong collapse point of that editor: a
sequential run (``knowbench run --sequential T --curve-every K --stop-below 50``) that stops at the
first curve point where the probe edits' Edit Succ. is below 50 %; the number of edits made then
is the collapse point (none: it survived T edits). Its result file is kept under ``collapse/`` and
reused when the study is run again with the same options.

Fact sources (:func:`read_facts`): the study's CounterFact format (``requested_rewrite`` with a
``{}`` prompt template, e.g. ``intersected_counterfact_known.json``, first m records in file order),
KnowEdit-style records (``subject`` + ``prompt``, WikiBio's ``concept`` + ``text``), plain
``{prompt, subject}`` lists, JSON or JSON lines; and the embedded world's facts (:func:`world_facts`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("knowbench")
# numpy, torch and the math module are imported where used: this module also builds CLI parsers,
# and `knowbench --help` should not wait for torch.

SCHEMA = "knowbench-superposition/1"


# -- facts ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    prompt: str  # the bare prompt, subject filled in
    subject: str
    answer: str | None = None
    index: int = -1  # position in the source file
    case_id: Any = None


@dataclass
class FactReport:
    path: str
    format: str
    n_raw: int
    bad: list[str] = field(default_factory=list)  # "record i: why", one per skipped record


def _load_json_records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as first:
        try:  # JSON lines
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise ValueError(f"{path}: neither JSON nor JSON lines ({first})") from None
    if isinstance(data, dict):
        for key in ("data", "records", "facts"):
            if isinstance(data.get(key), list):
                return data[key]
        raise ValueError(f"{path}: expected a list of records (or an object with a 'data' list)")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def _answer(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("str")
    while isinstance(v, list) and v:
        v = v[0]
    return v if isinstance(v, str) and v.strip() else None


def read_facts(path: str | Path) -> tuple[list[Fact], FactReport]:
    """Facts (prompt with its subject) from a file; records that cannot be used are listed in the
    report (record index and why), never silently dropped."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"fact file {path} does not exist")
    raw = _load_json_records(path)
    facts: list[Fact] = []
    bad: list[str] = []
    fmt = None
    for i, rec in enumerate(raw):
        if not isinstance(rec, dict):
            bad.append(f"record {i}: not an object ({type(rec).__name__})")
            continue
        if "requested_rewrite" in rec:
            fmt = fmt or "counterfact-requested_rewrite"
            rr = rec["requested_rewrite"]
            if not isinstance(rr, dict):
                bad.append(f"record {i}: requested_rewrite is not an object")
                continue
            tmpl, subj = rr.get("prompt"), rr.get("subject")
            if not isinstance(tmpl, str) or "{}" not in tmpl:
                bad.append(f"record {i}: requested_rewrite.prompt has no '{{}}' for the subject")
                continue
            if not isinstance(subj, str) or not subj.strip():
                bad.append(f"record {i}: requested_rewrite.subject is missing or blank")
                continue
            prompt = tmpl.replace("{}", subj, 1)
            facts.append(Fact(prompt, subj, _answer(rr.get("target_true")), i, rec.get("case_id")))
            continue
        subj = rec.get("subject", rec.get("concept"))
        prompt = rec.get("prompt", rec.get("text", rec.get("src")))
        if not isinstance(subj, str) or not subj.strip() or not isinstance(prompt, str) or not prompt.strip():
            bad.append(f"record {i}: needs a non-blank 'subject' and 'prompt' (or requested_rewrite)")
            continue
        fmt = fmt or ("knowedit" if "target_new" in rec or "concept" in rec else "prompt-subject")
        if "{}" in prompt and subj not in prompt:
            prompt = prompt.replace("{}", subj, 1)
        if subj not in prompt:
            bad.append(f"record {i}: subject {subj!r} does not occur in prompt {prompt!r}")
            continue
        facts.append(Fact(prompt, subj, _answer(rec.get("ground_truth")), i, rec.get("case_id")))
    report = FactReport(str(path), fmt or "unknown", len(raw), bad)
    if bad:
        log.warning("%s: %d of %d records skipped", path.name, len(bad), len(raw))
        for b in bad[:10]:
            log.warning("  %s", b)
    if not facts:
        raise ValueError(f"{path}: no usable facts (first problems: {'; '.join(bad[:3]) or 'empty file'})")
    return facts, report


def world_facts() -> tuple[list[Fact], FactReport]:
    """The embedded world's facts: its CounterFact-style task file (pre-edit facts the embedded
    model was trained on) when installed, else one fact per entity rendered from the default world
    with its first trained statement template, the kinds taken in turn (people, cities, ...)."""
    try:
        from . import world as W

        return read_facts(W.fact_file())
    except (ImportError, FileNotFoundError, LookupError, ValueError) as exc:
        log.info("embedded task file unavailable (%s); rendering facts from the world", exc)
    from .world import DEFAULT_SEED, generate
    from .world.templates import RELATIONS, fill
    from .world.world import KINDS

    w = generate(DEFAULT_SEED)
    per_kind: dict[str, list[Fact]] = {k: [] for k in KINDS}
    for f in w.facts():
        kind = w.get(f.subject).kind
        if per_kind[kind] and per_kind[kind][-1].subject == f.subject:
            continue  # one fact per entity
        rel = RELATIONS.get(f.relation)
        if rel is None or not rel.statements():
            continue
        prompt = fill(rel.statements()[0], f.subject)
        if f.subject in prompt:
            per_kind[kind].append(Fact(prompt, f.subject, f.object))
    facts: list[Fact] = []
    for i in range(max(len(v) for v in per_kind.values())):
        facts.extend(v[i] for v in per_kind.values() if i < len(v))
    facts = [Fact(f.prompt, f.subject, f.answer, i) for i, f in enumerate(facts)]
    return facts, FactReport(f"knowbench-world(seed {DEFAULT_SEED})", "world-facts", len(facts))


def pick_facts(facts: list[Fact], n: int, dedupe: bool = False) -> list[Fact]:
    """The first n facts in file order, as the study takes them (repeats included: record 83 of its
    knowledge set repeats record 21's subject, and the study analyses both). With ``dedupe``, only
    facts whose keys can differ: a causal model's key at the subject's last token depends only on the
    text up to it, so facts sharing that text are kept once and the next fact is taken instead."""
    if not dedupe:
        return facts[:n]
    seen: dict[str, int] = {}
    out = []
    for f in facts:
        key = f.prompt[: f.prompt.find(f.subject) + len(f.subject)]
        if key in seen:
            log.info("fact %d has the same key as fact %d (%r); taking the next one instead", f.index, seen[key], key)
            continue
        seen[key] = f.index
        out.append(f)
        if len(out) == n:
            break
    return out


# -- layers ---------------------------------------------------------------------------------------
def parse_layers(spec: str | Sequence[str] | None, n_layers: int) -> list[int]:
    """'all' (default), or comma-separated indices and ranges: '0,5,10-12', negatives from the end."""
    if spec is None:
        return list(range(n_layers))
    parts = [p for s in ([spec] if isinstance(spec, str) else spec) for p in str(s).split(",") if p.strip()]
    out: set[int] = set()
    for p in parts:
        p = p.strip()
        if p == "all":
            out.update(range(n_layers))
            continue
        try:
            if "-" in p[1:]:
                a, b = p[0] + p[1:].split("-", 1)[0], p[1:].split("-", 1)[1]
                lo, hi = int(a), int(b)
                out.update(range(lo % n_layers if lo < 0 else lo, (hi % n_layers if hi < 0 else hi) + 1))
            else:
                v = int(p)
                out.add(v % n_layers if v < 0 else v)
        except ValueError:
            raise ValueError(f"--layers: cannot read {p!r}; use e.g. 'all', '0,3,5-7' or '-1'") from None
    bad = sorted(v for v in out if not 0 <= v < n_layers)
    if bad:
        raise ValueError(f"--layers: {bad} out of range for a {n_layers}-layer model")
    return sorted(out)


# -- the analysis ---------------------------------------------------------------------------------
KDE_POINTS = 256
ANGLE_BIN_DEG = 2.0


def kde(values: Any, points: int = KDE_POINTS) -> dict[str, Any]:
    """Gaussian KDE (Scott bandwidth) on a grid spanning the values (±3 bandwidths)."""
    import numpy as np
    from scipy.stats import gaussian_kde

    from . import superposition as S

    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2 or np.ptp(x) == 0:
        return {"x": [], "density": [], "bandwidth": None}
    k = gaussian_kde(x, bw_method="scott")
    bw = float(np.sqrt(k.covariance[0, 0]))
    grid = np.linspace(x.min() - 3 * bw, x.max() + 3 * bw, points)
    return {"x": [S._r(v, 5) for v in grid], "density": [S._r(v, 5) for v in k(grid)], "bandwidth": S._r(bw)}


def _hist(angles: Any) -> dict[str, Any]:
    import numpy as np

    from . import superposition as S

    bins = np.arange(0.0, 180.0 + ANGLE_BIN_DEG / 2, ANGLE_BIN_DEG)
    counts, _ = np.histogram(angles, bins=bins)
    return {
        "mean_deg": S._r(angles.mean()), "std_deg": S._r(angles.std()),
        "median_deg": S._r(np.median(angles)),
        "bins_deg": [float(b) for b in bins], "counts": counts.tolist(),
    }


def layer_analysis(keys: Any, whitener: Any, facts: Sequence[Fact], top: int = 10) -> tuple[dict[str, Any], Any]:
    """The study's numbers for one layer (keys (m, d_in), a :class:`Whitener` of C) and its P
    matrix (float64 numpy, m×m)."""
    import numpy as np

    from . import superposition as S

    u = whitener.whiten(keys)
    P = S.p_from_whitened(u, u).cpu().numpy()
    off = S.offdiagonal(P)
    wcos = S.offdiagonal(S.cosine_from_whitened(u, u))
    rcos = S.offdiagonal(S.raw_cosine(keys))
    m = P.shape[0]
    # the most superposed pairs (largest |p| off the diagonal), with their subjects
    flat = np.abs(P.copy())
    np.fill_diagonal(flat, -1)
    order = np.argsort(flat, axis=None)[::-1][:top]
    pairs = []
    for o in order:
        i, j = divmod(int(o), m)
        pairs.append({"i": i, "j": j, "p": S._r(P[i, j]), "subject_i": facts[i].subject, "subject_j": facts[j].subject})
    info = {
        "kurtosis": S._r(S.excess_kurtosis(off)),
        "mean": S._r(off.mean()), "std": S._r(off.std()), "mean_abs": S._r(np.abs(off).mean()),
        "max_abs": S._r(np.abs(off).max()),
        "diag_max_error": S._r(np.abs(np.diag(P) - 1).max()),  # p(k, k) = 1
        "frac_abs_gt_0.5": S._r((np.abs(off) > 0.5).mean()),
        "kde": kde(off),
        "whitened_angle": _hist(S.angles_deg(wcos)),
        "raw_angle": _hist(S.angles_deg(rcos)),
        "raw_cosine_mean": S._r(rcos.mean()),
        "whitened_cosine_mean": S._r(wcos.mean()),
        "top_pairs": pairs,
    }
    if whitener.ridge:
        info["ridge"] = whitener.ridge
    return info, P


def _whitening(moment: Any, asked: float | None) -> dict[str, Any]:
    """How C of one layer was whitened: as it is, with the ridge asked for, or with the smallest
    ridge that made a C that is not positive definite factorisable (absolute, added to the diagonal)."""
    added = float(getattr(moment, "jitter", 0.0))
    if not added:
        return {"ridge": 0.0, "why": "none: C is positive definite"}
    if asked:
        return {"ridge": added, "why": f"asked: --ridge {asked} (× mean diag C)"}
    return {"ridge": added, "why": "C is not positive definite (Cholesky failed): the smallest ridge that works"}


@dataclass
class StudyConfig:
    n: int = 128
    layers: str | None = None
    batch_size: int = 16
    stats_source: str | None = None  # auto, corpus, wikipedia, wikitext, model
    stats_corpus: str | None = None
    stats_samples: int | None = None  # None: the editors' default (mom2_n_samples)
    stats_dtype: str | None = None  # None: the editors' default (mom2_dtype)
    ridge: float | None = None  # C + ridge·mean(diag C)·I; None: none, except where C is not positive definite
    dedupe: bool = False  # take the next fact instead of one whose key repeats an earlier one
    device: str = "cpu"
    dtype: str = "float32"
    # the lifelong collapse point per model (--collapse EDITOR ...): a stopped sequential run each
    collapse: list[str] = field(default_factory=list)
    collapse_task: str = "zsre"  # the lifelong literature's task
    collapse_max: int = 1000  # T: edits at most
    collapse_every: int = 10  # K: a curve point every K edits (the collapse point's resolution)
    collapse_probes: int = 20  # the first N edits are the probe edits the curve re-scores
    collapse_below: float = 50.0  # collapse: probe Edit Succ. (%) below this
    seed: int = 0


def collapse_point(model: str, editor: str, cfg: StudyConfig, out_dir: Path) -> dict[str, Any]:
    """Edits until ``editor``'s probe Edit Succ. on ``model`` falls below ``cfg.collapse_below``
    (the first curve point under it; None: it survived ``cfg.collapse_max`` edits), from a sequential
    run stopped there. The run's sealed result is ``out_dir/collapse/EDITOR_MODEL.json``; an existing
    one with the same options is read instead of run again."""
    from .runner import RunConfig, run_all, write_results

    path = out_dir / "collapse" / f"{editor}_{_slug(model)}.json"
    rc = RunConfig(editor=editor, task=cfg.collapse_task, model=model, sequential=cfg.collapse_max,
                   eval_timing="final", curve_every=cfg.collapse_every, curve_probes=cfg.collapse_probes,
                   stop_below=cfg.collapse_below, fluency=False, diagnostics=False, seed=cfg.seed,
                   device=cfg.device, dtype=cfg.dtype, output=str(path))
    result = None
    if path.is_file():
        old = json.loads(path.read_text())
        same = {k: old.get("config", {}).get(k) for k in ("editor", "task", "model", "sequential", "curve_every",
                                                           "curve_probes", "stop_below", "seed", "dtype")}
        if same == {k: getattr(rc, k) for k in same}:
            log.info("collapse: %s on %s read from %s", editor, model, path)
            result = old
    if result is None:
        log.info("collapse: %s on %s, up to %d edits (probe Edit Succ. < %g %% stops it)", editor, model,
                 cfg.collapse_max, cfg.collapse_below)
        ((_, result),) = write_results(run_all(rc), str(path))
    stopped = result["protocol"].get("stopped_at")
    return {
        "editor": result["editor"]["name"], "collapse_at": stopped, "survived": stopped is None,
        "max_edits": cfg.collapse_max, "below": cfg.collapse_below,
        "curve": [[c["edits"], c.get("edit_succ"), c.get("locality")] for c in result["curve"]],
        "edit_ms_per_edit": result["timings"]["edit_ms_per_edit"], "result": str(path),
    }


def _collapse_or_error(model: str, editor: str, cfg: StudyConfig, out_dir: Path) -> dict[str, Any]:
    """:func:`collapse_point`, or the reason it could not be measured (an editor that refuses the
    model, e.g. an empty null space): recorded, and the study goes on with the next one."""
    try:
        return collapse_point(model, editor, cfg, out_dir)
    except (ValueError, RuntimeError, FloatingPointError) as exc:
        log.error("collapse: %s on %s could not run: %s", editor, model, exc)
        return {"editor": editor, "collapse_at": None, "survived": False, "max_edits": cfg.collapse_max,
                "below": cfg.collapse_below, "error": f"{type(exc).__name__}: {exc}"}


def _slug(name: str) -> str:
    return Path(name).name.replace("/", "_") or "model"


def moments_for(model: Any, tok: Any, layers: list[int], model_name: str, lm: Any, cfg: StudyConfig) -> dict[int, Any]:
    """C of every analysed layer, computed (or loaded from the cache) with the configuration the
    locate-then-edit editors use by default — the run's corpus resolution, the reference sample
    count, dtype and max length, the same cache — so a run's editors and this analysis share one
    cached statistic per layer. C is whitened as it is unless ``cfg.ridge`` asks for a ridge; where it
    is not positive definite the smallest ridge that makes it so is added (recorded per layer)."""
    import dataclasses

    from . import defaults
    from .editor import StatsOptions
    from .stats import DEFAULT_DTYPE, key_statistics

    options = defaults.stats_options(model_name, lm) if lm is not None else StatsOptions()
    if cfg.stats_corpus:
        options = dataclasses.replace(options, corpus=cfg.stats_corpus, corpus_name=None)
    if cfg.stats_source:
        options = dataclasses.replace(options, source=cfg.stats_source)
    if cfg.stats_samples:
        options = dataclasses.replace(options, samples=cfg.stats_samples)
    stats = key_statistics(
        model, tok, layers, options, dtype=cfg.stats_dtype or DEFAULT_DTYPE,
        ridge=cfg.ridge or 0.0, model_name=model_name,
    )
    return {layer: stats[layer] for layer in layers}


def analyse_model(
    model: Any, tok: Any, facts: Sequence[Fact], layers: Sequence[int], moments: dict[int, Any],
    batch_size: int = 16,
) -> tuple[list[dict[str, Any]], dict[int, Any], float]:
    """Per-layer analysis of ``facts`` (one batched forward pass per fact, all layers hooked)."""
    from . import superposition as S
    from .arch import ArchAdapter
    from .diagnostics import capture_keys

    adapter = ArchAdapter(model)
    t0 = time.perf_counter()
    keys = capture_keys(model, tok, [(f.prompt, f.subject) for f in facts], layers, batch_size,
                        progress=f"keys of {len(facts)} facts, {len(layers)} layers")
    keys_s = time.perf_counter() - t0
    out, mats = [], {}
    for layer in layers:
        w = S.Whitener.from_any(moments[layer], name=f"C of layer {layer}")
        info, P = layer_analysis(keys[layer], w, facts)
        out.append({"layer": layer, "module": adapter.rewrite_name(layer), **info})
        mats[layer] = P
    return out, mats, keys_s


def run_study(models: Sequence[str], data: str | None, cfg: StudyConfig, out_dir: Path, plots: bool = True) -> dict[str, Any]:
    import numpy as np

    from .models import load_model

    if data:
        facts_all, rep = read_facts(data)
    else:
        facts_all, rep = world_facts()
    facts = pick_facts(facts_all, cfg.n, cfg.dedupe)
    if len(facts) < 2:
        raise ValueError(f"{rep.path}: need at least 2 distinct facts, found {len(facts)}")
    if len(facts) < cfg.n:
        log.warning("%s: only %d distinct facts, fewer than --n %d", rep.path, len(facts), cfg.n)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "data": {**asdict(rep), "n_used": len(facts), "indices": [f.index for f in facts],
                 "default": data is None},
        "config": asdict(cfg),
        "models": [],
    }
    from .defaults import is_world_model

    if data is None and not all(is_world_model(m) for m in models):
        log.warning("no --data: using the embedded world's invented facts, which a model other than the "
                    "embedded one does not know; pass --data (e.g. the study's CounterFact file)")
    for name in models:
        t0 = time.perf_counter()
        lm = load_model(name, dtype=cfg.dtype, device=cfg.device)
        from .arch import ArchAdapter

        n_layers = ArchAdapter(lm.model).n_layers
        layers = parse_layers(cfg.layers, n_layers)
        moms = moments_for(lm.model, lm.tokenizer, layers, name, lm, cfg)
        per_layer, mats, keys_s = analyse_model(lm.model, lm.tokenizer, facts, layers, moms, cfg.batch_size)
        slug = _slug(name)
        npz = out_dir / f"p_matrices_{slug}.npz"
        np.savez_compressed(npz, layers=np.array(layers), subjects=np.array([f.subject for f in facts]),
                            **{f"layer_{l}": m for l, m in mats.items()})
        stats_info = next(iter(moms.values())).provenance() if moms else {}
        for per_layer_key in ("layer", "module", "file", "cached"):
            stats_info.pop(per_layer_key, None)
        stats_info.pop("ridge", None)
        stats_info["whitening"] = {str(l): _whitening(m, cfg.ridge) for l, m in moms.items()}
        result["models"].append({
            "model": {"id": name, "source": lm.source, "revision": lm.revision,
                      "model_type": lm.model.config.model_type, "n_params": lm.n_params,
                      "n_layers": n_layers, "dtype": cfg.dtype},
            "statistics": stats_info,
            "layers": per_layer,
            "p_matrices": str(npz),
            "timings": {"keys_s": round(keys_s, 3), "total_s": round(time.perf_counter() - t0, 3),
                        "forward_passes": len(facts)},
        })
        del lm
        if cfg.collapse:
            result["models"][-1]["collapse"] = [_collapse_or_error(name, e, cfg, out_dir) for e in cfg.collapse]
    json_path = out_dir / "superposition.json"
    from .results import write_json_atomic

    write_json_atomic(json_path, result)
    result["_json"] = str(json_path)
    if plots:
        from .plots import study_figures

        result["_figures"] = [str(p) for p in study_figures(result, out_dir)]
    return result


# -- command line ---------------------------------------------------------------------------------
def add_superposition(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "superposition",
        help="measure knowledge superposition in a model (the study's P matrices, kurtosis, angles)",
        description="The 'Knowledge in Superposition' analysis: for N known facts, the matrix "
        "P[i,j] = k_i^T C^-1 k_j / k_i^T C^-1 k_i of subject keys at every layer, the excess kurtosis "
        "of its off-diagonal entries, their KDE, heatmaps, and whitened vs raw angles. Writes "
        "superposition.json, one .npz of P matrices per model and PNG figures (matplotlib: "
        "pip install 'knowbench[plots]'). Several --model values add the kurtosis-vs-layer scaling figure.",
    )
    p.add_argument("--model", action="append", required=True, metavar="M", help="model id, local folder "
                   "or built-in name (embedded, smollm2-135m, random-gpt2, ...); repeat for the scaling figure")
    p.add_argument("--data", default=None, metavar="FILE", help="facts: the study's CounterFact file "
                   "(requested_rewrite format, e.g. intersected_counterfact_known.json), a KnowEdit task "
                   "file, or a JSON list of {prompt, subject}; default: the embedded world's facts")
    p.add_argument("--n", type=int, default=128, help="number of facts: the first N of the file, as the study "
                   "takes them (default 128)")
    p.add_argument("--dedupe-keys", action="store_true", help="skip a fact whose subject text repeats an "
                   "earlier one's (same key) and take the next instead; the study does not")
    p.add_argument("--ridge", type=float, default=None, metavar="R", help="whiten with C + R·mean(diag C)·I at "
                   "every layer; default none, except the smallest that works where C is not positive definite")
    p.add_argument("--layers", default=None, help="layers to analyse: 'all' (default), '0,5,10-12', '-1'")
    p.add_argument("--out", default="superposition", metavar="DIR", help="output folder (default ./superposition)")
    p.add_argument("--stats-corpus", default=None, metavar="PATH", help="text corpus for C = E[kk^T] "
                   "(.txt one text per line, .json/.jsonl with 'text', or a folder); default: the embedded "
                   "world's corpus for the embedded model, else Wikipedia via the hub")
    p.add_argument("--stats-source", default=None, choices=("auto", "corpus", "wikipedia", "wikitext", "model"),
                   help="where C's text comes from ('model': text sampled from the model itself)")
    p.add_argument("--stats-samples", type=int, default=None, metavar="N", help="texts C is averaged over "
                   "(default: the editors' mom2_n_samples, so their cached statistics are reused)")
    p.add_argument("--batch-size", type=int, default=16, help="facts per forward pass (default 16)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    p.add_argument("--no-plots", action="store_true", help="write JSON and .npz only")
    p.add_argument("--collapse", action="append", default=[], metavar="EDITOR", help="per model, the lifelong "
                   "collapse point of EDITOR (repeatable): edits until the probe edits' Edit Succ. falls below "
                   "--collapse-below, from a sequential run that stops there (results under OUT/collapse/)")
    p.add_argument("--collapse-task", default="zsre", help="task of the collapse runs (default zsre)")
    p.add_argument("--collapse-max", type=int, default=1000, metavar="T", help="edits at most (default 1000)")
    p.add_argument("--collapse-every", type=int, default=10, metavar="K", help="a curve point every K edits: "
                   "the collapse point's resolution (default 10)")
    p.add_argument("--collapse-probes", type=int, default=20, metavar="N", help="probe edits: the first N, "
                   "re-scored at every curve point (default 20)")
    p.add_argument("--collapse-below", type=float, default=50.0, metavar="PCT", help="collapsed: probe Edit Succ. "
                   "below PCT %% (default 50)")
    p.set_defaults(func=cmd_superposition)


def cmd_superposition(args: argparse.Namespace) -> int:
    if args.n < 2:
        raise ValueError("--n must be at least 2")
    if not args.no_plots:
        from .plots import require_matplotlib

        require_matplotlib()  # fail before the long part, not after it
    cfg = StudyConfig(n=args.n, layers=args.layers, batch_size=args.batch_size, stats_source=args.stats_source,
                      stats_corpus=args.stats_corpus, stats_samples=args.stats_samples, device=args.device,
                      dtype=args.dtype, ridge=args.ridge, dedupe=args.dedupe_keys, collapse=list(args.collapse),
                      collapse_task=args.collapse_task, collapse_max=args.collapse_max,
                      collapse_every=args.collapse_every, collapse_probes=args.collapse_probes,
                      collapse_below=args.collapse_below)
    if args.collapse:
        from .protocols import from_options
        from .registry import load_editor

        from_options(sequential=cfg.collapse_max, batch_size=None, eval_timing="final",  # bad numbers fail now
                     curve_every=cfg.collapse_every, curve_probes=cfg.collapse_probes, stop_below=cfg.collapse_below)
        for name in args.collapse:
            load_editor(name)  # an unknown editor fails before the long part
    result = run_study(args.model, args.data, cfg, Path(args.out), plots=not args.no_plots)
    from rich.console import Console

    print_study(result, Console())
    print(result["_json"])
    for f in result.get("_figures", []):
        print(f)
    return 0


def _short(text: str, n: int = 14) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def print_study(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    if len(result["models"]) > 1 or any(m.get("collapse") for m in result["models"]):
        console.print(scaling_table(result, "rich"))

    for m in result["models"]:
        t = Table(title=f"Superposition of {result['data']['n_used']} facts · {m['model']['id']}", title_justify="left")
        for col in ("layer", "κ", "mean p", "max|p|", "∠ white", "∠ raw"):
            t.add_column(col, justify="right", no_wrap=True)
        t.add_column("most superposed pair (p)", overflow="fold")
        for L in m["layers"]:
            tp = L["top_pairs"][0] if L["top_pairs"] else None
            t.add_row(
                str(L["layer"]), f"{L['kurtosis']:.1f}" if L["kurtosis"] is not None else "",
                f"{L['mean']:.3f}", f"{L['max_abs']:.2f}",
                f"{L['whitened_angle']['mean_deg']:.0f}°", f"{L['raw_angle']['mean_deg']:.0f}°",
                f"{_short(tp['subject_i'])} ~ {_short(tp['subject_j'])} ({tp['p']:.2f})" if tp else "",
            )
        console.print(t)


def _collapse_cell(c: dict[str, Any]) -> str:
    if c.get("error"):
        return "error"
    return f">{c['max_edits']}" if c["survived"] else str(c["collapse_at"])


def scaling_table(result: dict[str, Any], fmt: str = "github") -> Any:
    """One row per model by parameter count: kurtosis per layer and each editor's collapse point
    (``>T`` where it survived T edits). ``fmt``: a tabulate format, or "rich" for a rich Table."""
    models = sorted(result["models"], key=lambda m: m["model"]["n_params"] or 0)
    layers = sorted({L["layer"] for m in models for L in m["layers"]})
    editors = [c["editor"] for c in models[0].get("collapse", [])] if models else []
    head = ["model", "parameters", *[f"κ layer {l}" for l in layers], *[f"{e} collapse" for e in editors]]
    rows = []
    for m in models:
        kappa = {L["layer"]: L["kurtosis"] for L in m["layers"]}
        col = {c["editor"]: c for c in m.get("collapse", [])}
        rows.append([m["model"]["id"], f"{m['model']['n_params']:,}",
                     *[f"{kappa[l]:.1f}" if kappa.get(l) is not None else "–" for l in layers],
                     *[_collapse_cell(col[e]) if e in col else "–" for e in editors]])
    if fmt != "rich":
        from tabulate import tabulate

        return tabulate(rows, head, tablefmt=fmt, colalign=("left",) + ("right",) * (len(head) - 1))
    from rich.table import Table

    t = Table(title="Scaling: kurtosis per layer and lifelong collapse point by model size", title_justify="left")
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    return t


# -- `knowbench run` options of the per-edit diagnostics (here so building the parser stays light) --
def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--diagnostics-probes", default=None, metavar="FILE", help="probe facts for the "
                   "superposition diagnostics (any format `knowbench superposition --data` reads) instead "
                   "of the task's locality items")
    p.add_argument("--diagnostics-max-probes", type=int, default=None, metavar="N", help="at most N probe "
                   "keys in the diagnostics (a seeded sample; default 512)")


def run_options(probes: str | None = None, max_probes: int | None = None) -> dict[str, Any]:
    """RunConfig.extra["diagnostics"] from the CLI values (only what was given)."""
    out: dict[str, Any] = {}
    if probes:
        if not Path(probes).exists():
            raise FileNotFoundError(f"--diagnostics-probes {probes}: no such file")
        out["probes"] = probes
    if max_probes is not None:
        if max_probes < 1:
            raise ValueError("--diagnostics-max-probes must be at least 1")
        out["max_probes"] = max_probes
    return out
