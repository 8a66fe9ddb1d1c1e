"""Config problems an operator can act on: `file:line: field: message (hint)`, the lines of a
`ConfigError` (compile.config_error) raised for streams.yaml.

Pydantic reports locations as key paths; the YAML reader (config_yaml) keeps the line of every
key and list item, and this module maps each validation error back to it, with a hint: the key
probably meant for an unknown key, else the field's own description from the schema. A problem's
message is redacted (secrets.redact): it may quote a value substituted from a secret.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, get_args

from codetr_stream.daemon.config.secrets import redact
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    field: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        message = redact(self.message)  # hints are schema text, never a value
        what = f"{self.field}: {message}" if self.field else message
        return f"{where}: {what}" + (f" (hint: {self.hint})" if self.hint else "")


def dotted(path: KeyPath) -> str:
    """('streams', 1, 'url') -> 'streams[1].url'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def inner_model(annotation: Any) -> type[BaseModel] | None:
    """The model class inside an annotation such as `tuple[StreamConfig, ...]` or `X | None`."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if found := inner_model(arg):
            return found
    return None


def _schema_at(
    root: type[BaseModel], path: KeyPath
) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The model expected at `path` (None for a leaf) and the field that holds it."""
    model: type[BaseModel] | None = root
    info = None
    for part in path:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None, None
        info = model.model_fields[part]
        model = inner_model(info.annotation)
    return model, info


def _problem(error: Any, root: type[BaseModel], file: str, lines: dict[KeyPath, int]) -> Problem:
    path: KeyPath = ()
    for part in error["loc"]:  # skip pydantic's union tags such as 'str' or 'function-after[...]'
        if (*path, part) in lines:
            path = (*path, part)
    missing = error["type"] == "missing"
    shown = (*path, error["loc"][-1]) if missing else path
    message = ("required, missing" if missing else error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        model, _ = _schema_at(root, path[:-1])
        allowed = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(path[-1]), allowed, n=1)
        message = "unknown key"
        hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
    else:
        _, info = _schema_at(root, shown)
        hint = (info.description or "") if info else ""
    return Problem(file, lines.get(path), dotted(shown), message, hint)


def validation_problems(
    exc: ValidationError, root: type[BaseModel], file: str, lines: dict[KeyPath, int]
) -> list[Problem]:
    """One Problem per pydantic error of validating `root`, placed on its YAML line.

    Error messages never include the offending value (it may be a substituted secret).
    """
    errors = exc.errors(include_input=False)
    # An invalid item also makes its tuple "too short"; only the item's error is news.
    deeper = {e["loc"][:n] for e in errors for n in range(len(e["loc"]))}
    return [_problem(e, root, file, lines) for e in errors
            if not (e["type"] == "too_short" and e["loc"] in deeper)]
