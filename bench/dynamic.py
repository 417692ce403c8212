"""GPU, ComfyUI 0.28: dynamic VRAM's per-load re-patch of the whole set against copying it in.

``python bench/dynamic.py --device cuda --comfyui PATH-TO-0.28 --help``. Per layer, with the
host's own functions: the weight copied in from pinned host memory (what
``ops.cast_modules_with_vbar`` does for a module), then ``LowVramPatch.memory_required`` /
``prepare`` stage the patch's tensors in a device buffer and rebuild the adapter
(``prefetch_prepared_value``), and ``LowVramPatch.__call__`` merges into the weight in its own
dtype (``intermediate_dtype=weight.dtype``), as after every eviction. Key ``dynamic`` of the
JSON result: ms for the whole set (one sync per pass) of copying in alone, copy + re-patch for
core and the node adapter (warm cache), the node adapter once with its cache cleared, and the
node cache afterwards.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (bench/harness.py)


def time_dynamic(comfy, layers, runs, device) -> dict:
    """Dynamic VRAM (ComfyUI 0.28), whole set, ms: copy in alone, then copy + re-patch per contender."""
    low = comfy.patcher.LowVramPatch
    if not hasattr(low, "prepare"):
        raise RuntimeError("this ComfyUI has no LowVramPatch.prepare (dynamic VRAM is 0.28's)")
    hosts = [layer.weight.cpu().pin_memory() for layer in layers]
    out = {"weights_mb": sum(h.numel() * h.element_size() for h in hosts) / 2**20, "dtype": str(hosts[0].dtype)}

    def timed(step) -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for i in range(len(hosts)):
            step(i)
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    out["copy in"] = [timed(lambda i: hosts[i].to(device, non_blocking=True)) for _ in range(max(runs, 3))]
    def pinned(adapter):  # ComfyUI pins a module's patches in host memory (comfy.pinned_memory, subset "patches")
        weights = tuple(t.pin_memory() if isinstance(t, torch.Tensor) else t for t in adapter.weights)
        return type(adapter)(adapter.loaded_keys, weights)

    for name in ("core", "node"):
        fns = [low(layer.key, {layer.key: [(1.0, pinned(layer.contenders[name]), 1.0, None, None)]})
               for layer in layers]

        def step(i, fns=fns):
            weight = hosts[i].to(device, non_blocking=True)
            fn = fns[i]
            fn.prepare(torch.empty(fn.memory_required(), dtype=torch.uint8, device=device), None,
                       copy=True, commit=True)
            fn(weight)

        logging.disable(logging.ERROR)  # core logs (and swallows) an error per failed call
        try:
            weight = hosts[0].to(device)
            patched = not torch.equal(fns[0](weight.clone()), weight)
            if name == "node":
                harness.node_cache(comfy).clear()
                out["node, cache cleared"] = timed(step)
            out[name] = {"runs_ms": [timed(step) for _ in range(max(runs, 3))], "patched": patched}
        finally:
            logging.disable(logging.NOTSET)
    out["cache"] = harness.cache_state(comfy, layers, device)
    return out


def measure(work: harness.Workload, args) -> dict:
    return time_dynamic(work.comfy, work.layers, args.runs, work.device)


def main(argv=None) -> dict:
    return harness.run(__doc__, "dynamic", measure, argv, gpu_only=True)


if __name__ == "__main__":
    main()
