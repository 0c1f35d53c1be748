"""Hyper-parameters per model family: the YAML files in ``editors/hparams/``.

``{editor}-{family}.yaml`` holds a ``match`` (model-name substrings, or a model_type together with
a layer count) and the ``hparams`` for every model it matches; the first file that matches wins.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

from torch import nn

log = logging.getLogger(__name__)


def hparams_dir():
    return resources.files("knowbench.editors") / "hparams"


def find_hparams_file(editor: str, model: nn.Module, model_name: str) -> tuple[Any, dict] | None:
    """The first ``{editor}-*.yaml`` whose ``match`` fits the model: a name substring of the model
    name, or the model_type together with the layer count. Its layers must exist in this model."""
    import yaml

    name = model_name.lower()
    model_type = getattr(model.config, "model_type", "")
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for f in sorted(hparams_dir().iterdir(), key=lambda p: p.name):
        if not (f.name.startswith(f"{editor}-") and f.name.endswith(".yaml")):
            continue
        data = yaml.safe_load(f.read_text())
        match = data.get("match", {})
        by_name = any(s.lower() in name for s in match.get("names", []))
        by_arch = (
            match.get("model_type") == model_type
            and match.get("n_layers") is not None
            and match.get("n_layers") == n_layers
        )
        if not (by_name or by_arch):
            continue
        hp = data.get("hparams", {})
        if n_layers is not None and any(not 0 <= l < n_layers for l in hp.get("layers", [])):
            log.warning("%s matches %s but names layers it lacks; ignoring it", f.name, model_name)
            continue
        return f, hp
    return None


class YamlHparams:
    """Editor mixin: ``default_hparams`` from the first ``editors/hparams/{name}-*.yaml`` that matches
    the model (:func:`find_hparams_file`), else ``hparams_cls()`` (the reference's values)."""

    name: str
    hparams_cls: type

    @classmethod
    def default_hparams(cls, model: nn.Module, model_name: str = "") -> Any:
        found = find_hparams_file(cls.name, model, model_name)
        return cls.hparams_cls(**found[1]) if found else cls.hparams_cls()
