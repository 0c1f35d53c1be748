"""Second-moment statistics of the rewrite module's keys, C = E[k kᵀ], computed once and cached.

For a layer l, every token position t of every text in a corpus gives a key k_t (the input of the
MLP output projection). C = (1/N) Σ_t k_t k_tᵀ is the *uncentred* second moment, normalised by the
token count N (DESIGN 6). The closed-form editors solve with C: ROME's C⁻¹k*, MEMIT's
(λC + KKᵀ)⁻¹, AlphaEdit's null-space projector from C's small-eigenvalue eigenvectors; the
superposition diagnostics whiten keys with it. So C is

* computed in one pass for all requested layers (hooks stop the pass after the highest one),
  the outer products taken in ``dtype`` (the reference's float32) and summed in float64;
* cached on disk per (model, layer, corpus, sample count, dtype, max length) — the configuration is
  in the file name and in the file's metadata (plus a ``.json`` sidecar), and a cached file is used
  only if that metadata matches;
* factorised once (Cholesky through :func:`knowbench.linalg.jittered_cholesky` / eigendecomposition,
  in float64) and kept on the :class:`SecondMoment`.

The whole recipe (corpus from the run's ``StatsOptions``, sample count, dtype, ridge, factorisation)
is :func:`key_statistics`, which the editors and the superposition study both call.

Corpora (:func:`resolve_corpus`): a list of strings or local text/JSON files (loaded with
``datasets``), the reference's Wikipedia / wikitext-103 through the Hugging Face hub when reachable,
or — only when asked — text sampled from the model itself, which is recorded as such.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import __version__
from .arch import ArchAdapter, cache_kwargs, returned_cache
from .devices import input_device, like, module_device
from .editor import StatsOptions
from .keys import StopForward
from .linalg import jittered_cholesky
from .tokens import pad_batch, pad_id

log = logging.getLogger(__name__)

STATS_FORMAT = 1


class StatsUnavailable(RuntimeError):
    """No text could be found to compute second-moment statistics from."""


def default_cache_dir() -> Path:
    env = os.environ.get("KNOWBENCH_CACHE")
    return Path(env) / "stats" if env else Path.home() / ".cache" / "knowbench" / "stats"


# -- the statistic -----------------------------------------------------------------------------
@dataclass
class SecondMoment:
    """C = E[k kᵀ] of one layer's keys (float64, count-normalised), with cached factorisations."""

    layer: int
    module: str
    mom2: torch.Tensor  # (d_in, d_in) float64
    count: int  # tokens averaged over
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    cached: bool = False  # loaded from disk rather than computed in this process
    _chol: torch.Tensor | None = field(default=None, repr=False)
    _eig: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    jitter: float = 0.0  # ridge added to make the Cholesky factorisation succeed (0 if none)
    ridge: float = 0.0  # requested ridge, relative to mean(diag C): C + ridge·mean(diag C)·I

    def set_ridge(self, ridge: float) -> None:
        """Regularise C before it is factorised. A small model's MLP has units that never fire on
        the corpus, so C is singular there and C⁻¹ blows up the tiny differences between an edit
        prompt's key k and the averaged k* along those directions."""
        if ridge != self.ridge:
            self.ridge, self._chol, self._eig = float(ridge), None, None

    @property
    def dim(self) -> int:
        return self.mom2.shape[0]

    def cholesky(self) -> torch.Tensor:
        """Lower-triangular L with C (+ a tiny ridge if C is singular) = L Lᵀ, computed once."""
        if self._chol is None:
            got = jittered_cholesky(self.mom2, self.ridge)
            if got is None:
                raise ValueError(
                    f"second moment of {self.module} is not positive definite even with a ridge "
                    f"of 1e-4·mean(diag); {self.count} tokens are too few for a {self.dim}-dim key"
                )
            self._chol, self.jitter = got
            if self.jitter and not self.ridge:
                log.warning("C of %s is singular; added a ridge of %.3g", self.module, self.jitter)
        return self._chol

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """C⁻¹ b for b of shape (d,) or (d, n), in float64 (two triangular solves)."""
        vec = b.dim() == 1
        b = b.to(self.mom2)
        out = torch.cholesky_solve(b[:, None] if vec else b, self.cholesky())
        return out[:, 0] if vec else out

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending) and eigenvectors of C, computed once."""
        if self._eig is None:
            c = self.mom2
            if self.ridge:
                c = c + self.ridge * float(torch.diagonal(c).mean()) * torch.eye(self.dim, dtype=c.dtype, device=c.device)
            self._eig = torch.linalg.eigh(c)
        return self._eig

    def to(self, device: Any) -> "SecondMoment":
        self.mom2 = self.mom2.to(device)
        self._chol = self._chol.to(device) if self._chol is not None else None
        self._eig = tuple(t.to(device) for t in self._eig) if self._eig is not None else None
        return self

    def provenance(self) -> dict[str, Any]:
        keep = ("corpus", "model_sampled", "n_samples", "n_tokens", "dtype", "max_length", "model")
        info = {k: self.meta[k] for k in keep if k in self.meta}
        info.update(layer=self.layer, module=self.module, file=str(self.path) if self.path else None,
                    cached=self.cached)
        if self.jitter:
            info["ridge"] = self.jitter
        return info


# -- corpora -----------------------------------------------------------------------------------
@dataclass
class Corpus:
    """Texts to compute C over, and how to name them in cache paths and provenance.

    A corpus that is expensive to produce (text sampled from the model) is lazy: ``loader`` makes
    its ``size`` texts on first use, so a run whose statistics are cached never produces it."""

    name: str  # e.g. "knowbench-world-1a2b3c4d5e6f", "wikipedia-20231101.en", "model-sampled-seed0"
    texts: Sequence[str] | None = None
    model_sampled: bool = False
    description: str = ""
    loader: Callable[[], Sequence[str]] | None = field(default=None, repr=False)
    size: int | None = None  # number of texts a lazy corpus will have

    def n_texts(self) -> int:
        if self.texts is None and self.size is not None:
            return self.size
        return len(self._texts())

    def _texts(self) -> list[str]:
        if self.texts is None:
            if self.loader is None:
                raise StatsUnavailable(f"corpus {self.name} has neither texts nor a loader")
            self.texts = list(self.loader())
        return [t for t in self.texts if isinstance(t, str) and t.strip()]

    def sample(self, n: int, seed: int = 0) -> list[str]:
        """Up to n non-empty texts: all of them if there are fewer, else a seeded random subset."""
        texts = self._texts()
        if len(texts) <= n:
            return texts
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(texts), generator=g)[:n].sort().values.tolist()
        return [texts[i] for i in idx]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


def _content_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "replace"))
        h.update(b"\0")
    return h.hexdigest()[:12]


def load_text_files(path: str | Path) -> Corpus:
    """Texts from a .txt file (one text per non-empty line), a .json / .jsonl file (each record's
    ``text`` field, or its only string field), or a folder of such files; read with ``datasets``."""
    from datasets import load_dataset

    path = Path(path).expanduser()
    if not path.exists():
        raise StatsUnavailable(f"statistics corpus {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".json", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise StatsUnavailable(f"statistics corpus folder {path} holds no .txt/.json/.jsonl files")
    texts: list[str] = []
    for f in files:
        if f.suffix == ".txt":
            ds = load_dataset("text", data_files=str(f), split="train")
            column = "text"
        elif f.suffix in (".json", ".jsonl"):
            try:
                ds = load_dataset("json", data_files=str(f), split="train")
            except Exception as exc:  # datasets wraps parse errors in several types
                raise StatsUnavailable(f"statistics corpus {f}: not readable as JSON records ({exc})") from exc
            strings = [c for c, feat in ds.features.items() if getattr(feat, "dtype", None) == "string"]
            if "text" in ds.column_names:
                column = "text"
            elif len(strings) == 1:
                column = strings[0]
            else:
                raise StatsUnavailable(
                    f"statistics corpus {f}: records need a 'text' field (string columns found: "
                    f"{', '.join(strings) or 'none'})"
                )
        else:
            raise StatsUnavailable(f"statistics corpus {f}: use .txt, .json or .jsonl")
        texts.extend(t for t in ds[column] if isinstance(t, str) and t.strip())
    if not texts:
        raise StatsUnavailable(f"statistics corpus {path} contains no text")
    return Corpus(f"file-{_slug(path.stem)}-{_content_hash(texts)}", texts, description=str(path))


HUB_CORPORA = {
    # name: (dataset id, config, text column); the reference used wikipedia 20200501.en, which
    # current `datasets` can no longer load (script dataset); these are its maintained successors.
    "wikipedia": ("wikimedia/wikipedia", "20231101.en", "text"),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1", "text"),
}


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the Hugging Face hub answers at all (offline env switches, DNS, TCP), checked fast
    so that an offline machine does not sit through ``datasets``' retries."""
    import socket
    from urllib.parse import urlparse

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return False, f"{var} is set"
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # noqa: BLE001 - huggingface_hub is a dependency of datasets; be safe anyway
        endpoint = os.environ.get("HF_ENDPOINT", "")
    url = urlparse(endpoint)
    if not url.hostname:
        return False, "no hub endpoint configured"
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as exc:
        return False, f"{url.hostname} unreachable ({exc})"
    return True, ""


