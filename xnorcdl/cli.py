"""``python -m xnorcdl <command>``: the command table, the options the commands share, their
loaders and the one error boundary.

A command is a module with ``add_arguments(parser)`` and ``run(args) -> exit status``, and one
line in :data:`COMMANDS`; its module is imported only when the command runs (so ``--help`` does
not load numba). ``python -m xnorcdl.<command>`` runs the same parser and code through the
module's ``main(argv)``.

:func:`run` parses a command's options (every value checked by its argparse ``type``: a bad
one is one ``error:`` line naming the option, status 2), then checks every path option before
any work (:mod:`xnorcdl.paths`: no output is an input, another output, a folder, a link or a
special file), then runs the command inside :func:`boundary`, the one place that turns the
project's own errors (:class:`xnorcdl.errors.XnorcdlError`) and operating-system errors (a
missing file, a full disk: the message names the file) into one ``error:`` line on stderr and
exit status 2. Exit statuses: 0 success, 2 bad input, 130 Ctrl-C (SIGINT), 143 SIGTERM, each
signal with one line on stderr; both unwind the command as an exception (:class:`Terminated`
for SIGTERM), so every ``finally`` runs and no temporary file is left. A closed stdout (``|
head``) ends quietly with 141 (128 + SIGPIPE, what a shell reports for a program that SIGPIPE
stops). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import signal
import sys
import threading
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import __version__
from . import paths
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


#: exit statuses besides 0 and 2
SIGINT_STATUS, SIGTERM_STATUS, SIGPIPE_STATUS = 130, 143, 141


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives while a command runs, so that the
    command unwinds (``finally`` blocks remove temporary files) and exits with 143."""


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


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error:`` line (status 2)."""

    def error(self, message: str):
        if message.startswith("argument "):  # "argument --limit: ..." -> "--limit: ..."
            message = message[len("argument "):]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def command_parser(module: ModuleType, prog: str) -> argparse.ArgumentParser:
    ap = Parser(prog=prog, description=summary_of(module), formatter_class=HelpFormatter)
    module.add_arguments(ap)
    return ap


def run(module: ModuleType, argv: Optional[Sequence[str]], prog: str) -> int:
    """Parse ``argv`` with the module's options, check its paths and run it inside the error
    boundary, with SIGINT and SIGTERM turned into exceptions; returns the exit status (also
    for ``--help`` and usage errors, which do not raise ``SystemExit`` here)."""
    with signals():
        parser = command_parser(module, prog)
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help (0) or a usage error (2)
            return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
        except (KeyboardInterrupt, Terminated) as exc:
            return boundary(_reraise, exc)
        try:
            return boundary(_checked, module, parser, args)
        except (KeyboardInterrupt, Terminated) as exc:  # after the command, before returning
            return boundary(_reraise, exc)


def _reraise(exc: BaseException):
    raise exc


def _checked(module: ModuleType, parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Check every path option (and the paths the module derives), then run the module."""
    outputs, inputs, dirs = paths.declared(parser, args)
    extra = getattr(module, "io_paths", None)
    if extra is not None:
        more = extra(args)
        outputs += more.get("outputs", [])
        inputs += more.get("inputs", [])
        dirs += more.get("dirs", [])
    paths.check_io(outputs, inputs, dirs)
    return module.run(args)


