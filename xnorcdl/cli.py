"""``python -m xnorcdl <command>``: the command table, the options the commands share, their
loaders and the one error boundary.

A command is a module with ``add_arguments(parser)`` and ``run(args) -> exit status``, and one
line in :data:`COMMANDS`; its module is imported only when the command runs (so ``--help`` does
not load numba). ``python -m xnorcdl.<command>`` runs the same parser and code through the
module's ``main(argv)``.

:func:`boundary` is the one place that turns the project's own errors
(:class:`xnorcdl.errors.XnorcdlError`) and operating-system errors (a missing or unreadable
file) into one ``error:`` line on stderr and exit status 2; Ctrl-C prints one line and exits
with 130; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import __version__
from .errors import UsageError, XnorcdlError

#: name -> (module, one-line summary); adding a command is one line here
COMMANDS: Dict[str, Tuple[str, str]] = {
    "infer": ("xnorcdl.infer",
              "run Algorithm 1 over an image file; accuracy, exits, speed, energy"),
    "summary": ("xnorcdl.summary",
                "per-layer operation, memory and energy table of a weights file"),
    "tradeoff": ("xnorcdl.tradeoff",
                 "calibrate exit thresholds and print accuracy vs edge exits"),
    "compare": ("xnorcdl.compare",
                "two weights files on the same labelled images, sample by sample"),
    "data": ("xnorcdl.data",
             "put CIFAR-10 in place (official binary records, MD5-verified)"),
    "explore": ("xnorcdl.explore",
                "the design space of a folder of weights files: Fig. 4, Tables II-IV"),
    "split": ("xnorcdl.split", "a weights file as an edge artifact and a cloud artifact"),
    "cloud": ("xnorcdl.cloud", "serve the cloud half over HTTP (uvicorn, or Ray Serve)"),
    "edge": ("xnorcdl.edge", "run the edge half against a cloud service"),
}

VALIDATION = "validation"
VALIDATION_HELP = "'validation': CIFAR-10 training images 45000..49999"
FORMAT_HELP = {"cifar10": "label byte + 3072 pixel bytes",
               "cifar100": "coarse, fine label bytes + 3072; the fine label is used",
               "raw": "3072 bytes, no labels"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action):
        if action.required or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------- commands

def summary_of(module: ModuleType) -> str:
    """The one-line summary of a command module: its docstring's first line, after the
    ``python -m xnorcdl <command>``: prefix."""
    first = (module.__doc__ or "").strip().split("\n")[0]
    return first.split(": ", 1)[1] if ": " in first else first


def command_parser(module: ModuleType, prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=summary_of(module),
                                 formatter_class=HelpFormatter)
    module.add_arguments(ap)
    return ap


def run(module: ModuleType, argv: Optional[Sequence[str]], prog: str) -> int:
    """Parse ``argv`` with the module's options and run it inside the error boundary."""
    args = command_parser(module, prog).parse_args(argv)
    return boundary(module.run, args)


def boundary(fn: Callable, *args) -> int:
    """``fn(*args)``'s exit status; a project or OS error becomes one ``error:`` line and 2,
    Ctrl-C one line and 130. Other exceptions propagate with their traceback (bugs)."""
    try:
        status = fn(*args)
    except XnorcdlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment (a missing file, a full disk), not a bug
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else int(status)


def top_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m xnorcdl", formatter_class=HelpFormatter,
        description="Conditionally deep hybrid neural networks across edge and cloud. "
                    "'python -m xnorcdl COMMAND --help' lists a command's options.")
    ap.add_argument("--version", action="version", version=f"xnorcdl {__version__}")
    sub = ap.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    sub.required = True
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m xnorcdl COMMAND [options]``; only COMMAND's module is imported."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top_parser().parse_args(argv)  # help, version, or a usage error (exits)
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    return run(module, argv[1:], f"python -m xnorcdl {name}")


# ----------------------------------------------------------------------------- shared options

def add_weights(ap: argparse.ArgumentParser, pair: bool = False) -> None:
    if pair:
        ap.add_argument("--weights", nargs=2, required=True, metavar=("A", "B"),
                        help="the two weights files (.npz, docs/FORMAT.md)")
    else:
        ap.add_argument("--weights", required=True, help="weights file (.npz, docs/FORMAT.md)")


