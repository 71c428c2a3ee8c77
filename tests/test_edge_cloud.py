"""Edge and cloud as two programs over loopback: the edge program against a cloud process equals
the single-process engine, survives the cloud being killed and restarted (no sample lost or
duplicated), waits a bounded time, and fails with one line naming the URL."""
import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from serving import CloudProcess, free_port, images, split_model
from xnorcdl import engine
from xnorcdl.edge import main as edge_main
from xnorcdl.edge_program import CloudClient, CloudError, run_edge
from xnorcdl.api import make_executor
from xnorcdl.model import load_model
from xnorcdl.records import pack_records
from xnorcdl.split import load_edge


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return split_model(tmp_path_factory.mktemp("ec"), seed=3)


def _reference(w, x):
    full = load_model(w)
    return engine.run(full, x, make_executor(full, "reference"), batch_size=32)


def test_edge_program_equals_infer(model, tmp_path):
    w, e_path, c_path = model
    x = images(150, seed=1)
    labels = np.arange(150) % 10
    pack_records(x, labels).tofile(str(tmp_path / "imgs.bin"))
    cloud = CloudProcess(c_path, free_port()).start()
    try:
        out = tmp_path / "edge.json"
        assert edge_main(["--weights", e_path, "--images", str(tmp_path / "imgs.bin"),
                          "--cloud", cloud.url, "--json", str(out), "--no-progress",
                          "--backend", "reference", "--concurrency", "3",
                          "--batch-size", "8", "--compress", "zlib"]) == 0
    finally:
        cloud.stop()
    from xnorcdl.infer import main as infer_main
    assert infer_main(["--weights", w, "--images", str(tmp_path / "imgs.bin"), "--backend",
                       "reference", "--json", str(tmp_path / "infer.json"), "--no-progress"]) == 0
    a = json.loads(out.read_text())
    b = json.loads((tmp_path / "infer.json").read_text())
    assert len(a["samples"]) == len(b["samples"]) == 150
    for s, t in zip(a["samples"], b["samples"]):
        assert (s["index"], s["prediction"], s["exit"], s["entropies"], s["energy"]) == \
               (t["index"], t["prediction"], t["exit"], t["entropies"], t["energy"])
    wire_ = a["summary"]["wire"]
    cloud_n = sum(s["exit"] == "final" for s in a["samples"])
    assert 0 < cloud_n < 150 and wire_["cloud_samples"] == cloud_n
    assert wire_["bytes_sent"] > 0 and wire_["retries"] == 0


def test_cloud_killed_and_restarted_loses_and_duplicates_nothing(model):
    w, e_path, c_path = model
    x = images(400, seed=2)
    ref = _reference(w, x)
    port = free_port()
    cloud = CloudProcess(c_path, port).start()
    part = load_edge(e_path)
    client = CloudClient(cloud.url, part.model_id, retry_for=120, timeout=20)
    sent = threading.Event()
    infer = client.infer

    def counting(ids, feats):       # the kill comes once some requests went through
        out = infer(ids, feats)
        sent.set()
        return out
    client.infer = counting
    result = {}

    def run():
        try:
            result["res"] = run_edge(part, x, make_executor(part.model, "reference"),
                                     [e.threshold for e in part.model.exits], client,
                                     concurrency=2, batch_size=4, edge_batch=8)
        except BaseException as exc:    # reported below
            result["exc"] = exc
    t = threading.Thread(target=run)
    t.start()
    try:
        assert sent.wait(120)
        cloud.kill()
        time.sleep(1.0)
        cloud.start()
        t.join(300)
    finally:
        cloud.stop()
        client.close()
    assert "exc" not in result, result.get("exc")
    res = result["res"]
    np.testing.assert_array_equal(res.exit_index, ref.exit_index)
    np.testing.assert_array_equal(res.predictions, ref.predictions)
    assert client.retries > 0


def test_no_cloud_gives_up_after_the_bounded_time(model):
    _, e_path, _ = model
    part = load_edge(e_path)
    client = CloudClient(f"http://127.0.0.1:{free_port()}", part.model_id, retry_for=1.0)
    t0 = time.monotonic()
    with pytest.raises(CloudError, match=r"http://127\.0\.0\.1:\d+/v1/infer: no answer for 1 s"):
        run_edge(part, images(64, seed=4), make_executor(part.model, "reference"), [0.0] * len(part.model.exits), client)
    assert time.monotonic() - t0 < 30
    client.close()


def test_edge_command_errors_are_one_line(model, tmp_path, capsys):
    _, e_path, c_path = model
    assert edge_main(["--weights", c_path, "--images", "x.bin", "--cloud", "http://127.0.0.1:1"]) == 2
    assert "other half" in capsys.readouterr().err
    assert edge_main(["--weights", e_path, "--images", "x.bin", "--cloud", "ftp://h"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --cloud") and "Traceback" not in err


def waiting(url: str) -> int:
    """The cloud's ``xnorcdl_requests_waiting`` gauge (GET /metrics)."""
    import httpx
    text = httpx.get(url + "/metrics", trust_env=False, timeout=10).text
    line = next(ln for ln in text.splitlines() if ln.startswith("xnorcdl_requests_waiting "))
    return int(line.split()[1])


def test_sigterm_drains_requests_in_flight(model):
    """Requests waiting in the batcher when SIGTERM arrives are answered; then the process
    exits with 143 (or 0) and refuses new connections."""
    import concurrent.futures as cf
    import signal

    import httpx

    from xnorcdl import wire
    from xnorcdl.split import load_cloud
    _, e_path, c_path = model
    part = load_cloud(c_path)
    # the batch waits up to the longest --max-wait-ms for more requests, so that SIGTERM
    # arrives while all four are waiting for it
    cloud = CloudProcess(c_path, free_port(), "--max-wait-ms", "1000", "--max-batch", "64").start()
    x = np.zeros((2,) + part.feature_shape, np.float32)
    body = wire.encode(wire.FEATURES, part.model_id, [0, 1], x)

    def post():
        return httpx.post(cloud.url + "/v1/infer", content=body, trust_env=False, timeout=60,
                          headers={"content-type": wire.CONTENT_TYPE}).status_code
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(post) for _ in range(4)]
            deadline = time.monotonic() + 60
            # all four accepted and waiting for their batch (unless a machine this slow ran
            # the batch first: then there is nothing left to drain, and the rest still holds)
            while waiting(cloud.url) < 4 and not all(f.done() for f in futs):
                assert time.monotonic() < deadline, "the four requests never reached the batcher"
                time.sleep(0.02)
            cloud.proc.send_signal(signal.SIGTERM)
            codes = [f.result() for f in futs]
        assert codes == [200] * 4
        # uvicorn re-raises the signal once drained; the command line turns it into 143
        assert cloud.proc.wait(30) in (0, 143)
    finally:
        cloud.stop()
