"""ModelPatcher: the whole ``ModelPatcher.patch_model`` (full load) of the model per contender.

``python bench/patcher.py --help``. The model is ComfyUI's own (random weights, float16, on the
device); each contender's adapters go in through ``add_patches`` and the whole load is timed,
then unpatched. Key ``patcher`` of the JSON result: per contender, ms per run and the median.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (bench/harness.py)


def time_patcher(comfy, net, layers, names, runs, device) -> dict:
    """The whole ModelPatcher.patch_model (full load) of the model with each contender."""
    out = {}
    clock = harness.Clock(device)
    for name in names:
        times = []
        for _ in range(runs):
            patcher = comfy.patcher.ModelPatcher(net, load_device=device, offload_device=device)
            taken = patcher.add_patches({layer.key: layer.contenders[name] for layer in layers})
            assert len(taken) == len(layers), (len(taken), len(layers))
            clock.sync()
            start = time.perf_counter()
            patcher.patch_model(device_to=device)
            clock.sync()
            times.append((time.perf_counter() - start) * 1e3)
            patcher.unpatch_model()
            del patcher
            gc.collect()
        out[name] = {"runs_ms": times, "median_ms": statistics.median(times)}
    return out


def measure(work: harness.Workload, args) -> dict:
    return time_patcher(work.comfy, work.net, work.layers, work.names, args.runs, work.device)


def main(argv=None) -> dict:
    return harness.run(__doc__, "patcher", measure, argv, needs="model")


if __name__ == "__main__":
    main()
