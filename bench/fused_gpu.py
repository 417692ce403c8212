"""GPU micro-benchmark of the in-place butterfly (boft_core.fused) against fast.Butterfly.

Workload: the SDXL layer classes of a bench.py result (``--classes``: counts and m per class),
LyCORIS layout, the out side: x is the (out, in*k*k) float32 weight, b as LyCORIS picks it at
lora_dim 16 (10 for every class but one), random orthogonal blocks (Cayley of small skew).
No ComfyUI needed. Not a test: speed is never asserted. Run ``python bench/fused_gpu.py --help``.

Reported per contender: per class the GPU time per layer (CUDA events around each call while a
``torch.cuda._sleep`` keeps the queue full, so the host's launch time is hidden; median), their
sum over the whole set (count x median), a back-to-back wall-clock loop over every layer (a
fresh preallocated x per layer, one sync at the end), the host time one call takes to return,
the whole set as one CUDA graph, and the relative Frobenius error against float64 arithmetic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, graph_replays, power2factorization, write_json  # noqa: E402  (bench/harness.py)

from boft_core import butterfly, fast, fused, kernel  # noqa: E402

DEFAULT_CLASSES = os.path.join(ROOT, "bench", "results", "h200_sdxl_after_shape_check_once.json")


def load_classes(path: str, lora_dim: int) -> list[dict]:
    with open(path) as f:
        classes = json.load(f)["timing"]["classes"]
    out = []
    for label, info in classes.items():
        kind, dims = label.split()
        shape = [int(v) for v in dims.split("x")]
        b, nb = power2factorization(shape[0], lora_dim)
        cols = 1
        for v in shape[1:]:
            cols *= v
        out.append({"label": label, "count": info["count"], "m": nb.bit_length(), "n": shape[0],
                    "cols": cols, "b": b, "nb": nb})
    return out


def random_rotations(m, nb, b, gen, device):
    a = torch.randn(m, nb, b, b, generator=gen, dtype=torch.float64) * 0.05
    return butterfly.cayley(a - a.transpose(-1, -2)).to(device)


class Contender:
    """A way to compute B @ x for every layer: ``call(i, x)`` returns the result (maybe x)."""

    def __init__(self, name, plans, call):
        self.name, self.plans, self.call = name, plans, call


def make_contenders(layers, names, layout, max_block, tuning, tunings=None):
    """``tuning``: the kernel's launch configuration; ``tunings``: per contender name, another."""
    out, bases = {}, {}
    tunings = tunings or {}

    def base_plans(block):
        if block not in bases:
            bases[block] = [fused.FusedButterfly(lay["rot"], layout, max_block=block) for lay in layers]
        return bases[block]

    for name in names:
        if name == "fast":
            plans = [fast.Butterfly(lay["rot"], layout) for lay in layers]
            out[name] = Contender(name, plans, lambda p, x: p.apply(x))
        elif name == "torch":
            out[name] = Contender(name, base_plans(max_block), lambda p, x: p.apply_torch_(x))
        else:  # fused-<precision>[-<max_block>]
            _, precision, *block = name.split("-")
            plans = [p.variant(precision, tunings.get(name, tuning))
                     for p in base_plans(int(block[0]) if block else max_block)]
            out[name] = Contender(name, plans, lambda p, x: p.apply_triton_(x))
    return out


def gpu_times(cont, layers, xs, reps, device):
    """Per layer: GPU ms of one call, CUDA events while a sleep kernel keeps the queue full."""
    times = [[] for _ in layers]
    for _ in range(reps):
        starts = [torch.cuda.Event(enable_timing=True) for _ in layers]
        ends = [torch.cuda.Event(enable_timing=True) for _ in layers]
        torch.cuda._sleep(int(6e5 * len(layers)))  # ~300 us of GPU time per call queued behind it
        for i, (plan, x) in enumerate(zip(cont.plans, xs, strict=True)):
            starts[i].record()
            cont.call(plan, x)
            ends[i].record()
        torch.cuda.synchronize(device)
        for i in range(len(layers)):
            times[i].append(starts[i].elapsed_time(ends[i]))
    return [statistics.median(t) for t in times]


