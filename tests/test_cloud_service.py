"""The cloud service on a free loopback port: replies, batching, every refusal (400 naming the
field, 401, 409, 413, 415, 503), idempotent retries, health and metrics."""
import asyncio
import concurrent.futures as cf

import numpy as np
import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serving import service_thread, split_model
from xnorcdl import wire
from xnorcdl.cloud_service import Batcher, CloudRunner, Metrics, ServiceConfig
from xnorcdl.split import load_cloud, load_edge


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return split_model(tmp_path_factory.mktemp("svc"))


def _features(edge_path, n, seed=0):
    shape = load_edge(edge_path).feature_shape
    return np.random.default_rng(seed).standard_normal((n,) + shape).astype(np.float32)


def _post(url, body, **headers):
    return httpx.post(url + "/v1/infer", content=body, trust_env=False, timeout=60,
                      headers={"content-type": wire.CONTENT_TYPE, **headers})


def test_replies_are_the_cloud_layers_and_requests_batch(model):
    _, e_path, c_path = model
    part = load_cloud(c_path)
    cfg = ServiceConfig(max_batch=64, max_wait_ms=200)
    with service_thread(c_path, cfg) as (url, app):
        assert httpx.get(url + "/healthz", trust_env=False).json()["model_id"] == part.model_id
        x = _features(e_path, 24)
        bodies = [wire.encode(wire.FEATURES, part.model_id, np.arange(3 * i, 3 * i + 3),
                              x[3 * i:3 * i + 3]) for i in range(8)]
        with cf.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda b: _post(url, b), bodies))
        want = CloudRunner(part, "reference")(x)
        for i, r in enumerate(replies):
            assert r.status_code == 200
            m = wire.decode(r.content, wire.LOGITS, part.model_id)
            np.testing.assert_array_equal(m.ids, np.arange(3 * i, 3 * i + 3))
            np.testing.assert_allclose(m.array, want[3 * i:3 * i + 3], rtol=1e-5, atol=1e-5)
        metrics = httpx.get(url + "/metrics", trust_env=False).text
        assert 'xnorcdl_requests_total{code="200"} 8' in metrics
        assert "xnorcdl_samples_total 24" in metrics
        batches = int(metrics.split("xnorcdl_batch_size_count ")[1].split()[0])
        assert batches < 8      # concurrent requests shared batches


def test_refusals_name_what_is_wrong(model, tmp_path):
    _, e_path, c_path = model
    part = load_cloud(c_path)
    good = wire.encode(wire.FEATURES, part.model_id, [0, 1], _features(e_path, 2))
    token = "s3cret-token"
    cfg = ServiceConfig(token=token, max_request_bytes=80_000)  # 2 samples fit, 40 do not
    auth = {"authorization": f"Bearer {token}"}
    with service_thread(c_path, cfg) as (url, _):
        assert _post(url, good).status_code == 401
        assert _post(url, good, authorization="Bearer wrong").status_code == 401
        r = httpx.post(url + "/v1/infer", content=good, headers={**auth,
                       "content-type": "application/octet-stream"}, trust_env=False)
        assert r.status_code == 415 and "content-type" in r.text
        bad = bytearray(good)
        bad[4] = 9                                                 # version
        r = _post(url, bytes(bad), **auth)
        assert r.status_code == 400 and "version" in r.text
        other = wire.encode(wire.FEATURES, "00" * 32, [0, 1], _features(e_path, 2))
        r = _post(url, other, **auth)
        assert r.status_code == 409 and "model id" in r.text
        wrong_shape = wire.encode(wire.FEATURES, part.model_id, [0], np.ones((1, 3, 2, 2)))
        r = _post(url, wrong_shape, **auth)
        assert r.status_code == 400 and "shape" in r.text
        big = wire.encode(wire.FEATURES, part.model_id, np.arange(40), _features(e_path, 40))
        r = _post(url, big, **auth)
        assert r.status_code == 413

        def chunks():       # no Content-Length: refused once the limit is passed
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]
        r = httpx.post(url + "/v1/infer", content=chunks(), trust_env=False,
                       headers={**auth, "content-type": wire.CONTENT_TYPE})
        assert r.status_code == 413
        assert _post(url, good, **auth).status_code == 200
        m = httpx.get(url + "/metrics", trust_env=False).text
        assert 'code="401"} 2' in m and 'code="413"} 2' in m and 'code="409"} 1' in m


def test_a_retried_key_is_answered_once(model):
    _, e_path, c_path = model
    part = load_cloud(c_path)
    body = wire.encode(wire.FEATURES, part.model_id, [5, 6], _features(e_path, 2))
    with service_thread(c_path) as (url, _):
        a = _post(url, body, **{"idempotency-key": "k1"})
        b = _post(url, body, **{"idempotency-key": "k1"})
        assert a.status_code == b.status_code == 200 and a.content == b.content
        m = httpx.get(url + "/metrics", trust_env=False).text
        assert "xnorcdl_samples_total 2" in m and "xnorcdl_idempotent_replays_total 1" in m


def test_batcher_respects_max_batch_and_drains_on_close():
    """Requests of 3 samples with max_batch 7: batches of at most 7 samples (two requests), a
    request never split; close() answers everything queued before it."""
    sizes = []

    def run(x):
        sizes.append(len(x))
        return x.reshape(len(x), -1)[:, :2].copy()

    async def go():
        b = Batcher(run, ServiceConfig(max_batch=7, max_wait_ms=50, queue_limit=16), Metrics())
        b.start()
        futs = [asyncio.ensure_future(b.submit(np.full((3, 1, 1, 2), i, np.float32)))
                for i in range(5)]
        await asyncio.sleep(0)
        await b.close()
        return [f.result() for f in futs]

    out = asyncio.run(go())
    assert all(len(o) == 3 and (o == i).all() for i, o in enumerate(out))
    assert max(sizes) <= 7 and sum(sizes) == 15 and len(sizes) == 3


def test_full_queue_gives_503_with_retry_after(model):
    _, e_path, c_path = model
    part = load_cloud(c_path)
    body = wire.encode(wire.FEATURES, part.model_id, [0], _features(e_path, 1))
    with service_thread(c_path) as (url, app):
        app.state.ctx.full = lambda: True
        r = _post(url, body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
