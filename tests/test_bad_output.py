"""Bad output paths, for every command that writes: refused before any work with status 2, one
``error:`` line naming the option and the path, and nothing changed on disk (every input,
every earlier output, the target of a link: checksums before and after)."""
import os

import pytest

from hostile import assert_refused, copy_files, pristine, snapshot, xnorcdl

#: one command line per command that writes, with OUT where its --json goes
COMMANDS = {
    "infer": ["infer", "--weights", "w.npz", "--images", "i.bin", "--backend", "reference",
              "--no-progress", "--json", "OUT"],
    "summary": ["summary", "--weights", "w.npz", "--json", "OUT"],
    "tradeoff": ["tradeoff", "--weights", "w.npz", "--images", "i.bin", "--calib", "i.bin",
                 "--rules", "fixed:0.5", "--backend", "reference", "--no-progress",
                 "--json", "OUT"],
    "compare": ["compare", "--weights", "w.npz", "w2.npz", "--images", "i.bin", "--rules",
                "fixed:0.5", "--backend", "reference", "--no-progress", "--json", "OUT"],
    "explore": ["explore", "--weights-dir", "grid", "--images", "i.bin", "--rules", "stored",
                "--baseline", "", "--out", "res", "--backend", "reference", "--no-progress",
                "--json", "OUT"],
    "split": ["split", "--weights", "w.npz", "--out", "parts", "--json", "OUT"],
    "edge": ["edge", "--weights", "d/edge.npz", "--images", "i.bin", "--cloud",
             "http://127.0.0.1:9", "--retry-for", "0", "--no-progress", "--json", "OUT"],
}


@pytest.fixture
def work(pristine, tmp_path):
    copy_files(pristine, tmp_path)
    with open(tmp_path / "earlier.json", "w") as f:
        f.write('{"an": "earlier output"}\n')
    return tmp_path


def _input(argv):
    """The weights-like input a command line reads (explore: a file of --weights-dir)."""
    return next((a for a in argv if a.endswith(".npz")), "grid/w.npz")


def _hardlink(tmp, argv):
    os.link(tmp / _input(argv), tmp / "hard.json")
    return "hard.json"


def _dirlink(tmp, argv):
    os.symlink(".", tmp / "same")
    return "same/" + _input(argv)


def _symlink(tmp, argv):
    os.symlink("earlier.json", tmp / "link.json")
    return "link.json"


def _fifo(tmp, argv):
    os.mkfifo(tmp / "pipe.json")
    return "pipe.json"


#: (row id, how to make the path from the folder and the command line, what the error says)
ROWS = [
    ("input by name", lambda tmp, argv: _input(argv), "same file as the input"),
    ("input by hard link", _hardlink, "same file as the input"),
    ("input by another name", _dirlink, "same file as the input"),
    ("input by a relative name", lambda tmp, argv: "./" + ("i.bin" if "i.bin" in argv
                                                           else _input(argv)),
     "same file as the input"),
    ("symlink", _symlink, "symbolic link"),
    ("fifo", _fifo, "FIFO"),
    ("device", lambda tmp, argv: "/dev/null", "character device"),
    ("folder", lambda tmp, argv: "grid", "folder"),
    ("missing folder", lambda tmp, argv: "nowhere/out.json", "does not exist"),
    ("trailing separator", lambda tmp, argv: "new.json/", "path separator"),
    ("empty", lambda tmp, argv: "", "empty"),
]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("row, make, says", ROWS, ids=[r[0] for r in ROWS])
def test_bad_json_path(work, command, row, make, says):
    argv = list(COMMANDS[command])
    out = make(work, argv)
    argv[argv.index("OUT")] = out
    before = snapshot(work)
    r = xnorcdl(argv, work)
    assert_refused(r, "--json", out, says)
    assert snapshot(work) == before


