"""Cloud service under load on loopback: throughput and latency with batching on and off,
uvicorn and Ray Serve, for 1, 4, 16 and 64 concurrent edge clients.

Each client sends one cloud-bound sample per request (what a device whose sample missed the
exit does), waits for the reply, and sends the next, for ``--seconds``: ``--load wrk`` (the
default where the ``wrk`` program is installed) opens that many connections from one wrk thread,
``--load python`` runs that many Python threads with httpx (which then compete with the service
for the CPU). The cloud runs in its own process (uvicorn)
or on a local Ray instance, on 127.0.0.1 only. Reported per configuration: samples per second
served, p50 and p99 request latency, the mean cloud batch (from /metrics) and the bytes on the
wire per sample (request + reply). The ratio column divides by batching off at the same
client count. Check first: one request's logits equal the in-process cloud layers.

    python benchmarks/bench_serve.py --weights weights/r32_20E.npz [--clients 1,4,16,64]
           [--seconds 8] [--ray] [--json PATH]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import httpx  # noqa: E402

from xnorcdl import wire  # noqa: E402
from xnorcdl.split import load_cloud, split  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_uvicorn(cloud: str, batching: bool, max_batch: int, wait_ms: float, threads: int = 1):
    port = free_port()
    cmd = [sys.executable, "-m", "xnorcdl.cloud", "--weights", cloud, "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(wait_ms), "--threads", str(threads)]
    if not batching:
        cmd.append("--no-batching")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = ""
    while "listening on" not in line:
        if proc.poll() is not None:
            raise SystemExit(f"the cloud did not start: {line}")
        line = proc.stderr.readline()
    return f"http://127.0.0.1:{port}", proc


def load(url: str, body: bytes, clients: int, seconds: float, requests: int):
    lat, lock, stop_at = [], threading.Lock(), time.perf_counter() + seconds
    headers = {"content-type": wire.CONTENT_TYPE}

    def client():
        mine = []
        with httpx.Client(trust_env=False, timeout=60) as http:
            for _ in range(requests):
                if time.perf_counter() > stop_at:
                    break
                t0 = time.perf_counter()
                r = http.post(url + "/v1/infer", content=body, headers=headers)
                r.raise_for_status()
                mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    lat = np.array(lat)
    return {"requests": int(len(lat)), "samples_per_s": len(lat) / wall,
            "p50_ms": 1e3 * float(np.percentile(lat, 50)),
            "p99_ms": 1e3 * float(np.percentile(lat, 99))}


WRK_LUA = """local f = io.open(os.getenv("XNORCDL_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "application/x-xnorcdl"
"""


def _ms(text: str) -> float:
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * scale
    raise ValueError(text)


def load_wrk(url: str, body: bytes, clients: int, seconds: float):
    """The same load from wrk (C, one thread, ``clients`` connections): the clients then
    take little of the CPU the service runs on."""
    tmp = tempfile.mkdtemp(prefix="bench-wrk-")
    with open(os.path.join(tmp, "body.bin"), "wb") as f:
        f.write(body)
    with open(os.path.join(tmp, "post.lua"), "w") as f:
        f.write(WRK_LUA)
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{max(1, int(seconds))}s", "--latency",
                          "-s", os.path.join(tmp, "post.lua"), url + "/v1/infer"],
                         capture_output=True, text=True, timeout=seconds + 60,
                         env={**os.environ, "XNORCDL_BODY": os.path.join(tmp, "body.bin")}).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"wrk saw failed requests:\n{out}")
    lat = {ln.split()[0]: _ms(ln.split()[1]) for ln in out.splitlines()
           if ln.strip().startswith(("50%", "99%"))}
    rps = float(out.split("Requests/sec:")[1].split()[0])
    return {"requests": int(out.split(" requests in")[0].split()[-1]), "samples_per_s": rps,
            "p50_ms": lat["50%"], "p99_ms": lat["99%"]}


def mean_batch(url: str) -> float:
    text = httpx.get(url + "/metrics", trust_env=False).text
    vals = dict(line.rsplit(" ", 1) for line in text.splitlines()
                if line.startswith("xnorcdl_batch_size_"))
    n = float(vals.get("xnorcdl_batch_size_count", 0))
    return float(vals.get("xnorcdl_batch_size_sum", 0)) / n if n else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=os.path.join("weights", "r32_20E.npz"))
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=8.0, help="per configuration")
    ap.add_argument("--requests", type=int, default=2000, help="per client at most")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads of the cloud process")
    ap.add_argument("--load", default="wrk" if shutil.which("wrk") else "python",
                    choices=("wrk", "python"),
                    help="load generator: wrk (C; Debian package wrk) or Python threads with httpx")
    ap.add_argument("--ray", action="store_true", help="also measure the Ray Serve deployment")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    rep = split(args.weights, tmp)
    part = load_cloud(rep["cloud"])
    x = np.random.default_rng(0).standard_normal((1,) + part.feature_shape).astype(np.float32)
    body = wire.encode(wire.FEATURES, part.model_id, [0], x)
    from xnorcdl.cloud_service import CloudRunner
    want = CloudRunner(part)(x)
    rows = []
    servers = [("uvicorn", True), ("uvicorn", False)]
    for server, batching in servers:
        url, proc = start_uvicorn(rep["cloud"], batching, args.max_batch, args.max_wait_ms,
                                  args.threads)
        try:
            r = httpx.post(url + "/v1/infer", content=body, trust_env=False, timeout=60,
                           headers={"content-type": wire.CONTENT_TYPE})
            got = wire.decode(r.content, wire.LOGITS).array
            assert np.allclose(got, want, rtol=1e-5, atol=1e-5), "the service disagrees"
            reply_bytes = len(r.content)
            for k in clients:
                run = (load_wrk(url, body, k, args.seconds) if args.load == "wrk"
                       else load(url, body, k, args.seconds, args.requests))
                row = {"server": server, "batching": batching, "clients": k, "load": args.load,
                       **run}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            rows[-1]["mean_batch"] = mean_batch(url)
        finally:
            proc.terminate()
            proc.wait(30)
    if args.ray:
        from xnorcdl import cloud_ray
        from xnorcdl.cloud_service import ServiceConfig
        port = free_port()
        cloud_ray.start(rep["cloud"], ServiceConfig(max_batch=args.max_batch,
                                                    max_wait_ms=args.max_wait_ms),
                        "fast", "127.0.0.1", port, 1)
        try:
            for k in clients:
                ray_url = f"http://127.0.0.1:{port}"
                run = (load_wrk(ray_url, body, k, args.seconds) if args.load == "wrk"
                       else load(ray_url, body, k, args.seconds, args.requests))
                row = {"server": "ray", "batching": True, "clients": k, "load": args.load, **run}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            cloud_ray.stop()
    off = {r["clients"]: r["samples_per_s"] for r in rows if not r["batching"]}
    print(f"{'server':<8} {'batching':>8} {'clients':>7} {'samples/s':>10} {'vs off':>7} "
          f"{'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        ratio = r["samples_per_s"] / off[r["clients"]] if r["clients"] in off else float("nan")
        print(f"{r['server']:<8} {str(r['batching']):>8} {r['clients']:>7} "
              f"{r['samples_per_s']:10.1f} {ratio:6.2f}x {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}")
    print(f"bytes on the wire per sample: request {len(body)}, reply {reply_bytes}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "request_bytes": len(body), "reply_bytes": reply_bytes}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
