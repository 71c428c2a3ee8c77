"""The one command line: its table, shared options, lazy imports and error boundary."""
import configparser
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_spec, random_images
from test_infer import write_cifar10
from xnorcdl import cli, errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(*args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, **kw)


def test_top_help_lists_every_command_with_its_summary():
    r = python("-m", "xnorcdl", "--help")
    assert r.returncode == 0, r.stderr
    for name, (_, summary) in cli.COMMANDS.items():
        line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith(name + " "))
        assert summary.split()[0] in line


def test_table_summary_is_the_module_docstring_line():
    for name, (module, summary) in cli.COMMANDS.items():
        mod = importlib.import_module(module)
        assert mod.__doc__.startswith(f"``python -m xnorcdl {name}``: ")
        assert cli.summary_of(mod) == summary
        assert callable(mod.add_arguments) and callable(mod.run) and callable(mod.main)


@pytest.mark.parametrize("argv", [["--help"], ["infer", "--help"], ["tradeoff", "--help"],
                                  ["explore", "--help"], ["edge", "--help"]])
def test_help_imports_no_numba(argv):
    r = python("-X", "importtime", "-m", "xnorcdl", *argv)
    assert r.returncode == 0, r.stderr
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines()
                if ln.startswith("import time:")]
    assert "numpy" in imported or argv == ["--help"]
    pure = {"xnorcdl.kernels", "xnorcdl.kernels.shapes", "xnorcdl.kernels.codes"}  # no jitted code
    assert not [m for m in imported if m.startswith("numba") or ("kernels" in m and m not in pure)], \
        imported
    if argv == ["--help"]:
        assert "numpy" not in imported  # the table alone, no command module


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_option_shows_its_default(name):
    mod = importlib.import_module(cli.COMMANDS[name][0])
    ap = cli.command_parser(mod, f"python -m xnorcdl {name}")
    fmt = cli.HelpFormatter(ap.prog)
    for action in ap._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = fmt._get_help_string(action)
        assert action.required or "(default" in text, (name, action.option_strings)


def test_unknown_and_missing_command_are_usage_errors():
    for argv in (["nope"], []):
        r = python("-m", "xnorcdl", *argv)
        assert r.returncode == 2 and "Traceback" not in r.stderr


def test_boundary_turns_project_errors_into_one_line(capsys):
    def fail(exc):
        raise exc
    assert cli.boundary(fail, errors.DataError("x.bin: bad", where="x.bin")) == 2
    assert capsys.readouterr().err == "error: x.bin: bad\n"
    assert cli.boundary(fail, FileNotFoundError(2, "No such file or directory", "y.bin")) == 2
    assert capsys.readouterr().err == "error: y.bin: No such file or directory\n"
    assert cli.boundary(fail, KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert cli.boundary(lambda: None) == 0 and cli.boundary(lambda: 3) == 3
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli.boundary(lambda: 1 / 0)
    with pytest.raises(ValueError):  # a bare ValueError is a bug too
        cli.boundary(fail, ValueError("not ours"))


def test_errors_are_value_errors_with_where():
    for cls in (errors.WeightsError, errors.DataError, errors.EnergyTableError,
                errors.UsageError):
        e = cls("m", where="w")
        assert isinstance(e, errors.XnorcdlError) and isinstance(e, ValueError)
        assert str(e) == "m" and e.where == "w"
    from xnorcdl import energy, format, records, spec
    assert format.WeightsError is errors.WeightsError
    assert records.DataError is errors.DataError
    assert energy.EnergyTableError is errors.EnergyTableError
    assert issubclass(spec.SpecError, errors.WeightsError)


def test_loaders_raise_project_errors_naming_what(tmp_path):
    from xnorcdl import calibrate, energy, format, records
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"nope")
    with pytest.raises(errors.WeightsError) as e:
        format.load_weights(str(bad))
    assert e.value.where == str(bad)
    with pytest.raises(errors.EnergyTableError) as e:
        energy.load_energy_table(str(tmp_path / "none.json"))
    assert e.value.where == str(tmp_path / "none.json")
    with pytest.raises(errors.DataError) as e:
        records.read_records(str(bad))
    assert e.value.where == str(bad)
    with pytest.raises(errors.UsageError, match="threshold rule"):
        calibrate.parse_rule("within:x")
    with pytest.raises(errors.UsageError) as e:
        cli.parse_range("5:1", 10, "--range")
    assert e.value.where == "--range"


def test_module_and_subcommand_run_the_same(tmp_path, weights_file):
    w = weights_file(make_spec(edge_convs=4, exits=[(4, 0.5)]))
    imgs = write_cifar10(tmp_path / "i.bin", random_images(6, seed=3), np.arange(6) % 10)
    common = ["--weights", w, "--images", imgs, "--backend", "reference", "--no-progress",
              "--json", "-"]
    a = python("-m", "xnorcdl", "infer", *common)
    b = python("-m", "xnorcdl.infer", *common)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    strip = lambda s: s.split('"seconds"')[0]  # noqa: E731 (timings differ)
    assert strip(a.stdout) == strip(b.stdout) and '"samples": 6' in a.stdout


def test_bad_input_is_one_error_line_with_status_2(tmp_path):
    r = python("-m", "xnorcdl", "summary", "--weights", str(tmp_path / "missing.npz"))
    assert r.returncode == 2
    assert r.stderr == f"error: {tmp_path / 'missing.npz'}: no such file\n"
    r = python("-m", "xnorcdl", "tradeoff", "--weights", "weights/r32_20E.npz",
               "--rules", "bogus:1")
    assert r.returncode == 2 and r.stderr.startswith("error: --rules: threshold rule")
    assert len(r.stderr.splitlines()) == 1


def test_a_bug_keeps_its_traceback(monkeypatch, weights_file, tmp_path):
    from xnorcdl import api, infer
    w = weights_file(make_spec(edge_convs=4, exits=[(4, 0.5)]))
    imgs = write_cifar10(tmp_path / "i.bin", random_images(2), np.zeros(2, int))

    def broken(*a, **k):
        raise KeyError("a bug")
    monkeypatch.setattr(api.Network, "run", broken)
    with pytest.raises(KeyError, match="a bug"):
        infer.main(["--weights", w, "--images", imgs, "--backend", "reference"])


def test_console_script_points_at_the_command_line():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    scripts = [ln.strip() for ln in cfg["options.entry_points"]["console_scripts"].splitlines()
               if ln.strip()]
    assert scripts == ["xnorcdl = xnorcdl.cli:main"]
    module, func = scripts[0].split(" = ")[1].split(":")
    assert getattr(importlib.import_module(module), func) is cli.main


def test_commands_skip_numba_extension_scan_and_the_library_does_not():
    """python -m xnorcdl marks Numba's extension entry points as loaded before Numba is
    imported (a scan of every installed distribution); ``import xnorcdl`` leaves Numba alone."""
    probe = ("import sys; from xnorcdl import cli; {before}; import xnorcdl.kernels.jit; "
             "from numba.core import entrypoints; print(entrypoints._already_initialized)")
    for before, want in (("cli.skip_numba_extensions()", "True"), ("pass", "False")):
        r = python("-c", probe.format(before=before))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == want, (before, r.stdout)
    # main() does it for every command, without importing Numba itself (see the help test)
    r = python("-c", "import sys; from xnorcdl import cli; cli.main(['summary', '--help']); "
               "import xnorcdl.kernels as k; print(k.NUMBA_EXTENSIONS)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"
