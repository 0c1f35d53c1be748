"""Task files from a Hugging Face dataset repository: ``--data zjunlp/KnowEdit[@REVISION]``.

One job: find one file of a task in a hub dataset, fetch it into the hub's own cache (only that
file) and say where it came from. ``resolve_file(ref, names)`` tries the task's file names in order
and returns a :class:`HubFile`: the local path (inside the cache's ``snapshots/<commit>/`` folder)
plus its provenance ``{repo_id, revision (the commit sha), path_in_repo, sha256}``.

Where a name lives in the repository:

* ``zjunlp/KnowEdit``: the known layout (``KNOWEDIT_PATHS``, the dataset's ``benchmark/`` folder),
  fetched directly with ``hf_hub_download``, and only the first name the layout has (the test
  split: a cached training split never stands in for a test split that is not cached); a name the
  layout lacks (ZsRE's training split is not on the hub) is a clear error;
* any other repository, or a KnowEdit revision where the known path is missing: the first name
  found in the repository's file list (``HfApi.list_repo_files`` online, the cached snapshot's
  files offline), in ``folder`` first.

The cache is the hub's own (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/
hub``), read from the environment at call time; ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE``)
never touches the network. Offline or unreachable, a cached file is used as it is; one that is not
cached raises :class:`HubDataNotFound` (a :class:`knowbench.task.DataNotFound`, so the CLI prints it
and exits 2) naming the dataset, the file, the cache folder and the download command.

A file from the hub is recognised from its path alone (``.../datasets--owner--name/snapshots/
<sha>/<path_in_repo>``, the cache's layout), so ``data_file_info(path)`` gives a result's
``task.data_files`` entry its provenance without any state being carried along.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from .task import DataNotFound

KNOWEDIT_REPO = "zjunlp/KnowEdit"
# where each KnowEdit file lives in https://huggingface.co/datasets/zjunlp/KnowEdit (main, 6d21888):
# benchmark/{ZsRE,wiki_recent,wiki_counterfact,WikiBio,Convsent,trivia}/. ZsRE has no training split there.
KNOWEDIT_PATHS = {
    "ZsRE-test-all.json": "benchmark/ZsRE/ZsRE-test-all.json",
    "recent_test.json": "benchmark/wiki_recent/recent_test.json",
    "recent_train.json": "benchmark/wiki_recent/recent_train.json",
    "test_cf.json": "benchmark/wiki_counterfact/test_cf.json",
    "train_cf.json": "benchmark/wiki_counterfact/train_cf.json",
    "wikibio-test-all.json": "benchmark/WikiBio/wikibio-test-all.json",
    "wikibio-train-all.json": "benchmark/WikiBio/wikibio-train-all.json",
    "blender_test.json": "benchmark/Convsent/blender_test.json",
    "blender_val.json": "benchmark/Convsent/blender_val.json",
    "blender_train.json": "benchmark/Convsent/blender_train.json",
    "trivia_qa_test.json": "benchmark/trivia/trivia_qa_test.json",
    "trivia_qa_train.json": "benchmark/trivia/trivia_qa_train.json",
}

# owner/name[@revision]; hub names are letters, digits, "-", "_", "." (revisions: branches, tags,
# commit shas, refs/pr/N)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w.][\w./-]*))?$")
_DATA_SUFFIXES = (".json", ".jsonl")  # a name ending so is a file path, never a dataset id
_SHA = re.compile(r"^[0-9a-f]{40}$")


class HubDataNotFound(DataNotFound):
    """A task file that cannot be had from the hub: unreachable and not cached, no such dataset,
    revision or file. The message names the dataset, the file and what to do."""


@dataclass(frozen=True)
class HubRef:
    """A dataset on the hub, at a revision (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class HubFile:
    path: Path  # the local copy, inside the cache's snapshots/<revision>/ folder
    repo_id: str
    revision: str  # the commit sha the file was taken from
    path_in_repo: str

    def provenance(self) -> dict[str, str]:
        from .results import sha256_file

        return {"repo_id": self.repo_id, "revision": self.revision, "path_in_repo": self.path_in_repo,
                "sha256": sha256_file(self.path)}


def parse_hub_id(text: str | os.PathLike[str]) -> HubRef | None:
    """``owner/name`` or ``owner/name@revision`` as a :class:`HubRef`; None for anything else
    (absolute or ``./`` paths, ``~``, more than one ``/``, a ``.json`` / ``.jsonl`` name). The
    caller decides whether an existing local path wins (it does in :meth:`Task.resolve`)."""
    m = _HUB_ID.match(str(text))
    if m is None or m["repo"].lower().endswith(_DATA_SUFFIXES):
        return None
    if ".." in m["repo"] or "--" in m["repo"]:  # the hub refuses both in names
        return None
    return HubRef(m["repo"], m["rev"])


def cache_dir() -> Path:
    """The hub cache, with huggingface_hub's precedence, read from the environment now (its own
    constants are fixed when it is imported)."""
    env = os.environ
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
                                                  "huggingface")
        folder = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    env = [os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    return constants.HF_HUB_OFFLINE or any(v.strip().upper() in {"1", "ON", "YES", "TRUE"} for v in env)


def _repo_folder(repo_id: str, cache: Path) -> Path:
    return cache / ("datasets--" + repo_id.replace("/", "--"))


def _cached_snapshot(ref: HubRef, cache: Path) -> Path | None:
    """The cached snapshot folder of ``ref`` (a commit sha, or a branch / tag through refs/)."""
    folder = _repo_folder(ref.repo_id, cache)
    rev = ref.revision or "main"
    if not _SHA.match(rev):
        ref_file = folder / "refs" / rev
        if not ref_file.is_file():
            return None
        rev = ref_file.read_text().strip()
    snap = folder / "snapshots" / rev
    return snap if snap.is_dir() else None


def _download_help(ref: HubRef, flag: str) -> str:
    rev = f" --revision {ref.revision}" if ref.revision else ""
    return (f"download it on a machine with network (`hf download {ref.repo_id} --repo-type dataset{rev}`; "
            f"older huggingface_hub: `huggingface-cli download`) into the same cache, or pass {flag} FILE")


class _Fetcher:
    """hf_hub_download / list_repo_files for one dataset, with the cache and offline mode of now;
    remembers why a file could not be had, for the error message."""

    def __init__(self, ref: HubRef):
        self.ref, self.cache, self.offline = ref, cache_dir(), offline()
        self.unreachable: str | None = "HF_HUB_OFFLINE is set" if self.offline else None

    def missing(self, exc: Exception) -> HubDataNotFound:
        """The hub's answer that the dataset or its revision does not exist (or is private / gated)."""
        from huggingface_hub import errors

        if isinstance(exc, errors.RevisionNotFoundError):
            return HubDataNotFound(f"{self.ref}: dataset {self.ref.repo_id} has no revision {self.ref.revision!r}")
        return HubDataNotFound(f"{self.ref}: no dataset {self.ref.repo_id} on the Hugging Face hub (or it is "
                               "private or gated: log in with `hf auth login`)")

    def download(self, path_in_repo: str) -> Path | None:
        """The local path of ``path_in_repo``, or None when the repository (reachable) has no such
        file, or the hub cannot be reached and the file is not cached (``self.unreachable`` says so)."""
        from huggingface_hub import errors, hf_hub_download

        try:
            local = hf_hub_download(self.ref.repo_id, path_in_repo, repo_type="dataset", revision=self.ref.revision,
                                    cache_dir=self.cache, local_files_only=self.offline)
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as exc:
            raise self.missing(exc) from None
        except errors.EntryNotFoundError as exc:  # Remote... (no such file) or LocalEntryNotFoundError
            if isinstance(exc, errors.LocalEntryNotFoundError):
                self.unreachable = self.unreachable or "the hub cannot be reached (HF_HUB_OFFLINE=1 skips trying)"
            return None
        except (errors.HfHubHTTPError, OSError) as exc:  # the hub answered with an error, or no network
            self.unreachable = f"the hub cannot be reached ({type(exc).__name__}: {exc})"
            return None
        return Path(local)

    def files(self) -> list[str]:
        """The repository's files (posix paths): the hub's list, else the cached snapshot's."""
        if not self.offline:
            from huggingface_hub import HfApi, errors

            try:
                return HfApi().list_repo_files(self.ref.repo_id, repo_type="dataset", revision=self.ref.revision)
            except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as exc:
                raise self.missing(exc) from None
            except (errors.HfHubHTTPError, OSError) as exc:
                self.unreachable = self.unreachable or f"the hub cannot be reached ({type(exc).__name__}: {exc})"
        snap = _cached_snapshot(self.ref, self.cache)
        if snap is None:
            return []
        return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())


