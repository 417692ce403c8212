"""Variants: ``fast.Butterfly.apply`` by largest block, the simple reference, and a plan's build.

``python bench/variants.py --help``. No ComfyUI: random orthogonal LyCORIS-layout rotations
(lora_dim 16) applied to random float32 matrices of four SDXL shapes, adapter-only, one sync
per call. Key ``variants`` of the JSON result: per shape, ms per variant and ``k <block>`` (the
number of batched matmuls at that block size).
"""

from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (bench/harness.py)

from boft_core import butterfly, fast  # noqa: E402


def variants(device, runs) -> dict:
    """fast.Butterfly at several block sizes against the simple reference path, adapter-only."""
    clock = harness.Clock(device)
    out, lay = {}, butterfly.INTERLEAVED
    for rows, cols in ((640, 640), (1280, 1280), (1280, 5120), (10240, 1280)):
        b, nb = harness.power2factorization(rows, 16)
        m = nb.bit_length()
        q = torch.randn(m, nb, b, b, device=device) * 0.05
        rot = butterfly.cayley(q - q.transpose(-1, -2))
        x = torch.randn(rows, cols, device=device)
        fns = {"reference": lambda x=x, rot=rot: butterfly.apply_stages(x, rot, lay)}
        row = {}
        for block in (10, 20, 40, 80, 160, 320, 640, 1280):
            plan = fast.Butterfly(rot, lay, max_block=block)
            fns[f"block {block}"] = lambda plan=plan, x=x: plan.apply(x)
            row[f"k {block}"] = len(plan.steps)
        fns["plan build (default)"] = lambda rot=rot: fast.Butterfly(rot, lay)
        for name, fn in fns.items():
            fn()
            times = []
            for _ in range(max(runs, 5)):
                a = clock.mark()
                fn()
                b_ = clock.mark()
                clock.sync()
                times.append(clock.ms(a, b_))
            row[name] = statistics.median(times)
        out[f"{rows}x{cols}"] = row
    return out


def measure(work: harness.Workload, args) -> dict:
    return variants(work.device, args.runs)


def main(argv=None) -> dict:
    return harness.run(__doc__, "variants", measure, argv, needs="none")


if __name__ == "__main__":
    main()
