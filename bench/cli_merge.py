"""The merge CLI end to end (read, merge, write) against ComfyUI core's adapter doing the same.

``python bench/cli_merge.py --help``. Workload: ``--layers`` SDXL layers spread over the UNet
(bench.py's shapes, float16 weights, 22 by default: 63 M weights), full-depth LyCORIS
butterflies from ``lora_dim`` 16 (random blocks). Both files are written once to ``--dir``.
Then, alternating in one process (torch imported before any timing), ``median of --runs``:

* ours: ``boft_core.cli.main(["merge", BASE, ADAPTER, "--out", ...])``, as ``python -m
  boft_core merge`` runs it;
* core: safetensors reads BASE and ADAPTER, ComfyUI's ``BOFTAdapter`` merges every layer
  through ``comfy.lora.calculate_weight`` on a float32 copy (what ``patch_weight_to_device``
  hands it), the result is cast back to float16 and ``save_file`` writes every tensor.

Each run writes a new output file (the last run's is removed first, untimed): replacing an
existing file costs ext4 a forced write-back of the new one (its ``auto_da_alloc``: at a rename
over a file for ours, at closing a truncated file for core's ``save_file``), which is no part of
either merge. Also the relative error of both outputs against each other. Not a test: speed is never
asserted. Results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (bench/harness.py)


def write_files(comfy, folder: str, count: int, seed: int) -> tuple[str, str, list]:
    from safetensors.torch import save_file

    net, _ = harness.build_model(comfy, "sdxl", "meta", torch.float16)
    layers = harness.subset(harness.model_layers(net, 16), count)
    base, adapter = {}, {}
    for i, layer in enumerate(layers):
        gen = torch.Generator().manual_seed(seed + i)
        base[layer.key] = (torch.randn(layer.shape, generator=gen) * 0.02).half()
        harness.make_tensors(layer, torch.float16, seed + i)
        adapter.update(layer.tensors)
    base_path, adapter_path = os.path.join(folder, "base.safetensors"), os.path.join(folder, "adapter.safetensors")
    save_file(base, base_path)
    save_file(adapter, adapter_path)
    return base_path, adapter_path, layers


def ours(base: str, adapter: str, out: str, threads: int | None) -> None:
    """The CLI in this process (``--threads``, else its own choice: one worker per CPU of the
    affinity mask); its workers set torch's threads to 1, which are put back for core afterwards."""
    from boft_core import cli

    before = torch.get_num_threads()
    try:
        extra = ["--threads", str(threads)] if threads else []
        if cli.main(["merge", base, adapter, "--out", out, *extra]) != 0:
            raise RuntimeError("the CLI failed")
    finally:
        torch.set_num_threads(before)


def core(comfy, base: str, adapter: str, out: str, layers) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(base, framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    lora = load_file(adapter)
    for layer in layers:
        patch = comfy.BOFTAdapter.load(layer.lname, lora, 0.0, None)  # alpha 0: no constraint, as the file says
        tensors[layer.key] = harness.call(comfy, patch, tensors[layer.key], layer.key)
    save_file(tensors, out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", default=harness.default_comfyui(), help="ComfyUI checkout")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", help="where the files go (default: a temporary folder)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--threads", type=int,
                   help="the CLI's --threads (default: its own choice, the CPUs of the affinity mask)")
    p.add_argument("--torch-threads", type=int, help="torch's threads for the whole process (core's)")
    args = p.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    comfy = harness.Comfy(args.comfyui, torch.device("cpu"), "float32")
    folder = args.dir or tempfile.mkdtemp(prefix="boft_cli_bench_")
    base, adapter, layers = write_files(comfy, folder, args.layers, 0)
    elements = sum(layer.weight_numel for layer in layers)
    outs = {"ours": os.path.join(folder, "ours.safetensors"), "core": os.path.join(folder, "core.safetensors")}
    fns = {"ours": lambda: ours(base, adapter, outs["ours"], args.threads),
           "core": lambda: core(comfy, base, adapter, outs["core"], layers)}
    times = {name: [] for name in fns}
    for run in range(args.runs):
        for name in (("ours", "core") if run % 2 == 0 else ("core", "ours")):
            if os.path.exists(outs[name]):  # a new file, as for a new merge (see the module doc)
                os.remove(outs[name])
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
            print(f"[cli_merge] run {run} {name}: {times[name][-1]:.2f} s", file=sys.stderr)
    from safetensors.torch import load_file

    a, b = load_file(outs["ours"]), load_file(outs["core"])
    worst = max(((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item() for k in b)
    res = {"machine": harness.machine(torch.device("cpu")), "load_before": os.getloadavg(),
           "threads": torch.get_num_threads(), "layers": len(layers), "elements": elements,
           "seconds": times, "median": {k: statistics.median(v) for k, v in times.items()},
           "worst_relative_difference": worst}
    res["ratio"] = res["median"]["core"] / res["median"]["ours"]
    return harness.finish(res, args.json)


if __name__ == "__main__":
    main()