def wall_loop(cont, xs, reps, device):
    """Back-to-back over every layer, one sync at the end: wall ms and host us per call."""
    walls, hosts = [], []
    clock = time.perf_counter
    for _ in range(reps):
        torch.cuda.synchronize(device)
        per = []
        t0 = clock()
        for plan, x in zip(cont.plans, xs, strict=True):
            t = clock()
            cont.call(plan, x)
            per.append(clock() - t)
        torch.cuda.synchronize(device)
        walls.append((clock() - t0) * 1e3)
        hosts.append(statistics.median(per) * 1e6)
    return statistics.median(walls), statistics.median(hosts), walls


def host_time(cont, xs, device, calls=150):
    """Host us for one call to return while the GPU is busy (a sleep kernel), queue not full."""
    torch.cuda.synchronize(device)
    torch.cuda._sleep(int(4e8))  # ~200 ms
    per = []
    clock = time.perf_counter
    for plan, x in list(zip(cont.plans, xs, strict=True))[:calls]:
        t = clock()
        cont.call(plan, x)
        per.append(clock() - t)
    torch.cuda.synchronize(device)
    return statistics.median(per) * 1e6, statistics.mean(per) * 1e6


def graph_time(cont, xs, reps, device):
    """The whole set captured in one CUDA graph: GPU ms of a replay (median)."""
    def work():
        for plan, x in zip(cont.plans, xs, strict=True):
            cont.call(plan, x)
    return statistics.median(graph_replays(work, reps, device))


def rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def errors(cont, classes, layers, layout, gen, device):
    """Relative Frobenius error per class on fresh data, against float64 arithmetic."""
    out, num, den = {}, 0.0, 0.0
    for cls in classes:
        i = cls["first"]
        plan, rot = cont.plans[i], layers[i]["rot"]
        x = torch.randn(cls["n"], cls["cols"], generator=gen, device=device)
        ref = butterfly.apply_stages(x.double(), rot.double(), layout)
        got = cont.call(plan, x.clone())
        e = rel(got, ref)
        out[cls["label"]] = e
        num += cls["count"] * (e * ref.norm().item()) ** 2
        den += cls["count"] * ref.norm().item() ** 2
    return out, (num / den) ** 0.5


def check(args, device):
    """Correctness on fresh random data: shapes, layouts, transposes, precisions, a strided x."""
    gen = torch.Generator().manual_seed(args.seed)
    shapes = [(1, 5, 3), (1, 1, 4), (2, 2, 4), (3, 8, 10), (5, 16, 6), (8, 128, 10), (11, 1024, 10), (6, 64, 2)]
    worst = 0.0
    for layout in (butterfly.INTERLEAVED, butterfly.CONCATENATED):
        for m, nb, b in shapes:
            if butterfly.check_butterfly_shape(m, nb, b, layout):
                continue
            rot = random_rotations(m, nb, b, gen, device).float()
            for transpose in (False, True):
                base = fused.FusedButterfly(rot, layout, transpose)
                for cols, strided in ((77, False), (1280, False), (96, True)):
                    x = torch.randn(nb * b, cols, generator=gen).to(device)
                    if strided:  # x.t() of a contiguous (cols, n): the torch path takes it
                        x = x.t().contiguous().t()
                    ref = butterfly.apply_stages(x.double(), rot.double(), layout, transpose)
                    for precision in fused.PRECISIONS[:2]:
                        plan = base.variant(precision)
                        for _ in range(2):  # the JIT launch, then the direct one
                            got = plan.apply_(x.clone())  # (clone keeps a strided x's strides)
                        e = rel(got, ref)
                        worst = max(worst, e)
                        if e > 1e-5:
                            print(f"FAIL {layout} {(m, nb, b)} T={transpose} cols={cols} strided={strided} "
                                  f"{precision}: {e:.2e}")
    print(f"check: worst relative error {worst:.2e} ({'ok' if worst <= 1e-5 else 'FAILED'})")
    return worst


