"""Devices and dtypes (issue 17): the device rule of knowbench.devices, low-precision models with
the numerically sensitive parts (C, its factor, the closed forms) in float32 / float64, editors on a
model with accelerate's hooks on every block (the path of a model spread over devices), and
``load_model(..., device="auto")`` end to end. No GPU is needed: a spread over real devices is
checked by benchmarks/gpu_check.sh where one is lent."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from kb_locate import REQS, make_editor, rewrite_io
from knowbench.arch import ArchAdapter
from knowbench.devices import device_summary, devices_of, input_device, like, module_device
from knowbench.editor import RunContext
from knowbench.editors import memit as memit_mod
from knowbench.editors import ultraedit as ultraedit_mod
from knowbench.editors.alphaedit import AlphaEdit
from knowbench.editors.ft import FTHparams, FTM
from knowbench.editors.grace import GRACE, GRACEHparams
from knowbench.editors.lora import AdaLoRA, LoRA
from knowbench.editors.memit import MEMIT
from knowbench.editors.rome import ROME
from knowbench.editors.ultraedit import UltraEdit, UltraEditHparams
from knowbench.editors.wise import WISE, WISEHparams
from knowbench.keys import subject_index
from knowbench.models import dispatch, load_model, prepare_tokenizer, resolve_device, tiny_random_model

FAMILIES = ("gpt2", "llama")
MLP_OUT = {"gpt2": "transformer.h.{i}.mlp.c_proj", "llama": "model.layers.{i}.mlp.down_proj"}


def _model(family: str, dtype: torch.dtype = torch.float32):
    model, tok = tiny_random_model(family)
    prepare_tokenizer(tok)
    return model.to(dtype), tok


# -- the helpers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_device_helpers_on_one_device(family):
    model, _ = _model(family)
    cpu = torch.device("cpu")
    assert input_device(model) == cpu and devices_of(model) == [cpu] and device_summary(model) == "cpu"
    name = MLP_OUT[family].format(i=1)
    assert module_device(model, name) == cpu  # a module
    assert module_device(model, name + ".weight") == cpu  # a parameter
    assert module_device(model) == cpu
    with pytest.raises(AttributeError):
        module_device(model, "no.such.module")
    t = torch.arange(3)
    assert like(t, torch.zeros(1)) is t  # no copy when already there


def test_device_helpers_follow_the_module_not_the_first_parameter():
    """A block whose weights accelerate keeps off-device ("meta") reports its hook's execution
    device; the input device is the embeddings', whatever the first parameter says."""
    model, _ = _model("gpt2")
    block = model.transformer.h[2]
    block.to("meta")

    class Hook:  # what accelerate's AlignDevicesHook exposes
        execution_device = 3

    block._hf_hook = Hook()
    assert module_device(model, "transformer.h.2") == torch.device("cuda:3")
    assert module_device(model, "transformer.h.1") == torch.device("cpu")
    model.transformer.wte.to("meta")  # embeddings nowhere usable: the first real parameter
    assert input_device(model) == torch.device("cpu")


def test_resolve_device_for_builtin_models():
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_preflight_accepts_auto():
    from knowbench.preflight import check_device
    from knowbench.runconfig import RunError

    check_device("auto")
    check_device("cpu")
    with pytest.raises(RunError, match="not a torch device.*auto"):
        check_device("gpu0")


# -- low precision: the edit in the model's dtype, the closed forms in float32 / float64 ----------
def _half_ok(dtype: torch.dtype) -> bool:
    """Whether this torch runs the tiny models' forward and backward in ``dtype`` on the CPU."""
    model, tok = _model("llama", dtype)
    try:
        ids = torch.tensor([tok("a b c")["input_ids"]])
        out = model(input_ids=ids).logits.float().sum()
        out.backward()
        return bool(torch.isfinite(out))
    except (RuntimeError, NotImplementedError):
        return False


DTYPES = [torch.bfloat16] + ([torch.float16] if _half_ok(torch.float16) else [])