def load_hub_corpus(name: str, n_samples: int, seed: int = 0) -> Corpus:
    """n texts of Wikipedia / wikitext-103 through the hub, streamed (a shuffle buffer stands in for
    the reference's random sample of the whole dump)."""
    from datasets import load_dataset

    ds_id, config, column = HUB_CORPORA[name]
    stream = load_dataset(ds_id, config, split="train", streaming=True)
    stream = stream.shuffle(seed=seed, buffer_size=10_000)
    texts = []
    for row in stream:
        t = row.get(column)
        if isinstance(t, str) and t.strip():
            texts.append(t)
            if len(texts) >= n_samples:
                break
    return Corpus(f"{name}-{config}", texts, description=f"{ds_id}:{config}")


def one_line(text: str) -> str:
    """``text`` on one line: braces (which would confuse anyone formatting templates) and runs of
    whitespace become single spaces."""
    return " ".join(text.replace("{", " ").replace("}", " ").split())


@torch.no_grad()
def sample_texts(
    model: nn.Module,
    tok: Any,
    length_params: Sequence[Sequence[int]],
    seed: int,
    starts: Sequence[str] | None = None,
    top_k: int = 5,
) -> list[str]:
    """Short texts sampled from the model (top-k sampling, seeded), decoded without special tokens.

    ``length_params`` is a list of (total tokens including the start, count). With ``starts``
    (e.g. "The", "Therefore", ...) each length draws count // len(starts) texts per start word;
    without, generation starts from the BOS (or EOS) token alone."""
    device = input_device(model)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for length, count in length_params:
            length, count = int(length), int(count)
            if starts:
                per = count // len(starts)
                groups = [(tok(s, add_special_tokens=True)["input_ids"], per) for s in starts]
            else:
                bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
                if bos is None:
                    raise ValueError("tokenizer has neither a BOS nor an EOS token to start sampling from")
                groups = [([bos], count)]
            for ids, n in groups:
                if n <= 0:
                    continue
                seq = torch.tensor([ids] * n, device=device)
                n_new = max(0, length - seq.shape[1])
                past, step_in = None, seq
                for _ in range(n_new):  # all rows have the same length: no padding, a plain KV cache
                    mask = torch.ones(seq.shape, dtype=torch.long, device=device)
                    res = model(input_ids=step_in, attention_mask=mask, **cache_kwargs(model, past))
                    past = returned_cache(res)
                    probs = torch.softmax(res.logits[:, -1, :].float(), dim=-1)
                    top = torch.topk(probs, top_k, dim=-1)
                    pick = torch.multinomial(top.values.cpu(), 1, generator=gen).to(device)
                    step_in = top.indices.gather(1, pick)
                    seq = torch.cat([seq, step_in], dim=1)
                out.extend(tok.decode(row, skip_special_tokens=True) for row in seq.tolist())
    finally:
        model.train(was_training)
    return out


