"""The cloud service deployed on a local Ray instance (Ray Serve, its own request batching),
bound to 127.0.0.1 on a free port, and stopped after the test."""
import concurrent.futures as cf

import httpx
import numpy as np
import pytest

from serving import free_port, split_model
from xnorcdl import wire
from xnorcdl.cloud_service import CloudRunner, ServiceConfig
from xnorcdl.split import load_cloud

pytest.importorskip("ray.serve")


def test_ray_serve_deployment_answers_like_the_runner(tmp_path):
    from xnorcdl import cloud_ray
    _, e_path, c_path = split_model(tmp_path, seed=4)
    part = load_cloud(c_path)
    port = free_port()
    cloud_ray.start(c_path, ServiceConfig(max_batch=8, max_wait_ms=50), "reference",
                    "127.0.0.1", port, replicas=1)
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/healthz", trust_env=False, timeout=60).json()["model_id"] == \
            part.model_id
        x = np.random.default_rng(0).standard_normal((12,) + part.feature_shape).astype(np.float32)
        bodies = [wire.encode(wire.FEATURES, part.model_id, [2 * i, 2 * i + 1], x[2 * i:2 * i + 2])
                  for i in range(6)]
        with cf.ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda b: httpx.post(
                url + "/v1/infer", content=b, trust_env=False, timeout=60,
                headers={"content-type": wire.CONTENT_TYPE}), bodies))
        want = CloudRunner(part, "reference")(x)
        for i, r in enumerate(replies):
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(wire.decode(r.content, wire.LOGITS).array,
                                       want[2 * i:2 * i + 2], rtol=1e-5, atol=1e-5)
        bad = httpx.post(url + "/v1/infer", content=b"XCDL", trust_env=False, timeout=60,
                         headers={"content-type": wire.CONTENT_TYPE})
        assert bad.status_code == 400 and "header" in bad.text
    finally:
        cloud_ray.stop()
