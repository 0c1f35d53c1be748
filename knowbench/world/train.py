"""``knowbench world build``: train the tokenizer and the small GPT-2 model that knows the world.

Steps: (1) render the corpus (``corpus.py``), (2) train a byte-level BPE tokenizer on it with the
``tokenizers`` library, (3) train a ``GPT2LMHeadModel`` from scratch with the causal LM loss on
texts packed from a fresh epoch of the corpus at a time, AdamW with linear warm-up and cosine
decay, bfloat16 autocast (stage 1: the facts), (4) round the weights to float16 as they are saved
and continue training on in-context update documents mixed with fresh epochs of the fact corpus
(stage 2: the model learns to read a "New Fact:" in its prompt and use it — see
``corpus.icl_documents``), (5) save the model (float16 safetensors, loaded as float32), the
tokenizer, the task files with their training splits and ``build_info.json``.

Why two stages: the in-context documents are long and costly next to the facts, and a model learns
to copy from its context far faster once it knows the entities; stage 2 replays the facts so they
are kept. ``--from-stage1 DIR`` runs stage 2 alone from a saved stage-1 model (the float16 rounding
in between makes that identical to the whole build).

Determinism: torch's seed, a fixed thread count, no dropout, and a data order that is a pure
function of the seed (each epoch's texts come from ``random.Random(f"...{seed}-{epoch}")``), so the
same seed, steps and thread count reproduce the same weights.

Why the vocabulary is small and the MLP wide: the model exists so that locate-then-edit editors
behave on it as they do on GPT-2 XL. (a) With a 5,000-token vocabulary every invented surname is a
single token, and a causal trace (corrupt the subject's embeddings, restore one hidden state) shows
such a model recalling facts at the *answer* position in layer 0, reading the surname embedding
directly: restoring the subject's last token restores 4 % of the answer probability, the last token
after block 0 restores 75 %. Edits at the subject token then stalled at 72-78 % single-edit
success. With 1,500 tokens a surname is 2-4 tokens, the subject has to be composed over its tokens,
and ROME, MEMIT and AlphaEdit at the subject's last token reach 93-97 %. (b) AlphaEdit's edits must
find room in key directions that ordinary text leaves unused: with d_ff = 512 lifelong AlphaEdit
collapsed as fast as ROME; with d_ff = 2048 (16 x n_embd) most directions are nearly unused (layer
1: 1,194 of 2,048 eigenvalues of C below 0.01), as in GPT-2 XL's 6,400-wide MLP. ``knowbench world
build --vocab-size 5000 --n-inner 512`` rebuilds the earlier model for comparison.
"""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .corpus import epoch_texts, render_corpus, test_edits
from .world import World, generate

EOS = "<|endoftext|>"
STAGE2_EPOCH0 = 10_000  # stage 2's corpus epochs are numbered from here (fresh renderings and updates)


@dataclass
class BuildConfig:
    seed: int = 0
    steps: int = 10000  # see build_info.json for the accuracy along the way
    batch_size: int = 32  # throughput per text peaks near 32 on 2 CPU cores; more updates than 64+
    lr: float = 4e-3
    min_lr_ratio: float = 0.05
    warmup: int = 200
    weight_decay: float = 0.01
    vocab_size: int = 1500  # small enough that invented names are several tokens (see the docstring)
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_inner: int | None = 2048  # MLP width: 16 × n_embd, a sparse key space (see the docstring)
    n_positions: int = 128
    max_len: int = 96  # tokens per training text (longer texts are cut)
    # stage 2, in-context updates (corpus.icl_documents) mixed with a replay of the fact corpus;
    # icl_steps 0 skips it
    icl_steps: int = 4000
    icl_lr: float = 2e-3
    icl_warmup: int = 100
    icl_docs: int = 4000  # in-context update documents per epoch, beside the epoch's ~4,000 fact texts
    icl_max_demos: int = 3  # blocks before the last one: demonstrations as IKE puts them (fits 128 positions)
    threads: int = 2
    tokenizer_epochs: int = 2  # corpus epochs the tokenizer is trained on
    # bfloat16 matmuls (fp32 master weights): ~25 % faster on CPUs with native bfloat16 (AVX512-BF16 /
    # AMX), but emulated, and many times slower, on CPUs without it; None: use it where it is native
    bf16_autocast: bool | None = None
    save_fp16: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


