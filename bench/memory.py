"""Peak extra memory of one call, per contender, on the largest layers.

``python bench/memory.py --help``. CPU: peak RSS during the call minus RSS before (VmHWM,
reset where Linux allows it), each contender and shape in a fresh process (this file run with
``--memprobe``), on the set's two largest shapes and 1280x1280. GPU: ``max_memory_allocated``
minus allocated before, on one layer of each class. Key ``memory`` of the JSON result.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (bench/harness.py)
from harness import Comfy, Layer, call, make_adapters, power2factorization  # noqa: E402


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak RSS: VmHWM where /proc has it (resettable), else ru_maxrss (which, in a child,
    starts at the parent's RSS at fork)."""
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, what ru_maxrss reports) where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(args) -> None:
    """Child process: peak extra RSS of one call (peak RSS during it minus RSS before), as JSON."""
    device = torch.device("cpu")
    comfy = Comfy(args.comfyui, device)
    shape = tuple(int(s) for s in args.memprobe_shape.split(","))
    fac = power2factorization(shape[0], args.lora_dim)
    warm = Layer("warm", (64, 32), "Linear", *power2factorization(64, args.lora_dim))
    layer = Layer("probe", shape, "Conv2d" if len(shape) == 4 else "Linear", *fac)
    for i, lay in enumerate((warm, layer)):
        make_adapters(comfy, lay, device, torch.float16, i)
    adapter = layer.contenders[args.memprobe]
    warm.weight = torch.randn(warm.shape).half()
    call(comfy, warm.contenders[args.memprobe], warm.weight, warm.key)  # load kernels, libraries
    temp = torch.randn(shape)  # the float32 copy ComfyUI passes in (no bigger transient)
    layer.weight = temp.half()
    gc.collect()
    reset = reset_peak_rss()
    before = rss_mb()
    peak_before = peak_rss_mb()
    out = comfy.calculate(adapter, temp, layer.key)
    peak = peak_rss_mb()
    print(json.dumps({"before_mb": before, "peak_before_mb": peak_before, "peak_mb": peak,
                      "extra_mb": peak - before, "layer_fp32_mb": temp.numel() * 4 / 2**20,
                      "exact": reset or peak > peak_before, "result": str(out.dtype)}))


def memory_cpu(args, names, shapes) -> dict:
    """Peak extra RSS per contender and shape, each in a fresh process."""
    out = {}
    for shape in shapes:
        for name in names:
            cmd = [sys.executable, os.path.abspath(__file__), "--comfyui", args.comfyui,
                   "--memprobe", name, "--memprobe-shape", ",".join(map(str, shape))]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode or not lines:
                raise RuntimeError(f"memory probe failed: {res.stderr[-2000:]}")
            out.setdefault("x".join(map(str, shape)), {})[name] = json.loads(lines[-1])
    return out


def memory_gpu(comfy, layers: list[Layer], names) -> dict:
    """Peak extra allocated CUDA memory of one call per contender, on one layer of each class."""
    out, seen = {}, set()
    for layer in layers:
        if layer.label in seen:
            continue
        seen.add(layer.label)
        row = {"layer_fp32_mb": layer.weight.numel() * 4 / 2**20}
        for name in names:
            temp = layer.weight.to(comfy.work_dtype, copy=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            comfy.calculate(layer.contenders[name], temp, layer.key)
            torch.cuda.synchronize()
            row[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
            del temp
        out[layer.label] = row
    return out


def measure(work: harness.Workload, args) -> dict:
    if work.device.type == "cpu":
        big = sorted({lay.shape for lay in work.layers}, key=lambda s: -torch.Size(s).numel())
        return memory_cpu(args, work.names, big[:2] + [(1280, 1280)])
    return memory_gpu(work.comfy, work.layers, work.names)


def add_args(p) -> None:
    p.add_argument("--memprobe", help=argparse.SUPPRESS)
    p.add_argument("--memprobe-shape", help=argparse.SUPPRESS)


def main(argv=None) -> dict:
    p = harness.parser(__doc__)
    add_args(p)
    args, _ = p.parse_known_args(argv)
    if args.memprobe:
        memory_probe(args)
        return {}
    return harness.run(__doc__, "memory", measure, argv, add_args=add_args)


if __name__ == "__main__":
    main()