def sample_model_corpus(
    model: nn.Module, tok: Any, n_texts: int, length: int = 128, seed: int = 0
) -> Corpus:
    """Texts sampled from the model itself (top-k 5 from BOS): a stand-in when no corpus is reachable.

    Keys of the model's own text are a biased sample of its inputs; results are marked as such.
    Lazy: the texts are generated only if the statistics are not already cached."""

    def generate() -> list[str]:
        texts: list[str] = []
        batch = 64
        for b0 in range(0, n_texts, batch):
            n = min(batch, n_texts - b0)
            texts += [one_line(t).rstrip(". ").strip() for t in
                      sample_texts(model, tok, [(length, n)], seed=seed * 1_000_003 + b0)]
        return texts

    return Corpus(f"model-sampled-seed{seed}-len{length}", None, model_sampled=True,
                  description=f"{n_texts} texts of {length} tokens sampled from the model (top-k 5)",
                  loader=generate, size=n_texts)


NO_CORPUS_HELP = (
    "Pass a local corpus for the key statistics (a .txt file with one text per line, .json/.jsonl "
    "records with a 'text' field, or a folder of them) as StatsOptions.corpus (knowbench run "
    "--stats-corpus PATH), or set StatsOptions.source = 'model' (--stats-source model) to use text "
    "sampled from the model itself; the results' provenance records which was used."
)


