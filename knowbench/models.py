"""Loading a causal LM and its tokenizer by id, local path or built-in name.

Built-in names: ``random-gpt2`` / ``random-llama`` are tiny randomly initialised models with a
byte-level tokenizer, built offline and deterministically (smoke tests, CI, the plumbing of a new
editor; metrics on them say nothing about editing quality).
"""

from __future__ import annotations

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


def load_model(name: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    torch_dtype = parse_dtype(dtype)
    if name in BUILTIN_MODELS:
        loaded = BUILTIN_MODELS[name](torch_dtype, device)
    elif Path(name).expanduser().exists():
        loaded = _from_pretrained(str(Path(name).expanduser()), torch_dtype, device, name, "local")
    else:
        loaded = _from_pretrained(name, torch_dtype, device, name, "hub")
    loaded.model.eval()
    prepare_tokenizer(loaded.tokenizer)
    return loaded


def _from_pretrained(path: str, dtype: torch.dtype, device: str, name: str, source: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        hint = ""
        if source == "hub":
            hint = (
                " The Hugging Face hub could not be reached or has no such model; pass a local "
                "folder with --model, or use the embedded default model (omit --model)."
            )
        raise OSError(f"could not load model {name!r}: {exc}.{hint}") from exc
    model.to(device)
    revision = getattr(model.config, "_commit_hash", None)
    return LoadedModel(model, tok, name, source, path=path, revision=revision)


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
