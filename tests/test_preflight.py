"""Everything that can be checked before a model loads is checked first, with the option named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knowbench import preflight as preflight_mod
from knowbench import runner
from knowbench.cli import main
from knowbench.runner import RunConfig, RunError, preflight


@pytest.fixture
def no_model(monkeypatch):
    """A run that gets as far as loading a model or reading records fails the test."""
    def boom(*a, **k):
        raise AssertionError("preflight let the run go on to load something")

    monkeypatch.setattr(runner, "_load_model", boom)
    monkeypatch.setattr(runner, "_select_records", boom)


def cfg(**kw) -> RunConfig:
    kw.setdefault("editor", "ft-m")
    kw.setdefault("task", "zsre")
    kw.setdefault("model", "random-gpt2")
    return RunConfig(**kw)


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_needs_a_positive_count(limit, no_model):
    with pytest.raises(RunError, match=r"^--limit N needs N >= 1, got " + str(limit)):
        runner.run(cfg(limit=limit))


@pytest.mark.parametrize("flag, value, message", [
    ("editor", "rom", "--editor rom: unknown editor 'rom'; did you mean 'rome'?"),
    ("editor", "alpha", "did you mean 'alphaedit'?"),
    ("task", "zsr", "--task zsr: unknown task 'zsr'; did you mean 'zsre'?"),
    ("task", "counterfac", "did you mean 'counterfact'?"),
])
def test_unknown_names_suggest_the_closest(flag, value, message, no_model):
    with pytest.raises(RunError) as exc:
        runner.run(cfg(**{flag: value}))
    assert message in str(exc.value)


def test_names_are_case_insensitive_and_recorded_canonically(zsre_file):
    pf = preflight(cfg(editor="ROME", task="ZSRE"))
    assert pf.editor_info.name == "rome" and pf.task.name == "zsre"
    r = runner.run(cfg(editor="FT-M", task="ZsRE", data=str(zsre_file), limit=1, fluency=False, diagnostics=False))
    assert r["editor"]["name"] == "ft-m" and r["config"]["editor"] == "ft-m" and r["task"]["name"] == "zsre"


def test_device_without_cuda_or_mps(monkeypatch, no_model):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RunError) as exc:
        runner.run(cfg(device="cuda"))
    assert str(exc.value) == "--device cuda: this machine has no CUDA GPU (torch.cuda.is_available() is False)"
    with pytest.raises(RunError, match=r"--device cuda:1: this machine has no CUDA GPU"):
        runner.run(cfg(device="cuda:1"))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RunError, match=r"--device mps: this machine has no MPS"):
        runner.run(cfg(device="mps"))
    with pytest.raises(RunError, match=r"--device gpu0: not a torch device"):
        runner.run(cfg(device="gpu0"))


def test_device_index_beyond_the_gpus(monkeypatch, no_model):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RunError, match=r"--device cuda:2: this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        runner.run(cfg(device="cuda:2"))


def test_dtype_and_other_counts(no_model):
    with pytest.raises(RunError, match=r"^--dtype float8: unknown dtype"):
        runner.run(cfg(dtype="float8"))
    with pytest.raises(RunError, match=r"^--eval-batch-size N needs N >= 1"):
        runner.run(cfg(eval_batch_size=0))
    with pytest.raises(RunError, match=r"^--sequential T needs T >= 1"):
        runner.run(cfg(sequential=0))
    with pytest.raises(RunError, match=r"^--limit 2 is smaller than --sequential 5"):
        runner.run(cfg(sequential=5, limit=2))
    with pytest.raises(RunError, match=r"^editor rome edits one fact at a time; drop --batch-size"):
        runner.run(cfg(editor="rome", batch_size=2))
    with pytest.raises(RunError, match=r"^--train-data /nonexistent/train.json: no such file"):
        runner.run(cfg(train_data="/nonexistent/train.json"))


def test_output_must_be_writable_before_the_run(tmp_path, no_model):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(RunError) as exc:
        runner.run(cfg(output=str(blocker / "sub" / "r.json")))
    assert str(exc.value).startswith(f"--output {blocker / 'sub' / 'r.json'}: ") and "not a folder" in str(exc.value)
    with pytest.raises(RunError, match=r"^--output .*: is a folder; give a file path"):
        runner.run(cfg(output=str(tmp_path)))
    with pytest.raises(RunError, match=r"^--log-records .*not a folder"):
        runner.run(cfg(log_records=str(blocker / "recs.jsonl")))


def test_writable_check_leaves_nothing_behind(tmp_path):
    target = tmp_path / "new" / "deeper" / "r.json"
    preflight_mod.check_writable(target, "--output")
    assert list(tmp_path.iterdir()) == []


def test_cli_names_the_flag_and_exits_2(tmp_path, capsys, no_model):
    assert main(["run", "--editor", "ft-m", "--task", "zsre", "--limit", "0"]) == 2
    assert main(["run", "--editor", "rom", "--task", "zsre"]) == 2
    text = " ".join(capsys.readouterr().err.split())  # rich wraps log lines
    assert "--limit N needs N >= 1, got 0" in text and "did you mean 'rome'?" in text
    assert "no usable records" not in text and "Sample larger than population" not in text


# -- hyper-parameter files ------------------------------------------------------------------------
def _hp(tmp_path: Path, text: str, name: str = "hp.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, message", [
    ("layers: 1\n", "layers must be list[int] (e.g. [1]), got 1 (int)"),
    ("layers: [one]\n", "layers must be list[int], got ['one'] (list)"),
    ("v_num_grad_steps: 2.5\n", "v_num_grad_steps must be int, got 2.5 (float)"),
    ("v_lr: fast\n", "v_lr must be float, got 'fast' (str)"),
    ("fact_token: 3\n", "fact_token must be str, got 3 (int)"),
    ("mom2_adjustment: 2\n", "mom2_adjustment must be bool, got 2 (int)"),
    ("context_template_length_params: [5, 10]\n", "context_template_length_params must be list[list[int]]"),
    ("context_template_starts: The\n", "context_template_starts must be list[str] | None"),
    ("wrong_name: 1\n", "unknown hyper-parameter(s) wrong_name"),
    ("- 1\n- 2\n", "must hold a mapping"),
])
def test_hparams_values_are_type_checked_naming_field_and_file(tmp_path, text, message, no_model):
    path = _hp(tmp_path, text)
    with pytest.raises(RunError) as exc:
        runner.run(cfg(editor="rome", hparams=path))
    assert str(exc.value).startswith(f"--hparams {path}: ") and message in str(exc.value)


def test_hparams_coerce_yaml_spellings_as_before(tmp_path):
    from knowbench.editor import load_hparams_file, override_hparams
    from knowbench.editors.rome import ROMEHparams

    path = _hp(tmp_path, "v_lr: 1e-3\nv_num_grad_steps: '7'\nlayers: [0, '1']\nmom2_max_length: null\n"
                         "context_template_starts: [The, A]\nmom2_adjustment: 'false'\n")
    hp = override_hparams(ROMEHparams(), load_hparams_file(path))
    assert (hp.v_lr, hp.v_num_grad_steps, hp.layers, hp.mom2_max_length) == (1e-3, 7, [0, 1], None)
    assert hp.context_template_starts == ["The", "A"] and hp.mom2_adjustment is False


def test_missing_hparams_file(no_model):
    with pytest.raises(RunError, match=r"^--hparams /nonexistent.yaml: no such file"):
        runner.run(cfg(hparams="/nonexistent.yaml"))


def test_shipped_hparams_files_are_accepted_as_they_are():
    """editors/hparams/*.yaml (match: + hparams:) work with --hparams: the hparams mapping is taken."""
    import yaml

    from knowbench.editor import load_hparams_file

    from knowbench.editors.hparams_yaml import hparams_dir

    files = sorted((f for f in hparams_dir().iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    assert len(files) >= 10
    for f in files:
        editor = next(e for e in ("alphaedit", "ft-l", "ft-m", "memit", "rome", "ike", "ice", "lora", "adalora", "serac", "mend", "grace", "wise", "ultraedit", "least-overlap") if f.name.startswith(e + "-"))
        pf = preflight(cfg(editor=editor, hparams=str(f)))
        assert pf.hparams == yaml.safe_load(f.read_text())["hparams"] == load_hparams_file(f)


def test_hparams_file_with_match_and_hparams_runs(tmp_path, zsre_file):
    path = _hp(tmp_path, "match: {names: [anything]}\nhparams:\n  num_steps: 2\n  lr: 1e-2\n")
    r = runner.run(cfg(data=str(zsre_file), limit=1, hparams=path, fluency=False, diagnostics=False))
    assert r["editor"]["hparams"]["num_steps"] == 2 and r["editor"]["hparams"]["lr"] == 0.01


# -- knowbench world --help --------------------------------------------------------------------------
def test_world_help_prints_help_and_exits_0(capsys):
    assert main(["world", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: knowbench world" in out and "build" in out and "eval" in out
    assert main(["world", "build", "--help"]) == 0
    assert "--steps" in capsys.readouterr().out
    assert main(["world"]) == 2  # no subcommand: a usage error


def test_world_help_from_the_shell():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "knowbench", "world", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "usage: knowbench world" in p.stdout, p.stderr
    json.dumps(p.returncode)
