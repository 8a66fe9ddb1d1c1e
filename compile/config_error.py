"""`ConfigError`, the one error of every config: a model config and streams.yaml alike.

A config that cannot be used says why in `problems`, one line each that names the file or field
and the fix (the model config stops at its first problem; streams.yaml lists every one); str()
is those lines. No other import here: both config systems and the commands that catch it load
this module without torch.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot be used; `problems` are its lines (strings, or objects whose str()
    is the line, e.g. `daemon.config.problems.Problem`)."""

    def __init__(self, *problems: object) -> None:
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))