def add_images(ap: argparse.ArgumentParser, default: Optional[str] = None,
               help: str = "binary record file",
               formats: Sequence[str] = ("cifar10", "cifar100", "raw"), limit: bool = True
               ) -> argparse._ArgumentGroup:
    """``--images``, ``--format``, ``--limit`` (optional) and ``--fetch``; a bare CIFAR-10 file
    name (``test_batch.bin``) is looked up in the data cache (:func:`resolve_images`)."""
    g = ap.add_argument_group("images")
    g.add_argument("--images", required=default is None, default=default,
                   help=help + "; a bare CIFAR-10 file name (test_batch.bin) is looked up in the "
                               "data cache")
    g.add_argument("--format", default="cifar10", choices=list(formats),
                   help="record format: " + ", ".join(f"{f} ({FORMAT_HELP[f]})" for f in formats))
    if limit:
        g.add_argument("--limit", type=int, default=None,
                       help="use only the first N samples (default: all)")
    g.add_argument("--fetch", action="store_true", help="fetch CIFAR-10 into the cache if missing")
    return g


def add_backend(ap: argparse.ArgumentParser, batch_size: Optional[int] = 100,
                batch_help: str = "samples per batch (decisions stay per sample)") -> None:
    """``--backend``, ``--batch-size`` and ``--threads``."""
    from .api import BACKENDS
    g = ap.add_argument_group("execution")
    g.add_argument("--backend", default="fast", choices=list(BACKENDS),
                   help="fast: Numba bit-packed kernels; reference: the NumPy oracle")
    g.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    g.add_argument("--threads", type=int, default=1,
                   help="BLAS threads for the float32 layers (batch-1 inference is fastest on one)")


def add_energy(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--energy", default=None, metavar="FILE",
                    help="energy table (JSON, docs/COUNTING.md) (default: the paper's Table I, "
                         "xnorcdl/energy_table.json)")


def add_json(ap: argparse.ArgumentParser, what: str = "the results") -> None:
    ap.add_argument("--json", default=None, metavar="PATH",
                    help=f"write {what} as JSON ('-' for stdout; the readable text then goes to "
                         "stderr)")


def add_progress(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bar on stderr (it shows only on a terminal anyway)")


def add_rules(ap: argparse.ArgumentParser, default: str) -> None:
    ap.add_argument("--rules", default=default,
                    help="comma-separated threshold rules (xnorcdl.calibrate): fixed:T (nats), "
                         "within:D (points), exits:P (%%), accuracy:A (%%)")


# ----------------------------------------------------------------------------- loaders

def check_positive(args: argparse.Namespace, *options: str) -> None:
    """Refuse an integer option (``--batch-size``, ...) below 1 (``None``: unset, passes)."""
    for opt in options:
        v = getattr(args, opt.lstrip("-").replace("-", "_"))
        if v is not None and v < 1:
            raise UsageError(f"{opt}: expected a positive integer, got {v}", where=opt)


def check_outputs(args: argparse.Namespace, *options: str) -> None:
    """Refuse an output path (``--json``, ``--write``) before any work is done."""
    from .report import check_destination
    for opt in options:
        dest = getattr(args, opt.lstrip("-").replace("-", "_"))
        if dest:
            check_destination(dest, opt)


def threads(args: argparse.Namespace):
    """A context limiting BLAS to ``--threads``."""
    from threadpoolctl import threadpool_limits
    return threadpool_limits(args.threads)


def progress(args: argparse.Namespace, total: int, label: str):
    """A progress bar on stderr unless ``--no-progress``."""
    from .progress import Progress
    return Progress(total, label, enabled=False if args.no_progress else None)


def text_out(args: argparse.Namespace):
    """Where the readable text goes: stderr when ``--json -`` holds stdout, else stdout."""
    return sys.stderr if getattr(args, "json", None) == "-" else sys.stdout


def parse_thresholds(text: Optional[str], n_exits: int, option: str = "--threshold"
                     ) -> Optional[List[float]]:
    """``T[,T...]`` nats, one per exit or one for all (``None``: the file's own)."""
    if text is None:
        return None
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated numbers, got {text!r}",
                         where=option) from None
    from .api import check_thresholds
    return check_thresholds(values, n_exits, option)