def resolve_corpus(
    options: StatsOptions,
    default_dataset: str,
    n_samples: int,
    model: nn.Module | None = None,
    tok: Any = None,
) -> Corpus:
    """The corpus C is computed over, from the run's :class:`~knowbench.editor.StatsOptions`:

    * ``source``: "auto" (default), "corpus", "wikipedia", "wikitext", "model";
    * ``corpus``: a list of strings, or a path to text/JSON files (used by "auto" and "corpus");
    * ``corpus_name``: a name for a list corpus (cache paths, provenance);
    * ``seed``: the seed of a model-sampled corpus.

    "auto" uses ``corpus`` when given, else ``default_dataset`` (an editor's ``mom2_dataset``: a hub
    corpus name or a local path), falling back from Wikipedia to wikitext-103; with nothing
    reachable it raises :class:`StatsUnavailable` saying what to pass.
    """
    source = str(options.source or "auto").lower()
    corpus = options.corpus
    if source not in ("auto", "corpus", "wikipedia", "wikitext", "model"):
        raise ValueError(
            f"stats_source {source!r} is not one of auto, corpus, wikipedia, wikitext, model"
        )
    if source == "model":
        if model is None:
            raise ValueError("stats_source 'model' needs the model")
        return sample_model_corpus(model, tok, n_samples, seed=int(options.seed))
    if source in ("auto", "corpus") and corpus is not None:
        if isinstance(corpus, (str, Path)):
            return load_text_files(corpus)
        if callable(corpus):
            corpus = corpus()
        texts = [t for t in corpus if isinstance(t, str)]
        if not texts:
            raise StatsUnavailable("the statistics corpus (StatsOptions.corpus) holds no text")
        name = _slug(str(options.corpus_name or "corpus"))
        return Corpus(f"{name}-{_content_hash(texts)}", texts, description=f"{len(texts)} texts")
    if source == "corpus":
        raise StatsUnavailable(f"stats source 'corpus' but no StatsOptions.corpus given. {NO_CORPUS_HELP}")
    wanted = [source] if source != "auto" else [default_dataset]
    if source == "auto" and default_dataset == "wikipedia":
        wanted.append("wikitext")
    errors = []
    reachable: tuple[bool, str] | None = None
    for name in wanted:
        if name not in HUB_CORPORA:
            return load_text_files(name)  # a local path given as mom2_dataset
        if reachable is None:
            reachable = hub_reachable()
        if not reachable[0]:
            errors.append(f"{name}: the Hugging Face hub is not reachable: {reachable[1]}")
            continue
        try:
            c = load_hub_corpus(name, n_samples)
            if c.texts:
                return c
            errors.append(f"{name}: empty")
        except Exception as exc:  # offline hub, missing dataset, ...: say what failed
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    raise StatsUnavailable(
        "no text corpus reachable for the key statistics C = E[kkᵀ] "
        f"(tried {'; '.join(errors)}). {NO_CORPUS_HELP}"
    )


# -- computing and caching ---------------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the config and the first values of every parameter (cheap, and different for
    different checkpoints, seeds, fine-tunes and dtypes)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    cfg = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version", "_commit_hash")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(str(p.dtype).encode())
        flat = p.detach().reshape(-1)[:1024].float().cpu().contiguous()
        h.update(flat.numpy().tobytes())
    return h.hexdigest()[:10]


def _max_length(model: nn.Module, requested: int | None) -> int:
    cfg = model.config
    limit = None
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            limit = v
            break
    limit = limit or 1024
    return min(limit, requested) if requested else limit