def _spy(monkeypatch, module, name: str, seen: list):
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        seen.extend(a.dtype for a in args if isinstance(a, torch.Tensor))
        out = real(*args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_locate_editors_in_low_precision_solve_in_float64(family, dtype, tmp_path, monkeypatch):
    model, tok = _model(family, dtype)
    adapter = ArchAdapter(model)
    # ROME: C float64, u and ΔW float64, and the low-precision layer still maps k to v*
    rome = make_editor(ROME, model, tok, tmp_path / "rome", mom2_ridge=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rome.apply([REQS[0]])
    sol = rome.last[0]
    sm = rome.second_moment(sol.layer)
    assert sm.mom2.dtype == torch.float64 and sm.cholesky().dtype == torch.float64
    assert sol.u.dtype == sol.delta_w.dtype == torch.float64 and torch.isfinite(sol.delta_w).all()
    w = adapter.rewrite_weight(sol.layer)
    assert w.dtype == dtype and torch.isfinite(w).all()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [adapter.rewrite_param_name(sol.layer)]
    k, v_now = rewrite_io(model, tok, REQS[0].prompt, sol.layer, subject_index(tok, REQS[0].prompt, REQS[0].subject))
    rel = float((v_now.double() - sol.v_star).norm() / sol.v_star.norm())
    assert rel < 0.05, rel  # written in float64, rounded once into the weight's dtype
    rome.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # MEMIT / AlphaEdit: the normal equations and the projected solve see float64 only
    seen: list = []
    _spy(monkeypatch, memit_mod, "normal_equations_update", seen)
    memit = make_editor(MEMIT, model, tok, tmp_path / "memit", mom2_ridge=1e-2)
    memit.apply(REQS[:2])
    assert seen and all(d == torch.float64 for d in seen), seen
    assert all(memit.second_moment(l).mom2.dtype == torch.float64 for l in memit.layers)
    memit.restore()
    seen.clear()
    alpha = make_editor(AlphaEdit, model, tok, tmp_path / "alpha", nullspace_threshold=1e9)
    monkeypatch.setattr(alpha, "projected_solve", _recording(alpha.projected_solve, seen))
    alpha.apply(REQS[:2])
    assert seen and all(d == torch.float64 for d in seen), seen
    assert all(alpha.basis(l).dtype == torch.float64 for l in alpha.layers)
    assert all(torch.isfinite(adapter.rewrite_weight(l)).all() for l in alpha.layers)
    alpha.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _recording(fn, seen: list):
    def wrapped(*args):
        seen.extend(a.dtype for a in args if isinstance(a, torch.Tensor))
        out = fn(*args)
        seen.append(out.dtype)
        return out

    return wrapped


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_trained_editors_in_low_precision(family, dtype, monkeypatch):
    """FT-M (float32 master copy), LoRA / AdaLoRA (float32 adapters), UltraEdit (ridge solve in
    float64), GRACE (codebook in float32) and WISE edit a low-precision model: finite weights /
    outputs in the model's dtype, exact restore. (Adam on a float16 tensor turns NaN at once.)"""
    model, tok = _model(family, dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    req = REQS[0]
    ids = torch.tensor([tok(req.prompt)["input_ids"]])
    with torch.no_grad():
        base = model(input_ids=ids).logits.float()

    ft = FTM(model, tok, FTHparams(layer=1, num_steps=3, lr=5e-2), RunContext())
    out = ft.apply([req])
    w = model.get_parameter(ft.param_name)
    assert w.dtype == dtype and torch.isfinite(w).all() and not torch.equal(w, before[ft.param_name])
    assert math.isfinite(out.info["loss_first"]) and math.isfinite(out.info["loss_last"])
    ft.restore()

    for cls in (LoRA, AdaLoRA):
        ed = cls(model, tok, dataclasses.replace(cls.default_hparams(model, "tiny"), num_steps=3), RunContext())
        out = ed.apply([req])
        adapters = ed.adapter_parameters()
        assert adapters and all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in adapters.values())
        assert math.isfinite(out.info["loss_last"]) and out.info["loss_last"] < out.info["loss_first"]
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits).all()
        ed.restore()

    seen: list = []
    _spy(monkeypatch, ultraedit_mod, "ridge_update", seen)
    ue = UltraEdit(model, tok, UltraEditHparams(inner_params=[MLP_OUT[family].format(i=1) + ".weight"], lr=1e-2),
                   RunContext())
    ue.apply(REQS[:2])
    assert seen and all(d == torch.float64 for d in seen), seen
    name = MLP_OUT[family].format(i=1) + ".weight"
    assert model.get_parameter(name).dtype == dtype and not torch.equal(model.get_parameter(name), before[name])
    ue.restore()

    grace = GRACE(model, tok, GRACEHparams(layer=1, n_iter=3, eps=1e-3), RunContext(seed=0))
    grace.apply([req])
    assert grace.codebook.values.dtype == torch.float32 and torch.isfinite(grace.codebook.values).all()
    with torch.no_grad():
        edited = model(input_ids=ids).logits
    assert edited.dtype == dtype and torch.isfinite(edited).all() and not torch.equal(edited.float(), base)
    grace.restore()

    wise = WISE(model, tok, WISEHparams(layer=2, n_iter=3, edit_lr=5.0, prefix_starts=["I"], prefix_lengths=[2],
                                        save_freq=100, merge_freq=100), RunContext(seed=0))
    wise.apply([req])
    assert wise.side is not None and torch.isfinite(wise.side).all()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    wise.restore()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits.float(), base)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- accelerate's hooks on every block: the code path of a model spread over devices ---------------
