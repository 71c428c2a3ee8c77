"""The infer command end to end on small generated files, and its one-line errors."""
import json

import numpy as np
import pytest

from conftest import make_spec, random_images
from xnorcdl import infer


def write_cifar10(path, images, labels):
    rec = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
    path.write_bytes(rec.tobytes())
    return str(path)


@pytest.fixture
def setup(tmp_path, weights_file):
    spec = make_spec(edge_convs=4, exits=[(4, 0.5)])
    w = weights_file(spec)
    images = random_images(12, seed=1)
    labels = np.arange(12) % 10
    return w, write_cifar10(tmp_path / "imgs.bin", images, labels), tmp_path


def run(args, capsys):
    code = infer.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_summary_and_json(setup, capsys):
    w, imgs, tmp = setup
    js = tmp / "out.json"
    code, out, err = run(["--weights", w, "--images", imgs, "--backend", "reference",
                          "--threshold", "1e9", "--json", str(js), "--no-progress"], capsys)
    assert code == 0, err
    assert "accuracy" in out and "exit0" in out
    doc = json.loads(js.read_text())
    assert doc["summary"]["samples"] == 12
    assert doc["summary"]["exits"][0]["fraction"] == 1.0  # a huge threshold exits everything
    assert len(doc["samples"]) == 12 and doc["samples"][0]["exit"] == "exit0"
    acc = np.mean([s["prediction"] == s["label"] for s in doc["samples"]])
    assert doc["summary"]["accuracy"] == pytest.approx(acc)


def test_limit_and_zero_threshold(setup, capsys):
    w, imgs, tmp = setup
    js = tmp / "o.json"
    code, _, err = run(["--weights", w, "--images", imgs, "--backend", "reference", "--limit", "3",
                        "--threshold", "0", "--json", str(js), "--no-progress"], capsys)
    assert code == 0, err
    doc = json.loads(js.read_text())
    assert doc["summary"]["samples"] == 3 and doc["summary"]["final"]["fraction"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--threshold", "x"], "--threshold"),
    (["--threshold", "1,2"], "2 value"),
    (["--limit", "0"], "--limit"),
])
def test_option_errors(setup, capsys, args, message):
    w, imgs, _ = setup
    code, out, err = run(["--weights", w, "--images", imgs, "--backend", "reference"] + args, capsys)
    assert code == 2 and err.startswith("error:") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_truncated_images_and_bad_weights(setup, capsys, tmp_path):
    w, imgs, _ = setup
    data = open(imgs, "rb").read()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:-10])
    code, _, err = run(["--weights", w, "--images", str(cut), "--backend", "reference"], capsys)
    assert code == 2 and "cut.bin" in err
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"junk")
    code, _, err = run(["--weights", str(bad), "--images", imgs], capsys)
    assert code == 2 and "bad.npz" in err


def test_label_beyond_model_classes(tmp_path, weights_file, capsys):
    w = weights_file(make_spec(num_classes=5))
    imgs = write_cifar10(tmp_path / "i.bin", random_images(3), np.array([1, 7, 2]))
    code, _, err = run(["--weights", w, "--images", imgs, "--backend", "reference"], capsys)
    assert code == 2 and "record 1 has label 7" in err


def test_auto_backend_takes_the_reference_for_small_jobs_with_the_same_decisions(tmp_path,
                                                                              weights_file, capsys):
    from xnorcdl import cli
    spec = make_spec(edge_convs=4, exits=[(4, 0.5)])
    w = weights_file(spec)
    n = cli.AUTO_REFERENCE_MAX + 1
    imgs = write_cifar10(tmp_path / "imgs.bin", random_images(n, seed=3), np.arange(n) % 10)
    docs = {}
    for limit, backend in ((n - 1, "auto"), (n, "auto"), (n, "fast"), (n, "reference")):
        js = tmp_path / f"{limit}-{backend}.json"
        code, _, err = run(["--weights", w, "--images", imgs, "--limit", str(limit),
                            "--backend", backend, "--threshold", "2.0", "--json", str(js),
                            "--no-progress"], capsys)
        assert code == 0, err
        docs[limit, backend] = json.loads(js.read_text())
    assert docs[n - 1, "auto"]["summary"]["backend"] == "reference"
    assert docs[n, "auto"]["summary"]["backend"] == "fast"
    assert cli.pick_backend("auto", 1, workers=2) == "fast"
    assert cli.pick_backend("fast", 1) == "fast"
    decisions = {k: [(s["exit"], s["prediction"]) for s in d["samples"]] for k, d in docs.items()}
    assert decisions[n - 1, "auto"] == decisions[n, "fast"][:n - 1]
    assert decisions[n, "fast"] == decisions[n, "reference"] == decisions[n, "auto"]
    assert len({e for e, _ in decisions[n, "fast"]}) == 2  # both exit and head taken
    entropies = {k: [s["entropies"] for s in d["samples"]] for k, d in docs.items()}
    assert entropies[n, "fast"] == entropies[n, "reference"]  # the edge is bit-identical
