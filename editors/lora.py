"""LoRA and AdaLoRA: low-rank adapters trained on the edit (EDITORS.md section 4), built with peft.

Semantics: "easyedit@14cea82" (EasyEdit's lora_main, the KnowEdit AdaLoRA row). Every target
module (q_proj and v_proj on Llama layouts, GPT-2's fused qkv Conv1D c_attn as a whole matrix; every
layer unless ``layers`` names some) gets an adapter, injected in place into the model object the
runner holds, so the evaluator's reference to that same object runs it:

    LoRA     y = W x + s·B A·drop(x),          s = α/r,
             A (r, d_in) Kaiming-uniform (a = √5), B (d_out, r) zeros
    AdaLoRA  y = W x + s·B (A ⊙ E)·drop(x),    s = α/(r_cur + 1e-5), r_cur = init_r = 12,
             A (r, d_in), B (d_out, r) ~ N(0, 0.02²), E (r, 1) zeros

(W in Linear layout (d_out, d_in); GPT-2's Conv1D stores W as (d_in, d_out) and y = x W + b, so
its ΔW is transposed, peft's fan_in_fan_out.) Trained on "{prompt} {target}" with prompt and pad
labels −100, mean over the batch's target tokens y (EasyEdit passes labels to the model):

    L = −(1/|y|) Σ_t log p(y_t | x, y_<t)                                      (both)
      + λ · mean over the adapters' A and B of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F      (AdaLoRA, λ = 0.5)

The AdaLoRA penalty is the one peft's AdaLoraModel.forward adds when labels are passed, which is
how EasyEdit gets it; here the forward goes through that same tuner object. Adam on the adapter
parameters only, lr 5e-3, weight decay 0, ``num_steps`` full passes over the apply's requests
(one batch of them per step: EasyEdit's batch_size 1 on one request), no early stop. AdaLoRA's rank
reallocation (``update_and_allocate``) is never called, as in EasyEdit: AdaLoRA is a fixed-rank-12
SVD-form LoRA with an orthogonality penalty; peft >= 0.14 needs ``total_step``, given num_steps.

Modes (EasyEdit's editor.py): single and batch = a fresh adapter per ``apply``, unloaded by
``restore`` (bit-identical model); sequential (``apply`` again without ``restore``) = the same
adapter keeps training, the Adam state rebuilt per call. Adapter initialisation and dropout draw
from ``torch.manual_seed(context.seed + n)`` (n counts applies) inside a forked RNG, so runs repeat
exactly and the caller's RNG is left alone.

Dropout: peft creates the adapter modules in training mode while the base model stays in eval mode
(from_pretrained; EasyEdit never calls ``train()``), so in EasyEdit lora_dropout 0.1 acts on the
adapters' input during training and nothing else drops out (gradient checkpointing, which transformers
applies only in training mode, is inert). ``dropout_active`` true (default) reproduces that; after
training the adapters are put in eval mode. (EasyEdit then evaluates with the adapters still in
training mode, i.e. with dropout on; knowbench evaluates deterministically.)

Hyper-parameters (EasyEdit hparams/LoRA/{llama-7b,gpt2-xl}.yaml): lora_type adalora, rank 8,
lora_alpha 32, lora_dropout 0.1, lr 5e-3, num_steps 70 (Llama) / 30 (GPT-2 XL), layers [] (all),
target_modules [q_proj, v_proj] / [c_attn]; AdaLoRA init_r 12, target_r 8, orth_reg_weight 0.5.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from knowbench.devices import devices_of, input_device
from knowbench.editor import ChangeKind, Editor, EditOutcome, EditRequest, RunContext

from .ft import target_batch
from .hparams_yaml import YamlHparams

SEMANTICS = "easyedit@14cea82"
ADAPTER = "default"  # peft's adapter name; there is only ever one
ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_E")

# target modules when ``target_modules`` is None: EasyEdit's yamls for llama and gpt2, peft's
# defaults for the other supported families
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
}


@dataclass
class LoRAHparams:
    target_modules: list[str] | None = None  # module-name suffixes inside each block; None: by layout
    layers: list[int] = field(default_factory=list)  # empty: every layer
    rank: int = 8  # LoRA r (AdaLoRA ignores it, as peft does; its rank is init_r)
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    num_steps: int = 70  # full passes over the apply's requests
    lr: float = 5e-3
    weight_decay: float = 0.0
    batch_size: int = 0  # requests per optimiser step; 0: all of the apply's requests in one batch
    dropout_active: bool = True  # adapter dropout on while training, as in EasyEdit (see the docstring)


@dataclass
class AdaLoRAHparams(LoRAHparams):
    init_r: int = 12
    target_r: int = 8  # recorded only: without reallocation the rank stays init_r
    orth_reg_weight: float = 0.5


class _PeftAdapters(YamlHparams, Editor):
    """Shared machinery: target resolution, injection, training loop, exact removal."""

    kind: ClassVar[ChangeKind] = ChangeKind.MODULES
    supports_batch: ClassVar[bool] = True
    hparams_cls: ClassVar[type] = LoRAHparams


    def __init__(self, model: nn.Module, tokenizer: Any, hparams: LoRAHparams, context: RunContext):
        super().__init__(model, tokenizer, hparams, context)
        self.target_names, self.fan_in_fan_out = self._resolve_targets()
        self.tuner: Any = None  # peft's LoraModel / AdaLoraModel wrapping self.model in place
        self.n_applies = 0  # seeds each apply
        self.steps_trained = 0  # optimiser steps on the current adapter
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []  # the model's flags before injection
        self._last: dict[str, Any] = {}

    # -- what is adapted -------------------------------------------------------------------------
    def _resolve_targets(self) -> tuple[list[str], bool]:
        """Full names of the adapted modules (every match of a target suffix inside each chosen
        block) and whether they are Conv1D (stored (d_in, d_out): peft's fan_in_fan_out)."""
        from transformers.pytorch_utils import Conv1D

        hp = self.hparams
        suffixes = list(hp.target_modules or DEFAULT_TARGETS.get(self.adapter.model_type, []))
        n = self.adapter.n_layers
        bad = [l for l in hp.layers if not 0 <= l < n]
        if bad:
            raise ValueError(f"{self.name}: layers {bad} do not exist in this {n}-layer model")
        names, conv = [], []
        for i in hp.layers or range(n):
            block = self.adapter.block_name(i)
            for sub, module in self.adapter.block(i).named_modules():
                if sub and any(sub == s or sub.endswith("." + s) for s in suffixes):
                    if not isinstance(module, (nn.Linear, Conv1D)):
                        raise ValueError(f"{self.name}: {block}.{sub} is a {type(module).__name__}, "
                                         f"not a Linear or Conv1D layer an adapter can wrap")
                    names.append(f"{block}.{sub}")
                    conv.append(isinstance(module, Conv1D))
        if not names:
            raise ValueError(f"{self.name}: no module named {suffixes} in the blocks of this "
                             f"{self.adapter.model_type} model (set target_modules)")
        if len(set(conv)) > 1:
            raise ValueError(f"{self.name}: target modules mix Linear and Conv1D layers; choose one kind")
        return names, conv[0]

    def _peft_config(self) -> Any:
        raise NotImplementedError

    def _tuner_cls(self) -> type:
        raise NotImplementedError

    def _inject(self) -> None:
        """Wrap every target module with a fresh adapter, in place (the model object stays the same)."""
        # by object: peft renames a wrapped weight (".weight" -> ".base_layer.weight")
        self._requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on fan_in_fan_out / r for AdaLoRA
            self.tuner = self._tuner_cls()(self.model, self._peft_config(), ADAPTER)
        # a float16 / bfloat16 model's adapters train in float32, as peft's get_peft_model makes them
        # (the tuner built directly skips that; Adam's ε = 1e-8 is 0 in float16: NaN at the first step)
        self.tuner._cast_adapter_dtype(ADAPTER, autocast_adapter_dtype=True)
        self._adapter_mode(False)  # peft makes its modules in training mode; apply decides
        # peft freezes every base parameter; apply freezes them only while it trains
        self._reset_requires_grad()
        self.steps_trained = 0

    def _reset_requires_grad(self) -> None:
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)

    def _adapter_mode(self, training: bool) -> None:
        """Train / eval mode of what peft added (dropout, A, B), never of the wrapped base layer."""
        for module in self.adapted_modules().values():
            module.training = training
            for name, child in module.named_children():
                if name != "base_layer":
                    child.train(training)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trained adapter tensors, by parameter name (empty when no adapter is in)."""
        if self.tuner is None:
            return {}
        out = {}
        for n, p in self.model.named_parameters():
            # AdaLoRA "<module>.lora_A.default", LoRA "<module>.lora_A.default.weight"
            parts = n.split(".")
            if any(a in ADAPTER_TENSORS and b == ADAPTER for a, b in zip(parts, parts[1:])):
                out[n] = p
        return out

    def adapted_modules(self) -> dict[str, nn.Module]:
        """The peft layers now wrapping the target modules, by target name."""
        if self.tuner is None:
            return {}
        return {name: self.model.get_submodule(name) for name in self.target_names}

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """ΔW of every adapted module in its weight's storage layout (peft's get_delta_weight; Conv1D
        (d_in, d_out)), by the base weight's parameter name."""
        with torch.no_grad():
            return {f"{name}.weight": layer.get_delta_weight(ADAPTER).detach().clone()
                    for name, layer in self.adapted_modules().items()}

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """W + ΔW of every adapted module: the dense weights that compute what the adapters do."""
        out = {}
        for pname, delta in self.delta_weights().items():
            base = self.model.get_submodule(pname[: -len(".weight")]).get_base_layer().weight
            out[pname] = base.detach() + delta.to(base.dtype)
        return out

    # -- the edit ---------------------------------------------------------------------------------
    def _batch(self, requests: list[EditRequest]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ids of "{prompt} {target}" (right-padded) and labels: the target tokens, −100 elsewhere.
        A prompt too long for the context loses its start; a target that cannot fit is a
        ValueError naming the record (the same fitting as FT-M and scoring)."""
        input_ids, mask, labels, _ = target_batch(self.tok, self.model, requests, self.name)
        return input_ids, mask, labels

    def loss(self, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss through peft's tuner: the model's label loss (token mean over the
        batch), plus, for AdaLoRA, the orthogonality penalty its forward adds."""
        return self.tuner(input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False).loss

    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        hp: LoRAHparams = self.hparams
        device = input_device(self.model)
        batch = [t.to(device) for t in self._batch(requests)]  # fails before anything changes
        size = hp.batch_size if hp.batch_size > 0 else len(requests)
        chunks = [[t[i : i + size] for t in batch] for i in range(0, len(requests), size)]
        self.n_applies += 1
        fresh = self.tuner is None
        # every GPU the model (and so its adapters' dropout) uses: a model may be spread over several
        forked = sorted({d.index or 0 for d in devices_of(self.model) if d.type == "cuda"})
        losses: list[float] = []
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(self.context.seed + self.n_applies)
            if fresh:
                self._inject()
            trained = self.adapter_parameters()
            params = list(trained.values())
            if not params:  # not a ValueError: the runner would take it for a refused record
                raise RuntimeError(f"{self.name}: peft injected no trainable adapter tensors")
            ours = {id(p) for p in params}
            frozen = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ours]
            for p in frozen:
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            self._adapter_mode(hp.dropout_active)
            # a new Adam per call, also when a sequential run keeps training the same adapter
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
            try:
                with torch.enable_grad():
                    for _ in range(hp.num_steps):
                        for input_ids, mask, labels in chunks:
                            opt.zero_grad(set_to_none=True)
                            loss = self.loss(input_ids, mask, labels)
                            losses.append(float(loss.detach()))
                            loss.backward()
                            opt.step()
            finally:
                self._adapter_mode(False)
                for p in frozen:
                    p.requires_grad_(True)
                for p in params:
                    p.grad = None
        self.steps_trained += len(losses)
        self._last = {"fresh_adapter": fresh, "steps": len(losses),
                      "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
        return EditOutcome(changed_params=sorted(trained), info=dict(self._last))

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"adapters": int(self.tuner is not None), "steps_trained": self.steps_trained}
        if self._last.get("loss_last") is not None:
            out["loss_last"] = self._last["loss_last"]
        return out

    def restore(self) -> None:
        """Unload the adapter: every wrapped module is put back (the original objects), peft's
        attribute on the model removed, requires_grad flags as they were: bit-identical."""
        if self.tuner is None:
            return
        self.tuner.unload()
        if "peft_config" in self.model.__dict__:
            del self.model.__dict__["peft_config"]
        self._reset_requires_grad()
        self._requires_grad = []
        self.tuner = None
        self.steps_trained = 0

    def _config_record(self) -> dict[str, Any]:
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        import peft

        hp: LoRAHparams = self.hparams
        return {
            "semantics": SEMANTICS,
            "peft_version": peft.__version__,
            "rank_reallocation": False,
            "config": self._config_record(),
            "target_modules": list(self.target_names),
            "fan_in_fan_out": self.fan_in_fan_out,
            "optimizer": {"name": "adam", "lr": hp.lr, "weight_decay": hp.weight_decay, "num_steps": hp.num_steps,
                          "batch_size": hp.batch_size or "all requests of an apply"},
            "loss": "token-mean NLL of the target of '{prompt} {target}', prompt and pad labels -100",
            "dropout_active": hp.dropout_active,
            "seed": f"context.seed + apply count ({self.context.seed} + n)",
        }


