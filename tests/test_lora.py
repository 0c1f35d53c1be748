"""LoRA / AdaLoRA through peft: the adapters are live on the runner's model object, compute the dense
W + ΔW of a hand formula, train the EasyEdit loss, keep training in sequence, and leave no trace."""

from __future__ import annotations

import copy

import pytest
import torch

from knowbench.editor import EditRequest, RunContext
from knowbench.editors.lora import AdaLoRA, AdaLoRAHparams, LoRA, LoRAHparams

REQ = EditRequest(prompt="The capital of Zorbia is", target_new="Quix", subject="Zorbia")
REQ2 = EditRequest(prompt="Mount Plumbo stands in", target_new="Wexa", subject="Mount Plumbo")
EDITORS = {"lora": (LoRA, LoRAHparams), "adalora": (AdaLoRA, AdaLoRAHparams)}


def _editor(which: str, model, tok, seed: int = 0, **hp):
    cls, hp_cls = EDITORS[which]
    return cls(model, tok, hp_cls(**hp), RunContext(seed=seed))


def _snapshot(model):
    """Everything restore must give back: tensors, module tree (objects), flags, attributes, hooks."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()},
        "tree": [(n, id(m), type(m)) for n, m in model.named_modules()],
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "buffers": [(n, id(b)) for n, b in model.named_buffers()],
        "training": [m.training for m in model.modules()],
        "attrs": sorted(model.__dict__),
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "config": model.config.to_dict(),
    }


def _assert_same(model, snap):
    now = _snapshot(model)
    assert now["state"].keys() == snap["state"].keys()
    assert all(torch.equal(now["state"][k], v) for k, v in snap["state"].items())
    for key in ("tree", "params", "buffers", "training", "attrs", "hooks", "config"):
        assert now[key] == snap[key], key


def _ids(tok, text="The capital of Zorbia is Quix"):
    return torch.tensor([tok(text)["input_ids"]])


def _hand_delta(layer, which: str) -> torch.Tensor:
    """ΔW in Linear layout (d_out, d_in), from the adapter's own tensors."""
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    if which == "lora":  # peft LoRA: Linear modules A (r, d_in), B (d_out, r)
        A, B = A.weight, B.weight
        return (B @ A) * (32.0 / 8)
    E = layer.lora_E["default"]  # (r, 1): one singular value per row of A
    return (B @ (A * E)) * 32.0 / 12  # α / r_cur, r_cur = init_r = 12 (peft adds 1e-5 to r_cur)


@pytest.mark.parametrize("which", ["lora", "adalora"])
def test_restore_is_bit_identical_and_adapters_run_on_the_same_object(tiny, which):
    model, tok = tiny
    snap = _snapshot(model)
    x = _ids(tok)
    base = model(x).logits.detach()
    editor = _editor(which, model, tok, num_steps=5, lr=2e-2)
    out = editor.apply([REQ])
    per_module = 3 if which == "adalora" else 2  # A, B (and E)
    assert len(out.changed_params) == per_module * len(editor.target_names)
    # the runner's reference (this very object) now runs the adapters
    assert not torch.allclose(model(x).logits, base)
    assert not model.training and all(not m.training for m in model.modules())
    editor.restore()
    _assert_same(model, snap)
    assert torch.equal(model(x).logits, base)
    editor.restore()  # a second restore is a no-op
    _assert_same(model, snap)