def _candidates(name: str, listing: Sequence[str], folder: str | None) -> list[str]:
    """Paths in the repository holding a file called ``name``: in ``folder`` first, then shallowest first."""
    hits = [f for f in listing if PurePosixPath(f).name == name]
    return sorted(hits, key=lambda f: (str(PurePosixPath(f).parent) != folder, f.count("/"), f))


def resolve_file(ref: HubRef, names: Sequence[str], what: str = "task file",
                 folder: str | None = None, flag: str = "--data") -> HubFile:
    """The first of ``names`` (in order of preference) the dataset ``ref`` has, fetched into the
    cache. ``folder``: prefer a file in that folder of the repository (a training split beside its
    test file); ``flag``: the option the messages tell the user to pass a local file with. Raises
    :class:`HubDataNotFound`.

    KnowEdit's files are fetched by their known path, and only the first of ``names`` KnowEdit has:
    another file (e.g. the training split) must never stand in for the test split because the test
    split is not cached. Other repositories are searched by name in their file list (the cached
    snapshot's when offline)."""
    fetch = _Fetcher(ref)
    tried: list[str] = []

    def unreachable() -> HubDataNotFound:
        return HubDataNotFound(
            f"cannot reach the Hugging Face hub to fetch {ref} (file {', '.join(tried) or ', '.join(names)}): "
            f"{fetch.unreachable}; it is not in the cache at {_repo_folder(ref.repo_id, fetch.cache)}; "
            f"{_download_help(ref, flag)}")

    if ref.repo_id.lower() == KNOWEDIT_REPO.lower():
        known = [KNOWEDIT_PATHS[n] for n in names if n in KNOWEDIT_PATHS]
        if not known:
            raise HubDataNotFound(f"{ref}: KnowEdit on the hub has no {what} (looked for "
                                  f"{', '.join(names)}); pass {flag} FILE")
        tried.append(known[0])
        local = fetch.download(known[0])
        if local is not None:
            return hub_file(local, ref.repo_id, known[0])
        if fetch.unreachable:
            raise unreachable()
        # reachable, and this revision has moved the file: look its name up in the file list
    listing = fetch.files()
    for name in names:
        for path_in_repo in _candidates(name, listing, folder):
            if path_in_repo in tried:
                continue
            tried.append(path_in_repo)
            local = fetch.download(path_in_repo)
            if local is not None:
                return hub_file(local, ref.repo_id, path_in_repo)
    if fetch.unreachable:
        raise unreachable()
    raise HubDataNotFound(f"{ref}: the dataset has no {what}: looked for {', '.join(names)}"
                          + (f" (tried {', '.join(tried)})" if tried else "") + f"; pass {flag} FILE")


