"""Loading a causal LM and its tokenizer by id, local path or built-in name.

Built-in names: ``random-gpt2`` / ``random-llama`` are tiny randomly initialised models with a
byte-level tokenizer, built offline and deterministically (smoke tests, CI, the plumbing of a new
editor; metrics on them say nothing about editing quality).

``device="auto"`` spreads a hub / local model over the GPUs (then the CPU) with accelerate; see
:func:`load_model` and :mod:`knowbench.devices` for the rule editors follow on such a model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str  # what the user asked for
    source: str  # "builtin", "local", "hub"
    path: str | None = None
    revision: str | None = None

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


# name -> builder(dtype, device) for models knowbench makes itself; other modules register theirs
BUILTIN_MODELS: dict[str, Callable[..., LoadedModel]] = {}


def builtin(name: str):
    def deco(fn):
        BUILTIN_MODELS[name] = fn
        return fn

    return deco


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


AUTO = "auto"  # device value: spread the model over the GPUs, then the CPU (accelerate)


def load_model(name: str, dtype: str = "float32", device: str = "cpu",
               max_memory: dict[int | str, int | str] | None = None) -> LoadedModel:
    """The model ``name`` (built-in name, local folder or hub id) in ``dtype`` on ``device``.

    ``device``: a torch device ("cpu", "cuda", "cuda:1", "mps"), or ``"auto"``: a hub / local model
    is spread block by block over every visible GPU, then the CPU, as accelerate's
    ``device_map="auto"`` does (balanced over the GPUs; ``max_memory`` caps each device, in
    accelerate's format, e.g. ``{0: "20GiB", 1: "40GiB", "cpu": "64GiB"}``; default: what each
    has). ``model.hf_device_map`` records where every module went; accelerate's hooks move each
    block's inputs to its device. Built-in models are small and ignore the spreading: with "auto"
    they go to cuda:0 when there is a GPU, else to the CPU.

    Every weight of a spread model stays in memory on the device it is mapped to, and computes
    there: a module mapped to the CPU runs on the CPU (accelerate's own dispatch would instead keep
    its weights off-device and copy them to the GPU for every forward pass, where an in-place edit
    would be lost), and a model that would need disk offloading is refused. Editors find their
    weights wherever they live and follow the rule of :mod:`knowbench.devices` (inputs to the input
    embeddings' device, each update computed on its weight's device).
    """
    torch_dtype = parse_dtype(dtype)
    if name in BUILTIN_MODELS:
        loaded = BUILTIN_MODELS[name](torch_dtype, resolve_device(device))
    elif Path(name).expanduser().exists():
        loaded = _from_pretrained(str(Path(name).expanduser()), torch_dtype, device, name, "local", max_memory)
    else:
        loaded = _from_pretrained(name, torch_dtype, device, name, "hub", max_memory)
    loaded.model.eval()
    prepare_tokenizer(loaded.tokenizer)
    return loaded


def resolve_device(device: str) -> str:
    """A single device for ``device``: "auto" is cuda:0 when a GPU is present, else cpu."""
    if str(device).lower() != AUTO:
        return device
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _from_pretrained(path: str, dtype: torch.dtype, device: str, name: str, source: str,
                     max_memory: dict[int | str, int | str] | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spread = str(device).lower() == AUTO
    try:
        tok = AutoTokenizer.from_pretrained(path)
        if spread:
            model = _load_spread(path, dtype, max_memory)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        hint = ""
        if source == "hub":
            hint = (
                " The Hugging Face hub could not be reached or has no such model; pass a local "
                "folder with --model, or use the embedded default model (omit --model)."
            )
        raise OSError(f"could not load model {name!r}: {exc}.{hint}") from exc
    if not spread:
        model.to(device)
    revision = getattr(model.config, "_commit_hash", None)
    return LoadedModel(model, tok, name, source, path=path, revision=revision)


# -- one model over several devices ------------------------------------------------------------
def auto_device_map(path: str, dtype: torch.dtype,
                    max_memory: dict[int | str, int | str] | None = None) -> dict[str, int | str]:
    """Module name -> device (GPU index, "cpu" or "disk") for the model at ``path``, as accelerate's
    ``device_map="auto"`` computes it (balanced over the GPUs, whole blocks only), from an empty
    (meta) copy of the model: no weights are read."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    skeleton.tie_weights()
    no_split = sorted(getattr(skeleton, "_no_split_modules", None) or [])
    if max_memory is None:
        max_memory = get_balanced_memory(skeleton, dtype=dtype, no_split_module_classes=no_split)
    return infer_auto_device_map(skeleton, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)


