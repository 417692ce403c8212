"""Merge benchmark: ComfyUI core's BOFT adapter against boft_core on SDXL- or Flux-sized weights.

Run from anywhere: ``python bench/bench.py --help``. It needs a ComfyUI checkout (``--comfyui``,
``$BOFT_COMFYUI_DIR`` or ``.comfyui/ComfyUI``) for the model shapes, core's adapter and the
``ModelPatcher``; it never writes into it. Not a test: speed is never asserted. Results and the
commands that made them: ``bench/RESULTS.md``.

Every contender gets the same inputs through the call ComfyUI makes in
``patch_weight_to_device``: a float32 copy of the stored weight,
``comfy.lora.calculate_weight(patches, copy, key)``, and the result cast back to the stored dtype.
Contenders: ComfyUI core's BOFTAdapter; this pack's node adapter (nodes/adapter.py); "ours", an
adapter holding a prepared ``Patch`` (``boft_core.merge.prepare``, once per file, strength and
mode) that calls ``boft_core.merge.apply`` (a new merged weight); "in place", which calls
``boft_core.merge.try_merge_into`` to write into ComfyUI's float32 copy. The node adapter takes the
in-place path whenever ComfyUI's patch function is the identity (as here).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402,F401  (bench/harness.py; re-exported for the other measurements)
    FLUX,
    MODELS,
    ROOT,
    SDXL,
    Comfy,
    Layer,
    build_model,
    call,
    default_comfyui,
    make_adapters,
    make_tensors,
    model_layers,
    power2factorization,
    subset,
)

from boft_core import butterfly, fast, fused, kernel, merge  # noqa: E402
from boft_core.formats import parse_lycoris  # noqa: E402

# --- timing ------------------------------------------------------------------------------------


class Clock:
    """Host timer on the CPU; CUDA events on a GPU (one sync at the end)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def run_order(names: list[str], run: int) -> list[str]:
    """Contender order of run ``run``: core first, then the others rotated, so that each of them
    comes right after core in one run of every len(others). (Core's weight-sized temporaries
    slow down whatever runs next on a small VM: 20-30% measured; see RESULTS.md.)"""
    if "core" not in names:
        return names[run % len(names):] + names[:run % len(names)]
    others = [name for name in names if name != "core"]
    k = run % len(others)
    return ["core"] + others[k:] + others[:k]


def time_layers(comfy, layers, names, runs, clock) -> dict:
    """Per contender: per run, per layer (copy-in, adapter, cast-back) in ms."""
    result = {name: [] for name in names}
    for run in range(runs):
        order = run_order(names, run)
        for name in order:
            marks = []
            for layer in layers:
                adapter = layer.contenders[name]
                t0 = clock.mark()
                temp = layer.weight.to(comfy.work_dtype, copy=True)
                t1 = clock.mark()
                out = comfy.calculate(adapter, temp, layer.key)
                t2 = clock.mark()
                comfy.float.stochastic_rounding(out, layer.weight.dtype, seed=0)
                t3 = clock.mark()
                marks.append((t0, t1, t2, t3))
                del temp, out
            clock.sync()
            result[name].append([(clock.ms(a, b), clock.ms(b, c), clock.ms(c, d))
                                 for a, b, c, d in marks])
            gc.collect()
    return result


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


def time_graph(comfy, layers, runs, device) -> list[float]:
    """GPU: the in-place calls for the whole set captured in one CUDA graph and replayed.

    A replay launches the same kernels without the host's per-call cost: the GPU-side time of
    the work, against which the back-to-back loop shows what the host adds per layer.
    """
    temps = [layer.weight.to(comfy.work_dtype, copy=True) for layer in layers]

    def work():
        for layer, temp in zip(layers, temps, strict=True):
            layer.contenders["in place"].calculate_weight(temp, layer.key, 1.0, 1.0, None, None)

    times = graph_replays(work, max(runs, 3), device)
    temps.clear()
    torch.cuda.empty_cache()
    return times