def sweep(args, device, classes, layout):
    """Tile sizes, warps, max_block and precision for some classes (GPU us per layer)."""
    gen = torch.Generator().manual_seed(args.seed)
    res = []
    picks = [c for c in classes if c["label"] in args.sweep_classes]
    for cls in picks:
        rot = random_rotations(cls["m"], cls["nb"], cls["b"], gen, device).float()
        xs = [torch.randn(cls["n"], cls["cols"], generator=gen).to(device) for _ in range(8)]
        for max_block in args.sweep_blocks:
            base = fused.FusedButterfly(rot, layout, max_block=max_block)
            pads = sorted({r.padded for r in base.runs})
            for bn in args.sweep_bn:
                for warps in args.sweep_warps:
                    for programs in args.sweep_programs:
                        for precision in args.sweep_precisions:
                            if precision == "ieee" and max(pads) > 64:
                                continue  # the block does not fit the registers: spills, far slower
                            plan = base.variant(precision, tuned(kernel.DEFAULT_TUNING, precision,
                                                                 {pad: (bn, warps) for pad in pads}, programs))
                            cont = Contender("x", [plan] * len(xs), lambda p, x: p.apply_triton_(x))
                            try:
                                gpu_times(cont, xs, xs, 1, device)
                                us = statistics.median(gpu_times(cont, xs, xs, 5, device)) * 1e3
                            except Exception as exc:  # noqa: BLE001 - a config that does not compile
                                us = float("nan")
                                print(f"  {type(exc).__name__}: {str(exc)[:120]}")
                            row = {"class": cls["label"], "max_block": max_block, "d": [r.d for r in base.runs],
                                   "bn": bn, "warps": warps, "programs": programs, "precision": precision,
                                   "us": us}
                            res.append(row)
                            print(f"  {cls['label']:22s} max_block={max_block:3d} d={row['d']} BN={bn:3d} "
                                  f"w={warps} P={programs} {precision:6s} {us:8.1f} us")
    return res


