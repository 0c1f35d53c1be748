"""The editor contract: what every editor plugin, built-in or third-party, implements.

An editor is a class registered under the ``knowbench.editors`` entry-point group that subclasses
:class:`Editor`. The core calls only the hooks declared here (the specification below is checked
when the plugin loads, :func:`check_editor`, with errors naming the plugin and the hook); it never
looks for anything else on an editor.

Declared by the class
    ``hparams_cls``   a dataclass of hyper-parameters (``default_hparams`` picks values for a model,
                      ``--hparams FILE`` overrides them);
    ``kind``          the kind of change it makes (:class:`ChangeKind`): weights in place, modules
                      wrapped, prompts rewritten, or an external memory consulted at run time;
    ``supports_batch`` whether one ``apply`` may take several requests;
    ``trainable``     whether it needs a training phase (then ``train`` and ``load_artefact``);
    ``uses_train_split`` whether it reads the task's training split without training on it (IKE's
                      demonstration pool); trainable editors always get it.

Hooks, in the order the runner calls them
    ``__init__(model, tokenizer, hparams, context)``  with the typed :class:`RunContext`;
    ``setup()``                 one-off preparation (statistics, a retrieval index), timed apart;
    ``train(split)`` / ``load_artefact(artefact)``     trainable editors only. ``knowbench train``
                                calls ``train`` with ``context.artefact_dir`` set: the editor stores
                                its files there, checkpoints there (``knowbench.training``) and, when
                                a checkpoint is already there, resumes from it. ``knowbench run``
                                finds the stored artefact and calls ``load_artefact``;
    ``sites()``                 the places the editor writes: layer, module, the original weight,
                                and C where it solves with one — all the diagnostics may read;
    ``apply(requests)``         edit; returns an :class:`EditOutcome`;
    ``rewrite_prompts(prompts, owners)``  what is evaluated, one prompt per owner (the record and
                                the metric it belongs to); the identity except for prompt editors;
    ``report()``                the editor's own numbers after an apply (router hit rates,
                                codebook size, ...), recorded by the behavioural diagnostics;
    ``restore()``               back to the model as it was handed over, bit for bit;
    ``provenance()``            what a result file needs to reproduce the editor's fixed inputs.

:class:`WeightEditor` gives weight editors snapshot / restore for free.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import inspect
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, Union, get_args, get_origin, get_type_hints

import torch
from torch import nn

from .arch import ArchAdapter


class ChangeKind(str, enum.Enum):
    """How an editor changes what the model answers (decides which diagnostics apply)."""

    WEIGHTS = "weights"  # parameters edited in place (FT, ROME, MEMIT, AlphaEdit, MEND)
    MODULES = "modules"  # modules wrapped or adapters added (LoRA, GRACE, WISE)
    PROMPTS = "prompts"  # only the evaluated prompts change (ICE, IKE)
    MEMORY = "memory"  # an external memory routes queries (SERAC)


@dataclass(frozen=True)
class EditRequest:
    prompt: str  # may contain the subject; locate-then-edit editors find it there
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    record_index: int = -1


@dataclass(frozen=True)
class PromptOwner:
    """Who an evaluated prompt belongs to: the record (its index in the task file), the metric
    (``edit_succ``, ``rephrase``, ``portability``, ``locality``, ``fluency``, ...) and the sub-key
    (``Reasoning``, ``Relation_Specificity``, ...) when the metric has them. ``request`` is the
    record's own edit, so an in-context editor can put the fact in front of the prompt."""

    record: int
    metric: str
    key: str | None = None
    request: EditRequest | None = None


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
class Site:
    """One place an editor writes: the rewrite module of ``layer`` (DESIGN 2).

    ``original``: W_0 in Linear layout (d_out, d_in) if the editor keeps one (else the diagnostics
    copy it themselves); ``second_moment``: the C the editor solves with (a ``stats.SecondMoment``,
    a tensor or a ``superposition.Whitener``), ``"identity"`` when it solves with C = I, None when
    it solves with none (fine-tuning)."""

    layer: int
    module: str
    param: str
    original: torch.Tensor | None = None
    second_moment: Any = None


@dataclass
class StatsOptions:
    """Where the key statistics C = E[kkᵀ] of locate-then-edit editors come from (``knowbench run
    --stats-corpus / --stats-source / --stats-samples``; see :func:`knowbench.stats.resolve_corpus`)."""

    corpus: Any = None  # list of texts, or a path to .txt/.json/.jsonl files or a folder of them
    corpus_name: str | None = None
    source: str | None = None  # auto | corpus | wikipedia | wikitext | model
    samples: int | None = None  # overrides the editor's mom2_n_samples
    seed: int = 0
    progress: bool = True


@dataclass
class TrainSplit:
    """A task's training records (``knowbench.records.LoadReport``) and where they came from."""

    report: Any
    path: Path
    sha256: str