def parse_range(text: str, n: int, option: str = "--calib-range") -> slice:
    """``A:B`` (either side may be empty) -> slice(A, B), checked 0 <= A < B <= n; errors name
    ``option``."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a = int(parts[0]) if parts[0].strip() else 0
        b = int(parts[1]) if parts[1].strip() else n
    except ValueError:
        raise UsageError(f"{option}: expected A:B (record indices), got {text!r}",
                         where=option) from None
    if not 0 <= a < b <= n:
        raise UsageError(f"{option} {text}: expected 0 <= A < B <= {n} (the set holds {n} "
                         "records)", where=option)
    return slice(a, b)


def parse_rules(text: str, option: str = "--rules") -> List[str]:
    """The comma-separated threshold rules of ``--rules``, each checked (at least one)."""
    from . import calibrate
    rules = [r.strip() for r in text.split(",") if r.strip()]
    if not rules:
        raise UsageError(f"{option}: expected at least one rule", where=option)
    for r in rules:
        try:
            calibrate.parse_rule(r)
        except UsageError as exc:
            raise UsageError(f"{option}: {exc}", where=option) from None
    return rules


def resolve_images(path: str, fetch: bool) -> str:
    """An existing path, or a CIFAR-10 file name looked up in the data cache."""
    from .data import CIFAR10_FILES, cifar10_dir, default_dest
    if os.path.exists(path) or os.path.basename(path) != path or path not in CIFAR10_FILES:
        return path
    cached = os.path.join(default_dest(), path)
    if os.path.isfile(cached):  # placed atomically after its MD5 check by `xnorcdl.data`
        return cached
    return os.path.join(cifar10_dir(fetch=fetch), path)


def load_images(path: str, fmt: str, limit: Optional[int], classes: int):
    """(images, labels or None) of a record file, the first ``limit``; labels checked against
    the model's ``classes``."""
    import numpy as np
    from .records import read_records
    images, labels = read_records(path, fmt)
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit: expected a positive integer, got {limit}", where="--limit")
        images = images[:limit]
        labels = labels[:limit] if labels is not None else None
    if labels is not None and len(labels) and int(labels.max()) >= classes:
        i = int(np.argmax(labels >= classes))
        raise UsageError(f"{path}: record {i} has label {int(labels[i])}, but the model has "
                         f"{classes} classes (0..{classes - 1}); check --format", where=path)
    return images, labels


def labelled(path: str, fmt: str, limit: Optional[int], classes: int, option: str):
    """:func:`load_images` of a set that must have labels and at least one record."""
    images, labels = load_images(path, fmt, limit, classes)
    if labels is None:
        raise UsageError(f"{option} {path}: has no labels; calibration and accuracy need them",
                         where=option)
    if len(images) == 0:
        raise UsageError(f"{option} {path}: holds no records", where=option)
    return images, labels


def labelled_set(which: str, rng: Optional[str], option: str, range_option: str, fmt: str,
                 fetch: bool, classes: int):
    """(name, images, labels) of a labelled set given as ``option``: a record file, or
    ``validation`` (CIFAR-10 training images 45000..49999); then records A..B-1 of it when
    ``rng`` is ``A:B`` (errors name ``range_option``)."""
    from .data import VAL_FILE, VAL_SIZE, VAL_START
    if which != VALIDATION:
        path = resolve_images(which, fetch)
        images, labels = labelled(path, fmt, None, classes, option)
        offset = 0
    else:
        if fmt != "cifar10":
            raise UsageError(f"{option} validation is the CIFAR-10 split; give {option} FILE for "
                             f"--format {fmt}", where=option)
        path = resolve_images(VAL_FILE, fetch)
        images, labels = labelled(path, "cifar10", None, classes, option)
        if len(images) != VAL_START + VAL_SIZE:
            raise UsageError(f"{option} validation: {path} holds {len(images)} records, expected "
                             f"{VAL_START + VAL_SIZE}", where=option)
        images, labels, offset = images[VAL_START:], labels[VAL_START:], VAL_START
    if rng is None:
        return (f"{path}[{offset}:]" if offset else path), images, labels
    sl = parse_range(rng, len(images), range_option)
    return f"{path}[{offset + sl.start}:{offset + sl.stop}]", images[sl], labels[sl]


def executor(model, backend: str):
    """The executor of ``--backend`` for ``model`` (:func:`xnorcdl.api.make_executor`)."""
    from .api import make_executor
    return make_executor(model, backend, option="--backend")