def _on_sigterm(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def signals():
    """While a command runs: SIGINT raises ``KeyboardInterrupt`` (Python's own handler) and
    SIGTERM raises :class:`Terminated`; the previous handlers come back afterwards. A signal
    the process was started with ignored (``nohup``, a background job) stays ignored. Only
    the main thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for sig, handler in ((signal.SIGTERM, _on_sigterm),
                         (signal.SIGINT, signal.default_int_handler)):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the flush at exit cannot fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)


def boundary(fn: Callable, *args) -> int:
    """``fn(*args)``'s exit status; a project or OS error becomes one ``error:`` line and 2,
    Ctrl-C one line and 130, SIGTERM one line and 143, a closed stdout nothing and 141. Other
    exceptions propagate with their traceback (bugs)."""
    try:
        status = fn(*args)
    except XnorcdlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout went away (| head): nothing to report
        _quiet_stdout()
        return SIGPIPE_STATUS
    except OSError as exc:  # the environment (a missing file, a full disk), not a bug
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return SIGINT_STATUS
    except Terminated:
        print("terminated", file=sys.stderr)
        return SIGTERM_STATUS
    return 0 if status is None else int(status)


def top_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="python -m xnorcdl", formatter_class=HelpFormatter,
        description="Conditionally deep hybrid neural networks across edge and cloud. "
                    "'python -m xnorcdl COMMAND --help' lists a command's options.")
    ap.add_argument("--version", action="version", version=f"xnorcdl {__version__}")
    sub = ap.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    sub.required = True
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return ap


def skip_numba_extensions() -> None:
    """Ask :mod:`xnorcdl.kernels.jit` to mark Numba's extension entry points as loaded when it
    imports Numba, for the commands' own process: at its first compilation or cache load Numba
    scans every installed distribution for ``numba_extensions`` entry points (about 0.07 s of
    ``infer --limit 1`` with the training and serving extras installed), and no kernel here
    uses an extension. Numba itself is not imported here (``--help`` stays quick); the library
    (``import xnorcdl``) leaves Numba as it is."""
    import xnorcdl.kernels      # the package alone: pure, no Numba
    xnorcdl.kernels.NUMBA_EXTENSIONS = False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m xnorcdl COMMAND [options]``; only COMMAND's module is imported."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top_parser().parse_args(argv)  # help, version, or a usage error (exits)
        return 2
    name = argv[0]
    with signals():
        try:
            skip_numba_extensions()
            module = importlib.import_module(COMMANDS[name][0])
        except (KeyboardInterrupt, Terminated) as exc:
            return boundary(_reraise, exc)
    return run(module, argv[1:], f"python -m xnorcdl {name}")


# ----------------------------------------------------------------------------- option types

#: upper bounds that keep an option's memory and time bounded
MAX_BATCH = 1 << 16
MAX_THREADS = 1024


class _Type:
    """An argparse ``type=`` with a readable name and a message naming what was expected."""

    def __init__(self, convert: Callable[[str], object], name: str):
        self.convert, self.__name__ = convert, name

    def __call__(self, text: str):
        try:
            return self.convert(text)
        except (ValueError, TypeError, OverflowError) as exc:
            raise argparse.ArgumentTypeError(str(exc) or f"expected {self.__name__}, got "
                                             f"{text!r}") from None


def integer(lo: int = 1, hi: Optional[int] = None) -> _Type:
    """An integer option in [lo, hi] (``integer()``: a positive integer)."""
    what = ("a positive integer" if lo == 1 else f"an integer >= {lo}") if hi is None else \
        f"an integer in [{lo}, {hi}]"

    def convert(text: str) -> int:
        try:
            v = int(text.strip())
        except ValueError:
            raise ValueError(f"expected {what}, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"expected {what}, got {text!r}")
        return v
    return _Type(convert, what)


def number(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> _Type:
    """A finite number option in the interval lo..hi (open at an end when asked)."""
    what = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def convert(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise ValueError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(v) and (v > lo if lo_open else v >= lo)
                and (v < hi if hi_open else v <= hi)):
            raise ValueError(f"expected {what}, got {text!r}")
        return v
    return _Type(convert, what)


def _thresholds(text: str) -> str:
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers (nats), got {text!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"expected finite thresholds >= 0 (nats), got {text!r}")
    return text


#: ``--threshold T[,T...]``: numbers checked here, their count against the model once loaded
thresholds_type = _Type(_thresholds, "thresholds")


def _range_text(text: str) -> str:
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        for p in parts:
            if p.strip():
                int(p)
    except ValueError:
        raise ValueError(f"expected A:B (record indices, either may be left out), got "
                         f"{text!r}") from None
    return text


#: ``A:B`` record ranges: the syntax is checked here, the bounds once the set is read
range_type = _Type(_range_text, "A:B")


def rules_type(also: Sequence[str] = ()) -> _Type:
    """``--rules``: comma-separated threshold rules (:func:`xnorcdl.calibrate.parse_rule`),
    at least one; ``also``: names accepted besides (explore's ``stored``)."""
    def convert(text: str) -> str:
        from . import calibrate
        rules = [r.strip() for r in text.split(",") if r.strip()]
        if not rules:
            raise ValueError("expected at least one rule")
        for r in rules:
            if r not in also:
                calibrate.parse_rule(r)
        return text
    return _Type(convert, "rules")


def cached_image(value: str) -> Optional[str]:
    """The file an ``--images``-like value stands for, without fetching: a path, the cached
    CIFAR-10 file of a bare CIFAR-10 file name, or the validation split's file."""
    from .data import CIFAR10_FILES, VAL_FILE, default_dest
    if value == VALIDATION:
        return os.path.join(default_dest(), VAL_FILE)
    if not os.path.lexists(value) and os.path.basename(value) == value \
            and value in CIFAR10_FILES:
        return os.path.join(default_dest(), value)
    return value


images_type = paths.input_path(specials=(VALIDATION,), resolve=cached_image)


# ----------------------------------------------------------------------------- shared options

def add_weights(ap: argparse.ArgumentParser, pair: bool = False, help: Optional[str] = None
                ) -> None:
    if pair:
        ap.add_argument("--weights", nargs=2, required=True, metavar=("A", "B"),
                        type=paths.input_path(),
                        help=help or "the two weights files (.npz, docs/FORMAT.md)")
    else:
        ap.add_argument("--weights", required=True, type=paths.input_path(),
                        help=help or "weights file (.npz, docs/FORMAT.md)")


def add_images(ap: argparse.ArgumentParser, default: Optional[str] = None,
               help: str = "binary record file",
               formats: Sequence[str] = ("cifar10", "cifar100", "raw"), limit: bool = True
               ) -> argparse._ArgumentGroup:
    """``--images``, ``--format``, ``--limit`` (optional) and ``--fetch``; a bare CIFAR-10 file
    name (``test_batch.bin``) is looked up in the data cache (:func:`resolve_images`)."""
    g = ap.add_argument_group("images")
    g.add_argument("--images", required=default is None, default=default, type=images_type,
                   help=help + "; a bare CIFAR-10 file name (test_batch.bin) is looked up in the "
                               "data cache")
    g.add_argument("--format", default="cifar10", choices=list(formats),
                   help="record format: " + ", ".join(f"{f} ({FORMAT_HELP[f]})" for f in formats))
    if limit:
        g.add_argument("--limit", type=integer(), default=None,
                       help="use only the first N samples (default: all)")
    g.add_argument("--fetch", action="store_true", help="fetch CIFAR-10 into the cache if missing")
    return g


#: ``--backend auto`` runs jobs of at most this many samples on the reference backend: it starts
#: without the JIT (Numba's import and first dispatch cost 0.8-1.5 s of a process's start-up,
#: the NumPy reference about 25 ms per sample), and both backends take the same decisions
AUTO_REFERENCE_MAX = 16


def add_backend(ap: argparse.ArgumentParser, batch_size: Optional[int] = 100,
                batch_help: str = "samples per batch (decisions stay per sample)",
                auto: bool = False) -> None:
    """``--backend``, ``--batch-size`` and ``--threads``; with ``auto`` the backend may be left
    to the job's size (:func:`pick_backend`), and that is the default."""
    from .api import BACKENDS
    g = ap.add_argument_group("execution")
    g.add_argument("--backend", default="auto" if auto else "fast",
                   choices=(["auto"] if auto else []) + list(BACKENDS),
                   help="fast: Numba bit-packed kernels; reference: the NumPy oracle"
                        + (f"; auto: reference for at most {AUTO_REFERENCE_MAX} samples on one "
                           "worker (no JIT start-up), fast otherwise" if auto else ""))
    g.add_argument("--batch-size", type=integer(1, MAX_BATCH), default=batch_size,
                   help=batch_help)
    g.add_argument("--threads", type=integer(1, MAX_THREADS), default=1,
                   help="BLAS threads for the float32 layers (batch-1 inference is fastest on one)")


def add_energy(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--energy", default=None, metavar="FILE", type=paths.input_path(),
                    help="energy table (JSON, docs/COUNTING.md) (default: the paper's Table I, "
                         "xnorcdl/energy_table.json)")


def add_json(ap: argparse.ArgumentParser, what: str = "the results",
             help: Optional[str] = None) -> None:
    ap.add_argument("--json", default=None, metavar="PATH", type=paths.output_path(stdout=True),
                    help=help or f"write {what} as JSON ('-' for stdout; the readable text then "
                                 "goes to stderr)")


def add_progress(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bar on stderr (it shows only on a terminal anyway)")


def add_rules(ap: argparse.ArgumentParser, default: str) -> None:
    ap.add_argument("--rules", default=default, type=rules_type(),
                    help="comma-separated threshold rules (xnorcdl.calibrate): fixed:T (nats), "
                         "within:D (points), exits:P (%%), accuracy:A (%%)")


# ----------------------------------------------------------------------------- loaders

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
        values = [float(t) for t in _thresholds(text).split(",")]
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}", where=option) from None
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
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"--limit: expected a positive integer, got {limit!r}", where="--limit")
    images, labels = read_records(path, fmt, limit=limit)
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


def pick_backend(backend: str, samples: int, workers: int = 1) -> str:
    """The backend ``--backend auto`` stands for: ``reference`` for a job of at most
    :data:`AUTO_REFERENCE_MAX` samples on one worker, ``fast`` otherwise; a named backend is
    itself. The backends agree on every exit decision and prediction (the edge is bit-identical,
    the cloud logits within float32 rounding), so the choice changes only the time."""
    if backend != "auto":
        return backend
    return "reference" if samples <= AUTO_REFERENCE_MAX and workers == 1 else "fast"


def executor(model, backend: str):
    """The executor of ``--backend`` for ``model`` (:func:`xnorcdl.api.make_executor`)."""
    from .api import make_executor
    return make_executor(model, backend, option="--backend")