#: commands with two outputs given the same file
TWO_OUTPUTS = [
    ("tradeoff --json --write", ["tradeoff", "--weights", "w.npz", "--images", "i.bin",
                                 "--calib", "i.bin", "--backend", "reference", "--json", "o.json",
                                 "--write", "o.json"], "--write", "same file as the output"),
    ("tradeoff --write earlier by hard link",
     ["tradeoff", "--weights", "w.npz", "--images", "i.bin", "--calib", "i.bin", "--json",
      "earlier.json", "--write", "hard.npz"], "--write", "same file as the output"),
    ("tradeoff --write over --weights", ["tradeoff", "--weights", "w.npz", "--images", "i.bin",
                                         "--calib", "i.bin", "--write", "w.npz"], "--write",
     "same file as the input"),
    ("tradeoff --write -", ["tradeoff", "--weights", "w.npz", "--write", "-"], "--write",
     "stdout"),
    ("explore --json into --out", ["explore", "--weights-dir", "grid", "--images", "i.bin",
                                   "--rules", "stored", "--baseline", "", "--out", "res",
                                   "--json", "res/tables.md"], "--json",
     "same file as the output"),
    ("explore --out is a weights file", ["explore", "--weights-dir", "grid", "--images",
                                         "i.bin", "--rules", "stored", "--baseline", "",
                                         "--out", "w.npz"], "--out", "exists and is not"),
    ("explore --out holding a weights file named as an output",
     ["explore", "--weights-dir", "grid", "--images", "i.bin", "--rules", "stored",
      "--baseline", "", "--out", "grid2"], "--out", "same file as the input"),
    ("split --json into --out", ["split", "--weights", "w.npz", "--out", "parts", "--json",
                                 "parts/edge.npz"], "--json", "same file as the output"),
    ("split --out holding the weights", ["split", "--weights", "d/edge.npz", "--out", "d"],
     "--out", "same file as the input"),
    ("split --out is a file", ["split", "--weights", "w.npz", "--out", "i.bin"], "--out",
     "exists and is not a folder"),
    ("data --dest is a file", ["data", "cifar10", "--dest", "i.bin", "--from", "grid"],
     "--dest", "exists and is not a folder"),
]


@pytest.mark.parametrize("row, argv, option, says", TWO_OUTPUTS, ids=[r[0] for r in TWO_OUTPUTS])
def test_outputs_that_collide(work, row, argv, option, says):
    if "hard.npz" in argv:
        os.link(work / "earlier.json", work / "hard.npz")
    if "grid2" in argv:  # an output folder whose tables.md is the grid's weights file
        os.mkdir(work / "grid2")
        os.link(work / "grid" / "w.npz", work / "grid2" / "tables.md")
    before = snapshot(work)
    r = xnorcdl(argv, work)
    assert_refused(r, option, says)
    assert snapshot(work) == before


def test_every_output_option_is_declared():
    """Each command's file outputs carry the output path type, so the shared check sees them
    (a new command that writes gets the rules by declaring its options this way)."""
    import importlib

    from xnorcdl import cli, paths
    outputs = {}
    for name, (module, _) in cli.COMMANDS.items():
        ap = cli.command_parser(importlib.import_module(module), name)
        outputs[name] = sorted(a.option_strings[0] for a in ap._actions
                               if isinstance(a.type, paths.PathType)
                               and a.type.kind != paths.INPUT)
    assert outputs == {"infer": ["--json"], "summary": ["--json"],
                       "tradeoff": ["--json", "--write"], "compare": ["--json"],
                       "data": ["--dest"], "explore": ["--json", "--out"],
                       "split": ["--json", "--out"], "cloud": [], "edge": ["--json"]}
    assert set(outputs) == set(COMMANDS) | {"data", "cloud"}


def test_api_writers_follow_the_same_rules(work):
    """save_weights, split and write_thresholds refuse what the commands refuse."""
    from xnorcdl.errors import UsageError
    from xnorcdl.format import load_weights, save_weights
    from xnorcdl.split import split
    from xnorcdl.tradeoff import write_thresholds
    spec, arrays = load_weights(str(work / "w.npz"))
    os.symlink("earlier.json", work / "link.npz")
    before = snapshot(work)
    with pytest.raises(UsageError, match="symbolic link"):
        save_weights(str(work / "link.npz"), spec, arrays)
    with pytest.raises(UsageError, match="character device"):
        save_weights("/dev/null", spec, arrays)
    with pytest.raises(UsageError, match="same file as the input"):
        write_thresholds(str(work / "w.npz"), str(work / "w.npz"), "fixed:1", [1.0], "x", 1)
    with pytest.raises(UsageError, match="same file as the input"):
        split(str(work / "d" / "edge.npz"), str(work / "d"))
    assert snapshot(work) == before


def test_data_refuses_a_link_before_writing_anything(work):
    """``data`` replaces a damaged cached file, but never a link or a special file: refused
    before any file is written."""
    from hostile import write_records
    src = work / "src"
    src.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        write_records(src / name, 2)
    (work / "cache").mkdir()
    os.symlink("../earlier.json", work / "cache" / "test_batch.bin")
    before = snapshot(work)
    r = xnorcdl(["data", "cifar10", "--dest", "cache", "--from", "src"], work)
    assert_refused(r, "test_batch.bin", "symbolic link")
    assert snapshot(work) == before
