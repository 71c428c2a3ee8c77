"""Machine-readable results of the commands: ``--json PATH`` or ``--json -`` (stdout)."""
from __future__ import annotations

import json


def emit_json(doc: dict, dest: str, option: str = "--json") -> int:
    """Write ``doc`` as indented JSON to stdout (``dest == "-"``) or to ``dest``, atomically (the
    file appears only once complete; :func:`xnorcdl.paths.check_output` rules apply). Returns
    the exit status 0; a file that cannot be written raises ``OSError`` naming it."""
    from .paths import check_output
    text = json.dumps(doc, indent=1)
    if dest == "-":
        try:
            print(text)
        except BrokenPipeError:
            raise
        except OSError as exc:  # stdout on a full disk or a failing device
            exc.filename = exc.filename or "<stdout>"
            raise
        return 0
    check_output(dest, option)
    from .files import atomic_write
    with atomic_write(dest, "w", ".json") as f:
        f.write(text + "\n")
    return 0
