"""The output and input paths of the commands and of the API, checked before any work is done.

Rules for an output file (:func:`check_output`): the path is not empty and does not end with a
path separator; it is not a folder, a symbolic link, a FIFO, a device or a socket (outputs are
regular files, replaced atomically by :func:`xnorcdl.files.atomic_write`, so a link or a special
file would silently become a plain file); its folder exists and is writable. ``-`` means stdout
where a command documents it. :func:`check_io` adds the rules between paths: an output is never
the same file as an input (compared by device and inode, following what the input path names, so
a hard link or another name for the same file is caught too) nor the same as another output.

The commands declare which options are paths with the argparse types below
(:class:`PathType`); :func:`xnorcdl.cli.run` collects them and calls :func:`check_io` before a
command runs, with any paths a command derives (``module.io_paths(args)``).
"""
from __future__ import annotations

import argparse
import os
import stat
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import UsageError

STDOUT = "-"
INPUT, OUTPUT, OUTPUT_DIR = "input", "output", "output folder"

Named = Tuple[str, Optional[str]]  # (option, path)


class PathType:
    """An argparse ``type=`` for a path option: refuses an empty path at parse time and marks
    the option as an input, an output file or an output folder for :func:`check_io`.

    ``stdout``: an output that accepts ``-``; ``specials``: values that are not paths (for an
    input such as ``--calib validation``); ``resolve``: maps an input value to the file it
    stands for (a cached CIFAR-10 file name), or ``None`` when it stands for none; ``folder``:
    an input that may be a folder as well as a file."""

    def __init__(self, kind: str, stdout: bool = False, specials: Sequence[str] = (),
                 resolve: Optional[Callable[[str], Optional[str]]] = None,
                 folder: bool = False):
        self.kind, self.stdout, self.specials, self.resolve = kind, stdout, tuple(specials), resolve
        self.folder = folder  # an input that may be a folder
        self.__name__ = f"{kind} path"  # argparse names the type in its messages

    def __call__(self, text: str) -> str:
        if text in self.specials:
            return text
        if text == "":
            raise argparse.ArgumentTypeError("expected a path, got an empty string")
        if text == STDOUT and self.kind == OUTPUT and not self.stdout:
            raise argparse.ArgumentTypeError("'-' (stdout) is not accepted here; give a file path")
        if "\0" in text:
            raise argparse.ArgumentTypeError("a path cannot hold a NUL character")
        return text

    def files(self, value: str) -> List[str]:
        """The input files ``value`` stands for (none for a special value)."""
        if self.resolve is not None:
            return [p for p in [self.resolve(value)] if p]
        return [] if value in self.specials else [value]


def input_path(**kw) -> PathType:
    return PathType(INPUT, **kw)


def output_path(stdout: bool = False) -> PathType:
    return PathType(OUTPUT, stdout=stdout)


def output_dir() -> PathType:
    return PathType(OUTPUT_DIR)


def _fail(option: str, path: str, problem: str) -> None:
    raise UsageError(f"{option} {path}: {problem}", where=option)