@pytest.mark.parametrize("which", ["lora", "adalora"])
def test_merged_weight_is_the_hand_formula_and_computes_the_edited_model(tiny, which):
    model, tok = tiny
    dense = copy.deepcopy(model)  # the independent check: a plain model with W replaced by W + ΔW
    editor = _editor(which, model, tok, num_steps=6, lr=3e-2)
    editor.apply([REQ])
    conv = model.config.model_type == "gpt2"
    assert editor.fan_in_fan_out == conv
    expect = ["c_attn"] if conv else ["q_proj", "v_proj"]
    assert sorted({n.rsplit(".", 1)[-1] for n in editor.target_names}) == sorted(expect)
    assert len(editor.target_names) == len(expect) * editor.adapter.n_layers  # every layer
    deltas, merged = editor.delta_weights(), editor.merged_weights()
    for name, layer in editor.adapted_modules().items():
        hand = _hand_delta(layer, which).detach()
        assert hand.abs().max() > 0  # trained away from the zero start
        stored = hand.T if conv else hand  # Conv1D keeps W as (d_in, d_out)
        w0 = dense.get_submodule(name).weight.detach()
        assert w0.shape == stored.shape
        assert torch.allclose(deltas[f"{name}.weight"], stored, rtol=1e-5, atol=1e-7)  # peft's get_delta_weight
        assert torch.allclose(merged[f"{name}.weight"], w0 + stored, rtol=1e-5, atol=1e-7)
        if which == "adalora":
            assert float(layer.ranknum["default"]) == 12.0 and layer.scaling["default"] == 32.0
            assert layer.lora_A["default"].shape[0] == 12  # init_r, never reallocated
    with torch.no_grad():
        for pname, w in merged.items():
            dense.get_parameter(pname).copy_(w)
    x = _ids(tok, "Mount Plumbo stands in the capital of Zorbia")
    with torch.no_grad():
        assert torch.allclose(model(x).logits, dense(x).logits, atol=1e-5, rtol=1e-4)
    editor.restore()


@pytest.mark.parametrize("which", ["lora", "adalora"])
def test_loss_is_target_nll_plus_the_adalora_penalty_and_decreases(tiny, which):
    model, tok = tiny
    editor = _editor(which, model, tok, num_steps=25)
    out = editor.apply([REQ])
    assert out.info["steps"] == 25 and out.info["loss_last"] < out.info["loss_first"]
    input_ids, mask, labels = editor._batch([REQ])
    assert (labels != -100).sum() == len(tok(" Quix", add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        got = editor.loss(input_ids, mask, labels)
        logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), -1)
        tgt, keep = labels[:, 1:], labels[:, 1:] != -100
        nll = -logp[:, :-1].gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean()
        penalty = torch.tensor(0.0)
        if which == "adalora":
            norms = []
            for layer in editor.adapted_modules().values():
                A, B = layer.lora_A["default"], layer.lora_B["default"]
                norms.append(torch.linalg.matrix_norm(A @ A.T - torch.eye(A.shape[0])))
                norms.append(torch.linalg.matrix_norm(B.T @ B - torch.eye(B.shape[1])))
            penalty = 0.5 * torch.stack(norms).mean()
            assert penalty > 0.1  # not negligible: it is part of what EasyEdit optimises
    assert torch.allclose(got, nll + penalty, rtol=1e-5, atol=1e-6)
    editor.restore()


@pytest.mark.parametrize("which", ["lora", "adalora"])
def test_sequential_keeps_training_the_same_adapter(tiny, which):
    model, tok = tiny
    snap = _snapshot(model)
    editor = _editor(which, model, tok, num_steps=5, lr=2e-2)
    first = editor.apply([REQ])
    tuner = editor.tuner
    params = editor.adapter_parameters()
    values = {n: p.detach().clone() for n, p in params.items()}
    second = editor.apply([REQ2])  # no restore in between: the sequential protocol
    assert first.info["fresh_adapter"] and not second.info["fresh_adapter"]
    assert editor.tuner is tuner and editor.steps_trained == 10
    now = editor.adapter_parameters()
    assert now.keys() == params.keys() and all(now[n] is params[n] for n in params)  # the same tensors
    moved = [n for n in params if "lora_A" in n or "lora_B" in n]
    assert all(not torch.equal(now[n], values[n]) for n in moved)  # ... still trained
    for layer in editor.adapted_modules().values():
        assert list(layer.lora_A.keys()) == ["default"]  # one adapter, not one per apply
    assert editor.report()["adapters"] == 1
    editor.restore()
    _assert_same(model, snap)