def _hooked(model):
    """``model`` with accelerate's hooks on each block, embeddings, final norm and head, as a
    device_map="auto" load attaches them (here every entry is the CPU, so results must not change)."""
    adapter = ArchAdapter(model)
    names = [n for n, _ in model.named_children()]
    base = names[0]  # transformer / model
    device_map = {f"{adapter.spec.blocks}.{i}": "cpu" for i in range(adapter.n_layers)}
    for name, child in getattr(model, base).named_children():
        if f"{base}.{name}" != adapter.spec.blocks:
            device_map[f"{base}.{name}"] = "cpu"
    device_map["lm_head"] = "cpu"
    dispatch(model, device_map, force_hooks=True)
    assert hasattr(adapter.block(0), "_hf_hook") and hasattr(model, "_hf_hook")
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_editors_give_the_same_edit_through_accelerate_hooks(family, tmp_path):
    plain, tok = _model(family)
    hooked = _hooked(copy.deepcopy(plain))
    assert device_summary(hooked) == "cpu"
    runs = [
        ("rome", lambda m, d: make_editor(ROME, m, tok, d)),
        ("memit", lambda m, d: make_editor(MEMIT, m, tok, d)),
        ("alphaedit", lambda m, d: make_editor(AlphaEdit, m, tok, d, nullspace_threshold=1e9)),
    ]
    for name, build in runs:
        got = {}
        for label, model in (("plain", plain), ("hooked", hooked)):
            ed = build(model, tmp_path / label / name)
            ed.apply(REQS[:2] if name != "rome" else REQS[:1])
            got[label] = {n: p.detach().clone() for n, p in model.named_parameters()}
            ed.restore()
        for n, p in got["plain"].items():
            assert torch.allclose(p, got["hooked"][n], rtol=1e-5, atol=1e-6), (name, n)
    # GRACE (replay of the upper blocks) and WISE (recorded pass + replay) through the hooks
    ids = torch.tensor([tok(REQS[0].prompt)["input_ids"]])
    outs = {}
    for label, model in (("plain", plain), ("hooked", hooked)):
        g = GRACE(model, tok, GRACEHparams(layer=1, n_iter=3, eps=1e-3), RunContext(seed=0))
        info = g.apply([REQS[0]]).info
        w = WISE(model, tok, WISEHparams(layer=2, n_iter=3, edit_lr=5.0, prefix_starts=["I"], prefix_lengths=[2],
                                         save_freq=100, merge_freq=100), RunContext(seed=0))
        w.apply([REQS[1]])
        with torch.no_grad():
            outs[label] = (model(input_ids=ids).logits, info["replay"], w.side.clone())
        w.restore()
        g.restore()
    assert outs["hooked"][1] is True  # GRACE's replay reproduced the hooked model's logits
    assert torch.allclose(outs["plain"][0], outs["hooked"][0], rtol=1e-5, atol=1e-5)
    assert torch.allclose(outs["plain"][2], outs["hooked"][2], rtol=1e-5, atol=1e-6)


# -- load_model(..., device="auto") ------------------------------------------------------------------
def test_load_auto_from_a_local_folder_and_edit(tmp_path):
    """A saved model loads with device="auto" (accelerate's map: every module on the CPU here),
    keeps hf_device_map, and a ROME edit runs end to end through the runner."""
    from kb_locate import toy_corpus
    from knowbench.runner import RunConfig, run

    model, tok = tiny_random_model("gpt2")
    folder = tmp_path / "tiny-gpt2"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    lm = load_model(str(folder), dtype="float32", device="auto")
    assert set(map(str, lm.model.hf_device_map.values())) == {"cpu"}
    assert input_device(lm.model) == torch.device("cpu")
    for (n, p), q in zip(lm.model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n
    ed = make_editor(ROME, lm.model, lm.tokenizer, tmp_path / "rome")
    ed.apply([REQS[0]])
    assert not torch.equal(ArchAdapter(lm.model).rewrite_weight(ed.layers[0]),
                           ArchAdapter(model).rewrite_weight(ed.layers[0]))
    data = tmp_path / "ZsRE-test-all.json"
    import json

    from conftest import zsre_records

    data.write_text(json.dumps(zsre_records(3)))
    r = run(RunConfig(editor="rome", task="zsre", data=str(data), model=str(folder), device="auto", limit=2,
                      fluency=False, diagnostics=False, extra={"stats": {"corpus": toy_corpus(32), "samples": 32}}))
    assert r["protocol"]["n_edits"] == 2 and 0 <= r["metrics"]["post"]["edit_succ"]["value"] <= 100
