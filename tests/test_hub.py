"""``--data zjunlp/KnowEdit[@REV]``: task files from the Hugging Face hub (knowbench.hub).

Nothing here touches the network: every test runs with HF_HUB_OFFLINE=1 (the environment and
huggingface_hub's own flag, which makes any HTTP request raise) against a hub cache built in a temp
folder in the cache's real layout (``datasets--owner--name/{refs,snapshots/<sha>}``), so the real
``hf_hub_download`` finds the files there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from knowbench import hub, registry
from knowbench.task import DataNotFound

WORLD_ZSRE = Path(__file__).resolve().parents[1] / "knowbench" / "world" / "data" / "tasks" / "ZsRE-test-all.json"
SHA_MAIN = "1" * 40
SHA_V1 = "2" * 40
ZSRE_PATH = "benchmark/ZsRE/ZsRE-test-all.json"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline: the environment says so (read by knowbench.hub at call time) and
    huggingface_hub's import-time flag too, so a stray request would raise instead of going out."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put(cache: Path, files: dict[str, str], sha: str, refs: tuple[str, ...] = ("main",),
        repo: str = "zjunlp/KnowEdit") -> Path:
    """Write ``files`` (path in repo -> text) as the cached snapshot ``sha`` of ``repo``; ``refs`` point at it."""
    folder = cache / ("datasets--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / sha
    for rel, text in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).write_text(text)
    for ref in refs:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(sha)
    return snap


def world_zsre(n: int, start: int = 0) -> str:
    return json.dumps(json.loads(WORLD_ZSRE.read_text())[start:start + n])


def task(name: str):
    return registry.load_task(name)[1]


def test_parse_hub_id():
    assert hub.parse_hub_id("zjunlp/KnowEdit") == hub.HubRef("zjunlp/KnowEdit", None)
    assert hub.parse_hub_id("zjunlp/KnowEdit@v1.0") == hub.HubRef("zjunlp/KnowEdit", "v1.0")
    assert hub.parse_hub_id(f"zjunlp/KnowEdit@{SHA_V1}").revision == SHA_V1
    assert hub.parse_hub_id("me/mirror@refs/pr/1").revision == "refs/pr/1"
    for path in ("/abs/KnowEdit", "./zjunlp/KnowEdit", "~/data", "a/b/c", "data/ZsRE-test-all.json",
                 "zjunlp/", "KnowEdit", "a--b/c", "zjunlp/KnowEdit@"):
        assert hub.parse_hub_id(path) is None, path


def test_offline_cache_resolves_zsre_with_its_revision(hub_cache):
    snap = put(hub_cache, {ZSRE_PATH: world_zsre(5)}, SHA_MAIN)
    path = task("zsre").resolve("zjunlp/KnowEdit")
    assert path == snap / ZSRE_PATH  # inside the snapshot, not a copy
    assert len(task("zsre").reader(path).records) == 5
    info = hub.parse_cache_path(path)
    assert info == {"repo_id": "zjunlp/KnowEdit", "revision": SHA_MAIN, "path_in_repo": ZSRE_PATH}
    assert hub.data_file_info(path) == {"hub": info}
    got = hub.resolve_file(hub.HubRef("zjunlp/KnowEdit"), ["ZsRE-test-all.json"])
    assert got.provenance() == {**info, "sha256": hashlib.sha256((snap / ZSRE_PATH).read_bytes()).hexdigest()}
    # a file outside any hub cache carries no provenance
    assert hub.data_file_info(WORLD_ZSRE) == {} and hub.parse_cache_path(WORLD_ZSRE) is None


def test_cli_run_on_the_hub_dataset(hub_cache, tmp_path):
    """The whole run on ``--data zjunlp/KnowEdit``: the result names the cached file, its sha256
    and (once the runner records it) the revision."""
    from knowbench.cli import main

    snap = put(hub_cache, {ZSRE_PATH: world_zsre(4)}, SHA_MAIN)
    out = tmp_path / "r.json"
    assert main(["run", "--editor", "ft-m", "--task", "zsre", "--data", "zjunlp/KnowEdit", "--limit", "2",
                 "--no-fluency", "--no-diagnostics", "--model", "embedded", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    (entry,) = result["task"]["data_files"]
    assert Path(entry["path"]) == snap / ZSRE_PATH
    assert entry["sha256"] == hashlib.sha256((snap / ZSRE_PATH).read_bytes()).hexdigest()
    expected = {"repo_id": "zjunlp/KnowEdit", "revision": SHA_MAIN, "path_in_repo": ZSRE_PATH}
    assert hub.data_file_info(entry["path"]) == {"hub": expected}
    if "hub" in entry:  # recorded by the runner (result_of: **hub.data_file_info(p))
        assert entry["hub"] == expected
    assert result["config"]["data"] == "zjunlp/KnowEdit"
    assert len(result["records"]) == 2


def test_offline_empty_cache_is_a_clear_error(hub_cache, capsys):
    with pytest.raises(hub.HubDataNotFound) as err:
        task("zsre").resolve("zjunlp/KnowEdit")
    assert isinstance(err.value, DataNotFound)
    msg = str(err.value)
    for part in ("cannot reach the Hugging Face hub", "zjunlp/KnowEdit", ZSRE_PATH, "HF_HUB_OFFLINE",
                 str(hub_cache / "datasets--zjunlp--KnowEdit"), "hf download zjunlp/KnowEdit --repo-type dataset",
                 "--data FILE"):
        assert part in msg, part
    # through the CLI: a message and exit code 2, not a traceback
    from knowbench.cli import main

    assert main(["run", "--editor", "ft-m", "--task", "zsre", "--data", "zjunlp/KnowEdit", "--limit", "2",
                 "--no-fluency", "--model", "random-gpt2"]) == 2
    err_text = capsys.readouterr().err
    assert "zjunlp/KnowEdit" in err_text and ZSRE_PATH in err_text and "Traceback" not in err_text


def test_cached_training_split_never_stands_in_for_the_test_split(hub_cache):
    put(hub_cache, {"benchmark/wiki_counterfact/train_cf.json": "[]"}, SHA_MAIN)
    with pytest.raises(hub.HubDataNotFound, match="benchmark/wiki_counterfact/test_cf.json"):
        task("counterfact").resolve("zjunlp/KnowEdit")


def test_revision_pinning(hub_cache):
    main = put(hub_cache, {ZSRE_PATH: world_zsre(3)}, SHA_MAIN)
    v1 = put(hub_cache, {ZSRE_PATH: world_zsre(2, start=10)}, SHA_V1, refs=("v1",))
    zsre = task("zsre")
    assert zsre.resolve("zjunlp/KnowEdit") == main / ZSRE_PATH
    assert zsre.resolve("zjunlp/KnowEdit@main") == main / ZSRE_PATH
    assert zsre.resolve("zjunlp/KnowEdit@v1") == v1 / ZSRE_PATH  # a tag / branch, through refs/
    assert zsre.resolve(f"zjunlp/KnowEdit@{SHA_V1}") == v1 / ZSRE_PATH  # a commit sha
    assert hub.parse_cache_path(zsre.resolve("zjunlp/KnowEdit@v1"))["revision"] == SHA_V1
    assert len(zsre.reader(zsre.resolve("zjunlp/KnowEdit@v1")).records) == 2
    with pytest.raises(hub.HubDataNotFound, match="zjunlp/KnowEdit@v2"):
        zsre.resolve("zjunlp/KnowEdit@v2")  # not cached: the pinned revision, never another one


def test_local_path_wins_over_a_hub_id(hub_cache, tmp_path, monkeypatch):
    put(hub_cache, {ZSRE_PATH: world_zsre(3)}, SHA_MAIN)
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "zjunlp" / "KnowEdit"
    local.mkdir(parents=True)
    (local / "ZsRE-test-all.json").write_text(world_zsre(1))
    got = task("zsre").resolve("zjunlp/KnowEdit")
    assert got == Path("zjunlp/KnowEdit/ZsRE-test-all.json") and hub.data_file_info(got) == {}
    # a local file whose name reads as a dataset id wins too
    put(hub_cache, {ZSRE_PATH: world_zsre(3)}, SHA_MAIN, repo="me/zsre")
    (tmp_path / "me").mkdir()
    (tmp_path / "me" / "zsre").write_text(world_zsre(1))
    assert task("zsre").resolve("me/zsre") == Path("me/zsre")
    # a path that is neither local nor cached says it was read as a dataset id
    with pytest.raises(DataNotFound, match="no local file or folder either"):
        task("zsre").resolve("data/knowedit")


def test_training_split_from_the_same_snapshot(hub_cache):
    cf = "benchmark/wiki_counterfact/"
    train = json.loads((WORLD_ZSRE.parent / "train_cf.json").read_text())[:3]
    snap = put(hub_cache, {cf + "test_cf.json": (WORLD_ZSRE.parent / "test_cf.json").read_text(),
                           cf + "train_cf.json": json.dumps(train)}, SHA_MAIN)
    counterfact = task("counterfact")
    data = counterfact.resolve("zjunlp/KnowEdit")
    assert data == snap / cf / "test_cf.json"
    assert counterfact.resolve_train(None, data) == snap / cf / "train_cf.json"
    # not cached (offline): the hub branch names the file of that commit and --train-data
    (snap / cf / "train_cf.json").unlink()
    with pytest.raises(hub.HubDataNotFound) as err:
        counterfact.resolve_train(None, data)
    assert cf + "train_cf.json" in str(err.value) and SHA_MAIN in str(err.value)
    assert "--train-data FILE" in str(err.value)
    # ZsRE's training split is not on the hub at all
    put(hub_cache, {ZSRE_PATH: world_zsre(2)}, SHA_MAIN)
    with pytest.raises(hub.HubDataNotFound, match="KnowEdit on the hub has no training split for task zsre"):
        task("zsre").resolve_train(None, task("zsre").resolve("zjunlp/KnowEdit"))


def test_other_repository_found_by_name_in_the_cached_snapshot(hub_cache):
    snap = put(hub_cache, {"data/zsre/ZsRE-test-all.json": world_zsre(2), "README.md": "x"}, SHA_V1,
               repo="someone/knowedit-mirror")
    path = task("zsre").resolve("someone/knowedit-mirror")
    assert path == snap / "data/zsre/ZsRE-test-all.json"
    assert hub.data_file_info(path)["hub"]["repo_id"] == "someone/knowedit-mirror"


def test_cache_dir_honours_hf_home(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"


class _Response:  # what huggingface_hub's HTTP errors read from a response
    headers: dict[str, str] = {}
    request = None


def test_online_branches_against_a_simulated_hub(hub_cache, monkeypatch):
    """The online paths, with the hub simulated (hf_hub_download / list_repo_files replaced, so
    still no request): a KnowEdit file moved at some revision is found by name in the file list; a
    missing dataset, a missing revision and a lost connection are errors that say which."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    repo = {"README.md": "x", "moved/ZsRE/ZsRE-test-all.json": world_zsre(2), "moved/ZsRE/extra.json": "[]"}
    calls: list[str] = []
    state = {"down": False}

    def fake_download(repo_id, filename, *, repo_type, revision, cache_dir, local_files_only):
        assert repo_type == "dataset" and not local_files_only and Path(cache_dir) == hub_cache
        calls.append(filename)
        if state["down"]:
            raise OSError("Name or service not known")
        if repo_id != "zjunlp/KnowEdit":
            raise errors.RepositoryNotFoundError("404", response=_Response())
        if revision not in (None, "main"):
            raise errors.RevisionNotFoundError("404", response=_Response())
        if filename not in repo:
            raise errors.RemoteEntryNotFoundError("404", response=_Response())
        return str(put(hub_cache, {filename: repo[filename]}, SHA_MAIN) / filename)

    def fake_list(self, repo_id, *, repo_type, revision=None):
        assert repo_type == "dataset"
        if state["down"]:
            raise OSError("Name or service not known")
        return sorted(repo)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", fake_list)
    zsre = task("zsre")
    path = zsre.resolve("zjunlp/KnowEdit")
    assert calls == [ZSRE_PATH, "moved/ZsRE/ZsRE-test-all.json"]  # the known path, then by name
    assert hub.data_file_info(path)["hub"] == {"repo_id": "zjunlp/KnowEdit", "revision": SHA_MAIN,
                                               "path_in_repo": "moved/ZsRE/ZsRE-test-all.json"}
    with pytest.raises(hub.HubDataNotFound, match="no dataset nobody/nothing on the Hugging Face hub"):
        zsre.resolve("nobody/nothing")
    with pytest.raises(hub.HubDataNotFound, match="has no revision 'v9'"):
        zsre.resolve("zjunlp/KnowEdit@v9")
    with pytest.raises(hub.HubDataNotFound, match="the dataset has no WikiBio file"):
        task("wikibio").resolve("zjunlp/KnowEdit")
    state["down"] = True
    with pytest.raises(hub.HubDataNotFound, match="cannot reach the Hugging Face hub .*Name or service not known"):
        task("counterfact").resolve("zjunlp/KnowEdit")
