"""Signals, closed pipes and full disks: Ctrl-C (SIGINT) ends a command with one line and
status 130, SIGTERM with one line and 143, in the middle of the work or in the middle of
writing an output; the earlier output stays as it was and no temporary file remains. A closed
stdout ends quietly; a failed write names the file.

The commands run as child processes; a small wrapper stops one at a known point (the engine
running, or an output's temporary file written but not yet in place) and says so on stderr,
so the signal arrives exactly there without any timing."""
import errno
import os
import selectors
import signal
import subprocess
import sys
import time

import pytest

from hostile import TIMEOUT, copy_files, env, pristine, snapshot, write_records, xnorcdl

STOP = r"""
import os, sys, time
from xnorcdl import cli, engine
where, argv = sys.argv[1], sys.argv[2:]

def stop(*args, **kw):
    os.write(2, b"STOPPED\n")
    while True:
        time.sleep(0.01)

if where == "work":
    engine.run = engine.outputs = stop
else:  # "write": every output's temporary file is complete, not yet renamed over the target
    os.fsync = stop
sys.exit(cli.main(argv))
"""


def _wait_for(proc, marker: bytes, timeout: float = TIMEOUT) -> bytes:
    """What ``proc`` wrote on stderr up to ``marker`` (a hang fails the test)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    got = b""
    deadline = time.monotonic() + timeout
    while marker not in got:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            proc.kill()
            pytest.fail(f"no {marker!r} from the command: {got!r}")
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            pytest.fail(f"the command ended before {marker!r}: {got!r}")
        got += chunk
    return got


@pytest.fixture
def work(pristine, tmp_path):
    copy_files(pristine, tmp_path)
    (tmp_path / "out.json").write_text('{"an": "earlier output"}\n')
    return tmp_path


INFER = ["infer", "--weights", "w.npz", "--images", "i.bin", "--backend", "reference",
         "--no-progress", "--json", "out.json"]
COMMANDS = {
    "infer": INFER,
    "tradeoff --write": ["tradeoff", "--weights", "w.npz", "--images", "i.bin", "--calib",
                         "i.bin", "--rules", "fixed:0.5", "--backend", "reference",
                         "--no-progress", "--json", "out.json", "--write", "w3.npz"],
    "split": ["split", "--weights", "w.npz", "--out", "d", "--json", "out.json"],
}


#: (command, where it stops); split runs no engine, so it stops while writing only
STOPS = [(c, w) for c in COMMANDS for w in ("work", "write") if (c, w) != ("split", "work")]


@pytest.mark.parametrize("sig, status, line", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
@pytest.mark.parametrize("command, where", STOPS, ids=[f"{c}-{w}" for c, w in STOPS])
def test_signal_leaves_nothing_half_written(work, command, where, sig, status, line):
    before = snapshot(work)
    proc = subprocess.Popen([sys.executable, "-c", STOP, where, *COMMANDS[command]],
                            cwd=str(work), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_for(proc, b"STOPPED\n")
        if where == "write":  # a temporary file is there now, beside its target
            assert any(n.startswith(".xnorcdl-") for n in os.listdir(work)) or \
                any(n.startswith(".xnorcdl-") for n in os.listdir(work / "d"))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, err
    assert err.decode().split("STOPPED\n", 1)[-1] == line + "\n"
    assert snapshot(work) == before  # the earlier out.json intact, no temporary file


def test_data_killed_mid_way_leaves_no_part_file(work):
    """``data`` stopped while a verified file is being written: no .part file remains."""
    src = work / "src"
    src.mkdir()
    for i in range(1, 6):
        write_records(src / f"data_batch_{i}.bin", 3)
    write_records(src / "test_batch.bin", 3)
    (work / "cache").mkdir()
    before = snapshot(work)
    proc = subprocess.Popen([sys.executable, "-c", STOP, "write", "data", "cifar10", "--dest",
                             "cache", "--from", "src"], cwd=str(work), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(proc, b"STOPPED\n")
        assert [n for n in os.listdir(work / "cache") if n.endswith(".part")]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and b"Traceback" not in err, err
    assert snapshot(work) == before


def test_ctrl_c_on_a_real_run(work):
    """No wrapper: infer over many images with its progress bar on a terminal; Ctrl-C once
    the bar shows gives one line and 130, and the earlier output is intact."""
    import pty
    write_records(work / "many.bin", 20000)
    before = snapshot(work)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "xnorcdl", "infer", "--weights", "w.npz",
                             "--images", "many.bin", "--backend", "reference", "--json",
                             "out.json"], cwd=str(work), env=env(), stdout=subprocess.DEVNULL,
                            stderr=slave)
    os.close(slave)
    try:
        seen = b""
        sel = selectors.DefaultSelector()
        sel.register(master, selectors.EVENT_READ)
        deadline = time.monotonic() + TIMEOUT
        while b"infer " not in seen:
            if time.monotonic() > deadline or not sel.select(deadline - time.monotonic()):
                pytest.fail(f"no progress bar: {seen!r}")
            seen += os.read(master, 4096)
        proc.send_signal(signal.SIGINT)
        proc.wait(TIMEOUT)
        rest = b""
        while sel.select(0.5):
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            rest += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert proc.returncode == 130
    text = (seen + rest).decode(errors="replace")
    assert "interrupted" in text and "Traceback" not in text
    assert snapshot(work) == before


def test_closed_stdout_is_quiet(work):
    """The reader of stdout has gone before the command writes: no traceback, status 141."""
    proc = subprocess.Popen([sys.executable, "-m", "xnorcdl", "summary", "--weights", "w.npz",
                             "--json", "-"], cwd=str(work), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(TIMEOUT)
    assert proc.returncode == 141 and err == b"", err


@pytest.mark.parametrize("argv", [["summary", "--weights", "w.npz"],
                                  ["summary", "--weights", "w.npz", "--json", "-"],
                                  INFER[:-2] + ["--json", "-"]])
def test_pipe_into_head(work, argv):
    """``python -m xnorcdl ... | head -1``: one line out, no traceback nor error on stderr
    (infer's readable text goes there with --json -)."""
    cmd = " ".join([sys.executable, "-m", "xnorcdl"] + [f"'{a}'" for a in argv])
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} 2>err.txt | head -1; "
                        "echo status $?"], cwd=str(work), env=env(), capture_output=True,
                       text=True, timeout=TIMEOUT)
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[1] in ("status 0", "status 141"), r.stdout
    err = (work / "err.txt").read_text()
    assert "Traceback" not in err and "rror" not in err, err


def test_full_disk_names_the_file(work, monkeypatch, capsys):
    """A write that fails (ENOSPC) names the file; the earlier output and the folder are as
    they were."""
    from xnorcdl import cli

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    before = snapshot(work)
    monkeypatch.chdir(work)
    monkeypatch.setattr(os, "fsync", full)
    assert cli.main(["summary", "--weights", "w.npz", "--json", "out.json"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: out.json: {os.strerror(errno.ENOSPC)}\n"
    assert snapshot(work) == before


def test_in_process_handlers_are_restored():
    """cli.main installs its handlers only while a command runs."""
    from xnorcdl import cli
    old = signal.getsignal(signal.SIGTERM)
    assert cli.main(["summary", "--weights", "absent.npz"]) == 2
    assert signal.getsignal(signal.SIGTERM) is old


def test_ignored_signals_stay_ignored(work):
    """A command started with SIGINT ignored (a background job) keeps ignoring it."""
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "from xnorcdl import cli; import os; "
            "sys.exit(cli.main(['summary', '--weights', 'w.npz']) + 0 * os.getpid())")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(work), env=env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert xnorcdl(["summary", "--weights", "w.npz"], work).returncode == 0
