"""End-to-end latency at batch 1: Algorithm 1 on the hybrid ResNet-32 vs full-precision peers.

Ours: ResNet-32 with the first 20 block convs binary (edge) and one exit after conv 20, run by
:func:`xnorcdl.engine.run` with the fast backend, one sample at a time: a sample that leaves at
the exit (threshold set above its entropy) and one that goes on to the cloud (threshold 0).
Also timed: the edge path alone (normalize + stem + 10 binary blocks + exit). Peers: the same
architecture in full precision (all convs float32, same random weights), as a PyTorch eager
module and as ONNX Runtime (exported with torch.onnx.export), 1 thread each, on normalized
float32 input (ours starts from uint8 pixels and normalizes inside).

Usage::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_e2e.py \\
        [--repeat 300] [--json out.json]
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

from xnorcdl import engine  # noqa: E402
from xnorcdl.backends.fast import FastExecutor  # noqa: E402
from xnorcdl.backends.reference import ReferenceExecutor  # noqa: E402
from xnorcdl.format import random_weights  # noqa: E402
from xnorcdl.kernels.reference import normalize  # noqa: E402
from xnorcdl.model import build_model  # noqa: E402
from xnorcdl.spec import ExitSpec, ModelSpec  # noqa: E402


def torch_resnet(spec: ModelSpec, arrays):
    """The full-precision CIFAR ResNet of docs/FORMAT.md as a torch module (eval mode)."""
    import torch
    from torch import nn

    def conv_bn(prefix, w_name, stride, pad):
        w = torch.from_numpy(arrays[w_name])
        conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride, pad, bias=False)
        conv.weight.data.copy_(w)
        bn = nn.BatchNorm2d(w.shape[0], eps=spec.bn_eps)
        for name in ("weight", "bias"):
            getattr(bn, name).data.copy_(torch.from_numpy(
                arrays[f"{prefix}.bn.{'gamma' if name == 'weight' else 'beta'}"]))
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--repeat", type=int, default=300, help="timed calls per contender")
    ap.add_argument("--seed", type=int, default=0, help="weights and image seed")
    ap.add_argument("--json", default=None, metavar="PATH", help="write all figures as JSON")
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import torch
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    hybrid = ModelSpec(depth=32, edge_convs=20, edge_bits=1, exits=(ExitSpec(20, 0.0),))
    hybrid.validate()
    model = build_model(hybrid, random_weights(hybrid, args.seed))
    full = ModelSpec(depth=32, edge_convs=0)
    full.validate()
    full_arrays = random_weights(full, args.seed)
    full_model = build_model(full, full_arrays)
    image = np.random.default_rng(args.seed).integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    x = normalize(image, full_model.mean, full_model.std)

    fast = FastExecutor(model)
    h = float(engine.run(model, image, fast).entropies[0, 0])
    leave, stay = [h * 2 + 1.0], [0.0]
    res_leave = engine.run(model, image, fast, leave, batch_size=1)
    res_stay = engine.run(model, image, fast, stay, batch_size=1)
    assert res_leave.exit_index[0] == 0 and res_stay.exit_index[0] == engine.FINAL
    ref = engine.run(model, image, ReferenceExecutor(model), stay, batch_size=1)
    assert np.allclose(ref.logits, res_stay.logits, atol=1e-4)

    def edge_path():
        s = fast.stem(image)
        for b in range(model.edge_blocks):
            s = fast.block(b, s)
        return fast.exit(0, s)

    net = torch_resnet(full, full_arrays)
    tx = torch.from_numpy(x)
    with torch.no_grad():
        want = net(tx).numpy()
    ref_full = engine.run(full_model, image, ReferenceExecutor(full_model))
    assert np.allclose(want, ref_full.logits, atol=1e-3), "torch peer disagrees with the reference"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "resnet32.onnx")
        torch.onnx.export(net, (tx,), path, input_names=["x"], output_names=["logits"],
                          dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    assert np.allclose(sess.run(None, {"x": x})[0], want, atol=1e-3)

    def run_torch():
        with torch.no_grad():
            return net(tx)

    fns = {
        "xnorcdl edge exit (Algorithm 1)":
            lambda: engine.run(model, image, fast, leave, batch_size=1),
        "xnorcdl cloud (Algorithm 1)": lambda: engine.run(model, image, fast, stay, batch_size=1),
        "xnorcdl edge path only": edge_path,
        "onnxruntime full precision": lambda: sess.run(None, {"x": x}),
        "pytorch full precision": run_torch,
    }
    info = common.machine()
    print(f"config: repeat={args.repeat} seed={args.seed} onnxruntime={ort.__version__} "
          f"torch={torch.__version__}")
    print(f"machine: {info}")
    times = common.time_interleaved(fns, args.repeat)
    ort_t = times["onnxruntime full precision"]["median"]
    torch_t = times["pytorch full precision"]["median"]
    lines = ["| contender | median ms | p10 ms | ORT / this | PyTorch / this |",
             "|---|---:|---:|---:|---:|"]
    for name, t in times.items():
        lines.append(f"| {name} | {t['median'] * 1e3:.3f} | {t['p10'] * 1e3:.3f} | "
                     f"{ort_t / t['median']:.2f}x | {torch_t / t['median']:.2f}x |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "repeat": args.repeat, "times_s": times}, f, indent=1)


if __name__ == "__main__":
    main()