def stats_path(
    cache_dir: Path, model_name: str, fingerprint: str, corpus: str, module: str, dtype: str,
    n_samples: int, max_length: int,
) -> Path:
    model_dir = f"{_slug(Path(model_name).name or model_name)}-{fingerprint}"
    return Path(cache_dir) / model_dir / _slug(corpus) / f"{module}_{dtype}_n{n_samples}_len{max_length}.pt"


def second_moments(
    model: nn.Module,
    tok: Any,
    layers: Sequence[int],
    corpus: Corpus,
    *,
    n_samples: int,
    dtype: str = "float32",
    max_length: int | None = None,
    cache_dir: str | Path | None = None,
    model_name: str = "",
    batch_tokens: int = 4096,
    progress: bool = True,
    device: Any = None,
) -> dict[int, SecondMoment]:
    """C for each layer: loaded from the cache when its metadata matches, else computed in one pass
    over ``n_samples`` texts of ``corpus`` (each truncated to ``max_length`` tokens) and saved."""
    adapter = ArchAdapter(model)
    layers = sorted({adapter._check(layer) for layer in layers})
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    n_used = min(n_samples, corpus.n_texts())
    if n_used == 0:
        raise StatsUnavailable(f"corpus {corpus.name} holds no text")
    maxlen = _max_length(model, max_length)
    fp = model_fingerprint(model)
    model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    meta_base = {
        "format": STATS_FORMAT, "model": model_name, "model_fingerprint": fp, "corpus": corpus.name,
        "corpus_description": corpus.description, "model_sampled": corpus.model_sampled,
        "n_samples": n_used, "dtype": dtype, "max_length": maxlen, "statistic": "E[k k^T], uncentred",
    }
    out: dict[int, SecondMoment] = {}
    todo = []
    for layer in layers:
        module = adapter.rewrite_name(layer)
        path = stats_path(cache_dir, model_name, fp, corpus.name, module, dtype, n_used, maxlen)
        meta = {**meta_base, "layer": layer, "module": module}
        loaded = _load(path, meta)
        if loaded is not None:
            loaded.path, loaded.cached = path, True
            out[layer] = loaded
        else:
            todo.append((layer, module, path, meta))
    if todo:
        texts = corpus.sample(n_samples)  # only now: a lazy corpus is produced only when needed
        computed = _compute(
            model, tok, adapter, [t[0] for t in todo], texts, dtype, maxlen, batch_tokens,
            progress, corpus.name, device,
        )
        for layer, module, path, meta in todo:
            mom2, count = computed[layer]
            meta = {**meta, "n_tokens": count, "knowbench_version": __version__}
            sm = SecondMoment(layer, module, mom2, count, meta, path=path)
            _save(path, sm)
            out[layer] = sm
    return out


# reference defaults of the configuration C is computed with (ROME's / MEMIT's mom2_* values)
DEFAULT_DATASET = "wikipedia"
DEFAULT_SAMPLES = 100000
DEFAULT_DTYPE = "float32"
MODEL_SAMPLED_CAP = 1000  # texts generated when the model samples its own corpus and no count is given


def key_statistics(
    model: nn.Module,
    tok: Any,
    layers: Sequence[int],
    options: StatsOptions | None = None,
    *,
    dataset: str = DEFAULT_DATASET,
    n_samples: int = DEFAULT_SAMPLES,
    dtype: str = DEFAULT_DTYPE,
    max_length: int | None = None,
    ridge: float = 0.0,
    cache_dir: str | Path | None = None,
    model_name: str = "",
    device: Any = None,
) -> dict[int, SecondMoment]:
    """C of each of ``layers``, as a run computes it, regularised and factorised.

    The corpus comes from ``options`` (:func:`resolve_corpus`; ``dataset`` when they name none),
    ``options.samples`` overrides ``n_samples`` (a model-sampled corpus is capped at
    :data:`MODEL_SAMPLED_CAP` texts unless a count is given), and every C gets ``ridge`` (relative
    to its mean diagonal, :meth:`SecondMoment.set_ridge`) and its Cholesky factor now. Editors pass
    their ``mom2_*`` hyper-parameters; the superposition study passes the same, so both share one
    cached statistic per layer under ``cache_dir`` (default :func:`default_cache_dir`)."""
    options = options if options is not None else StatsOptions()
    n = int(options.samples or n_samples)
    if str(options.source or "").lower() == "model" and not options.samples:
        n = min(n, MODEL_SAMPLED_CAP)  # generating is slow; enough for d ≲ 4k, recorded in provenance
    corpus = resolve_corpus(options, dataset, n, model, tok)
    stats = second_moments(
        model, tok, layers, corpus, n_samples=n, dtype=dtype, max_length=max_length,
        cache_dir=cache_dir if cache_dir is not None else default_cache_dir(), model_name=model_name,
        progress=bool(options.progress),
        device=device if device is not None else input_device(model),
    )
    for sm in stats.values():
        sm.set_ridge(ridge)
        sm.cholesky()  # factorise once per layer, now
    if corpus.model_sampled:
        log.warning("key statistics computed on text sampled from the model itself (%s)", corpus.name)
    return stats