# The model-size family (`knowbench world build --size S`): the same world, corpus, tokenizer
# recipe, depth and training schedule (x0.25: longer, below), with the width scaled (head dimension 32, 16 for x0.25, and
# the MLP 16 × n_embd, as in x1). Depth stays 4 so that every editor's layer choice means the same
# thing at every size (and so each size builds in under 30 minutes on 2 cores). The family is
# stage 1 only: it is for the superposition study and lifelong locate-then-edit, not in-context
# editing.
SIZES: dict[str, dict[str, Any]] = {
    # the smallest learns its facts more slowly: twice the steps at a higher peak rate
    "x0.25": {"n_embd": 32, "n_head": 2, "n_inner": 512, "steps": 20000, "lr": 6e-3},
    "x0.5": {"n_embd": 64, "n_head": 2, "n_inner": 1024},
    "x1": {"n_embd": 128, "n_head": 4, "n_inner": 2048},
    "x2": {"n_embd": 256, "n_head": 8, "n_inner": 4096},
}


def sized(cfg: "BuildConfig", size: str) -> "BuildConfig":
    """``cfg`` with the width of family member ``size`` and no stage 2; a ValueError names the sizes."""
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: the family has sizes {', '.join(SIZES)}")
    import dataclasses

    return dataclasses.replace(cfg, icl_steps=0, **SIZES[size], extra={**cfg.extra, "size": size})


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere autocast emulates it."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


# -- tokenizer -----------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A GPT-2-style byte-level BPE tokenizer (no BOS added, EOS = pad) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        padding_side="right",
    )
    tok.model_max_length = 1024
    return tok


# -- model ---------------------------------------------------------------------------------------
def make_model(cfg: BuildConfig, tok: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    gcfg = GPT2Config(
        vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.n_inner or 4 * cfg.n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )
    return GPT2LMHeadModel(gcfg)


def batches(world: World, tok: Any, cfg: BuildConfig, stage: int = 1) -> Iterator[tuple[Any, Any, int]]:
    """(input_ids, labels, epoch) batches forever, epoch after epoch, in seeded order: the fact
    corpus (stage 1), or fact epochs of their own (numbered from 10,000) with the in-context update
    documents (stage 2).

    Each text ends with EOS; padding (also EOS) is masked out of the loss with -100."""
    import torch

    epoch = 0 if stage == 1 else STAGE2_EPOCH0
    excluded = test_edits(world) if stage == 2 else set()
    while True:
        texts = epoch_texts(world, cfg.seed, epoch, excluded, cfg.icl_docs if stage == 2 else 0, cfg.icl_max_demos)
        enc = tok([t + EOS for t in texts], add_special_tokens=False)["input_ids"]
        enc = [ids[: min(cfg.max_len, cfg.n_positions)] for ids in enc]
        for chunk in _length_buckets(enc, cfg.batch_size, random.Random(f"knowbench-batches-{cfg.seed}-{epoch}")):
            width = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), width), tok.eos_token_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for r, x in enumerate(chunk):
                ids[r, : len(x)] = torch.tensor(x)
                labels[r, : len(x)] = torch.tensor(x)
            yield ids, labels, epoch
        epoch += 1


