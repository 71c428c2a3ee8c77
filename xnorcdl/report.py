"""Machine-readable results of the commands: ``--json PATH`` or ``--json -`` (stdout)."""
from __future__ import annotations

import json
import os
import sys

from .errors import UsageError


def check_destination(dest: str, option: str) -> None:
    """Refuse an output path before any work is done: its folder must exist and be writable, and
    the path must not be a folder. ``-`` (stdout) always passes. Raises ``UsageError`` naming the
    option and the path."""
    if dest == "-":
        return
    folder = os.path.dirname(os.path.abspath(dest))
    if os.path.isdir(dest):
        raise UsageError(f"{option} {dest}: is a folder; expected a file path", where=option)
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {dest}: folder {folder} does not exist", where=option)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {dest}: folder {folder} is not writable", where=option)


def emit_json(doc: dict, dest: str) -> int:
    """Write ``doc`` as indented JSON to stdout (``dest == "-"``) or to ``dest``, atomically (the
    file appears only once complete). Returns the exit status: 0, or 2 after one ``error:`` line
    on stderr when ``dest`` cannot be written."""
    text = json.dumps(doc, indent=1)
    if dest == "-":
        print(text)
        return 0
    from .files import atomic_write
    try:
        with atomic_write(dest, "w", ".json") as f:
            f.write(text + "\n")
    except OSError as exc:
        print(f"error: {dest}: cannot write the JSON ({exc})", file=sys.stderr)
        return 2
    return 0
