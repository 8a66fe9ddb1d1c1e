"""Loading streams.yaml: YAML with line numbers -> `${...}` substitution -> validation -> every
problem at once; and `diff`, what a reload changes.

`load_config` reports every problem at once, each with its file, line, field path and a hint (the
field's own documentation, or the key you probably meant), because an operator fixing a camera
list at 3 a.m. should not have to iterate one error at a time. Reload builds a new object and
`diff` says what changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codetr_stream.compile.coco_classes import COCO_CLASSES
from codetr_stream.compile.config_error import ConfigError
from codetr_stream.daemon.config.problems import KeyPath, Problem, dotted, validation_problems
from codetr_stream.daemon.config.schema import DaemonConfig, StreamConfig, duplicate_names
from codetr_stream.daemon.config.secrets import SecretError, shown, substitute
from codetr_stream.daemon.config.yaml_reader import read_yaml
from pydantic import ValidationError

__all__ = ["ConfigDiff", "ConfigError", "diff", "load_config"]

log = logging.getLogger(__name__)

SECRET_HINT = ("export the variable, or provide a systemd credential (LoadCredential=) or Docker "
               "secret file of that name")
MAX_PROBLEMS = 50  # reported of one file; a broken file can hold thousands


def _substitute_all(data: Any, path: KeyPath, file: str, lines: dict[KeyPath, int],
                    problems: list[Problem]) -> Any:
    if isinstance(data, dict):
        return {k: _substitute_all(v, (*path, k), file, lines, problems) for k, v in data.items()}
    if isinstance(data, list):
        return [_substitute_all(v, (*path, i), file, lines, problems) for i, v in enumerate(data)]
    if isinstance(data, str):
        try:
            return substitute(data)
        except SecretError as exc:
            problems.append(Problem(file, lines.get(path), dotted(path), str(exc), SECRET_HINT))
    return data


ClassNames = tuple[str, ...] | Callable[[Path], tuple[str, ...] | None] | None


def load_config(path: str | Path, *, class_names: ClassNames = COCO_CLASSES) -> DaemonConfig:
    """Read, substitute and validate a streams.yaml; raises ConfigError listing every problem.

    `class_names` checks stream class allow-lists (COCO by default; pass the engine manifest's
    names once it is loaded, None to skip the check, or a function of the file's engine path
    that returns them). Nothing else is raised: whatever goes wrong reading a file is a problem
    in that file.
    """
    file = str(path)
    try:
        config, problems = _load(Path(path), file, class_names)
    except Exception as exc:  # a bug here must not kill a daemon on reload: say where it was
        log.debug("reading %s failed", file, exc_info=True)
        config, problems = None, [Problem(file, None, "", f"cannot be read ({type(exc).__name__}"
                                          "); please report this with the file")]
    if problems:
        problems.sort(key=lambda p: (p.line or 0, p.field))
        if len(problems) > MAX_PROBLEMS:
            more = len(problems) - MAX_PROBLEMS
            problems[MAX_PROBLEMS:] = [Problem(file, None, "", f"{more} more problems not shown")]
        raise ConfigError(*problems)
    return config


def _load(path: Path, file: str,
          class_names: ClassNames) -> tuple[DaemonConfig | None, list[Problem]]:
    problems: list[Problem] = []
    data, lines = read_yaml(path, file, problems)
    if problems:
        return None, problems
    if not isinstance(data, dict):
        return None, [Problem(file, 1, "", "the file must be a mapping of sections",
                              "start with `engine:` and `streams:`; see streams.yaml")]
    data = _substitute_all(data, (), file, lines, problems)
    raw_streams = data.get("streams") if isinstance(data.get("streams"), list) else []
    names = [entry.get("name") if isinstance(entry, dict) else None for entry in raw_streams]
    # here too, so that they come with every other problem
    for name, first, index in duplicate_names(names):
        line = lines.get(("streams", index, "name"))
        problems.append(Problem(file, line, f"streams[{index}].name",
                                f"duplicate stream name {shown(name)}",
                                f"used by streams[{first}]"))
    reported = {p.field for p in problems}
    base_dir = path.resolve().parent
    if callable(class_names):  # the engine's names: its path as the engine section resolves it
        engine = data.get("engine")
        engine_path = engine.get("path") if isinstance(engine, dict) else None
        class_names = class_names(base_dir / engine_path) if isinstance(engine_path, str) else None
    context = {"base_dir": base_dir, "class_names": tuple(class_names) if class_names else None}
    try:
        return DaemonConfig.model_validate(data, context=context), problems
    except ValidationError as exc:
        found = validation_problems(exc, DaemonConfig, file, lines)
        problems += [p for p in found if p.field not in reported
                     and not (p.field == "streams" and p.message.startswith("duplicate"))]
    return None, problems


@dataclass(frozen=True)
class ConfigDiff:
    """What a reload changes. Streams are compared by name over the *enabled* ones, so turning a
    stream off shows up as removed. `changed` holds the new versions; `reconnect` names the changed
    streams whose source (url, transport) differs, the others only changed filters or fps.
    `restart_required` names non-stream sections that differ: they take effect at restart only.
    """

    added: tuple[StreamConfig, ...]
    removed: tuple[StreamConfig, ...]
    changed: tuple[StreamConfig, ...]
    reconnect: tuple[str, ...]
    restart_required: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.restart_required)


def diff(old: DaemonConfig, new: DaemonConfig) -> ConfigDiff:
    before = {s.name: s for s in old.enabled_streams}
    after = {s.name: s for s in new.enabled_streams}
    changed = tuple(s for name, s in after.items() if name in before and before[name] != s)
    return ConfigDiff(
        added=tuple(s for name, s in after.items() if name not in before),
        removed=tuple(s for name, s in before.items() if name not in after),
        changed=changed,
        reconnect=tuple(
            s.name for s in changed
            if (s.url, s.transport) != (before[s.name].url, before[s.name].transport)
        ),
        restart_required=tuple(
            name for name in DaemonConfig.model_fields
            if name != "streams" and getattr(old, name) != getattr(new, name)
        ),
    )  # fmt: skip