def check_output(path, option: str, stdout: bool = True, folder_created: bool = False) -> None:
    """Refuse an output file path that breaks a rule of the module doc; ``UsageError`` names
    ``option`` and the path. ``-`` passes when ``stdout``; ``folder_created``: the folder may
    be missing (an output folder the command creates)."""
    path = os.fspath(path) if path is not None else path
    if path is None or path == "":
        raise UsageError(f"{option}: expected a file path, got an empty string", where=option)
    if path == STDOUT:
        if not stdout:
            _fail(option, path, "'-' (stdout) is not accepted here; give a file path")
        return
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        _fail(option, path, "ends with a path separator; expected a file path")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        _fail(option, path, f"cannot be written ({exc.strerror or exc})")
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            _fail(option, path, "is a symbolic link; refusing to replace it (give the path of "
                                "its target, or another name)")
        if stat.S_ISDIR(st.st_mode):
            _fail(option, path, "is a folder; expected a file path")
        if not stat.S_ISREG(st.st_mode):
            from .files import kind_of
            _fail(option, path, f"is {kind_of(st.st_mode)}; outputs are written as regular "
                                "files, so refusing to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if folder_created and not os.path.lexists(folder):
        return
    if not os.path.isdir(folder):
        _fail(option, path, f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        _fail(option, path, f"folder {folder} is not writable")


def check_output_dir(path, option: str) -> None:
    """Refuse an output folder path that is empty or exists as something other than a folder
    (it is created when missing)."""
    path = os.fspath(path) if path is not None else path
    if path is None or path == "":
        raise UsageError(f"{option}: expected a folder path, got an empty string", where=option)
    if os.path.lexists(path) and not os.path.isdir(path):
        _fail(option, path, "exists and is not a folder")


def _identity(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def check_input(path: str, option: str, folder: bool = False) -> None:
    """Refuse an input that exists but is not a regular file (a FIFO or a device would block
    or never end; a folder, unless ``folder``), naming ``option``; a missing file is left to
    the loader, which says what it expected."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return
    if stat.S_ISREG(st.st_mode) or (folder and stat.S_ISDIR(st.st_mode)):
        return
    from .files import kind_of
    _fail(option, path, f"is {kind_of(st.st_mode)}; expected a regular file"
                        + (" or a folder" if folder else ""))


def check_io(outputs: Iterable[Tuple[str, Optional[str], bool]] = (),
             inputs: Iterable[tuple] = (), dirs: Iterable[Named] = ()) -> None:
    """Check every input ``(option, path[, folder allowed])`` with :func:`check_input`, every
    output ``(option, path, stdout allowed)`` with :func:`check_output`, every output folder
    with :func:`check_output_dir`, then refuse an output that is the same file as an input (by
    device and inode, or by real path for a file not there yet) or as another output. ``None``
    paths are skipped."""
    created = set()
    for option, path in dirs:
        if path is not None:
            check_output_dir(path, option)
            if not os.path.lexists(path):
                created.add(os.path.abspath(path))
    by_id: Dict[Tuple[int, int], Named] = {}
    by_name: Dict[str, Named] = {}
    for option, path, *folder in inputs:
        if path is None or path == STDOUT:
            continue
        check_input(path, option, bool(folder and folder[0]))
        ident = _identity(path)
        if ident is not None:
            by_id.setdefault(ident, (option, path))
        by_name.setdefault(os.path.realpath(path), (option, path))
    seen_id: Dict[Tuple[int, int], Named] = {}
    seen_name: Dict[str, Named] = {}
    to_stdout: Optional[str] = None
    for option, path, stdout in outputs:
        if path is None:
            continue
        check_output(path, option, stdout,
                     path != STDOUT and os.path.dirname(os.path.abspath(path)) in created)
        if path == STDOUT:
            if to_stdout is not None:
                _fail(option, path, f"{to_stdout} already writes to stdout")
            to_stdout = option
            continue
        ident = _identity(path)
        name = os.path.realpath(path)
        other = (by_id.get(ident) if ident else None) or by_name.get(name)
        if other is not None:
            _fail(option, path, f"is the same file as the input {other[0]} {other[1]}; refusing "
                                "to overwrite an input")
        other = (seen_id.get(ident) if ident else None) or seen_name.get(name)
        if other is not None:
            _fail(option, path, f"is the same file as the output {other[0]} {other[1]}")
        if ident:
            seen_id[ident] = (option, path)
        seen_name[name] = (option, path)


def declared(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """(outputs, inputs, dirs) of the options of ``parser`` declared with :class:`PathType`,
    with their values in ``args``, as :func:`check_io` takes them."""
    outputs, inputs, dirs = [], [], []
    for action in parser._actions:
        kind = action.type
        if not isinstance(kind, PathType):
            continue
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        option = action.option_strings[0] if action.option_strings else action.dest
        for v in values:
            if v is None:
                continue
            if kind.kind == OUTPUT:
                outputs.append((option, v, kind.stdout))
            elif kind.kind == OUTPUT_DIR:
                dirs.append((option, v))
            else:
                inputs += [(option, f, kind.folder) for f in kind.files(v)]
    return outputs, inputs, dirs
