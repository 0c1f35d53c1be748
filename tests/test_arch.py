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


FAMILIES = {
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=8)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_declared_family_resolves(family):
    """Tiny random configs of the other supported families: names exist and v = W k holds."""
    import transformers

    cfg_name, model_name, kw = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(vocab_size=64, **kw)).eval()
    a = ArchAdapter(model)
    assert a.model_type == family and a.n_layers == 2
    module = a.rewrite_module(1)
    k = torch.randn(2, a.key_dim(1))
    bias = module.bias if getattr(module, "bias", None) is not None else 0
    with torch.no_grad():
        assert torch.allclose(module(k), k @ a.rewrite_weight(1).T + bias, atol=1e-6)
    assert a.lm_head is not None and a.final_norm is not None