class LoRA(_PeftAdapters):
    name = "lora"
    hparams_cls = LoRAHparams

    def _tuner_cls(self) -> type:
        from peft.tuners.lora import LoraModel

        return LoraModel

    def _peft_config(self) -> Any:
        from peft import LoraConfig

        hp = self.hparams
        return LoraConfig(r=hp.rank, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                          target_modules=list(self.target_names), fan_in_fan_out=self.fan_in_fan_out,
                          bias="none", inference_mode=False)

    def _config_record(self) -> dict[str, Any]:
        hp = self.hparams
        return {"type": "lora", "r": hp.rank, "lora_alpha": hp.lora_alpha, "lora_dropout": hp.lora_dropout,
                "scaling": hp.lora_alpha / hp.rank, "init": "A kaiming-uniform(a=sqrt 5), B zeros"}


class AdaLoRA(_PeftAdapters):
    name = "adalora"
    hparams_cls = AdaLoRAHparams

    def _tuner_cls(self) -> type:
        from peft.tuners.adalora import AdaLoraModel

        return AdaLoraModel

    def _peft_config(self) -> Any:
        from peft import AdaLoraConfig

        hp: AdaLoRAHparams = self.hparams
        # total_step only sizes the reallocation schedule, which never runs (update_and_allocate is
        # not called); newer peft refuses None, so it gets the number of steps of one apply
        return AdaLoraConfig(init_r=hp.init_r, target_r=hp.target_r, lora_alpha=hp.lora_alpha,
                             lora_dropout=hp.lora_dropout, orth_reg_weight=hp.orth_reg_weight,
                             total_step=max(1, hp.num_steps), target_modules=list(self.target_names),
                             fan_in_fan_out=self.fan_in_fan_out, inference_mode=False)

    def _config_record(self) -> dict[str, Any]:
        hp: AdaLoRAHparams = self.hparams
        return {"type": "adalora", "init_r": hp.init_r, "target_r": hp.target_r, "lora_alpha": hp.lora_alpha,
                "lora_dropout": hp.lora_dropout, "orth_reg_weight": hp.orth_reg_weight,
                "total_step": max(1, hp.num_steps), "tinit": 0, "tfinal": 0,
                "scaling": hp.lora_alpha / (hp.init_r + 1e-5),
                "init": "A, B ~ N(0, 0.02^2), E zeros", "r_ignored": hp.rank}
