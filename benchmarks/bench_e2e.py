"""End to end: the hybrid ResNet-32 against float32 and int8 peers, batch 1 and 32, one thread.

Ours (``weights/r32_20E.npz``: 20 binary edge convs, one exit after conv 20, its stored
threshold; CIFAR-10 test images):

* **edge path**: normalize + stem + 10 binary blocks + exit + entropy of one sample, the fast
  backend's edge program (one jitted call) and :func:`xnorcdl.engine.entropy`;
* **main job**: Algorithm 1 (:func:`xnorcdl.engine.run`) at batch 1 over ``--images`` test
  images, per sample (the file's exit fraction decides how many go on to the cloud); the
  energy accounting ``infer`` adds once per run (about 30 ms) is not in it;
* **hybrid, exits off, batch 32**: every sample through edge and cloud, per sample;
* the main job and the exits-off run again with the cloud blocks of ``--cloud-peer`` (default:
  the cloud_block kernel the backend does not use here, ``cloud_block_direct`` FMA tiles or
  ``cloud_block_folded`` BLAS) in place of the fast backend's own, to show what the cloud
  kernel is worth in the same run;
* the edge path and the main job again with the binary blocks of ``--edge-peer`` (default: the
  binary_block kernel the backend does not use here, ``binary_block_fused`` popcounts or
  ``binary_block_nibble`` tables) in the edge program, the same bits (checked).

Peers, built from ``weights/r32_fp.npz`` (the full-precision ResNet-32 of the same recipe),
exported with ``torch.onnx.export``: ONNX Runtime float32 at batch 1 and 32; ONNX Runtime int8,
statically quantized by ``onnxruntime.quantization.quantize_static`` (QOperator, per-channel
int8 weights, uint8 activations, MinMax calibration on ``--calib`` training images), at batch 1
and 32, with its test-set accuracy beside the float model's; PyTorch eager float32 at batch 1.
Every contender is timed interleaved in one run (``common.time_interleaved``), medians.

Usage::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_e2e.py \\
        [--repeat 300] [--images 256] [--calib 300] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (pins BLAS/OpenMP threads before numpy is imported)

import numpy as np  # noqa: E402

import xnorcdl  # noqa: E402
from xnorcdl import engine  # noqa: E402
from xnorcdl.data import cifar10_dir  # noqa: E402
from xnorcdl.format import load_weights  # noqa: E402
from xnorcdl.kernels.reference import normalize  # noqa: E402
from xnorcdl.records import read_records  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_resnet(spec, arrays):
    """The full-precision CIFAR ResNet of docs/FORMAT.md (zero-pad shortcuts) as a torch module
    in eval mode."""
    import torch
    from torch import nn

    def conv_bn(prefix, w_name, stride, pad):
        w = torch.from_numpy(arrays[w_name])
        conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride, pad, bias=False)
        conv.weight.data.copy_(w)
        bn = nn.BatchNorm2d(w.shape[0], eps=spec.bn_eps)
        bn.weight.data.copy_(torch.from_numpy(arrays[f"{prefix}.bn.gamma"]))
        bn.bias.data.copy_(torch.from_numpy(arrays[f"{prefix}.bn.beta"]))
        bn.running_mean.copy_(torch.from_numpy(arrays[f"{prefix}.bn.mean"]))
        bn.running_var.copy_(torch.from_numpy(arrays[f"{prefix}.bn.var"]))
        return nn.Sequential(conv, bn)

    class Block(nn.Module):
        def __init__(self, b):
            super().__init__()
            _, w_in, w_out, stride = spec.block_geometry(b)
            self.c1 = conv_bn(f"conv{2 * b + 1}", f"conv{2 * b + 1}.weight", stride, 1)
            self.c2 = conv_bn(f"conv{2 * b + 2}", f"conv{2 * b + 2}.weight", 1, 1)
            self.pad = (w_out - w_in) // 2 if stride == 2 else 0

        def forward(self, x):
            t = self.c2(torch.relu(self.c1(x)))
            sc = x
            if self.pad:
                sc = nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
            return torch.relu(t + sc)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn("stem", "stem.conv.weight", 1, 1)
            self.blocks = nn.Sequential(*[Block(b) for b in range(spec.num_blocks)])
            self.head = nn.Linear(64, spec.num_classes)
            self.head.weight.data.copy_(torch.from_numpy(arrays["head.weight"]))
            self.head.bias.data.copy_(torch.from_numpy(arrays["head.bias"]))

        def forward(self, x):
            x = self.blocks(torch.relu(self.stem(x)))
            return self.head(x.mean(dim=(2, 3)))

    return Net().eval()


def ort_sessions(net, x1, calib, tmp):
    """(float32 session, int8 session): the torch module exported to ONNX (dynamic batch), and
    that model statically quantized with ONNX Runtime's own tool on ``calib`` (normalized)."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = os.path.join(tmp, "resnet32.onnx")
    torch.onnx.export(net, (torch.from_numpy(x1),), fp32, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
                      dynamo=False)
    pre = os.path.join(tmp, "resnet32.pre.onnx")
    quant_pre_process(fp32, pre)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"x": x}

    int8 = os.path.join(tmp, "resnet32.int8.onnx")
    quantize_static(pre, int8, Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return [ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for p in (fp32, int8)]


def work(model):
    """(binary MACs, popcount words) of the edge's binary convs and float32 MACs of the cloud
    convs, per sample (dense: every tap of every output, padding included)."""
    bin_macs = words = float_macs = 0
    for blk in model.blocks:
        c, h, _ = blk.in_shape
        for conv in (blk.conv1, blk.conv2):
            o, ci = conv.shape[:2]
            side = (h - 1) // conv.stride + 1
            macs = o * side * side * 9 * ci
            if blk.edge:
                bin_macs += macs
                words += o * side * side * 3 * -(-3 * ci // 64)
            else:
                float_macs += macs
            h = side
    return bin_macs, words, float_macs


def sgemm_peak(n=1024, reps=5):
    """FLOP/s of NumPy's float32 matmul on n x n operands (one BLAS thread)."""
    import time
    a = np.ones((n, n), np.float32)
    c = np.empty_like(a)
    np.matmul(a, a, out=c)
    best = min(_timed(lambda: np.matmul(a, a, out=c), time) for _ in range(reps))
    return 2 * n ** 3 / best


def _timed(f, time):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def with_cloud_kernel(model, name):
    """A fast executor whose cloud blocks are registry kernel ``name`` (the edge unchanged)."""
    from xnorcdl.backends.fast import FastExecutor
    from xnorcdl.kernels.registry import KERNELS
    ex = FastExecutor(model)
    for blk, prep in zip(model.blocks, ex.blocks):
        if not blk.edge:
            sc = blk.shortcut
            prep.cloud = KERNELS[name].build(blk.conv1, blk.conv2, sc.kind, sc.pad_channels,
                                             sc.conv if sc.kind == "conv1x1" else None)
    ex.cloud = ex.cloud_program()      # the cloud program of the new blocks
    return ex


def with_edge_kernel(model, name):
    """A fast executor whose binary edge blocks are registry kernel ``name``, its edge program
    rebuilt (the cloud unchanged)."""
    from xnorcdl.backends.fast import FastExecutor
    from xnorcdl.kernels.registry import KERNELS
    ex = FastExecutor(model)
    for blk, prep in zip(model.blocks, ex.blocks):
        if prep.fused is not None:
            sc = blk.shortcut
            prep.fused = KERNELS[name].build(prep.conv1, prep.conv2, sc.kind, sc.pad_channels)
    ex.program = ex._edge_program()
    return ex


def accuracy(sess, x, labels, batch=500):
    pred = np.concatenate([sess.run(None, {"x": x[i:i + batch]})[0].argmax(1)
                           for i in range(0, len(x), batch)])
    return float((pred == labels).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--repeat", type=int, default=300, help="timed calls per contender")
    ap.add_argument("--images", type=int, default=256,
                    help="test images per main-job call (Algorithm 1 at batch 1)")
    ap.add_argument("--calib", type=int, default=300, help="training images for int8 calibration")
    ap.add_argument("--json", default=None, metavar="PATH", help="write all figures as JSON")
    ap.add_argument("--cloud-peer", default=None, metavar="KERNEL",
                    help="cloud_block kernel of the registry timed beside the backend's own "
                         "(default: the other of cloud_block_direct / cloud_block_folded)")
    ap.add_argument("--edge-peer", default=None, metavar="KERNEL",
                    help="binary_block kernel of the registry timed beside the backend's own "
                         "(default: the other of binary_block_fused / binary_block_nibble)")
    args = ap.parse_args(argv)
    from xnorcdl.kernels.registry import binary_block_kernel, cloud_block_kernel, of_kind
    own_edge, own_cloud = binary_block_kernel().name, cloud_block_kernel().name
    if args.cloud_peer is None:
        args.cloud_peer = ("cloud_block_folded" if own_cloud == "cloud_block_direct"
                           else "cloud_block_direct")
    if args.edge_peer is None:
        args.edge_peer = ("binary_block_fused" if own_edge == "binary_block_nibble"
                          else "binary_block_nibble")
    if args.edge_peer not in of_kind("binary_block"):
        ap.error(f"--edge-peer: expected one of {', '.join(of_kind('binary_block'))}, got "
                 f"{args.edge_peer!r}")
    if args.cloud_peer not in of_kind("cloud_block"):
        ap.error(f"--cloud-peer: expected one of {', '.join(of_kind('cloud_block'))}, got "
                 f"{args.cloud_peer!r}")
    import torch
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    data = cifar10_dir(fetch=False, need=["test_batch.bin", "data_batch_1.bin"])
    test_x, test_y = read_records(os.path.join(data, "test_batch.bin"), "cifar10")
    train_x, _ = read_records(os.path.join(data, "data_batch_1.bin"), "cifar10")
    test_x, test_y = np.ascontiguousarray(test_x), np.asarray(test_y)

    net = xnorcdl.load(os.path.join(ROOT, "weights", "r32_20E.npz"))
    model, fast = net.model, net.executor("fast")
    n_edge = model.edge_blocks
    one = test_x[:1]
    main_imgs = test_x[:args.images]
    batch32 = test_x[:32]
    res = net.run(main_imgs)
    peer = with_cloud_kernel(model, args.cloud_peer)
    a = engine.run(model, batch32, fast, [0.0], 32)
    b = engine.run(model, batch32, peer, [0.0], 32)
    assert np.allclose(a.logits, b.logits, atol=1e-3), "the two cloud kernels disagree"
    cloud_frac = float((res.exits == xnorcdl.CLOUD).mean())
    epeer = with_edge_kernel(model, args.edge_peer)
    (xa, la), (xb, lb) = (ex.segment(batch32, None, 0, n_edge, 0) for ex in (fast, epeer))
    assert np.array_equal(xa, xb) and np.array_equal(la, lb), "the two edge kernels disagree"

    def edge_path(ex=fast):
        _, logits = ex.segment(one, None, 0, n_edge, 0)
        return engine.entropy(logits)

    fp_spec, fp_arrays = load_weights(os.path.join(ROOT, "weights", "r32_fp.npz"))
    mean, std = np.asarray(fp_spec.mean, np.float32), np.asarray(fp_spec.std, np.float32)
    tnet = torch_resnet(fp_spec, fp_arrays)
    x_all = normalize(test_x, mean, std)
    calib = normalize(train_x[:args.calib], mean, std)
    x1, x32 = x_all[:1], x_all[:32]
    with tempfile.TemporaryDirectory() as tmp:
        sess, sess8 = ort_sessions(tnet, x1, calib, tmp)
    with torch.no_grad():
        want = tnet(torch.from_numpy(x32)).numpy()
    assert np.allclose(sess.run(None, {"x": x32})[0], want, atol=1e-3), "ORT disagrees with torch"
    acc = {"onnxruntime float32 (r32_fp)": accuracy(sess, x_all, test_y),
           "onnxruntime int8 QOperator per-channel (r32_fp)": accuracy(sess8, x_all, test_y),
           "xnorcdl r32_20E (Algorithm 1)": float(net.run(test_x).accuracy(test_y))}
    tx1 = torch.from_numpy(x1)

    def run_torch():
        with torch.no_grad():
            return tnet(tx1)

    n_main = len(main_imgs)
    fns = {  # name -> (callable, samples per call)
        "xnorcdl edge path (batch 1)": (edge_path, 1),
        f"xnorcdl main job (Algorithm 1, batch 1, {100 * cloud_frac:.0f}% to the cloud)":
            (lambda: engine.run(model, main_imgs, fast, None, 1), n_main),
        "xnorcdl hybrid, exits off (batch 32)":
            (lambda: engine.run(model, batch32, fast, [0.0], 32), 32),
        f"xnorcdl edge path (batch 1), blocks by {args.edge_peer}":
            (lambda: edge_path(epeer), 1),
        f"xnorcdl main job, edge blocks by {args.edge_peer}":
            (lambda: engine.run(model, main_imgs, epeer, None, 1), n_main),
        f"xnorcdl main job, cloud by {args.cloud_peer}":
            (lambda: engine.run(model, main_imgs, peer, None, 1), n_main),
        f"xnorcdl hybrid, exits off (batch 32), cloud by {args.cloud_peer}":
            (lambda: engine.run(model, batch32, peer, [0.0], 32), 32),
        "onnxruntime float32 (batch 1)": (lambda: sess.run(None, {"x": x1}), 1),
        "onnxruntime float32 (batch 32)": (lambda: sess.run(None, {"x": x32}), 32),
        "onnxruntime int8 (batch 1)": (lambda: sess8.run(None, {"x": x1}), 1),
        "onnxruntime int8 (batch 32)": (lambda: sess8.run(None, {"x": x32}), 32),
        "pytorch eager float32 (batch 1)": (run_torch, 1),
    }
    reps = {k: max(5, args.repeat // n) for k, (_, n) in fns.items()}
    info = common.machine()
    import onnxruntime as ort
    print(f"config: repeat={args.repeat} images={n_main} calib={args.calib} "
          f"onnxruntime={ort.__version__} torch={torch.__version__} "
          f"edge blocks={own_edge} cloud blocks={own_cloud}")
    print(f"machine: {info}")
    times = {}
    for group in ([k for k in fns if fns[k][1] == 1], [k for k in fns if fns[k][1] > 1]):
        rep = min(reps[k] for k in group)
        times.update(common.time_interleaved({k: fns[k][0] for k in group}, rep,
                                             rounds=min(10, rep)))
    per = {k: times[k]["median"] / fns[k][1] for k in fns}
    ort1, ort32 = per["onnxruntime float32 (batch 1)"], per["onnxruntime float32 (batch 32)"]
    int8_1 = per["onnxruntime int8 (batch 1)"]
    lines = ["| contender | ms per sample | ORT fp32 b1 / this | ORT fp32 b32 / this | "
             "ORT int8 b1 / this |", "|---|---:|---:|---:|---:|"]
    for k in fns:
        lines.append(f"| {k} | {per[k] * 1e3:.3f} | {ort1 / per[k]:.2f}x | {ort32 / per[k]:.2f}x"
                     f" | {int8_1 / per[k]:.2f}x |")
    print("\n".join(lines))
    print("\n| model | test accuracy (10000 images) |\n|---|---:|")
    for k, v in acc.items():
        print(f"| {k} | {100 * v:.2f}% |")
    # napkin math: the edge's binary work against the measured popcount rate, the cloud's
    # float work against NumPy's sgemm on large operands (both one core)
    bin_macs, words, float_macs = work(model)
    edge = per["xnorcdl edge path (batch 1)"]
    cloud = per["xnorcdl hybrid, exits off (batch 32)"] - edge
    stream, peak = common.streaming_popcount_words_per_s(), sgemm_peak()
    napkin = {"binary_macs": bin_macs, "popcount_words": words, "float_macs": float_macs,
              "edge_binary_macs_per_s": bin_macs / edge, "edge_words_per_s": words / edge,
              "streaming_words_per_s": stream, "cloud_flop_per_s": 2 * float_macs / cloud,
              "sgemm_peak_flop_per_s": peak}
    print(f"\nedge: {bin_macs / 1e6:.1f} M binary MACs, {words / 1e3:.0f} k popcount words per "
          f"sample; {bin_macs / edge / 1e9:.0f} G binary MAC/s, {words / edge / 1e9:.2f} G words/s"
          f" = {100 * words / edge / stream:.0f}% of streaming XOR+popcount "
          f"({stream / 1e9:.2f} G words/s), stem, packing and exit included")
    print(f"cloud (batch 32, edge time subtracted): {2 * float_macs / 1e6:.1f} MFLOP per sample,"
          f" {2 * float_macs / cloud / 1e9:.1f} GFLOP/s = {100 * 2 * float_macs / cloud / peak:.0f}%"
          f" of NumPy sgemm on 1024^3 ({peak / 1e9:.1f} GFLOP/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "repeat": args.repeat, "times_s": times,
                       "per_sample_s": per, "accuracy": acc, "cloud_fraction": cloud_frac,
                       "napkin": napkin, "edge_blocks": own_edge,
                       "edge_peer": args.edge_peer, "cloud_blocks": own_cloud,
                       "cloud_peer": args.cloud_peer}, f, indent=1)


if __name__ == "__main__":
    main()
