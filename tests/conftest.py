"""Shared fixtures: tiny random models built offline and small task files written on the fly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# tiny models gain nothing from intra-op threads, and oversubscribed cores slow them badly
torch.set_num_threads(1)
os.environ.setdefault("KNOWBENCH_PROGRESS", "0")

SHARED_DATA = Path(os.environ.get("KNOWBENCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    if SHARED_DATA.exists():
        return
    skip = pytest.mark.skip(reason=f"real data not found at {SHARED_DATA} (set KNOWBENCH_SHARED_DATA)")
    for item in items:
        if "realdata" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request):
    """(model, tokenizer) of a tiny random model of each supported layout: GPT-2 Conv1D, Llama Linear + BOS."""
    from knowbench.models import prepare_tokenizer, tiny_random_model

    model, tok = tiny_random_model(request.param)
    prepare_tokenizer(tok)
    return model, tok


def zsre_records(n: int) -> list[dict]:
    """Synthetic records in KnowEdit's ZsRE schema."""
    out = []
    for i in range(n):
        subj = f"Zorb{i}"
        out.append({
            "subject": subj,
            "prompt": f"Which family does {subj} belong to?",
            "target_new": f"Noct{i % 7}",
            "ground_truth": [f"Aspid{i % 5}"],
            "rephrase_prompt": f"What family is {subj} in?",
            "cond": "",
            "portability": {"Reasoning": [{"prompt": f"The family of {subj} is named", "ground_truth": f"Owl{i % 3}"}]},
            "locality": {"Relation_Specificity": [{"prompt": f"The rank of {subj} is", "ground_truth": ["genus"]}]},
        })
    return out


@pytest.fixture
def zsre_file(tmp_path) -> Path:
    path = tmp_path / "ZsRE-test-all.json"
    path.write_text(json.dumps(zsre_records(12)))
    return path