def _length_buckets(enc: list[list[int]], batch_size: int, rng: random.Random, window: int = 16) -> list[list[list[int]]]:
    """Batches of texts of similar length (less padding to compute), in a seeded random order.

    Texts are sorted by length within windows of ``window`` batches, cut into batches, and the
    batches shuffled; a last incomplete batch is dropped."""
    out = []
    span = batch_size * window
    for w in range(0, len(enc), span):
        block = sorted(enc[w : w + span], key=len)
        out.extend(block[i : i + batch_size] for i in range(0, len(block) - batch_size + 1, batch_size))
    rng.shuffle(out)
    return out


def lr_at(step: int, cfg: BuildConfig, stage: int = 1) -> float:
    lr, warmup, steps = (cfg.lr, cfg.warmup, cfg.steps) if stage == 1 else (cfg.icl_lr, cfg.icl_warmup, cfg.icl_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(world: World, tok: Any, cfg: BuildConfig, progress: bool = True,
          callback: Any = None, callback_every: int = 0, model: Any = None, stage: int = 1) -> tuple[Any, dict]:
    """Stage 1: train a fresh model for ``cfg.steps`` steps; stage 2: continue ``model`` for
    ``cfg.icl_steps`` steps on the in-context documents and the facts. Returns the model and stats."""
    import torch

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # padding-mask / loss-type notices do not apply here
    torch.manual_seed(cfg.seed + (stage - 1))
    random.seed(cfg.seed + (stage - 1))
    if model is None:
        model = make_model(cfg, tok)
    model.train()
    n_steps = cfg.steps if stage == 1 else cfg.icl_steps
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    stream = batches(world, tok, cfg, stage)
    losses: list[float] = []
    tokens = 0
    epoch = 0
    start = time.time()
    with _progress(progress) as bar:
        what = "training world model" if stage == 1 else "in-context updates (stage 2)"
        task = bar.add_task(what, total=n_steps, loss=float("nan"), epoch=0)
        for step in range(n_steps):
            ids, labels, epoch = next(stream)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg, stage)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
                loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            tokens += int((labels != -100).sum())
            if step % 10 == 0 or step == n_steps - 1:
                recent = sum(losses[-50:]) / len(losses[-50:])
                bar.update(task, completed=step + 1, loss=recent, epoch=epoch)
            if callback is not None and callback_every and (step + 1) % callback_every == 0:
                model.eval()
                callback(step + 1, model, sum(losses[-50:]) / len(losses[-50:]))
                model.train()
    model.eval()
    stats = {
        "train_seconds": round(time.time() - start, 1),
        "final_loss": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 4),
        "epochs_seen": epoch + 1 - (0 if stage == 1 else STAGE2_EPOCH0),
        "tokens_seen": tokens,
    }
    return model, stats


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} epoch {task.fields[epoch]}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled,
    )