def _load(path: Path, meta: dict[str, Any]) -> SecondMoment | None:
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        stored = json.loads(blob["meta"])
    except Exception as exc:
        log.warning("ignoring unreadable statistics cache %s (%s)", path, exc)
        return None
    mismatch = [k for k, v in meta.items() if k != "corpus_description" and stored.get(k) != v]
    if mismatch:
        log.warning("ignoring statistics cache %s: metadata differs in %s", path, ", ".join(mismatch))
        return None
    return SecondMoment(meta["layer"], meta["module"], blob["mom2"].double(), int(blob["count"]), stored)


def _save(path: Path, sm: SecondMoment) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"mom2": sm.mom2.cpu(), "count": sm.count, "meta": json.dumps(sm.meta)}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
    path.with_suffix(".json").write_text(json.dumps(sm.meta, indent=1) + "\n")
    log.info("saved key statistics to %s", path)


@torch.no_grad()
def _compute(
    model: nn.Module, tok: Any, adapter: ArchAdapter, layers: list[int], texts: list[str],
    dtype: str, maxlen: int, batch_tokens: int, progress: bool, corpus_name: str, device: Any,
) -> dict[int, tuple[torch.Tensor, int]]:
    from .progress import progress_bar

    torch_dtype = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                   "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"mom2_dtype {dtype!r}: use float32, float64, float16 or bfloat16")
    device = device or input_device(model)  # where the token rows go
    enc = tok(texts, add_special_tokens=True, truncation=True, max_length=maxlen)["input_ids"]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    # each layer's sum where its rewrite module lives (blocks may sit on several devices)
    sums = {layer: torch.zeros(adapter.key_dim(layer), adapter.key_dim(layer), dtype=torch.float64,
                               device=module_device(model, adapter.rewrite_name(layer)))
            for layer in layers}
    count = 0
    acc_dtype = torch_dtype if torch_dtype in (torch.float32, torch.float64) else torch.float32
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(mod, args, out, layer):
        # the outer products in ``dtype`` (float32 by default, whatever the model's dtype), summed in float64
        k = args[0][like(mask_holder["m"], args[0])].to(torch_dtype).to(acc_dtype)
        sums[layer] += (k.T @ k).double().to(sums[layer].device)

    handles = [adapter.rewrite_module(layer).register_forward_hook(lambda m, a, o, layer=layer: hook(m, a, o, layer))
               for layer in layers]

    def stop(mod, args, out):
        raise StopForward

    handles.append(adapter.block(layers[-1]).register_forward_hook(stop))
    was_training = model.training
    model.eval()
    try:
        bar = (progress_bar(f"key statistics C, layers {layers} · {corpus_name}", len(order))
               if progress else nullcontext(lambda n=1: None))
        with bar as advance:
            i = 0
            while i < len(order):
                width = len(enc[order[i]])
                n = max(1, batch_tokens // max(width, 1))
                idx = order[i : i + n]
                ids, mask, pos, _ = pad_batch([enc[j] for j in idx], pad_id(tok), "right", device)
                mask_holder["m"] = mask.bool()
                try:
                    model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
                except StopForward:
                    pass
                count += int(mask.sum())
                i += len(idx)
                advance(len(idx))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if count == 0:
        raise StatsUnavailable(f"corpus {corpus_name} produced no tokens")
    return {layer: ((s / count).cpu(), count) for layer, s in sums.items()}