def graph_replays(work, runs: int, device) -> list[float]:
    """``work()`` captured once in a CUDA graph (after a warm-up on a side stream, so library
    handles and workspaces exist first) and replayed ``runs`` times: GPU ms per replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    del graph
    return times


def median(values):
    return statistics.median(values)


def summarize(timings: dict, layers: list[Layer]) -> dict:
    """Median per layer class and whole-set totals (median over runs of the per-run sums)."""
    out = {"classes": {}, "total": {}}
    classes: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        classes.setdefault(layer.label, []).append(i)
    for name, runs in timings.items():
        out["total"][name] = {
            "adapter_ms": median([sum(t[1] for t in run) for run in runs]),
            "call_ms": median([sum(sum(t) for t in run) for run in runs]),
        }
        for label, idx in classes.items():
            per = out["classes"].setdefault(label, {"count": len(idx), "m": layers[idx[0]].m})
            per[name] = median([sum(run[i][1] for i in idx) / len(idx) for run in runs])
    return out


# --- accuracy, memory --------------------------------------------------------------------------


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a.double() - ref) / torch.linalg.vector_norm(ref)).item()


def accuracy(comfy, layers: list[Layer], device) -> list[dict]:
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


# --- ModelPatcher, low-VRAM, scaling, variants -------------------------------------------------


def time_patcher(comfy, net, layers, names, runs, device) -> dict:
    """The whole ModelPatcher.patch_model (full load) of the model with each contender."""
    out = {}
    for name in names:
        times = []
        for _ in range(runs):
            patcher = comfy.patcher.ModelPatcher(net, load_device=device, offload_device=device)
            taken = patcher.add_patches({layer.key: layer.contenders[name] for layer in layers})
            assert len(taken) == len(layers), (len(taken), len(layers))
            Clock(device).sync()
            start = time.perf_counter()
            patcher.patch_model(device_to=device)
            Clock(device).sync()
            times.append((time.perf_counter() - start) * 1e3)
            patcher.unpatch_model()
            del patcher
            gc.collect()
        out[name] = {"runs_ms": times, "median_ms": median(times)}
    return out


def time_lowvram(comfy, layers, runs, device, dtype) -> dict:
    """Per-call cost of comfy.model_patcher.LowVramPatch (runs on every forward) per class."""
    out, seen = {}, set()
    clock = Clock(device)
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
            row[name] = {"ms": median(times), "patched": changed}
        out[layer.label] = row
    return out


def node_cache(comfy):
    """The node adapter's process-wide cache of prepared layers (nodes/adapter.py CACHE)."""
    return sys.modules[comfy.NodeAdapter.__module__].CACHE


def cache_state(comfy, layers, device) -> dict:
    """What the node cache holds now, against the weights of the set in their stored dtype."""
    cache = node_cache(comfy)
    weights = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)
    held = cache.held(device) if device.type == "cuda" else 0
    return {"device_mb": held / 2**20, "host_mb": cache.held("cpu") / 2**20,
            "device_budget_mb": cache.device_budget / 2**20, "weights_mb": weights / 2**20,
            "device_share": held / weights, "counts": dict(cache.counts)}


def time_dynamic(comfy, layers, runs, device) -> dict:
    """Dynamic VRAM (ComfyUI 0.28), per layer with the host's own functions: the weight is copied in
    from pinned host memory (what ``ops.cast_modules_with_vbar`` does for a module), then
    ``LowVramPatch.memory_required``/``prepare`` stage the patch's tensors in a device buffer and
    rebuild the adapter (``prefetch_prepared_value``), and ``LowVramPatch.__call__`` merges into
    the weight in its own dtype (``intermediate_dtype=weight.dtype``), as after every eviction.
    Whole set, ms (one sync per pass): copying the weights in alone, then copy + re-patch for
    core and the node adapter (warm cache), and the node adapter once with its cache cleared."""
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
                node_cache(comfy).clear()
                out["node, cache cleared"] = timed(step)
            out[name] = {"runs_ms": [timed(step) for _ in range(max(runs, 3))], "patched": patched}
        finally:
            logging.disable(logging.NOTSET)
    out["cache"] = cache_state(comfy, layers, device)
    return out