def test_batch_apply_trains_one_adapter_on_all_requests(tiny):
    model, tok = tiny
    editor = _editor("lora", model, tok, num_steps=3)
    out = editor.apply([REQ, REQ2])
    assert out.info["steps"] == 3  # one batch of both requests per step
    editor.restore()
    editor = _editor("lora", model, tok, num_steps=3, batch_size=1)
    out = editor.apply([REQ, REQ2])
    assert out.info["steps"] == 6  # EasyEdit's loop: one step per request per pass
    editor.restore()


@pytest.mark.parametrize("which", ["lora", "adalora"])
def test_runs_repeat_exactly_and_leave_the_rng_alone(tiny, which):
    model, tok = tiny
    runs = []
    for seed, dropout in ((0, True), (0, True), (1, True), (0, False)):
        editor = _editor(which, model, tok, seed=seed, num_steps=3, dropout_active=dropout)
        editor.apply([REQ])
        runs.append({n: p.detach().clone() for n, p in editor.adapter_parameters().items()})
        editor.restore()
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert any(not torch.equal(runs[0][n], runs[2][n]) for n in runs[0])  # the seed draws the init
    assert any(not torch.equal(runs[0][n], runs[3][n]) for n in runs[0])  # the adapter dropout acts
    # the caller's RNG stream is untouched by an apply
    editor = _editor(which, model, tok, num_steps=2)
    torch.manual_seed(7)
    editor.apply([REQ])
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))
    editor.restore()


def test_layers_and_target_modules_select_the_adapted_modules(tiny):
    model, tok = tiny
    conv = model.config.model_type == "gpt2"
    target = "c_attn" if conv else "k_proj"
    editor = _editor("adalora", model, tok, layers=[1, 3], target_modules=[target], num_steps=1)
    prefix = "transformer.h" if conv else "model.layers"
    sub = "attn" if conv else "self_attn"
    assert editor.target_names == [f"{prefix}.1.{sub}.{target}", f"{prefix}.3.{sub}.{target}"]
    editor.apply([REQ])
    assert sorted(editor.adapted_modules()) == editor.target_names
    editor.restore()
    with pytest.raises(ValueError, match="layers"):
        _editor("lora", model, tok, layers=[99])
    with pytest.raises(ValueError, match="no module"):
        _editor("lora", model, tok, target_modules=["nope"])


def test_runner_records_peft_version(zsre_file, tmp_path):
    import peft

    from knowbench.runconfig import RunConfig
    from knowbench.runner import run

    r = run(RunConfig(editor="adalora", task="zsre", data=str(zsre_file), model="random-llama", limit=2,
                      fluency=False, output=str(tmp_path / "out.json")))
    prov = r["editor"]["provenance"]
    assert prov["peft_version"] == peft.__version__ and prov["semantics"] == "easyedit@14cea82"
    assert prov["rank_reallocation"] is False and prov["config"]["init_r"] == 12
    assert prov["target_modules"] and all(n.endswith(("q_proj", "v_proj")) for n in prov["target_modules"])
    assert r["editor"]["kind"] == "modules"
    assert len(r["edits"]) == 2 and all(e["loss_last"] < e["loss_first"] for e in r["edits"])


def test_shipped_hparams_files_are_valid():
    from knowbench.editor import load_hparams_file, override_hparams
    from knowbench.editors.hparams_yaml import hparams_dir

    files = [f for f in hparams_dir().iterdir() if f.name.startswith(("lora-", "adalora-")) and f.name.endswith(".yaml")]
    assert {f.name for f in files} >= {"lora-llama.yaml", "lora-gpt2-xl.yaml", "adalora-llama.yaml", "adalora-gpt2-xl.yaml",
                                       "lora-embedded.yaml", "adalora-embedded.yaml"}
    for f in files:
        hp_cls = AdaLoRAHparams if f.name.startswith("adalora-") else LoRAHparams
        hp = override_hparams(hp_cls(), load_hparams_file(f), source=f.name)  # type-checked field by field
        assert hp.num_steps > 0 and hp.lr > 0
