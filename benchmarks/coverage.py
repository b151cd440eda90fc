"""How much of each model the dependency analysis can permute, and how long it takes.

Usage:
    python benchmarks/coverage.py [--out benchmarks/results] [--image-size 224] [--models resnet18 vit_small ...]

For the torchvision models of issue #2 (at ``--image-size``, batch 1), a small VisionTransformer
(32x32 images, patch 8, 2 layers, 4 heads, hidden 32, MLP 64) and every fxmerge.zoo family
(32x32): the number of groups (channel spaces), of free (permutable) groups, the hidden-channel
coverage (``Analysis.coverage()``: fraction of the channels of hidden layers that lie in free
groups) and the time of ``fxmerge.analyze`` split into tracing + shape propagation (one forward
on the example input) and the dependency analysis proper. Fail-closed warnings are counted.
Prints a markdown table and writes ``coverage.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
import torchvision.models as tvm
from torch import nn

# Run from a checkout without installing: make the repository's fxmerge importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxmerge  # noqa: E402
from fxmerge import zoo  # noqa: E402
from fxmerge.passes.dependency import analyze_graph, state_name_map  # noqa: E402
from fxmerge.trace import trace  # noqa: E402

Builder = Callable[[], nn.Module]


def _small_vit() -> nn.Module:
    return tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64)


# name -> (builder, input size or None for --image-size)
MODELS: dict[str, tuple[Builder, int | None]] = {
    "resnet18": (tvm.resnet18, None),
    "resnet50": (tvm.resnet50, None),
    "wide_resnet50_2": (tvm.wide_resnet50_2, None),
    "resnext50_32x4d": (tvm.resnext50_32x4d, None),
    "vgg11_bn": (tvm.vgg11_bn, None),
    "mobilenet_v2": (tvm.mobilenet_v2, None),
    "mobilenet_v3_small": (tvm.mobilenet_v3_small, None),
    "efficientnet_b0": (tvm.efficientnet_b0, None),
    "densenet121": (tvm.densenet121, None),
    "convnext_tiny": (tvm.convnext_tiny, None),
    "swin_t": (tvm.swin_t, None),
    "shufflenet_v2_x0_5 (extra)": (tvm.shufflenet_v2_x0_5, None),
    "vit_small (32px, p8, L2, H4, D32)": (_small_vit, 32),
    "zoo.resnet (2,2,2) w16": (lambda: zoo.resnet((2, 2, 2), width=16), 32),
    "zoo.vgg (BN)": (lambda: zoo.vgg(batch_norm=True), 32),
    "zoo.vgg (no BN)": (lambda: zoo.vgg(batch_norm=False), 32),
    "zoo.mlp": (lambda: zoo.mlp((64, 64), layernorm=False), 32),
    "zoo.mlp (LayerNorm)": (lambda: zoo.mlp((64, 64), layernorm=True), 32),
    "zoo.vit": (lambda: zoo.vit(), 32),
}


def measure(name: str, builder: Builder, size: int) -> dict:
    model = builder().eval()
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        gm = trace(model, x)
        traced = time.perf_counter()
        analysis = analyze_graph(gm, state_name_map(model))
        done = time.perf_counter()
    # the public entry point gives the same groups (the split above only separates the timings)
    assert [g.name for g in fxmerge.analyze(model, x).groups] == [g.name for g in analysis.groups]
    fixed_hidden = [
        g for g in analysis.groups if g.fixed and g.name in analysis.layer_channel_groups and "model " not in (g.reason or "")
    ]
    return {
        "model": name,
        "input": f"{size}x{size}",
        "groups": len(analysis.groups),
        "free": len(analysis.free_groups),
        "coverage": analysis.coverage(),
        "trace_s": traced - start,
        "analysis_s": done - traced,
        "warnings": sum(1 for w in caught if issubclass(w.category, UserWarning)),
        "fixed_hidden": ", ".join(sorted({(g.reason or "").split(" (")[0] for g in fixed_hidden}))[:80],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | input | #groups | #free groups | coverage | trace + shapes (s) | analysis (s) | warnings | fixed hidden groups, why |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {r['groups']} | {r['free']} | {r['coverage']:.1%} | "
            f"{r['trace_s']:.2f} | {r['analysis_s']:.3f} | {r['warnings']} | {r['fixed_hidden'] or '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--image-size", type=int, default=224, help="input size of the torchvision models")
    parser.add_argument("--models", nargs="*", help="subset of model names (default: all)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name, (builder, size) in MODELS.items():
        if args.models and name not in args.models:
            continue
        row = measure(name, builder, size or args.image_size)
        rows.append(row)
        print(f"{name}: {row['free']}/{row['groups']} free, coverage {row['coverage']:.1%}, "
              f"{row['trace_s'] + row['analysis_s']:.2f}s", file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    header = (
        "# Dependency-analysis coverage\n\n"
        "Generated by `python benchmarks/coverage.py`. Coverage = fraction of the channels of hidden "
        "layers (conv, linear, norm, attention axes; model input and output excluded) that lie in "
        "free (permutable) groups. `#groups` counts every channel space on a parameter axis, "
        "including the fixed input/output ones. Timings: `fxmerge.trace` (symbolic trace + one "
        "shape-propagation forward at batch 1) and the dependency analysis proper "
        "(`analyze_graph`), wall clock, single run (the machine may be shared: indicative only). "
        "A model whose first layer reads the raw image through a flatten (zoo.mlp) also lists the "
        "input's spatial axes as fixed input groups.\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, {torch.get_num_threads()} threads.\n\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coverage.md").write_text(header + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
