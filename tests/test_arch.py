"""The architecture adapter hides Conv1D vs Linear and names every part an editor needs."""

from __future__ import annotations

import pytest
import torch

from knowbench.arch import ArchAdapter, UnsupportedArchitecture


def test_rewrite_weight_is_linear_layout(tiny):
    model, tok = tiny
    a = ArchAdapter(model)
    layer = 1
    module = a.rewrite_module(layer)
    k = torch.randn(3, a.key_dim(layer))
    with torch.no_grad():
        v_module = module(k)
        bias = module.bias if getattr(module, "bias", None) is not None else 0
        v_adapter = k @ a.rewrite_weight(layer).T + bias
    assert torch.allclose(v_module, v_adapter, atol=1e-6)


def test_add_to_rewrite_weight_changes_only_that_layer(tiny):
    model, _ = tiny
    a = ArchAdapter(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = torch.randn(a.value_dim(2), a.key_dim(2))
    a.add_to_rewrite_weight(2, delta)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [a.rewrite_param_name(2)]
    assert torch.allclose(a.rewrite_weight(2) - (before[a.rewrite_param_name(2)].T if a.spec.conv1d else before[a.rewrite_param_name(2)]), delta, atol=1e-6)


def test_names_per_family(tiny):
    model, _ = tiny
    a = ArchAdapter(model)
    names = dict(model.named_modules())
    for layer in range(a.n_layers):
        assert a.rewrite_name(layer) in names and a.mlp_name(layer) in names
    assert a.final_norm is not None and a.lm_head is not None
    with pytest.raises(IndexError):
        a.rewrite_name(a.n_layers)


def test_unsupported_architecture_is_clear():
    class Cfg:
        model_type = "mamba"

    class Fake(torch.nn.Module):
        config = Cfg()

    with pytest.raises(UnsupportedArchitecture, match="mamba.*rewrite module.*Supported families"):
        ArchAdapter(Fake())
