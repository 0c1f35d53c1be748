"""Where the pieces of a model live, for models spread over several devices.

A model loaded with ``device="auto"`` (:func:`knowbench.models.load_model`, ``--device auto``) may
have its blocks on several devices (cuda:0, cuda:1, cpu; ``model.hf_device_map`` says which);
accelerate's hooks move each block's inputs to that block's device, so a forward pass works as on
one device. The code that runs or edits such a model follows one rule:

* inputs to the model (token ids, masks, position ids) go to :func:`input_device`, the device of
  the input embeddings (not ``next(model.parameters()).device``, which need not be it);
* an editor computes on the device of the module / weight it edits (:func:`module_device`): the
  closed form of layer l is solved where W_l lives, C of layer l is kept there;
* a tensor that indexes or meets a tensor from another part of the model (row / column indices
  into a block's output, labels against logits) is moved to that tensor's device (:func:`like`);
* what is added to a weight is cast to the weight's own device and dtype at the end.

On one device every move here is a no-op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """The device token ids must be on: that of the input embeddings (the first parameter's when
    the model has no ``get_input_embeddings``)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor) and w.device.type != "meta":
        return w.device
    return first_device(model)


def first_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (else buffer); cpu for a module with neither.
    A parameter accelerate has offloaded (on "meta") reports its hook's execution device."""
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
        hook = getattr(module, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    return torch.device("cpu")


def module_device(model: nn.Module, name: str = "") -> torch.device:
    """The device of the submodule ``name`` of ``model`` (dotted, as in ``named_modules``; "" for
    the model itself), or of the module holding the parameter ``name`` (``...weight``)."""
    try:
        mod = model.get_submodule(name) if name else model
    except AttributeError:
        param = model.get_parameter(name)  # AttributeError if neither
        return param.device
    return first_device(mod)


def like(t: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``t`` on ``other``'s device (dtype kept); ``t`` itself when it is already there."""
    return t if t.device == other.device else t.to(other.device)


def devices_of(model: nn.Module) -> list[torch.device]:
    """The distinct devices holding the model's parameters, in first-seen order."""
    seen: list[torch.device] = []
    for p in model.parameters():
        if p.device not in seen:
            seen.append(p.device)
    return seen


def device_summary(model: Any) -> str:
    """"cpu", "cuda:0", or "cuda:0 ×20 blocks, cpu ×28 blocks" for a spread model (for logs)."""
    hf_map = getattr(model, "hf_device_map", None)
    if isinstance(hf_map, dict) and len(set(map(str, hf_map.values()))) > 1:
        counts: dict[str, int] = {}
        for dev in hf_map.values():
            key = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{d} ×{n} modules" for d, n in counts.items())
    return ", ".join(str(d) for d in devices_of(model)) or "cpu"
