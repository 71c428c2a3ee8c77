"""Helpers of the serving tests: small split models, a cloud service on a free loopback port
(in a thread or as a child process), always stopped."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from conftest import make_spec
from xnorcdl.format import random_weights, save_weights

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def split_model(tmp_path, name="m", seed=0, **kw):
    """Write a random model and split it; returns (weights path, edge path, cloud path)."""
    from xnorcdl.split import split
    spec = make_spec(**{"depth": 8, "edge_convs": 4, "exits": [(2, 1.5), (4, 1.8)], **kw})
    w = os.path.join(str(tmp_path), f"{name}.npz")
    save_weights(w, spec, random_weights(spec, seed))
    rep = split(w, os.path.join(str(tmp_path), name))
    return w, rep["edge"], rep["cloud"]


@contextlib.contextmanager
def service_thread(cloud_path, cfg=None, backend="reference"):
    """The cloud application under uvicorn in a thread of this process; yields its URL."""
    import uvicorn

    from xnorcdl.cloud_service import ServiceConfig, create_app
    from xnorcdl.split import load_cloud
    app = create_app(load_cloud(cloud_path), cfg or ServiceConfig(), backend)
    sock = socket.socket()
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        deadline = time.time() + 60
        while not server.started:
            if time.time() > deadline or not t.is_alive():
                raise RuntimeError("the cloud service did not start")
            time.sleep(0.05)
        yield f"http://{HOST}:{port}", app
    finally:
        server.should_exit = True
        t.join(30)
        sock.close()


class CloudProcess:
    """``python -m xnorcdl.cloud`` as a child process on a given port."""

    def __init__(self, cloud_path, port, *extra):
        self.cmd = [sys.executable, "-m", "xnorcdl.cloud", "--weights", cloud_path,
                    "--host", HOST, "--port", str(port), "--backend", "reference", *extra]
        self.url = f"http://{HOST}:{port}"
        self.proc = None

    def start(self, timeout=120):
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + timeout
        line = ""
        while "listening on" not in line:
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the cloud process did not start: {line}")
            line = self.proc.stderr.readline()
        return self

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
