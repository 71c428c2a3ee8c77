"""Several workers (``Network.run(workers=N)``, ``infer --workers N``) give the results of one,
sample for sample and bit for bit: each sample is computed by one worker on its own executor,
and no kernel's result depends on the other samples of its share."""
import json

import numpy as np
import pytest

import xnorcdl
from conftest import make_spec, random_images
from test_infer import write_cifar10
from xnorcdl import errors, infer

FIELDS = ("predictions", "exits", "entropies", "logits")


@pytest.fixture
def net(weights_file):
    spec = make_spec(edge_convs=4, exits=[(2, 0.0), (4, 0.0)])
    net = xnorcdl.load(weights_file(spec))
    images = random_images(17, seed=3)
    # thresholds that send some samples out at each exit and some to the cloud
    ent = net.run(images, "reference").entropies
    thr = [float(np.median(ent[:, 0])), float(np.median(ent[:, 1]))]
    return net, images, thr


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_workers_give_the_results_of_one(net, backend, batch_size):
    net, images, thr = net
    one = net.run(images, backend, thr, batch_size)
    assert len(set(one.exits.tolist())) == 3, "the thresholds should use every exit and the cloud"
    for workers in (2, 3, 40):
        many = net.run(images, backend, thr, batch_size, workers=workers)
        for f in FIELDS:
            assert np.array_equal(getattr(many, f), getattr(one, f), equal_nan=True), (workers, f)
        assert np.array_equal(many.energy.per_sample["total_pJ"], one.energy.per_sample["total_pJ"])


def test_workers_option(tmp_path, weights_file, capsys):
    w = weights_file(make_spec(edge_convs=4, exits=[(4, 0.5)]))
    imgs = write_cifar10(tmp_path / "imgs.bin", random_images(9, seed=4), np.arange(9) % 10)
    docs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}.json"
        assert infer.main(["--weights", w, "--images", imgs, "--workers", workers,
                           "--no-progress", "--json", str(out)]) == 0
        docs.append(json.loads(out.read_text())["samples"])
    assert docs[0] == docs[1]
    capsys.readouterr()
    assert infer.main(["--weights", w, "--images", imgs, "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--workers" in err
    with pytest.raises(errors.UsageError, match="workers"):
        xnorcdl.load(w).run(random_images(2), workers=0)
