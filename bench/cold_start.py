"""First patch at a new strength: the whole SDXL set with fresh adapters (nothing cached).

``python bench/cold_start.py --help``. Times, for the set of bench.py, the adapter calls of fresh
node adapters (each layer prepared on its first call, as through core's LoRA loader), the same
after ``BOFTAdapter.prepare_all`` (what this pack's loader nodes do for a CUDA load device; its
time is counted), and core's adapter. Not a test; results in bench/RESULTS.md. ``--json``: the
printed lines as one run of results/h200_cold_start_028.json's ``runs`` (ms by label).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (bench/harness.py)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", default=harness.default_comfyui(), help="ComfyUI checkout")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--subset", type=int)
    p.add_argument("--work-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="the working copy's dtype (auto: the host's lora_compute_dtype, else float32)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    comfy = harness.Comfy(args.comfyui, device, args.work_dtype)
    net, _ = harness.build_model(comfy, "sdxl", "meta", torch.float16)
    layers = harness.subset(harness.model_layers(net, 16), args.subset)
    for i, layer in enumerate(layers):
        gen = torch.Generator().manual_seed(i)
        layer.weight = torch.randn(layer.shape, generator=gen).half().to(device)
    warm = layers[:4]  # libraries, Triton's compile and its self-test, outside the timing

    def fresh(name):
        for i, layer in enumerate(layers):
            harness.make_adapters(comfy, layer, device, torch.float16, i)
        return [layer.contenders[name] for layer in layers]

    def run(adapters, prepare=False) -> float:
        temps = [layer.weight.to(comfy.work_dtype, copy=True) for layer in layers]
        harness.Clock(device).sync()
        start = time.perf_counter()
        if prepare:
            type(adapters[0]).prepare_all(adapters, 1.0, device)
        for layer, adapter, temp in zip(layers, adapters, temps, strict=True):
            comfy.calculate(adapter, temp, layer.key)
        harness.Clock(device).sync()
        return (time.perf_counter() - start) * 1e3

    for layer in warm:
        harness.make_adapters(comfy, layer, device, torch.float16, 0)
        for name in ("core", "node"):
            temp = layer.weight.to(comfy.work_dtype, copy=True)
            comfy.calculate(layer.contenders[name], temp, layer.key)
    res = {"header": f"{len(layers)} layers on {harness.machine(device)}, ComfyUI {comfy.version}, "
                     f"working copies {comfy.work_dtype}"}
    print(res["header"])

    def report(label, ms):
        res[label] = round(ms)
        print(f"{label}: {ms:.0f} ms", flush=True)

    report("core", run(fresh("core")))
    report("node, prepared per layer on its first call", run(fresh("node")))
    adapters = fresh("node")
    report("node, prepare_all first (what the loader nodes do; included)", run(adapters, True))
    report("node, warm (the same adapters again)", run(adapters))
    if args.json:
        harness.write_json(args.json, {"command": " ".join(["python3"] + sys.argv), "runs": {"this run": res}})
    return res


if __name__ == "__main__":
    main()