def tuned(base: kernel.KernelTuning, precision: str, tiles: dict, programs: int | None) -> kernel.KernelTuning:
    """``base`` with ``tiles`` (padded D -> (BN, warps)) for ``precision``'s table and ``programs``."""
    field = "fma_tiles" if precision == "fma" else "tiles"
    table = {**getattr(base, field), **tiles}
    return dataclasses.replace(base, **{field: table},
                               programs=base.programs if programs is None else programs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--classes", default=DEFAULT_CLASSES, help="bench.py result JSON with timing.classes")
    ap.add_argument("--lora-dim", type=int, default=16, help="LyCORIS lora_dim that picks b (16: b = 10)")
    ap.add_argument("--layout", default=butterfly.INTERLEAVED, choices=[butterfly.INTERLEAVED, butterfly.CONCATENATED])
    ap.add_argument("--contenders", default="fast,fused-tf32x3,fused-fma",
                    help="comma list of: fast, torch, fused-<tf32x3|fma|ieee|tf32>[-<max_block>]")
    ap.add_argument("--max-block", type=int, default=None, help="largest dense block of the fused plan")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="correctness check first (fails loudly)")
    ap.add_argument("--only-check", action="store_true", help="only the correctness check")
    ap.add_argument("--sweep", action="store_true", help="tile/warp/max_block sweep on --sweep-classes")
    ap.add_argument("--sweep-classes", default="Linear 1280x1280,Linear 10240x1280",
                    type=lambda s: s.split(","))
    ap.add_argument("--sweep-blocks", default="20,40,80", type=lambda s: [int(v) for v in s.split(",")],
                    help="max_block values the sweep tries")
    ap.add_argument("--sweep-bn", default="32,64,128", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--sweep-programs", default="0", type=lambda s: [int(v) for v in s.split(",")],
                    help="KernelTuning.programs values (programs per run in SMs; 0: one per block and tile)")
    ap.add_argument("--sweep-warps", default="4,8", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--sweep-precisions", default="tf32x3,fma", type=lambda s: s.split(","))
    ap.add_argument("--auto", action="store_true",
                    help="after --sweep: per precision, the fastest (max_block, tile) becomes a contender")
    ap.add_argument("--tiles", help="KernelTuning.tiles entries, e.g. 64:128:4,128:64:8 (D:BN:warps)")
    ap.add_argument("--programs", type=int, help="KernelTuning.programs")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA graph replay")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    device = torch.device("cuda")
    print(f"torch {torch.__version__}, triton {getattr(kernel.triton, '__version__', None)}, "
          f"{torch.cuda.get_device_name(device)}, fused.available()={fused.available()}")
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "triton": getattr(kernel.triton, "__version__", None), "argv": sys.argv[1:]}
    if args.check or args.only_check:
        result["check_worst"] = check(args, device)
        if args.only_check:
            return result
    tiles = {}
    for item in (args.tiles or "").split(",") if args.tiles else []:
        big, bn, warps = (int(v) for v in item.split(":"))
        tiles[big] = (bn, warps)
    tuning = tuned(kernel.DEFAULT_TUNING, "tf32x3", tiles, args.programs)
    result["tiles"], result["programs"] = dict(tuning.tiles), tuning.programs
    layout = args.layout
    classes = load_classes(args.classes, args.lora_dim)
    if args.sweep:
        result["sweep"] = sweep(args, device, classes, layout)

    gen = torch.Generator().manual_seed(args.seed)
    layers, xs = [], []
    for cls in classes:
        cls["first"] = len(layers)
        for _ in range(cls["count"]):
            rot = random_rotations(cls["m"], cls["nb"], cls["b"], gen, device).float()
            layers.append({"cls": cls["label"], "rot": rot})
            xs.append(torch.randn(cls["n"], cls["cols"], device=device))
    elements = sum(x.numel() for x in xs)
    print(f"{len(layers)} layers in {len(classes)} classes, {elements / 1e9:.2f} G float32 elements")
    result["layers"], result["elements"] = len(layers), elements

    names = args.contenders.split(",")
    if args.auto and args.sweep:
        best = {}
        for row in result["sweep"]:
            if row["us"] == row["us"] and (row["precision"] not in best or row["us"] < best[row["precision"]]["us"]):
                best[row["precision"]] = row
        tunings = {}
        for precision, row in best.items():
            pads = {max(16, 1 << (d - 1).bit_length()): (row["bn"], row["warps"]) for d in row["d"]}
            name = f"fused-{precision}-{row['max_block']}"
            tunings[name] = tuned(tuning, precision, pads, row["programs"])
            names.append(name)
            print(f"auto: {precision}: max_block {row['max_block']} BN {row['bn']} warps {row['warps']} "
                  f"programs {row['programs']} ({row['us']:.1f} us)")
        result["auto"] = best
        result["auto_tunings"] = {name: {"tiles": t.tiles, "fma_tiles": t.fma_tiles, "programs": t.programs}
                                  for name, t in tunings.items()}
    t = time.perf_counter()
    contenders = make_contenders(layers, names, layout, args.max_block, tuning,
                                 tunings if args.auto and args.sweep else None)
    print(f"plans built in {time.perf_counter() - t:.1f} s")
    result["contenders"] = {}
    egen = torch.Generator(device=device).manual_seed(args.seed + 1)
    for name, cont in contenders.items():
        t = time.perf_counter()
        wall_loop(cont, xs, 1, device)  # warm-up: compiles, plans' device tensors, launch caches
        warm = time.perf_counter() - t
        per_layer = gpu_times(cont, layers, xs, args.reps, device)
        classes_ms = {}
        for cls in classes:
            sl = per_layer[cls["first"]:cls["first"] + cls["count"]]
            classes_ms[cls["label"]] = statistics.median(sl)
        gpu_sum = sum(classes_ms[c["label"]] * c["count"] for c in classes)
        wall, loop_host_us, walls = wall_loop(cont, xs, args.reps, device)
        host_us, host_mean = host_time(cont, xs, device)
        graph = None if args.no_graph else graph_time(cont, xs, args.reps, device)
        errs, err_all = errors(cont, classes, layers, layout, egen, device)
        result["contenders"][name] = {"classes_ms": classes_ms, "gpu_sum_ms": gpu_sum, "wall_ms": wall,
                                      "walls_ms": walls, "host_us_per_call": host_us,
                                      "host_us_mean": host_mean, "loop_host_us": loop_host_us, "graph_ms": graph,
                                      "err_max": max(errs.values()), "err_set": err_all, "errors": errs,
                                      "warmup_s": warm}
        print(f"{name:20s} gpu sum {gpu_sum:7.2f} ms | wall {wall:7.2f} ms | host {host_us:6.1f} us/call "
              f"(mean {host_mean:.1f}, in loop {loop_host_us:.1f}) | "
              f"graph {graph if graph is None else round(graph, 2)} ms | err max {max(errs.values()):.2e} "
              f"set {err_all:.2e} | warm-up {warm:.1f} s")
    print()
    print("per layer GPU ms (median):")
    print(f"{'class':24s} {'count':>5s} {'m':>3s} " + " ".join(f"{n:>18s}" for n in names))
    for cls in classes:
        vals = " ".join(f"{result['contenders'][n]['classes_ms'][cls['label']]:18.4f}" for n in names)
        print(f"{cls['label']:24s} {cls['count']:5d} {cls['m']:3d} {vals}")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
