"""Plugin discovery through entry points.

Listing names reads only distribution metadata; a plugin module is imported the first time its
object is asked for. Built-in tasks and editors are found the same way as third-party ones, from
the ``knowbench.tasks`` / ``knowbench.editors`` groups of installed distributions.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any

TASK_GROUP = "knowbench.tasks"
EDITOR_GROUP = "knowbench.editors"


class PluginError(LookupError):
    """Unknown plugin name, a name provided twice, or a plugin that failed to import."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    value: str  # "module:attr", what the entry point resolves to
    dist: str
    dist_version: str
    group: str

    def load(self) -> Any:
        module, _, attr = self.value.partition(":")
        try:
            import importlib

            obj = importlib.import_module(module)
            for part in attr.split(".") if attr else []:
                obj = getattr(obj, part)
        except Exception as exc:  # a broken plugin must say which one it is
            raise PluginError(
                f"{self.group} plugin {self.name!r} ({self.value}) from distribution "
                f"{self.dist} {self.dist_version} failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        return obj


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def discover(group: str) -> dict[str, PluginInfo]:
    """All plugins of ``group`` keyed by name; raises on a name offered by two distributions."""
    found: dict[str, PluginInfo] = {}
    for ep in metadata.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        info = PluginInfo(
            name=ep.name,
            value=ep.value,
            dist=dist.metadata["Name"] if dist is not None else "?",
            dist_version=dist.version if dist is not None else "?",
            group=group,
        )
        key = _canonical(ep.name)
        prev = found.get(key)
        if prev is not None and (prev.dist, prev.value) != (info.dist, info.value):
            raise PluginError(
                f"{group} name {ep.name!r} is provided twice: by {prev.dist} {prev.dist_version} "
                f"({prev.value}) and by {info.dist} {info.dist_version} ({info.value}); "
                f"uninstall one of them"
            )
        found[key] = info
    return found


def get(group: str, name: str) -> PluginInfo:
    """The plugin registered as ``name`` (case-insensitive; ``-`` and ``_`` alike); an unknown name is
    a :class:`PluginError` with the closest names ("did you mean") and every available one."""
    plugins = discover(group)
    info = plugins.get(_canonical(name)) if isinstance(name, str) else None
    if info is None:
        kind = group.rsplit(".", 1)[-1]
        available = ", ".join(sorted(p.name for p in plugins.values())) or "none installed"
        hint = ""
        close = suggest(name, plugins) if isinstance(name, str) else []
        if close:
            hint = " did you mean " + " or ".join(repr(c) for c in close) + "?"
        raise PluginError(f"unknown {kind[:-1]} {name!r};{hint} available {kind}: {available}")
    return info


def suggest(name: str, plugins: dict[str, PluginInfo], n: int = 3) -> list[str]:
    """Up to ``n`` registered names closest to ``name`` (difflib), each plugin once, best first."""
    import difflib

    key = _canonical(name)
    close = difflib.get_close_matches(key, list(plugins), n=n * 2, cutoff=0.6)
    if not close:  # a prefix (``alpha`` for ``alphaedit``) is close enough too
        close = [k for k in plugins if key and k.startswith(key)]
    out: list[str] = []
    seen: set[tuple[str, str]] = set()
    for k in close:
        info = plugins[k]
        if (info.dist, info.value) in seen:
            continue
        seen.add((info.dist, info.value))
        out.append(info.name)
    return out[:n]


def load(group: str, name: str) -> Any:
    return get(group, name).load()


def group_aliases(plugins: dict[str, PluginInfo]) -> list[tuple[PluginInfo, list[str]]]:
    """Entry points that resolve to the same object are one plugin under several names."""
    by_value: dict[tuple[str, str], list[PluginInfo]] = {}
    for info in plugins.values():
        by_value.setdefault((info.dist, info.value), []).append(info)
    out = []
    for infos in by_value.values():
        # the primary name is the one the object itself is named after, else the shortest
        attr = _canonical(infos[0].value.rpartition(":")[2].rpartition(".")[2])
        infos.sort(key=lambda i: (_canonical(i.name) != attr, i.name != i.name.lower(), len(i.name), i.name))
        out.append((infos[0], [i.name for i in infos[1:]]))
    out.sort(key=lambda pair: pair[0].name)
    return out


def load_editor(name: str) -> tuple[PluginInfo, Any]:
    """The editor class registered as ``name``, checked against the editor contract
    (:func:`knowbench.editor.check_editor`): a plugin that breaks it is an error naming it."""
    from .editor import ContractError, check_editor

    info = get(EDITOR_GROUP, name)
    try:
        return info, check_editor(info.load(), _describe(info))
    except ContractError as exc:
        raise PluginError(str(exc)) from exc


def load_task(name: str) -> tuple[PluginInfo, Any]:
    """The task registered as ``name``, checked against the task contract, its metric family loaded."""
    from .task import TaskContractError, check_task

    info = get(TASK_GROUP, name)
    try:
        return info, check_task(info.load(), _describe(info))
    except TaskContractError as exc:
        raise PluginError(str(exc)) from exc


def _describe(info: PluginInfo) -> str:
    return f"{info.name!r} ({info.value} from {info.dist} {info.dist_version})"