def hub_file(local: Path, repo_id: str, path_in_repo: str) -> HubFile:
    info = data_file_info(local)
    revision = info["hub"]["revision"] if info else "unknown"
    return HubFile(Path(local), repo_id, revision, path_in_repo)


def parse_cache_path(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """``{repo_id, revision, path_in_repo}`` of a file inside a hub cache's dataset snapshot
    (``.../datasets--owner--name/snapshots/<sha>/<path_in_repo>``), else None. The path is read as
    given: snapshot files are links into ``blobs/``, which resolving would lose."""
    parts = Path(os.path.abspath(os.path.expanduser(path))).parts
    for i in range(len(parts) - 3, 0, -1):
        repo, snaps, sha = parts[i - 1], parts[i], parts[i + 1]
        if snaps == "snapshots" and repo.startswith("datasets--") and _SHA.match(sha):
            owner_name = repo[len("datasets--"):].split("--")
            if len(owner_name) != 2 or i + 2 >= len(parts):
                return None
            return {"repo_id": "/".join(owner_name), "revision": sha, "path_in_repo": "/".join(parts[i + 2:])}
    return None


def data_file_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Extra keys for a result's ``task.data_files`` entry: ``{"hub": {repo_id, revision,
    path_in_repo}}`` for a file of a hub dataset's cached snapshot, ``{}`` for any other file."""
    info = parse_cache_path(path)
    return {"hub": info} if info else {}
