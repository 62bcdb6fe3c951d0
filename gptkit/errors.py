"""Errors a user can cause. The CLI turns each into a message and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GptkitError(Exception):
    """Something the user can fix: a bad spec, a missing file, a bad flag.

    ``hint`` names the command that explains more (``Run 'gptkit plugins'.``).
    """

    exit_code = 2
    code: str | None = None  # the server's error ``code`` for it, where OpenAI has one

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class QuietExit(SystemExit):
    """An exit whose reason was already said (``gptkit serve`` stopped by Ctrl-C)."""


class SpecError(GptkitError):
    """The experiment spec is invalid; ``problems`` holds (dotted path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]], hint: str | None = None):
        self.source = source
        self.problems = problems
        self.overridden: set[str] = set()  # paths whose problem an override caused
        n = len(problems)
        lines = [f"{source}: {n} problem{'s' if n != 1 else ''} in the spec:"]
        lines += [f"  {path or '(top level)'}: {msg}" for path, msg in problems]
        super().__init__(
            "\n".join(lines), hint or "Run 'gptkit schema' to see every field it accepts."
        )


class ContextError(GptkitError):
    """A prompt longer than the model's context (the server's 400 says
    ``context_length_exceeded``, as OpenAI's does)."""

    code = "context_length_exceeded"


class PluginError(GptkitError):
    """A plugin could not be loaded or registered something invalid."""


class DataError(GptkitError):
    """Training or evaluation data is missing or unusable."""


class EncodeError(DataError):
    """Text a tokenizer cannot encode (exit 2 at the command line, 400 from the server). A
    plugin tokenizer raises it (``plugin.EncodeError``) to refuse text, e.g. characters its
    vocabulary lacks."""


class RunError(GptkitError):
    """A run directory, checkpoint or bundle is missing or unusable."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'rope'?)`` when a close match exists, else an empty string."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""
