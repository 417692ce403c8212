"""Accuracy: each contender's merged weight against a float64 reference (the simple path).

``python bench/accuracy.py --help``. For ``--accuracy-layers`` layers spread over the set: the
working copy ComfyUI hands the adapter, each contender through ``calculate_weight``, and the
relative Frobenius error against ``butterfly.apply_stages`` on float64 rotations; "rounding" is
what the working dtype allows (the exact result rounded to it), "change" how far the merge moves
the weight (so a no-op cannot pass). Key ``accuracy`` of the JSON result.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (bench/harness.py)

from boft_core import butterfly, merge  # noqa: E402
from boft_core.formats import parse_lycoris  # noqa: E402


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a.double() - ref) / torch.linalg.vector_norm(ref)).item()


def accuracy(comfy, layers: list[harness.Layer], device) -> list[dict]:
    """Float32 results of each contender against a float64 reference (simple path, float64)."""
    rows = []
    for layer in layers:
        w64 = layer.weight.double()
        (lay,) = parse_lycoris("bench", layer.tensors).values()
        lay.blocks = lay.blocks.to(device)
        patch64 = merge.prepare(lay, 1.0, "lycoris", dtype=torch.float64)
        flat = w64.reshape(w64.shape[0], -1)
        ref = butterfly.apply_stages(flat, patch64.rotations, patch64.layout).view(w64.shape)
        row = {"layer": layer.name, "shape": layer.label, "change": rel(w64, ref)}
        row["rounding"] = rel(ref.to(comfy.work_dtype), ref)  # what the working dtype allows
        for name, adapter in layer.contenders.items():
            temp = layer.weight.to(comfy.work_dtype, copy=True)
            out = comfy.calculate(adapter, temp, layer.key)
            row[name] = rel(out, ref)
        rows.append(row)
    return rows


def add_args(p) -> None:
    p.add_argument("--accuracy-layers", type=int, default=12,
                   help="layers checked against the float64 reference (default 12)")


def measure(work: harness.Workload, args) -> list[dict]:
    return accuracy(work.comfy, harness.subset(work.layers, args.accuracy_layers), work.device)


def main(argv=None) -> dict:
    return harness.run(__doc__, "accuracy", measure, argv, add_args=add_args)


if __name__ == "__main__":
    main()
