"""Low-VRAM path: ``comfy.model_patcher.LowVramPatch`` per call (it runs on every forward).

``python bench/lowvram.py --help``. One layer of each class among 8 spread over the set, the
weight in float16 (as stored) and in float32; each contender, and "ours, prepare per call" (no
cache: the rotation prepared on every call). Key ``lowvram`` of the JSON result: per
"<class> <dtype>", per contender, the median ms and whether the weight was patched at all.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (bench/harness.py)

from boft_core import merge  # noqa: E402
from boft_core.formats import parse_lycoris  # noqa: E402

DTYPES = "float16 (as stored) and float32"  # the result's "lowvram_dtype"


def time_lowvram(comfy, layers, runs, device, dtype) -> dict:
    """Per-call cost of comfy.model_patcher.LowVramPatch (runs on every forward) per class."""
    out, seen = {}, set()
    clock = harness.Clock(device)
    for layer in layers:
        if layer.label in seen:
            continue
        seen.add(layer.label)
        weight = layer.weight.to(dtype)
        (lay,) = parse_lycoris("bench", layer.tensors).values()
        lay.blocks = lay.blocks.to(device)

        class Unprepared(comfy.Ours):  # no cache: prepare() on every call
            def calculate_weight(self, weight, *args, layer=lay, **kwargs):
                return merge.apply(merge.prepare(layer, 1.0, "lycoris"), weight)

        row = {}
        contenders = dict(layer.contenders, **{"ours, prepare per call": Unprepared(None)})
        for name, adapter in contenders.items():
            fn = comfy.patcher.LowVramPatch(layer.key, {layer.key: [(1.0, adapter, 1.0, None,
                                                                       None)]})
            # comfy.ops casts a fresh copy of the weight for the patch (adapters work in place)
            logging.disable(logging.ERROR)  # core logs (and swallows) an error per failed call
            try:
                changed = not torch.equal(fn(weight.clone()), weight)
                times = []
                for _ in range(max(runs, 5)):
                    fresh = weight.clone()
                    a = clock.mark()
                    fn(fresh)
                    b = clock.mark()
                    clock.sync()
                    times.append(clock.ms(a, b))
            finally:
                logging.disable(logging.NOTSET)
            row[name] = {"ms": statistics.median(times), "patched": changed}
        out[layer.label] = row
    return out


def measure(work: harness.Workload, args) -> dict:
    out = {}
    for dt in (torch.float16, torch.float32):
        part = time_lowvram(work.comfy, harness.subset(work.layers, 8), args.runs, work.device, dt)
        out.update({f"{label} {str(dt)[6:]}": row for label, row in part.items()})
    return out


def main(argv=None) -> dict:
    return harness.run(__doc__, "lowvram", measure, argv, extra={"lowvram_dtype": DTYPES})


if __name__ == "__main__":
    main()
