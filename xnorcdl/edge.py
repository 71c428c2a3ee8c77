"""``python -m xnorcdl edge``: run the edge half against a cloud service

Runs Algorithm 1 on ``--images`` with the edge artifact alone (stem, quantized convs, exits);
the samples no exit takes are sent to the cloud service at ``--cloud`` (docs/PROTOCOL.md) and
its head decides them. Predictions and exits equal ``python -m xnorcdl infer`` on the source
weights; ``--json`` holds the same per-sample records, plus the bytes on the wire. Retries,
backoff and exactly-once delivery: :mod:`xnorcdl.edge_program`.
"""
from __future__ import annotations

import argparse
import sys
import time
import types
from typing import List, Optional

import numpy as np

from . import cli, paths
from .wire import MAX_SAMPLES as MAX_REQUEST_SAMPLES


def add_arguments(ap: argparse.ArgumentParser) -> None:
    a = ap.add_argument
    cli.add_weights(ap, help="the edge artifact (DIR/edge.npz of python -m xnorcdl split)")
    cli.add_images(ap)
    a("--cloud", required=True, type=cloud_url,
      help="URL of the cloud service, e.g. http://127.0.0.1:8765")
    a("--threshold", default=None, type=cli.thresholds_type,
      help="exit thresholds (nats), overriding the stored ones (default: the stored ones)")
    g = ap.add_argument_group("wire")
    g.add_argument("--concurrency", type=cli.integer(1, 1024), default=4,
                   help="requests in flight at most")
    g.add_argument("--batch-size", type=cli.integer(1, MAX_REQUEST_SAMPLES), default=16,
                   help="cloud-bound samples per request at most")
    g.add_argument("--wire-dtype", default="float32", choices=["float32", "float16"],
                   help="features on the wire: exact float32, or float16 (lossy, half the bytes)")
    g.add_argument("--compress", default="none", choices=["none", "zlib"],
                   help="lossless payload compression")
    g.add_argument("--token-file", default=None, type=paths.input_path(),
                   help="file holding the bearer token of the cloud")
    g.add_argument("--retry-for", type=cli.number(0, 86400), default=60.0,
                   help="seconds a request is retried (connection errors, timeouts, 5xx) before "
                        "giving up")
    g.add_argument("--timeout", type=cli.number(0, 3600, lo_open=True), default=30.0,
                   help="seconds one HTTP attempt may take")
    g.add_argument("--tx-pj-per-bit", type=cli.number(0, 1e9, hi_open=True), default=None,
                   metavar="P",
                   help="also price the bytes sent at P pJ per bit (give the radio's figure and "
                        "its source)")
    a("--edge-batch", type=cli.integer(1, cli.MAX_BATCH), default=32,
      help="samples per edge batch")
    a("--backend", default="fast", choices=["fast", "reference"],
      help="fast: Numba bit-packed kernels; reference: the NumPy oracle")
    cli.add_json(ap, "the summary and per-sample records")
    cli.add_progress(ap)


def energy_records(part, exit_index: np.ndarray) -> List[dict]:
    """Per-sample energy records as ``infer --json`` writes them, from the outcome prices the
    split stored (priced on the whole network)."""
    outs = part.meta["energy_outcomes"]
    conv = part.meta["energy_table"]["mac_convention"]
    rows = [{"exit": o["outcome"], "edge_pJ": o["pJ_per_sample"]["edge"],
             "cloud_pJ": o["pJ_per_sample"]["cloud"], "total_pJ": o["pJ_per_sample"]["total"],
             "comm_bytes": o["comm_bytes"], "macs_by_bits": o[f"macs_{conv}_by_bits"]}
            for o in outs]
    k = len(outs) - 1
    return [dict(rows[k if e < 0 else e], macs_by_bits=dict(rows[k if e < 0 else e]
                                                            ["macs_by_bits"]))
            for e in exit_index.tolist()]


