"""GPU, one CUDA graph: the in-place calls for the whole set captured once and replayed.

``python bench/cuda_graph.py --device cuda --help``. A replay launches the same kernels without
the host's per-call cost: the GPU-side time of the work, against which the back-to-back loop
(back_to_back.py) shows what the host adds per layer. Key ``graph`` of the JSON result: ms per
replay (at least 3).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (bench/harness.py)


def time_graph(comfy, layers, runs, device) -> list[float]:
    """GPU: the in-place calls for the whole set captured in one CUDA graph and replayed."""
    temps = [layer.weight.to(comfy.work_dtype, copy=True) for layer in layers]

    def work():
        for layer, temp in zip(layers, temps, strict=True):
            layer.contenders["in place"].calculate_weight(temp, layer.key, 1.0, 1.0, None, None)

    times = harness.graph_replays(work, max(runs, 3), device)
    temps.clear()
    torch.cuda.empty_cache()
    return times


def measure(work: harness.Workload, args) -> list[float]:
    return time_graph(work.comfy, work.layers, args.runs, work.device)


def main(argv=None) -> dict:
    return harness.run(__doc__, "graph", measure, argv, gpu_only=True)


if __name__ == "__main__":
    main()
