"""The editor interface every built-in and third-party editor implements.

The core knows nothing of any specific editor. An editor is a class registered under the
``knowbench.editors`` entry-point group with:

* ``hparams_cls``: a dataclass of its hyper-parameters (``default_hparams`` picks values for a
  model, ``--hparams FILE`` overrides them);
* ``apply(requests)``: edit the model in place with one request or a batch, and return an
  :class:`EditOutcome` that says which parameters changed and, for locate-then-edit editors, the
  keys k, target values v* and residuals δ it used at each layer (the diagnostics read them);
* ``restore()``: put back exactly the weights held when the editor was created (bit-identical);
* ``rewrite_prompts(prompts)``: the hook in-context editors (IKE) use to change what is
  evaluated; weight editors leave prompts alone;
* memory-based editors (GRACE, WISE) wrap modules inside ``apply`` and unwrap them in
  ``restore``, reporting the wrapped modules in ``changed_params``.

Weight editors get snapshot / restore for free from :class:`WeightEditor`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .arch import ArchAdapter


@dataclass(frozen=True)
class EditRequest:
    prompt: str  # may contain the subject; locate-then-edit editors find it there
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    record_index: int = -1


@dataclass
class LayerTrace:
    """What a locate-then-edit update used at one layer (rows are edits of this apply call).

    keys: (n, d_in) the keys k the update was solved for (k* for ROME)
    values: (n, d_out) the target values v* (None where the editor has no explicit target)
    residuals: (n, d_out) δ = v* − W_before k
    """

    layer: int
    module: str
    keys: torch.Tensor
    values: torch.Tensor | None = None
    residuals: torch.Tensor | None = None


@dataclass
class EditOutcome:
    changed_params: list[str]
    traces: list[LayerTrace] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # losses, steps, ... (JSON-serialisable)


@dataclass
class EditContext:
    """Run-wide things an editor may use: the seed, a cache dir, the task's text, a progress sink."""

    seed: int = 0
    cache_dir: Path | None = None
    model_name: str = ""
    device: str = "cpu"
    extras: dict[str, Any] = field(default_factory=dict)


class Editor(ABC):
    name: ClassVar[str] = "editor"
    hparams_cls: ClassVar[type]
    supports_batch: ClassVar[bool] = False  # may apply() take more than one request at once?
    changes_weights: ClassVar[bool] = True

    def __init__(self, model: nn.Module, tokenizer: Any, hparams: Any, context: EditContext):
        self.model = model
        self.tok = tokenizer
        self.hparams = hparams
        self.context = context
        self.adapter = ArchAdapter(model)

    @classmethod
    def default_hparams(cls, model: nn.Module, model_name: str = "") -> Any:
        """Hyper-parameters for this model; editors with per-family YAML override this."""
        return cls.hparams_cls()

    @abstractmethod
    def apply(self, requests: list[EditRequest]) -> EditOutcome: ...

    @abstractmethod
    def restore(self) -> None: ...

    def rewrite_prompts(self, prompts: list[str]) -> list[str]:
        return prompts


class WeightEditor(Editor):
    """An editor that changes parameters in place: snapshot on first touch, exact restore."""

    def __init__(self, model: nn.Module, tokenizer: Any, hparams: Any, context: EditContext):
        super().__init__(model, tokenizer, hparams, context)
        self._params = dict(model.named_parameters())
        self._saved: dict[str, torch.Tensor] = {}

    def param(self, name: str) -> nn.Parameter:
        """The parameter to edit; its original value is saved the first time it is asked for."""
        p = self._params[name]
        if name not in self._saved:
            self._saved[name] = p.detach().clone()
        return p

    def restore(self) -> None:
        with torch.no_grad():
            for name, saved in self._saved.items():
                self._params[name].copy_(saved)

    @property
    def touched(self) -> list[str]:
        return sorted(self._saved)


# -- hyper-parameters ------------------------------------------------------------------------
def hparams_to_dict(hp: Any) -> dict[str, Any]:
    return dataclasses.asdict(hp) if dataclasses.is_dataclass(hp) else dict(vars(hp))


def hparams_hash(hp: Any) -> str:
    blob = json.dumps(hparams_to_dict(hp), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def override_hparams(hp: Any, overrides: dict[str, Any], source: str = "--hparams") -> Any:
    """A copy of ``hp`` with ``overrides`` applied; unknown keys are an error naming the valid ones."""
    valid = {f.name: f for f in dataclasses.fields(hp)}
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"{source}: unknown hyper-parameter(s) {', '.join(unknown)} for "
            f"{type(hp).__name__}; valid: {', '.join(sorted(valid))}"
        )
    coerced = {name: _coerce(valid[name], value, source) for name, value in overrides.items()}
    return dataclasses.replace(hp, **coerced)


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """YAML reads ``1e-6`` as a string and ``5`` as an int: convert to the field's declared type."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    try:
        if kind == "float" and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if kind == "int" and isinstance(value, (int, str)) and not isinstance(value, bool):
            return int(value)
        if kind == "bool" and isinstance(value, str):
            if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "yes", "1")
    except ValueError:
        raise ValueError(f"{source}: {f.name} must be {kind}, got {value!r}") from None
    return value


def load_hparams_file(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"hyper-parameter file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"hyper-parameter file {path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"hyper-parameter file {path} must hold a mapping of name: value")
    return data
