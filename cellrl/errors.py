"""Error types with messages that name the file, the field and the fix."""

from __future__ import annotations


class CellrlError(Exception):
    """Base class of every user-facing cellrl error."""


class InputError(CellrlError, ValueError):
    """Bad user input: a file, a field or a value that cannot be used."""

    def __init__(self, what: str, *, path: object = None, field: str | None = None, fix: str | None = None):
        parts = []
        if path is not None:
            parts.append(f"{path}")
        if field is not None:
            parts.append(f"[{field}]")
        head = " ".join(parts)
        msg = f"{head}: {what}" if head else what
        if fix:
            msg += f"\n  fix: {fix}"
        super().__init__(msg)
        self.what, self.path, self.field, self.fix = what, path, field, fix


class ConfigError(CellrlError, ValueError):
    """Invalid configuration (schema violation or inconsistent values)."""
