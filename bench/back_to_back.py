"""GPU, back to back: the whole set's adapter calls one after another, one sync (wall time).

``python bench/back_to_back.py --device cuda --help``. On ready working copies, as a model load
makes them; the host's per-call cost is in it (against cuda_graph.py, which leaves it out).
Key ``loop`` of the JSON result: per contender, ms per run.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (bench/harness.py)
from per_call import run_order  # noqa: E402  (bench/per_call.py)


def time_adapter_loop(comfy, layers, names, runs, device) -> dict:
    """GPU: the whole set's adapter calls back to back on ready float32 copies (one sync)."""
    result = {name: [] for name in names}
    for run in range(runs):
        for name in run_order(names, run):
            temps = [layer.weight.to(comfy.work_dtype, copy=True) for layer in layers]
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for layer, temp in zip(layers, temps, strict=True):
                comfy.calculate(layer.contenders[name], temp, layer.key)
            torch.cuda.synchronize(device)
            result[name].append((time.perf_counter() - start) * 1e3)
            del temps
            torch.cuda.empty_cache()
    return result


def measure(work: harness.Workload, args) -> dict:
    return time_adapter_loop(work.comfy, work.layers, work.names, args.runs, work.device)


def main(argv=None) -> dict:
    return harness.run(__doc__, "loop", measure, argv, gpu_only=True)


if __name__ == "__main__":
    main()
