"""Architecture adapter: where the parts an editor needs live in each model family.

Editors speak of the rewrite module's weight W as a Linear-layout matrix of shape (d_out, d_in),
so that v = W k. GPT-2 stores its Conv1D weight transposed, (d_in, d_out); the adapter hides that.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Module-name templates for one family (``{i}`` is the layer index)."""

    blocks: str  # the ModuleList of transformer blocks
    mlp: str  # block i's MLP
    rewrite: str  # MLP output projection: its input is the key k, its output the value v
    final_norm: str
    lm_head: str
    embed: str  # token embedding
    conv1d: bool = False  # weight stored (d_in, d_out)
    mlp_in: str | None = None  # first MLP projection (FT-L style editors, diagnostics)


ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        blocks="transformer.h",
        mlp="transformer.h.{i}.mlp",
        rewrite="transformer.h.{i}.mlp.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        conv1d=True,
        mlp_in="transformer.h.{i}.mlp.c_fc",
    ),
    "gptj": ArchSpec(
        blocks="transformer.h",
        mlp="transformer.h.{i}.mlp",
        rewrite="transformer.h.{i}.mlp.fc_out",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        mlp_in="transformer.h.{i}.mlp.fc_in",
    ),
    "gpt_neox": ArchSpec(
        blocks="gpt_neox.layers",
        mlp="gpt_neox.layers.{i}.mlp",
        rewrite="gpt_neox.layers.{i}.mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="embed_out",
        embed="gpt_neox.embed_in",
        mlp_in="gpt_neox.layers.{i}.mlp.dense_h_to_4h",
    ),
}
for _family in ("llama", "mistral", "qwen2", "gemma"):
    ARCHS[_family] = ArchSpec(
        blocks="model.layers",
        mlp="model.layers.{i}.mlp",
        rewrite="model.layers.{i}.mlp.down_proj",
        final_norm="model.norm",
        lm_head="lm_head",
        embed="model.embed_tokens",
        mlp_in="model.layers.{i}.mlp.up_proj",
    )


class UnsupportedArchitecture(ValueError):
    pass


class ArchAdapter:
    """Names and weight access for one loaded model."""

    def __init__(self, model: nn.Module):
        self.model = model
        model_type = getattr(model.config, "model_type", None)
        spec = ARCHS.get(model_type)
        if spec is None:
            raise UnsupportedArchitecture(
                f"model_type {model_type!r} ({type(model).__name__}) is not supported: knowbench "
                f"needs the names of its transformer blocks, MLP, MLP output projection (the "
                f"rewrite module), final norm and LM head. Supported families: "
                f"{', '.join(sorted(ARCHS))}."
            )
        self.model_type: str = model_type
        self.spec = spec
        modules = dict(model.named_modules())
        missing = [
            name
            for name in (spec.blocks, spec.rewrite.format(i=0), spec.final_norm)
            if name not in modules
        ]
        if self._output_embeddings(model, modules) is None:
            missing.append(spec.lm_head)
        if missing:
            raise UnsupportedArchitecture(
                f"{type(model).__name__} (model_type {model_type!r}) lacks the modules knowbench "
                f"expects for this family: {', '.join(missing)}"
            )
        self._modules = modules
        self.n_layers: int = len(modules[spec.blocks])

    # -- names -----------------------------------------------------------------------------
    def rewrite_name(self, layer: int) -> str:
        return self.spec.rewrite.format(i=self._check(layer))

    def rewrite_param_name(self, layer: int) -> str:
        return self.rewrite_name(layer) + ".weight"

    def mlp_name(self, layer: int) -> str:
        return self.spec.mlp.format(i=self._check(layer))

    def block_name(self, layer: int) -> str:
        return f"{self.spec.blocks}.{self._check(layer)}"

    def module(self, name: str) -> nn.Module:
        return self._modules[name]

    def block(self, layer: int) -> nn.Module:
        return self.module(self.block_name(layer))

    def rewrite_module(self, layer: int) -> nn.Module:
        return self.module(self.rewrite_name(layer))

    @staticmethod
    def _output_embeddings(model: nn.Module, modules: dict[str, nn.Module]) -> nn.Module | None:
        # transformers renames heads across versions (GPT-NeoX: embed_out -> lm_head); ask the model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return head if head is not None else modules.get(ARCHS[model.config.model_type].lm_head)

    @property
    def lm_head(self) -> nn.Module:
        return self._output_embeddings(self.model, self._modules)

    @property
    def final_norm(self) -> nn.Module:
        return self.module(self.spec.final_norm)

    @property
    def body(self) -> nn.Module:
        """The base model (everything below the LM head), whose output is normed hidden states."""
        return self.model.base_model

    def _check(self, layer: int) -> int:
        if not -self.n_layers <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for a {self.n_layers}-layer model")
        return layer % self.n_layers

    # -- weights in Linear layout (d_out, d_in) --------------------------------------------
    def rewrite_weight(self, layer: int) -> torch.Tensor:
        """W of the rewrite module as (d_out, d_in); a view for Linear, a transposed view for Conv1D."""
        w = self.rewrite_module(layer).weight
        return w.T if self.spec.conv1d else w

    def add_to_rewrite_weight(self, layer: int, delta: torch.Tensor) -> None:
        """W += ΔW with ΔW given as (d_out, d_in), in the weight's own dtype and device."""
        w = self.rewrite_module(layer).weight
        upd = delta.T if self.spec.conv1d else delta
        with torch.no_grad():
            w.add_(upd.to(dtype=w.dtype, device=w.device))

    def key_dim(self, layer: int) -> int:
        return self.rewrite_weight(layer).shape[1]

    def value_dim(self, layer: int) -> int:
        return self.rewrite_weight(layer).shape[0]


# -- KV caches across transformers releases ------------------------------------------------------
def cache_kwargs(model: nn.Module, cache: object) -> dict[str, object]:
    """The forward keyword for a KV cache: transformers 5.2x renamed ``past_key_values`` to
    ``cache`` (the old name warns and goes in 5.40); releases before that only know the old one."""
    return {_cache_keyword(type(model)): cache, "use_cache": True}


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_cls: type) -> str:
    # read once per model class: callers ask on every generated token
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def returned_cache(out: object) -> object:
    """The KV cache a forward pass returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