# -- the whole build -----------------------------------------------------------------------------
def build(out_dir: str | Path, seed: int = 0, steps: int | None = None, config: BuildConfig | None = None,
          progress: bool = True, evaluate: bool = True, eval_every: int = 0, from_stage1: str | Path | None = None,
          tasks: bool = True) -> dict:
    """Generate the world, write its task files, train tokenizer + model, save all under
    ``out_dir`` (``model/``, ``tasks/``, ``build_info.json``); returns the build info."""
    import torch

    from .tasks import write_tasks

    cfg = config or BuildConfig()
    cfg.seed = seed
    if steps is not None:
        cfg.steps = steps
    torch.set_num_threads(cfg.threads)
    if cfg.bf16_autocast is None:
        cfg.bf16_autocast = native_bf16()
        log_bf16 = "native bfloat16: autocast on" if cfg.bf16_autocast else "no native bfloat16 on this CPU: float32"
        print(f"world build: {log_bf16}", file=sys.stderr)
    t0 = time.time()
    out = Path(out_dir)
    world = generate(seed)
    if tasks:  # a family member shares the shipped task files (same world), so it writes none
        write_tasks(world, out / "tasks")
    if from_stage1 is None:
        tok = train_tokenizer(render_corpus(world, seed, epochs=cfg.tokenizer_epochs), cfg.vocab_size)
        callback = _monitor(world, tok, seed) if eval_every else None
        model, stats = train(world, tok, cfg, progress=progress, callback=callback, callback_every=eval_every)
        if cfg.save_fp16:  # the saved stage-1 model, exactly: what --from-stage1 starts from
            model = model.to(torch.float16).to(torch.float32)
        stage1 = {**stats, "from": None}
    else:
        model, tok, stage1 = _load_stage1(from_stage1, cfg)
        callback = _monitor(world, tok, seed) if eval_every else None
    stage2 = None
    if cfg.icl_steps:
        model, stage2 = train(world, tok, cfg, progress=progress, callback=callback, callback_every=eval_every,
                              model=model, stage=2)
    stats = {k: v for k, v in stage1.items() if k != "from"}
    model_dir = out / "model"
    save_model(model, tok, model_dir, fp16=cfg.save_fp16)
    info: dict[str, Any] = {
        "seed": seed,
        "config": asdict(cfg),
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
        **stats,
        "stage1_from": stage1["from"],
        "stage2": stage2,
        "build_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if evaluate:
        from .evaluate import evaluate_world

        info["accuracy"] = evaluate_world(model, tok, world).as_dict()
    (out / "build_info.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    print(f"world model written to {out} in {info['build_seconds']:.0f} s", file=sys.stderr)
    return info


def _load_stage1(folder: str | Path, cfg: BuildConfig) -> tuple[Any, Any, dict]:
    """A saved stage-1 model (a model folder of an earlier build with ``icl_steps`` 0, or of the build
    before stage 2 existed), its tokenizer, and its stage-1 statistics from the ``build_info.json``
    beside it; the model must have the architecture ``cfg`` asks for."""
    import hashlib

    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"--from-stage1 {folder}: no model.safetensors there")
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = GPT2LMHeadModel.from_pretrained(str(folder), dtype=torch.float32)
    c = model.config
    want = (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_inner or 4 * cfg.n_embd, cfg.n_positions)
    got = (c.n_layer, c.n_embd, c.n_head, c.n_inner or 4 * c.n_embd, c.n_positions)
    if want != got:
        raise ValueError(f"--from-stage1 {folder}: model is (layers, width, heads, MLP, positions) {got}, "
                         f"the build config asks for {want}")
    info_file = folder.parent / "build_info.json"
    old = json.loads(info_file.read_text()) if info_file.is_file() else {}
    stats = {k: old[k] for k in ("train_seconds", "final_loss", "epochs_seen", "tokens_seen") if k in old}
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    return model, tok, {**stats, "from": {"path": str(folder), "sha256": digest}}


def _monitor(world: World, tok: Any, seed: int):
    """A callback logging the accuracy on a fixed sample of the known facts (does not touch the
    training state, so the run stays deterministic)."""
    from .evaluate import evaluate_probes
    from .tasks import build_tasks

    _, probes = build_tasks(world)
    rng = random.Random(f"knowbench-monitor-{seed}")
    sample = rng.sample([p for p in probes if "/" in p.group], 400) + rng.sample(
        [p for p in probes if p.group in ("rephrase", "held_out")], 200) + rng.sample(
        [p for p in probes if p.group.startswith("icl_")], 300)
    t0 = time.time()

    def cb(step: int, model: Any, loss: float) -> None:
        acc = evaluate_probes(model, tok, sample)
        parts = ", ".join(f"{g} {v:.1f}" for g, v in sorted(acc.groups.items()) if "/" not in g)
        print(f"step {step} ({time.time() - t0:.0f} s) loss {loss:.3f}: {parts}", file=sys.stderr, flush=True)

    return cb


def save_model(model: Any, tok: Any, model_dir: Path, fp16: bool = True) -> None:
    import copy

    import torch

    model_dir.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to(torch.float16) if fp16 else model
    m.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