def synthetic(comfy, shapes, device, seed) -> list[Layer]:
    layers = []
    for i, shape in enumerate(shapes):
        fac = power2factorization(shape[0], 16)
        layer = Layer(f"synthetic.{i}", tuple(shape), "Linear", *fac)
        gen = torch.Generator(device=device).manual_seed(seed + i)
        layer.weight = torch.randn(shape, generator=gen, device=device).half()
        make_adapters(comfy, layer, device, torch.float16, seed + i)
        layers.append(layer)
    return layers


def scaling(comfy, runs, device, names) -> dict:
    """Adapter time against out_dim (in 1280) and against the number of 1280x1280 layers."""
    clock = Clock(device)
    by_dim = {}
    for out_dim in (640, 1280, 2560, 5120, 10240):
        layers = synthetic(comfy, [(out_dim, 1280)], device, out_dim)
        t = summarize(time_layers(comfy, layers, names, runs, clock), layers)
        by_dim[out_dim] = {n: t["total"][n]["adapter_ms"] for n in names}
    by_count = {}
    for count in (1, 8, 64):
        layers = synthetic(comfy, [(1280, 1280)] * count, device, 7)
        t = summarize(time_layers(comfy, layers, names, runs, clock), layers)
        by_count[count] = {n: t["total"][n]["adapter_ms"] for n in names}
    return {"out_dim": by_dim, "layers": by_count}


def variants(device, runs) -> dict:
    """fast.Butterfly at several block sizes against the simple reference path, adapter-only."""
    clock = Clock(device)
    out, lay = {}, butterfly.INTERLEAVED
    for rows, cols in ((640, 640), (1280, 1280), (1280, 5120), (10240, 1280)):
        b, nb = power2factorization(rows, 16)
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
            row[name] = median(times)
        out[f"{rows}x{cols}"] = row
    return out


# --- report ------------------------------------------------------------------------------------