@dataclass
class RunContext:
    """Everything run-wide an editor may use; handed to the editor when it is built."""

    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    model_name: str = ""
    cache_dir: Path | None = None  # None: $KNOWBENCH_CACHE or ~/.cache/knowbench
    stats: StatsOptions = field(default_factory=StatsOptions)
    train_split: TrainSplit | None = None
    artefact_dir: Path | None = None  # where ``train`` stores what it trained (set by the runner)
    progress: Callable[..., Any] | None = None  # knowbench.progress.progress_bar-like sink

    def cache(self, *parts: str) -> Path:
        """A folder under the run's cache (created on first use)."""
        root = self.cache_dir or Path(os.environ.get("KNOWBENCH_CACHE", Path.home() / ".cache" / "knowbench"))
        path = Path(root, *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path


EditContext = RunContext  # the name editors written before the contract used


@dataclass
class Artefact:
    """What ``train`` produced: a folder of files and the metadata that says what it was trained on."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)


class Editor(ABC):
    name: ClassVar[str] = "editor"
    hparams_cls: ClassVar[type]
    kind: ClassVar[ChangeKind] = ChangeKind.WEIGHTS
    supports_batch: ClassVar[bool] = False  # may apply() take more than one request at once?
    trainable: ClassVar[bool] = False
    uses_train_split: ClassVar[bool] = False  # reads context.train_split without training (IKE)

    def __init__(self, model: nn.Module, tokenizer: Any, hparams: Any, context: RunContext):
        self.model = model
        self.tok = tokenizer
        self.hparams = hparams
        self.context = context
        self.adapter = ArchAdapter(model)

    @classmethod
    def default_hparams(cls, model: nn.Module, model_name: str = "") -> Any:
        """Hyper-parameters for this model; editors with per-family YAML override this."""
        return cls.hparams_cls()

    def setup(self) -> None:
        """One-off preparation before the first edit (not counted as edit time)."""

    def train(self, split: TrainSplit) -> Artefact:
        """Train on ``split`` (trainable editors), store the result in ``context.artefact_dir`` and
        return it as an :class:`Artefact` (its ``meta``: steps, validation curve, ...). A checkpoint
        left in ``context.artefact_dir`` by a killed training is resumed from, not started over."""
        raise NotImplementedError(f"editor {self.name} is not trainable")

    def load_artefact(self, artefact: Artefact) -> None:
        """Load what ``train`` stored (trainable editors)."""
        raise NotImplementedError(f"editor {self.name} is not trainable")

    def sites(self) -> list[Site]:
        """Where this editor writes (weight editors); empty when it does not say."""
        return []

    @abstractmethod
    def apply(self, requests: list[EditRequest]) -> EditOutcome: ...

    def rewrite_prompts(self, prompts: Sequence[str], owners: Sequence[PromptOwner]) -> list[str]:
        return list(prompts)

    def report(self) -> dict[str, Any]:
        """The editor's own diagnostics after an apply (JSON-serialisable numbers)."""
        return {}

    @abstractmethod
    def restore(self) -> None: ...

    def provenance(self) -> dict[str, Any]:
        return {}


class WeightEditor(Editor):
    """An editor that changes parameters in place: snapshot on first touch, exact restore."""

    kind: ClassVar[ChangeKind] = ChangeKind.WEIGHTS

    def __init__(self, model: nn.Module, tokenizer: Any, hparams: Any, context: RunContext):
        super().__init__(model, tokenizer, hparams, context)
        self._saved: dict[str, torch.Tensor] = {}

    def param(self, name: str) -> nn.Parameter:
        """The parameter to edit (looked up now, so parameters added after construction count too);
        its original value is saved the first time it is asked for."""
        p = self.model.get_parameter(name)
        if name not in self._saved:
            self._saved[name] = p.detach().clone()
        return p

    def original(self, name: str) -> torch.Tensor | None:
        """The saved original of a parameter this editor has touched (None if untouched)."""
        return self._saved.get(name)

    def restore(self) -> None:
        with torch.no_grad():
            for name, saved in self._saved.items():
                self.model.get_parameter(name).copy_(saved)



# -- the contract, checked when a plugin loads -----------------------------------------------
class ContractError(TypeError):
    """A plugin that does not implement the declared contract; the message names plugin and hook."""


# hook name -> the parameter names it takes after ``self`` (annotations are not compared)
HOOKS: dict[str, tuple[str, ...]] = {
    "__init__": ("model", "tokenizer", "hparams", "context"),
    "setup": (),
    "sites": (),
    "apply": ("requests",),
    "rewrite_prompts": ("prompts", "owners"),
    "report": (),
    "restore": (),
    "provenance": (),
    "train": ("split",),
    "load_artefact": ("artefact",),
}


def check_editor(obj: Any, plugin: str) -> type[Editor]:
    """``obj`` if it implements the editor contract, else a :class:`ContractError` naming ``plugin``
    and the hook that is missing or has the wrong shape."""
    where = f"editor plugin {plugin}"
    if not (isinstance(obj, type) and issubclass(obj, Editor)):
        raise ContractError(f"{where}: must be a class deriving from knowbench.editor.Editor")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise ContractError(f"{where}: hook(s) {missing} not implemented")
    hp = getattr(obj, "hparams_cls", None)
    if not (isinstance(hp, type) and dataclasses.is_dataclass(hp)):
        raise ContractError(f"{where}: hparams_cls must be a dataclass, got {hp!r}")
    try:
        hp()
    except TypeError as exc:
        raise ContractError(f"{where}: hparams_cls {hp.__name__} needs a default for every field ({exc})") from None
    if not isinstance(obj.kind, ChangeKind):
        raise ContractError(f"{where}: kind must be a knowbench.editor.ChangeKind, got {obj.kind!r}")
    for hook, params in HOOKS.items():
        fn = getattr(obj, hook)
        got = [p for p in inspect.signature(fn).parameters.values()][1:]  # drop self
        names = tuple(p.name for p in got if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        required_extra = [p.name for p in got[len(params):]
                          if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if names[: len(params)] != params and not any(p.kind == p.VAR_POSITIONAL for p in got):
            raise ContractError(f"{where}: hook {hook}{inspect.signature(fn)} must take ({', '.join(params)})")
        if required_extra:
            raise ContractError(f"{where}: hook {hook} has extra required parameter(s) {', '.join(required_extra)}")
    if obj.trainable:
        for hook in ("train", "load_artefact"):
            if getattr(obj, hook) is getattr(Editor, hook):
                raise ContractError(f"{where}: trainable editors implement hook {hook}")
    if obj.kind is ChangeKind.PROMPTS and obj.rewrite_prompts is Editor.rewrite_prompts:
        raise ContractError(f"{where}: a prompt-rewriting editor (kind=prompts) implements hook rewrite_prompts")
    return obj


# -- hyper-parameters ------------------------------------------------------------------------
def hparams_to_dict(hp: Any) -> dict[str, Any]:
    return dataclasses.asdict(hp) if dataclasses.is_dataclass(hp) else dict(vars(hp))


def hparams_hash(hp: Any) -> str:
    blob = json.dumps(hparams_to_dict(hp), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def override_hparams(hp: Any, overrides: dict[str, Any], source: str = "--hparams") -> Any:
    """A copy of ``hp`` with ``overrides`` applied; unknown keys are an error naming the valid ones,
    and every value is checked against its field's type (:func:`_coerce`): a wrong type is a
    ValueError naming ``source``, the field and the type it needs."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{source}: expected a mapping of hyper-parameter: value, got {type(overrides).__name__}")
    valid = {f.name: f for f in dataclasses.fields(hp)}
    bad_keys = [k for k in overrides if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"{source}: hyper-parameter names must be strings, got {bad_keys[0]!r}")
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"{source}: unknown hyper-parameter(s) {', '.join(unknown)} for "
            f"{type(hp).__name__}; valid: {', '.join(sorted(valid))}"
        )
    try:
        hints = get_type_hints(type(hp))
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: its fields go unchecked
        hints = {}
    coerced = {name: _coerce(name, hints.get(name, Any), value, source) for name, value in overrides.items()}
    return dataclasses.replace(hp, **coerced)


def _coerce(name: str, kind: Any, value: Any, source: str) -> Any:
    """``value`` as the field's declared type ``kind`` (pydantic's lax conversion: YAML reads
    ``1e-6`` as a string and ``5`` as an int, so a float field takes both; an int field takes
    ``"5"`` and ``5.0``, not ``5.5``; lists, nested ones, ``X | None`` and ``Literal`` are checked
    element by element), or a ValueError naming ``source``, the field and the type it needs."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError:
        got = "null" if value is None else f"{value!r} ({type(value).__name__})"
        hint = f" (e.g. [{value!r}])" if get_origin(kind) in (list, tuple) and not isinstance(value, (list, tuple, dict)) \
            and value is not None else ""
        raise ValueError(f"{source}: {name} must be {_type_name(kind)}{hint}, got {got}") from None


def _type_name(kind: Any) -> str:
    """``int``, ``list[int]``, ``list[str] | None``: the type as a reader would write it."""
    origin, args = get_origin(kind), get_args(kind)
    if origin is Union or type(kind).__name__ == "UnionType":
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is not None and args:
        import typing

        if origin is typing.Literal:
            return "one of " + ", ".join(repr(a) for a in args)
        base = getattr(origin, "__name__", str(origin).replace("typing.", ""))
        return f"{base}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def load_hparams_file(path: str | Path) -> dict[str, Any]:
    """The hyper-parameters in a YAML / JSON file: a plain mapping of name: value, or the layout of
    the shipped ``editors/hparams/*.yaml`` (``match:`` saying which models it is for, ``hparams:``
    the values), whose ``hparams:`` mapping is taken and ``match:`` ignored."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"hyper-parameter file {path} is a directory; pass a YAML/JSON file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"hyper-parameter file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"hyper-parameter file {path} is not UTF-8 text ({exc})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"hyper-parameter file {path} is not valid YAML/JSON: {exc}") from exc
    if isinstance(data, dict) and "hparams" in data and set(data) <= {"hparams", "match"}:
        data = data["hparams"]
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"hyper-parameter file {path}: 'hparams' must hold a mapping of name: value")
    if not isinstance(data, dict):
        raise ValueError(f"hyper-parameter file {path} must hold a mapping of name: value")
    return data