def cloud_url(text: str) -> str:
    """``--cloud``: an http:// or https:// URL with a host."""
    from urllib.parse import urlsplit
    try:
        url = urlsplit(text)
        url.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r} "
                                         f"({exc})") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text


def run(args: argparse.Namespace) -> int:
    from .api import make_executor
    from .cloud import read_token
    from .edge_program import CloudClient, run_edge
    from .infer import summarize
    from .split import load_edge
    part = load_edge(args.weights)
    model = part.model
    used = cli.parse_thresholds(args.threshold, len(model.exits)) or \
        [e.threshold for e in model.exits]
    path = cli.resolve_images(args.images, args.fetch)
    images, labels = cli.load_images(path, args.format, args.limit, model.spec.num_classes)
    executor = make_executor(model, args.backend, "--backend")
    client = CloudClient(args.cloud, part.model_id, read_token(args.token_file), args.wire_dtype,
                         args.compress, args.retry_for, args.timeout)
    try:
        with cli.progress(args, len(images), "edge") as bar:
            t0 = time.perf_counter()
            res = run_edge(part, images, executor, used, client, args.concurrency,
                           args.batch_size, args.edge_batch, bar)
            seconds = time.perf_counter() - t0
    finally:
        client.close()
    summary = summarize(model, types.SimpleNamespace(predictions=res.predictions,
                                                     exits=res.exit_index),
                        labels, seconds, used)
    cloud_n = int((res.exit_index < 0).sum())
    lat = np.array(client.latencies) if client.latencies else np.zeros(1)
    summary["wire"] = {"url": args.cloud, "dtype": args.wire_dtype, "compression": args.compress,
                       "requests": len(client.latencies), "retries": client.retries,
                       "bytes_sent": client.bytes_sent, "cloud_samples": cloud_n,
                       "bytes_per_cloud_sample": client.bytes_sent / cloud_n if cloud_n else None,
                       "latency_p50_s": float(np.percentile(lat, 50)),
                       "latency_p99_s": float(np.percentile(lat, 99))}
    if args.tx_pj_per_bit is not None:
        summary["wire"]["transmit_pJ_per_sample"] = (8 * client.bytes_sent * args.tx_pj_per_bit
                                                     / max(1, len(images)))
    summary.update(weights=args.weights, images=path, backend=args.backend,
                   model_id=part.model_id)
    out = cli.text_out(args)
    acc = (f", accuracy {100 * summary['accuracy']:.2f}%"
           if summary.get("accuracy") is not None else "")
    w = summary["wire"]
    print(f"edge      {len(images)} samples{acc}; {100 * (1 - cloud_n / max(1, len(images))):.2f}% "
          f"left at the edge, {cloud_n} sent to {args.cloud}", file=out)
    print(f"wire      {w['bytes_sent']} bytes in {w['requests']} requests "
          f"({w['bytes_per_cloud_sample'] or 0:.0f} per cloud-bound sample, {args.wire_dtype}, "
          f"{args.compress}), {w['retries']} retries, p50 {1e3 * w['latency_p50_s']:.1f} ms, "
          f"p99 {1e3 * w['latency_p99_s']:.1f} ms", file=out)
    print(f"speed     {len(images) / seconds:.1f} samples/s ({seconds:.2f} s)", file=out)
    if not args.json:
        return 0
    from .report import emit_json
    energy = energy_records(part, res.exit_index)
    doc = {"summary": summary, "samples": [
        {"index": i, "label": None if labels is None else int(labels[i]),
         "prediction": int(res.predictions[i]),
         "exit": "final" if res.exit_index[i] < 0 else f"exit{res.exit_index[i]}",
         "entropies": [None if np.isnan(h) else float(h) for h in res.entropies[i]],
         "energy": energy[i]}
        for i in range(len(res.predictions))]}
    return emit_json(doc, args.json)


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(sys.modules[__name__], argv, "python -m xnorcdl edge")


if __name__ == "__main__":
    sys.exit(main())
