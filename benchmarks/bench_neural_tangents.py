"""neural-tangents next to this library: ConvNet GP throughput, and kernel values on shared layers.

neural-tangents (JAX) is never a dependency; it runs in a separate virtual environment whose Python
is given with ``--nt-python``, for example::

    python3 -m venv ntvenv && ntvenv/bin/pip install neural-tangents "jax[cpu]==0.4.30" tf2jax==0.3.6
    python benchmarks/bench_neural_tangents.py --nt-python ntvenv/bin/python

The script (run with this project's environment) writes the images to a temporary ``.npz`` file,
runs neural-tangents on them in a subprocess, computes the same kernels here and prints:

* ConvNet GP (paper hyperparameters) cross kernel ``K(X, Z)`` on 28x28 MNIST digits, float32:
  entries/s of neural-tangents' jitted ``kernel_fn`` and of ours (compiled and eager), medians of
  ``--repeats`` calls after a warm-up call, measured in this one run; and the NNGP and the NTK together
  (``get=("nngp", "ntk")`` on both sides; ours in the native kernel);
* a pooled network with a global pool (28x28), ours eager on full maps and native on spatial offsets (the
  default), timed the same way;
* the largest relative difference, in float64, between the two libraries' kernels (the NNGP and the NTK, both
  in the NTK parameterisation, neural-tangents' default) for
  architectures made of layers both have: the ConvNet GP, and small pooled networks with
  AvgPool2d / GlobalAvgPool2d / Dense / Erf / LeakyReLU / GELU (stride-1 convolutions only: for strided
  "same" convolutions the paper's padding, which we follow, differs from TensorFlow's). Pooling
  strides are given explicitly to neural-tangents, whose ``AvgPool`` defaults to stride 1 where
  ours defaults to the window, as ``torch.nn.AvgPool2d`` does.

Results are appended to ``benchmarks/RESULTS.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Architectures as plain data, built by both sides: ("conv", k, var_weight, var_bias), ("relu",),
# ("erf",), ("gelu",), ("leaky", slope), ("avgpool", k), ("gap",), ("dense", var_weight, var_bias).
CONVNET = [("conv", 7, 2.79 * 49, 7.86), ("relu",)] * 7 + [("dense", 2.79, 7.86)]
# a pooled network on the full spatial path at 28x28 (timed on both sides; stride-1 convolutions)
POOLED = [("conv", 3, 2.0, 0.05), ("relu",), ("avgpool", 2), ("conv", 3, 2.0, 0.05), ("relu",), ("gap",)]
POOLED = POOLED + [("dense", 2.0, 0.05)]
VALUE_CASES = {
    "convnet_gp (28x28)": (CONVNET, 28),
    "conv-relu-avgpool-conv-erf-gap-dense (8x8)": (
        [("conv", 3, 2.0, 0.1), ("relu",), ("avgpool", 2), ("conv", 3, 1.5, 0.2), ("erf",), ("gap",)]
        + [("dense", 1.3, 0.1)],
        8,
    ),
    "conv-leaky-conv-relu-avgpool-dense (8x8)": (
        [("conv", 3, 2.0, 0.0), ("leaky", 0.2), ("conv", 2, 1.7, 0.3), ("relu",), ("avgpool", 2), ("dense", 2.0, 0.5)],
        8,
    ),
    "conv-gelu-avgpool-conv-gelu-dense (8x8)": (
        [("conv", 3, 2.0, 0.1), ("gelu",), ("avgpool", 2), ("conv", 2, 1.5, 0.0), ("gelu",), ("dense", 1.0, 0.2)],
        8,
    ),
}


# ------------------------------------------------------------------------------------------------
# the neural-tangents side (runs in its own environment: no torch, no gpytorch_cnngp)


def _nt_model(spec):
    from neural_tangents import stax

    layers = []
    for layer in spec:
        kind = layer[0]
        if kind == "conv":
            _, k, vw, vb = layer
            layers.append(stax.Conv(1, (k, k), padding="SAME", W_std=math.sqrt(vw), b_std=math.sqrt(vb) or None))
        elif kind == "relu":
            layers.append(stax.Relu())
        elif kind == "erf":
            layers.append(stax.Erf())
        elif kind == "gelu":
            layers.append(stax.Gelu(approximate=False))
        elif kind == "leaky":
            layers.append(stax.LeakyRelu(layer[1]))
        elif kind == "avgpool":
            # explicit strides: neural-tangents' AvgPool defaults to stride 1, ours (like torch) to the window
            layers.append(stax.AvgPool((layer[1], layer[1]), strides=(layer[1], layer[1])))
        elif kind == "gap":
            layers.append(stax.GlobalAvgPool())
        elif kind == "dense":
            _, vw, vb = layer
            layers.append(stax.Flatten())
            layers.append(stax.Dense(1, W_std=math.sqrt(vw), b_std=math.sqrt(vb) or None))
    return stax.serial(*layers)[2]


def nt_worker(path: str, mode: str, repeats: int) -> dict:
    import numpy as np

    if mode == "values":
        from jax import config

        config.update("jax_enable_x64", True)
    import jax

    data = np.load(path)
    if mode in ("time", "time_ntk", "time_pooled"):
        spec, key = (POOLED, "p") if mode == "time_pooled" else (CONVNET, "")
        get = ("nngp", "ntk") if mode == "time_ntk" else "nngp"
        kernel_fn = jax.jit(_nt_model(spec), static_argnames="get")
        x = np.transpose(data[f"x{key}"], (0, 2, 3, 1)).astype(np.float32)  # NHWC
        z = np.transpose(data[f"z{key}"], (0, 2, 3, 1)).astype(np.float32)
        jax.block_until_ready(kernel_fn(x, z, get))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(kernel_fn(x, z, get))
            times.append(time.perf_counter() - t0)
        return {"median_s": statistics.median(times), "n": int(x.shape[0]), "jax": jax.__version__}
    out = {}
    for name, (spec, size) in VALUE_CASES.items():
        x = np.transpose(data[f"v{size}"], (0, 2, 3, 1)).astype(np.float64)
        nngp, ntk = _nt_model(spec)(x, x, ("nngp", "ntk"))
        out[name] = {"nngp": np.asarray(nngp).tolist(), "ntk": np.asarray(ntk).tolist()}
    return out


# ------------------------------------------------------------------------------------------------
# our side


def _ours(spec):
    from gpytorch_cnngp import GELU, AvgPool2d, Conv2d, Dense, Erf, GlobalAvgPool2d, LeakyReLU, ReLU, Sequential

    layers = []
    for layer in spec:
        kind = layer[0]
        if kind == "conv":
            layers.append(Conv2d(layer[1], var_weight=layer[2], var_bias=layer[3]))
        elif kind == "relu":
            layers.append(ReLU())
        elif kind == "erf":
            layers.append(Erf())
        elif kind == "gelu":
            layers.append(GELU())
        elif kind == "leaky":
            layers.append(LeakyReLU(layer[1]))
        elif kind == "avgpool":
            layers.append(AvgPool2d(layer[1]))
        elif kind == "gap":
            layers.append(GlobalAvgPool2d())
        elif kind == "dense":
            layers.append(Dense(var_weight=layer[1], var_bias=layer[2]))
    return Sequential(*layers)


def _time_ours(model, x, z, compile: bool, repeats: int, get="nngp") -> float:
    from gpytorch_cnngp import gram

    backend = "native" if compile else "eager"
    gram(model, x, z, backend=backend, get=get)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gram(model, x, z, backend=backend, get=get)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nt-python", help="Python of an environment with neural-tangents")
    p.add_argument("--n", type=int, default=192, help="images per side of the timed cross kernel")
    p.add_argument("--n-pooled", type=int, default=12, help="images per side of the timed pooled kernel")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--nt-worker", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.nt_worker:
        print(json.dumps(nt_worker(args.nt_worker, args.mode, args.repeats)))
        return
    if not args.nt_python:
        p.error("--nt-python is required (the Python of an environment with neural-tangents)")

    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from bench_kernels import _images, machine, report

    x, source = _images(args.n, torch.float32, 0)
    z, _ = _images(args.n, torch.float32, 1)
    small, _ = _images(6, torch.float64, 2)
    small8 = torch.nn.functional.avg_pool2d(small, 3, 3, 1)[:, :, 1:9, 1:9] + 0.05 * torch.rand(6, 1, 8, 8)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.npz")
        xp, zp = x[: args.n_pooled], z[: args.n_pooled]
        np.savez(path, x=x.numpy(), z=z.numpy(), xp=xp.numpy(), zp=zp.numpy(), v28=small.numpy(), v8=small8.numpy())
        results = {}
        for mode in ("time", "time_ntk", "time_pooled", "values"):
            cmd = [args.nt_python, __file__, "--nt-worker", path, "--mode", mode, "--repeats", str(args.repeats)]
            run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            if run.returncode:
                print(run.stderr, file=sys.stderr)
                raise SystemExit(f"neural-tangents worker failed ({mode})")
            results[mode] = json.loads(run.stdout.strip().splitlines()[-1])

    entries = args.n * args.n
    nt_rate = entries / results["time"]["median_s"]
    model = _ours(CONVNET)
    compiled = entries / _time_ours(model, x, z, True, args.repeats)
    eager = entries / _time_ours(model, x, z, False, args.repeats)
    nt_both = entries / results["time_ntk"]["median_s"]
    ours_both = entries / _time_ours(model, x, z, True, args.repeats, get=("nngp", "ntk"))
    pooled_entries = args.n_pooled**2
    nt_pooled = pooled_entries / results["time_pooled"]["median_s"]
    ours_pooled = pooled_entries / _time_ours(_ours(POOLED), xp, zp, False, args.repeats)
    ours_pooled_native = pooled_entries / _time_ours(_ours(POOLED), xp, zp, True, args.repeats)
    lines = [
        f"### neural-tangents comparison ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}; neural-tangents with JAX {results['time']['jax']} (CPU) in a separate environment. "
        f"Command: `python benchmarks/bench_neural_tangents.py {' '.join(argv or sys.argv[1:])}`. ConvNet GP "
        f"(paper hyperparameters) cross kernel on {args.n}x{args.n} {source} 28x28 images, float32, median of "
        f"{args.repeats} calls after a warm-up (compilation excluded on both sides).",
        "",
        "| ConvNet GP, float32 | entries/s | x neural-tangents |",
        "|---|---|---|",
        f"| neural-tangents (jit) | {nt_rate:,.0f} | 1.0 |",
        f"| ours, compiled | {compiled:,.0f} | {compiled / nt_rate:.1f} |",
        f"| ours, eager | {eager:,.0f} | {eager / nt_rate:.1f} |",
        f"| NNGP + NTK: neural-tangents (jit) | {nt_both:,.0f} | 1.0 |",
        f"| NNGP + NTK: ours, native | {ours_both:,.0f} | {ours_both / nt_both:.1f} |",
        "",
        f"Pooled network (Conv3-ReLU-AvgPool2-Conv3-ReLU-GlobalAvgPool-Dense, 28x28, "
        f"{args.n_pooled}x{args.n_pooled} cross kernel, float32):",
        "",
        "| pooled, float32 | entries/s | ms per entry | x neural-tangents |",
        "|---|---|---|---|",
        f"| neural-tangents (jit) | {nt_pooled:,.1f} | {1e3 / nt_pooled:.1f} | 1.0 |",
        f"| ours, eager (full maps) | {ours_pooled:,.1f} | {1e3 / ours_pooled:.1f} | {ours_pooled / nt_pooled:.1f} |",
        f"| ours, native (spatial offsets; the default) | {ours_pooled_native:,.1f} | {1e3 / ours_pooled_native:.2f} | "
        f"{ours_pooled_native / nt_pooled:.1f} |",
        "",
        "Kernel values, float64, K(X, X) of 6 images (ours: `model(X, get=...)`, neural-tangents: "
        "`kernel_fn(x, x, ('nngp', 'ntk'))`), largest difference relative to the largest entry:",
        "",
        "| architecture | NNGP | NTK |",
        "|---|---|---|",
    ]
    for name, (spec, size) in VALUE_CASES.items():
        images = small if size == 28 else small8
        cells = []
        for get in ("nngp", "ntk"):
            ours = _ours(spec)(images, get=get).numpy()
            theirs = np.asarray(results["values"][name][get])
            cells.append(f"{np.abs(ours - theirs).max() / np.abs(theirs).max():.1e}")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    report(lines, args)


if __name__ == "__main__":
    main()