def _load_spread(path: str, dtype: torch.dtype, max_memory: dict[int | str, int | str] | None) -> Any:
    from transformers import AutoModelForCausalLM

    device_map = auto_device_map(path, dtype, max_memory)
    where = {str(d) for d in device_map.values()}
    if "disk" in where:
        raise RuntimeError(
            f"{path} does not fit into the GPUs and CPU memory given (max_memory={max_memory}); knowbench "
            "does not offload weights to disk (editors write them in place)"
        )
    if "cpu" not in where or where == {"cpu"}:  # GPUs only (or the CPU only): transformers loads each
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)  # shard in place
        if not isinstance(getattr(model, "hf_device_map", None), dict):
            model.hf_device_map = dict(device_map)  # transformers sets it only for several devices
        return model
    # GPUs and the CPU: read into CPU memory, then move the GPU blocks, keeping the CPU blocks on the
    # CPU (from_pretrained's dispatch would offload them, see load_model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return dispatch(model, device_map)


def dispatch(model: Any, device_map: dict[str, int | str], force_hooks: bool = False) -> Any:
    """Put each module of ``device_map`` on its device, with accelerate's hooks moving every mapped
    module's inputs to it, and keep every weight in memory where it is mapped ("cpu" modules run on
    the CPU, never offloaded); inputs then go to the input embeddings' device. ``force_hooks``
    attaches the hooks even when the map names one device (tests of the hooked path on a CPU)."""
    from accelerate import dispatch_model

    from .devices import input_device

    if any(str(d) == "disk" for d in device_map.values()):
        raise ValueError("dispatch: knowbench keeps every weight in memory; the device map names 'disk'")
    # main_device "cpu": accelerate offloads only to disk then, so CPU modules keep their weights
    # (its warning that CPU modules were offloaded to "meta" is unconditional: silenced, checked below)
    quiet = logging.getLogger("accelerate.big_modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        dispatch_model(model, device_map=device_map, main_device="cpu", force_hooks=force_hooks,
                       skip_keys=getattr(model, "_skip_keys_device_placement", None))
    finally:
        quiet.setLevel(level)
    off = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if off:
        raise RuntimeError(f"dispatch: {len(off)} parameters were left off-device (e.g. {off[0]})")
    hook = getattr(model, "_hf_hook", None)
    if hook is not None:  # the root hook sends the inputs to the main device: make that the embeddings'
        hook.execution_device = input_device(model)
    model.hf_device_map = dict(device_map)
    return model


def prepare_tokenizer(tok: Any) -> None:
    """Editors and scorers need a pad token; reuse EOS as GPT-2-style models have none."""
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token


# -- tiny random models ----------------------------------------------------------------------
def byte_level_tokenizer(bos: bool, padding_side: str = "right") -> Any:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus specials; needs no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|endoftext|>", "<s>", "<pad>"]
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for s in specials:
        vocab[s] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    else:
        core.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>" if bos else "<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>" if bos else None,
        padding_side=padding_side,
    )


def tiny_random_model(family: str, seed: int = 0, n_layers: int = 4, d_model: int = 64) -> tuple[Any, Any]:
    """A small random causal LM of the given family and its byte-level tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "gpt2":
        tok = byte_level_tokenizer(bos=False)
        cfg = GPT2Config(
            vocab_size=len(tok), n_positions=512, n_embd=d_model, n_layer=n_layers, n_head=4,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )
        model = GPT2LMHeadModel(cfg)
    elif family == "llama":
        tok = byte_level_tokenizer(bos=True, padding_side="left")
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
            num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"no tiny random model for family {family!r} (gpt2, llama)")
    model.eval()
    return model, tok


def _tiny_builder(family: str):
    def build(dtype: torch.dtype, device: str) -> LoadedModel:
        model, tok = tiny_random_model(family)
        model.to(device=device, dtype=dtype)
        return LoadedModel(model, tok, f"random-{family}", "builtin", revision="seed0")

    return build


for _family in ("gpt2", "llama"):
    BUILTIN_MODELS[f"random-{_family}"] = _tiny_builder(_family)


# built-in models of the embedded world and SmolLM2 (registers builders only; loads nothing)
from .world import model_registry  # noqa: E402,F401