def machine(device) -> str:
    threads = torch.get_num_threads()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({threads} threads)"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def report(res: dict) -> str:
    names = res["contenders"]
    out = [f"machine: {res['machine']}", f"command: {res['command']}",
           f"fast path's largest block: cpu {res['blocks']['cpu']}, gpu {res['blocks']['gpu']}; in place on "
           f"CUDA: {res['blocks'].get('fused (in place, CUDA)')} ({res['blocks'].get('fused precision')}, "
           f"Triton {res['blocks'].get('triton')})",
           f"model: {res['model']} ({res['model_class']}), {res['layers']} layers, "
           f"{res['elements'] / 1e9:.3f} G weights ({res['dtype']}; working copies "
           f"{res.get('work_dtype', 'torch.float32')}), ComfyUI {res.get('comfyui')}, runs: {res['runs']}", ""]
    for key, err in res.get("errors", {}).items():
        out.append(f"ERROR in {key}: {err}")
    if "timing" not in res:
        return "\n".join(out)
    summ = res["timing"]
    rows = []
    first = names[0]
    for label, c in sorted(summ["classes"].items(), key=lambda kv: -kv[1][first] * kv[1]["count"]):
        row = [label, c["count"], c["m"]] + [fmt(c[n]) for n in names]
        row += [f"{c['core'] / c[n]:.1f}x" for n in names if n != "core" and "core" in c]
        rows.append(row)
    ratio_heads = [f"core/{n}" for n in names if n != "core" and "core" in names]
    out.append("Adapter time per layer (ms, median over runs), by layer class:")
    out.append(table(["layer", "n", "m"] + names + ratio_heads, rows))
    tot = summ["total"]
    rows = [[n, fmt(tot[n]["adapter_ms"]), fmt(tot[n]["call_ms"])]
            + ([f"{tot['core']['adapter_ms'] / tot[n]['adapter_ms']:.1f}x",
                f"{tot['core']['call_ms'] / tot[n]['call_ms']:.1f}x"] if "core" in tot else [])
            for n in names]
    out += ["", "Whole set (ms; adapter = calculate_weight only; call = + working copy in and "
            "cast back):", table(["contender", "adapter", "call", "core/this adapter",
                                  "core/this call"], rows)]
    if "loop" in res:
        rows = [[n, fmt(median(v)), " ".join(fmt(x) for x in v)] for n, v in res["loop"].items()]
        out += ["", "GPU, whole set's adapter calls back to back (ms, wall, one sync):",
                table(["contender", "median", "runs"], rows)]
    if "graph" in res:
        out += ["", "GPU, the in-place calls for the whole set as one CUDA graph replay (ms, the "
                f"kernels without the host's per-call cost): median {fmt(median(res['graph']))}, "
                f"runs {' '.join(fmt(x) for x in res['graph'])}"]
    acc = res.get("accuracy", [])
    worst = {n: max((r[n] for r in acc), default=float("nan"))
             for n in names + ["rounding"] if all(n in r for r in acc)}
    out += ["", "Relative error (Frobenius) against the float64 reference, "
            f"{len(acc)} sampled layers, worst: "
            + ", ".join(f"{n} {worst[n]:.2e}" for n in worst)
            + f"; the merge changes a weight by {min((r['change'] for r in acc), default=0):.2e} "
            "or more"]
    if "memory" in res:
        rows = []
        for shape, per in res["memory"].items():
            size = next(iter(per.values()))["layer_fp32_mb"] if res["device"] == "cpu" else \
                per["layer_fp32_mb"]
            vals = [per[n]["extra_mb"] if res["device"] == "cpu" else per[n] for n in names]
            rows.append([shape, fmt(size)] + [f"{fmt(v)} ({v / size:.2f}x)" for v in vals])
        what = "peak RSS, VmHWM" if res["device"] == "cpu" else "max_memory_allocated"
        out += ["", f"Peak extra memory of one call, MB ({what}; x = multiples of the layer in "
                "float32):", table(["layer", "fp32 MB"] + names, rows)]
    if "patcher" in res:
        rows = [[n, fmt(v["median_ms"]), " ".join(fmt(x) for x in v["runs_ms"])]
                for n, v in res["patcher"].items()]
        out += ["", "ModelPatcher.patch_model, full load (ms):",
                table(["contender", "median", "runs"], rows)]
    if "cache" in res:
        c = res["cache"]
        out += ["", f"Node cache after the timing: {fmt(c['device_mb'])} MB on the device "
                f"({100 * c['device_share']:.1f}% of the set's {fmt(c['weights_mb'])} MB of weights; budget "
                f"{fmt(c['device_budget_mb'])} MB), {fmt(c['host_mb'])} MB on the host; {c['counts']}"]
    if "dynamic" in res:
        d = res["dynamic"]
        copy = median(d["copy in"])
        rows = [["copy in only", fmt(copy), " ".join(fmt(x) for x in d["copy in"]), "1.0x"]]
        for name in ("core", "node"):
            v = d[name]
            rows.append([name + ("" if v["patched"] else " (NOT patched)"), fmt(median(v["runs_ms"])),
                         " ".join(fmt(x) for x in v["runs_ms"]), f"{median(v['runs_ms']) / copy:.2f}x"])
        cleared = d["node, cache cleared"]
        rows.append(["node, cache cleared first", fmt(cleared), "", f"{cleared / copy:.2f}x"])
        c = d["cache"]
        out += ["", f"Dynamic VRAM, whole set re-loaded from pinned host memory ({fmt(d['weights_mb'])} MB "
                f"{d['dtype']}) with LowVramPatch.prepare + __call__ per layer (ms):",
                table(["", "median", "runs", "/ copy in"], rows),
                f"node cache then: {fmt(c['device_mb'])} MB on the device ({100 * c['device_share']:.1f}% of the "
                f"weights), {fmt(c['host_mb'])} MB on the host"]
    if "lowvram" in res:
        heads = list(next(iter(res["lowvram"].values())))
        rows = [[label] + [fmt(r[h]["ms"]) + ("" if r[h]["patched"] else " (NOT patched)")
                           for h in heads] for label, r in res["lowvram"].items()]
        out += ["", f"Low-VRAM path, LowVramPatch per call on {res['lowvram_dtype']} weights "
                "(ms, runs on every forward):", table(["layer"] + heads, rows)]
    if "scaling" in res:
        sc = res["scaling"]
        rows = [[d] + [fmt(v[n]) for n in names] for d, v in sc["out_dim"].items()]
        out += ["", "Adapter time against out_dim (Linear out x 1280, ms):",
                table(["out_dim"] + names, rows)]
        rows = [[c] + [f"{fmt(v[n])} ({fmt(v[n] / int(c))}/layer)" for n in names]
                for c, v in sc["layers"].items()]
        out += ["", "Adapter time against the number of 1280x1280 layers (ms):",
                table(["layers"] + names, rows)]
    if "variants" in res:
        heads = [h for h in next(iter(res["variants"].values())) if not h.startswith("k ")]
        rows = [[s] + [fmt(r[h]) + (f" (k={r['k ' + h[6:]]})" if h.startswith("block") else "")
                       for h in heads] for s, r in res["variants"].items()]
        out += ["", "fast.Butterfly.apply by largest block (ms, plan prebuilt), the simple "
                "reference, and building a plan:", table(["B @ W"] + heads, rows)]
    return "\n".join(out)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="sdxl",
                   help="weight shapes from ComfyUI's model class (default sdxl)")
    p.add_argument("--subset", type=int, default=None,
                   help="only this many layers, spread over the model (smoke runs)")
    p.add_argument("--runs", type=int, default=3, help="timed runs; medians are reported")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--lora-dim", type=int, default=16, help="LyCORIS lora_dim (default 16)")
    p.add_argument("--comfyui", default=default_comfyui(), help="ComfyUI checkout")
    p.add_argument("--no-core", action="store_true", help="skip core's adapter (ours only)")
    p.add_argument("--patcher", action="store_true", help="time ModelPatcher.patch_model")
    p.add_argument("--lowvram", action="store_true", help="time the per-forward LowVramPatch")
    p.add_argument("--dynamic", action="store_true",
                   help="GPU, ComfyUI 0.28: time dynamic VRAM's per-load re-patch against copying the weights in")
    p.add_argument("--work-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="the working copy's dtype (auto: the host's lora_compute_dtype, else float32)")
    p.add_argument("--memory", action="store_true", help="measure peak extra memory")
    p.add_argument("--scaling", action="store_true", help="time against out_dim and layer count")
    p.add_argument("--variants", action="store_true", help="time fast.Butterfly block sizes")
    p.add_argument("--accuracy-layers", type=int, default=12,
                   help="layers checked against the float64 reference (default 12)")
    p.add_argument("--json", help="also write all numbers to this file")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--block", type=int,
                   help="largest dense block of ours and in place (fast path and kernel plan; "
                        "default: boft_core.fast.MAX_BLOCK)")
    p.add_argument("--slice", type=int,
                   help="column slice of ours and in place's fast path, in elements "
                        "(default: boft_core.fast's)")
    p.add_argument("--memprobe", help=argparse.SUPPRESS)
    p.add_argument("--memprobe-shape", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def section(res: dict, key: str, fn, json_path: str | None) -> None:
    """Run one part; a failure is recorded (and printed) so the other parts still report."""
    start = time.perf_counter()
    try:
        res[key] = fn()
    except Exception as e:  # a benchmark keeps the numbers it has
        res.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    print(f"[bench] {key}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1, default=str)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memprobe:
        memory_probe(args)
        return {}
    torch.manual_seed(0)
    device = torch.device(args.device)
    comfy = Comfy(args.comfyui, device, args.work_dtype)
    names = (["core"] if not args.no_core else []) + ["node", "ours", "in place"]
    started = time.perf_counter()
    need_model = args.patcher
    net, model_class = build_model(comfy, args.model, device if need_model else "meta",
                                   torch.float16)
    layers = subset(model_layers(net, args.lora_dim), args.subset)
    for i, layer in enumerate(layers):
        if need_model:
            layer.weight = comfy.utils.get_attr(net, layer.key)
        else:
            gen = torch.Generator(device=device).manual_seed(1000 + i)
            layer.weight = (torch.randn(layer.shape, generator=gen, device=device) * 0.02).half()
        make_adapters(comfy, layer, device, torch.float16, i, args.block, args.slice)
    print(f"[bench] {len(layers)} layers ready in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    res = {
        "machine": machine(device), "device": device.type, "comfyui": comfy.version,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "model": args.model, "model_class": model_class, "layers": len(layers),
        "elements": sum(layer.weight.numel() for layer in layers), "dtype": "float16",
        "work_dtype": str(comfy.work_dtype),
        "runs": args.runs, "contenders": names,
        "blocks": {"cpu": args.block or fast.MAX_BLOCK["cpu"], "gpu": args.block or fast.MAX_BLOCK["cuda"],
                   "fused (in place, CUDA)": args.block or fast.MAX_BLOCK["cuda in place"],
                   "fused precision": fused.PRECISION,
                   "triton": getattr(kernel.triton, "__version__", None) if fused.available() else None},
    }
    jpath = args.json
    section(res, "accuracy",
            lambda: accuracy(comfy, subset(layers, args.accuracy_layers), device), jpath)
    section(res, "timing", lambda: summarize(
        time_layers(comfy, layers, names, args.runs, Clock(device)), layers), jpath)
    if device.type == "cuda":
        section(res, "loop", lambda: time_adapter_loop(comfy, layers, names, args.runs, device),
                jpath)
        section(res, "graph", lambda: time_graph(comfy, layers, args.runs, device), jpath)
    section(res, "cache", lambda: cache_state(comfy, layers, device), jpath)
    if args.dynamic and device.type == "cuda":
        section(res, "dynamic", lambda: time_dynamic(comfy, layers, args.runs, device), jpath)
    if args.memory and device.type == "cpu":
        big = sorted({lay.shape for lay in layers}, key=lambda s: -torch.Size(s).numel())
        section(res, "memory", lambda: memory_cpu(args, names, big[:2] + [(1280, 1280)]), jpath)
    elif args.memory:
        section(res, "memory", lambda: memory_gpu(comfy, layers, names), jpath)
    if args.patcher:
        section(res, "patcher", lambda: time_patcher(comfy, net, layers, names, args.runs,
                                                     device), jpath)
    if args.lowvram:
        res["lowvram_dtype"] = "float16 (as stored) and float32"

        def lowvram():
            out = {}
            for dt in (torch.float16, torch.float32):
                part = time_lowvram(comfy, subset(layers, 8), args.runs, device, dt)
                out.update({f"{label} {str(dt)[6:]}": row for label, row in part.items()})
            return out

        section(res, "lowvram", lowvram, jpath)
    if args.scaling:
        section(res, "scaling", lambda: scaling(comfy, args.runs, device, names), jpath)
    if args.variants:
        section(res, "variants", lambda: variants(device, args.runs), jpath)
    res["seconds"] = time.perf_counter() - started
    print(report(res))
    if jpath:
        with open(jpath, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
