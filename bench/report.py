"""Reports from the benchmarks' JSON results: one result as text, and RESULTS.md's tables.

``python bench/report.py RESULT.json``: the text a measurement prints (bench.py and the files
beside it print it at the end of a run). ``python bench/report.py --results-md``: the tables of
bench/RESULTS.md built from ``bench/results/*.json``; ``--write`` puts them into RESULTS.md
between its ``<!-- report.py: NAME -->`` and ``<!-- /report.py -->`` markers (the prose around
them is hand-written), ``--check`` exits 1 where RESULTS.md differs from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
median = statistics.median


def table(headers, rows) -> str:
    def line(cells):
        return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"

    return "\n".join([line(headers), "|" + "---|" * len(headers)] + [line(row) for row in rows])


def fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


# --- one result as text ------------------------------------------------------------------------


def text(res: dict) -> str:
    """The report of one bench result (any subset of its measurements)."""
    names = res["contenders"]
    out = [f"machine: {res['machine']}", f"command: {res['command']}",
           f"fast path's largest block: cpu {res['blocks']['cpu']}, gpu {res['blocks']['gpu']}; in place on "
           f"CUDA: {res['blocks'].get('fused (in place, CUDA)')} ({res['blocks'].get('fused precision')}, "
           f"Triton {res['blocks'].get('triton')})"]
    if res["layers"]:  # scaling.py and variants.py make their own layers
        out.append(f"model: {res['model']} ({res['model_class']}), {res['layers']} layers, "
                   f"{res['elements'] / 1e9:.3f} G weights ({res['dtype']}; working copies "
                   f"{res.get('work_dtype', 'torch.float32')}), ComfyUI {res.get('comfyui')}, runs: {res['runs']}")
    else:
        out.append(f"ComfyUI {res.get('comfyui')}, runs: {res['runs']}")
    out.append("")
    for key, err in res.get("errors", {}).items():
        out.append(f"ERROR in {key}: {err}")
    if "timing" in res:
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
    if "accuracy" in res:
        acc = res["accuracy"]
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


# --- RESULTS.md's tables -----------------------------------------------------------------------

TABLES: dict = {}  # marker name -> function(load) returning the markdown of that table


def generated(fn):
    """Register ``fn(load)`` as the table of RESULTS.md's marker of its name (``_`` -> ``-``)."""
    TABLES[fn.__name__.replace("_", "-")] = fn
    return fn


def num(x: float) -> str:
    """3 significant digits, trailing zeros kept (0.250); whole numbers from 100 up."""
    return f"{x:#.3g}".rstrip(".") if x < 100 else f"{x:.0f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x"


def b2b(res: dict, name: str) -> float:
    """Median of the back-to-back loop's runs."""
    return median(res["loop"][name])


def adapter(res: dict, name: str) -> float:
    """The adapter time summed over the set's synced calls (median over runs)."""
    return res["timing"]["total"][name]["adapter_ms"]


@generated
def bypass(load) -> str:
    rows = []
    for dtype in ("fp16", "bf16"):
        r = load(f"h200_bypass_sdxl_{dtype}.json")
        over = r["bypass_ms"] / r["plain_ms"]
        rows.append([r["dtype"], f"{r['plain_ms']:.1f} ms", f"{r['bypass_ms']:.1f} ms",
                     f"+{100 * (over - 1):.0f} % ({over:.1f}x)", f"{r['first_lazy_ms'] / 1e3:.2f} s",
                     f"{r['prepare_all_ms'] / 1e3:.2f} s + {r['first_prepared_ms'] / 1e3:.2f} s"])
    return table(["model dtype", "plain forward", "bypass forward", "overhead",
                  "first forward after a strength change, lazy", "prepare_all + first forward"], rows)


@generated
def bypass_kernel(load) -> str:
    """Session 10: the bypass on the in-place plan's Triton kernel (two leases)."""
    rows = []
    for name, state in (("session10a", "kernel, scratch as the activation"),
                        ("session10", "kernel, column-contiguous scratch")):
        for dtype in ("fp16", "bf16"):
            r = load(f"h200_bypass_sdxl_{dtype}_{name}.json")
            plain = min(r["plain_ms"], r["plain_ms_after"])
            rows.append([state, r["dtype"], f"{plain:.1f} ms", f"{r['plain_gpu_ms']:.1f} ms",
                         f"{r['hook_only_ms']:.1f} ms ({r['hook_only_overhead_pct']:+.0f} %)",
                         f"{r['touch_ms']:.1f} ms ({r['touch_overhead_pct']:+.0f} %)",
                         f"{r['bypass_ms']:.1f} ms ({r['overhead_pct']:+.0f} %)", f"{r['bypass_gpu_ms']:.1f} ms",
                         f"{r['first_lazy_ms'] / 1e3:.1f} s"])
    return table(["engine", "dtype", "plain forward", "its GPU time", "host hook, no-op adapter",
                  "touch floor", "bypass forward", "its GPU time", "first forward (cold Triton cache)"], rows)


@generated
def bypass_session11(load) -> str:
    """Session 11: the final launcher (empty hook chain skipped, C launcher called directly) against
    every launch through the hooked path (as before), same lease."""
    rows = []
    for dtype in ("fp16", "bf16"):
        r = load(f"h200_bypass_sdxl_{dtype}_session11.json")
        plain = min(r["plain_ms"], r["plain_ms_after"])
        host = sum(x["count"] * x["host_us"] for x in r["sweep"]) / 1e3
        hooked = sum(x["count"] * x["host_us_hooked"] for x in r["sweep"]) / 1e3
        rows.append([r["dtype"], f"{plain:.1f} ms", f"{r['plain_gpu_ms']:.1f} ms", f"{r['hook_only_ms']:.1f} ms",
                     f"{r['bypass_ms']:.1f} ms ({100 * (r['bypass_ms'] / plain - 1):+.0f} %)",
                     f"{r['bypass_hooked_ms']:.1f} ms", f"{r['bypass_gpu_ms']:.1f} ms",
                     f"{host:.1f} ms ({hooked:.1f} ms)"])
    return table(["dtype", "plain forward", "its GPU time", "host hook, no-op adapter", "bypass forward",
                  "bypass, launches hooked (as before)", "its GPU time",
                  "apply_channels host time, summed (hooked)"], rows)


@generated
def bypass_launches(load) -> str:
    """Session 11: one launch per run against one launch per layer, same lease, same adapters."""
    rows = []
    for dtype in ("fp16", "bf16"):
        r = load(f"h200_bypass_sdxl_{dtype}_session11a.json")
        plain = min(r["plain_ms"], r["plain_ms_after"])
        for name, label in (("per-run", "one per run"), ("per-layer", "one per layer")):
            wall = r[f"bypass_{name}_ms"]
            rows.append([label, r["dtype"], f"{plain:.1f} ms", f"{r['hook_only_ms']:.1f} ms",
                         f"{wall:.1f} ms ({100 * (wall / plain - 1):+.0f} %)", f"{r[f'bypass_{name}_gpu_ms']:.1f} ms"])
    return table(["launches", "dtype", "plain forward", "host hook, no-op adapter", "bypass forward",
                  "its GPU time"], rows)


@generated
def bypass_shapes(load) -> str:
    """Session 11: per SDXL call shape, GPU and host time of one apply_channels call (fp16)."""
    rows = []
    for x in load("h200_bypass_sdxl_fp16_session11a.json")["sweep"]:
        us, host = x["us"], x["host_us"]
        layer = " / ".join(f"{us[k]:.0f}" if k in us else "–"
                           for k in ("per-layer-16", "per-layer-16-s3", "per-layer-64"))
        rows.append([x["n"], x["runs"], f"{x['batch']} x {x['cols']}", "NCHW" if x["channel_dim"] == 1 else "last",
                     x["count"], f"{us['per-run']:.0f}", layer, f"{host['per-run']:.0f}",
                     f"{host['per-layer-16']:.0f}"])
    return table(["channels n", "runs", "matrices x columns", "channels", "calls", "GPU us, per run",
                  "GPU us, per layer (BN 16 / 16 pipelined / 64)", "host us, per run", "host us, per layer"], rows)


@generated
def merge_session10(load) -> str:
    r = load("h200_b2b_028_session10.json")
    core = b2b(r, "core")
    rows = [[name, num(b2b(r, name)), f"{core / b2b(r, name):.1f}x"] for name in ("core", "node", "ours", "in place")]
    return table(["H200, SDXL 794 layers, 0.28, fp16 copies, back to back", "ms (median of 4)", "core / this"], rows)


@generated
def issue13(load) -> str:
    old, new = load("h200_sdxl_0375_issue13.json"), load("h200_sdxl_028_issue13.json")
    rows = [[f"{name}, back to back", num(b2b(old, name)), num(b2b(new, name))]
            for name in ("core", "node", "in place")]
    rows.append(["in place, one CUDA graph", num(median(old["graph"])), num(median(new["graph"]))])
    return table(["H200, SDXL 794 layers (ms)", "0.3.75", "0.28 (fp16 copies)"], rows)


CLI_RUNS = {"quiet": "quiet",
            "load_threads1": "two busy loops on the same 2 cores, `--threads 1`",
            "load_threads2": "two busy loops on the same 2 cores, `--threads 2`"}


def cli_rows(load, runs: dict, digits: int) -> list:
    """A row per ``h200host_cli_merge_2core_{run}.json`` of ``runs``: its label, ours, core, core/ours."""
    rows = []
    for run, label in runs.items():
        median = load(f"h200host_cli_merge_2core_{run}.json")["median"]
        rows.append([label, f"{median['ours']:.{digits}f}", f"{median['core']:.{digits}f}",
                     f"{median['core'] / median['ours']:.2f}x"])
    return rows


@generated
def cli_merge(load) -> str:
    return table(["2 cores of a Xeon", "ours (s)", "core (s)", "core/ours"], cli_rows(load, CLI_RUNS, 2))


CLI_SESSION11 = {"quiet_session11_1": "lease A: this code, first median of 5",
                 "quiet_session11_old": "lease A: the last session's code (0a39fbd)",
                 "quiet_session11_2": "lease A: this code, second median of 5",
                 "quiet_session11_lease2_1": "lease B: this code, before the slice sweep",
                 "quiet_session11_lease2_2": "lease B: this code, after the sweep (1)",
                 "quiet_session11_lease2_3": "lease B: this code, after the sweep (2)"}


@generated
def cli_merge_session11(load) -> str:
    return table(["2 cores of the Xeon, ComfyUI 0.3.75", "ours (s)", "core (s)", "core/ours"],
                 cli_rows(load, CLI_SESSION11, 3))


PHASES = {"read": "read the adapter (checked), map the base", "match_check": "match names, check_merge",
          "prepare": "prepare (generators, Cayley, blend)", "cayley": "of which Cayley (`butterfly.cayley`)",
          "cayley_lapack": "Cayley by LAPACK's `linalg.solve` (before)", "dense_blocks": "dense blocks",
          "merge": "merge (`try_merge_into` from the map)", "finite": "finite check",
          "cli_one_thread": "the whole CLI, `--threads 1`"}


@generated
def cli_phases_session11(load) -> str:
    r = load("h200host_cli_phases_1thread_session11.json")
    return table(["one Xeon core, 22 layers", "ms"], [[label, f"{r['ms'][k]:.0f}"] for k, label in PHASES.items()])


LEASES = {"h200_sdxl_028_lease4.json": ("0.28, float16, lease 4", "4"),
          "h200_sdxl_028_lease5.json": ("0.28, float16, lease 5", "5"),
          "h200_sdxl_028.json": ("0.28, float16, lease 6, final code", "6, final code"),
          "h200_sdxl_028_lease7_arena.json": ("0.28, float16, lease 7, pinned-arena variant, reverted",
                                              "7, arena variant"),
          "h200_sdxl_0375.json": ("0.3.75, float32, lease 4", None)}


@generated
def leases(load) -> str:
    rows = []
    for path, (label, _) in LEASES.items():
        r = load(path)
        rows.append([f"{label} (`{path}`)", f"{num(adapter(r, 'core'))} / {num(b2b(r, 'core'))}",
                     f"{num(adapter(r, 'node'))} / {num(b2b(r, 'node'))}",
                     f"{ratio(adapter(r, 'core'), adapter(r, 'node'))} / {ratio(b2b(r, 'core'), b2b(r, 'node'))}",
                     num(b2b(r, "in place")), num(median(r["graph"]))])
    return table(["host, working copy, lease", "core summed / b2b", "node summed / b2b", "core / node (b2b)",
                  "in place b2b", "one CUDA graph"], rows)


@generated
def dynamic(load) -> str:
    rows = []
    for path, (_, lease) in LEASES.items():
        if lease is None:
            continue
        d = load(path)["dynamic"]
        copy, node = median(d["copy in"]), median(d["node"]["runs_ms"])
        core = num(median(d["core"]["runs_ms"])) + ("" if d["core"]["patched"] else " (does not patch)")
        rows.append([lease, num(copy), num(node), f"{node / copy:.2f}x", num(d["node, cache cleared"]), core])
    return table(["lease", "copy in only", "node, warm cache", "node / copy", "node, cache cleared first", "core"],
                 rows)


COLD_LEASES = {"lease 4": "4 (each layer's plan copied and pinned alone)", "lease 5": "5",
               "lease 6": "6, final code (one device-to-host copy per group)"}


@generated
def cold_start(load) -> str:
    runs = load("h200_cold_start_028.json")["runs"]
    rows = []
    for label, run in runs.items():
        short = COLD_LEASES.get(label.split(" (")[0], label)
        rows.append([short, *(f"{run[k]:.0f}" for k in run if k != "header")])
    return table(["lease", "core", "node, per layer on first call", "node, `prepare_all` first", "node, warm"], rows)


@generated
def latest(load) -> str:
    cpu, gpu = load("cpu_sdxl_inplace.json"), load("h200_sdxl_inplace.json")
    names = ("core", "node", "ours", "in place")

    def row(label, values, last):
        return [label, *values, last]

    tot = cpu["timing"]["total"]
    pc, pg = cpu["patcher"], gpu["patcher"]
    rows = [
        row("CPU, 2 cores: adapter, summed per call", [num(adapter(cpu, n)) for n in names],
            ratio(adapter(cpu, "core"), adapter(cpu, "node"))),
        row("CPU: call (+ float32 copy in, cast back)", [num(tot[n]["call_ms"]) for n in names],
            ratio(tot["core"]["call_ms"], tot["node"]["call_ms"])),
        row("CPU: `ModelPatcher.patch_model` (runs)", [", ".join(num(x) for x in pc[n]["runs_ms"]) for n in names],
            ratio(pc["core"]["median_ms"], pc["node"]["median_ms"]) + " (medians)"),
        row("H200: adapter, summed per call (synced)", [num(adapter(gpu, n)) for n in names],
            ratio(adapter(gpu, "core"), adapter(gpu, "node"))),
        row("H200: back-to-back loop, one sync (wall)", [num(b2b(gpu, n)) for n in names],
            ratio(b2b(gpu, "core"), b2b(gpu, "node"))),
        row("H200: the in-place calls as one CUDA graph", ["", "", "", num(median(gpu["graph"]))], ""),
        row("H200: `ModelPatcher.patch_model`", [num(pg[n]["median_ms"]) for n in names],
            ratio(pg["core"]["median_ms"], pg["node"]["median_ms"])),
    ]
    return table(["", "core", "node (ships)", "ours (`apply`)", "in place (`apply_`)", "core / node"], rows)


CLASSES = ("Linear 10240x1280", "Linear 1280x1280", "Linear 1280x5120", "Linear 1280x2048",
           "Conv2d 1280x1280x3x3", "Conv2d 1280x2560x3x3")


@generated
def per_class(load) -> str:
    cpu, gpu = load("cpu_sdxl_inplace.json")["timing"]["classes"], load("h200_sdxl_inplace.json")["timing"]["classes"]
    rows = [[c, cpu[c]["count"], cpu[c]["m"], num(cpu[c]["core"]), num(cpu[c]["node"]), num(gpu[c]["core"]),
             num(gpu[c]["node"])] for c in CLASSES]
    return table(["layer", "count", "m", "CPU core", "CPU node", "H200 core", "H200 node"], rows)


FUSED = {"fast": "fast.Butterfly (out of place)", "fused-runs-tf32x3-40": "fused tf32x3 (ships)",
         "fused-runs-fma-40": "fused fma"}


@generated
def fused_kernels(load) -> str:
    res = load("h200_fused_gpu.json")["contenders"]
    classes = load("h200_sdxl_after_shape_check_once.json")["timing"]["classes"]  # fused_gpu.py's --classes
    rows = [[c, classes[c]["count"], classes[c]["m"], *(num(1e3 * res[n]["classes_ms"][c]) for n in FUSED)]
            for c in (CLASSES[1], CLASSES[0], CLASSES[2], CLASSES[3], CLASSES[4])]
    return table(["layer", "count", "m", *FUSED.values()], rows)


def results_md() -> dict[str, str]:
    """Every generated table of RESULTS.md, by marker name, from bench/results/*.json."""
    cache: dict[str, dict] = {}

    def load(name: str) -> dict:
        if name not in cache:
            with open(os.path.join(RESULTS, name)) as f:
                cache[name] = json.load(f)
        return cache[name]

    return {name: fn(load) for name, fn in TABLES.items()}


MARKER = re.compile(r"(<!-- report\.py: (\S+) -->\n)(.*?)(<!-- /report\.py -->)", re.S)


def fill(md: str, tables: dict[str, str]) -> str:
    """RESULTS.md with each marked block replaced by its table."""
    def repl(m):
        if m.group(2) not in tables:
            raise SystemExit(f"RESULTS.md names a table report.py does not make: {m.group(2)}")
        return m.group(1) + tables[m.group(2)] + "\n" + m.group(4)

    return MARKER.sub(repl, md)


# The earlier sessions' runs (contenders named differently then: "ours+plan" is today's "ours").

def spread(values) -> str:
    return f"{num(median(values))} ({num(min(values))}–{num(max(values))})"


@generated
def after_plan_cache(load) -> str:
    r = load("h200_sdxl_after_plan_cache.json")
    core_a, core_l, core_p = adapter(r, "core"), b2b(r, "core"), r["patcher"]["core"]["median_ms"]
    labels = {"core": "core", "node": "node (the pack's adapter)",
              "ours": "ours (`merge.apply`, plan now cached in the Patch)", "ours+plan": "ours+plan"}
    rows = []
    for name, label in labels.items():
        a, loop, pm = adapter(r, name), b2b(r, name), r["patcher"][name]["median_ms"]
        rows.append([label, f"{num(a)} ({ratio(core_a, a)})", f"{num(loop)} ({ratio(core_l, loop)})",
                     f"{num(pm)} ({ratio(core_p, pm)})"])
    rows.append(["ours+plan, one CUDA graph", "", num(median(r["graph"])), ""])
    return table(["contender", "adapter, summed per call", "back-to-back loop (wall)", "ModelPatcher.patch_model"],
                 rows)


OLD_CLASSES = ("Linear 10240x1280", "Conv2d 1280x1280x3x3", "Linear 1280x1280", "Linear 1280x5120",
               "Linear 1280x2048", "Conv2d 1280x2560x3x3", "Linear 5120x640", "Conv2d 640x640x3x3", "Linear 640x640")
OLD_NAMES = ("core", "node", "ours", "ours+plan", "in place")


@generated
def cpu_2core_classes(load) -> str:
    classes = load("cpu_sdxl.json")["timing"]["classes"]
    rows = [[c, classes[c]["count"], classes[c]["m"], *(num(classes[c][n]) for n in OLD_NAMES),
             ratio(classes[c]["core"], classes[c]["ours"]), ratio(classes[c]["core"], classes[c]["in place"])]
            for c in OLD_CLASSES]
    return table(["layer", "n", "m", *OLD_NAMES, "core/ours", "core/in place"], rows)


@generated
def cpu_2core_total(load) -> str:
    tot = load("cpu_sdxl.json")["timing"]["total"]
    rows = [[n, num(tot[n]["adapter_ms"]), num(tot[n]["call_ms"]),
             ratio(tot["core"]["adapter_ms"], tot[n]["adapter_ms"]), ratio(tot["core"]["call_ms"], tot[n]["call_ms"])]
            for n in OLD_NAMES]
    return table(["contender", "adapter", "call (+ copy in, cast back)", "core/this, adapter", "core/this, call"],
                 rows)


@generated
def cpu_2core_memory(load) -> str:
    memory = load("cpu_sdxl.json")["memory"]
    rows = []
    for i, (shape, per) in enumerate(memory.items()):
        label = ("Conv2d " if shape.count("x") == 3 else "Linear ") + shape + (" (largest)" if i == 0 else "")
        size = per["core"]["layer_fp32_mb"]
        rows.append([label, f"{size:.4g}", *(f"{num(per[n]['extra_mb'])} ({per[n]['extra_mb'] / size:.2f}x)"
                                             for n in OLD_NAMES)])
    return table(["layer", "fp32 MB", *OLD_NAMES], rows)


@generated
def h200_total(load) -> str:
    r = load("h200_sdxl.json")
    tot = r["timing"]["total"]
    rows = [[n, num(tot[n]["adapter_ms"]), num(tot[n]["call_ms"]), spread(r["loop"][n]),
             num(r["patcher"][n]["median_ms"])] for n in r["contenders"]]
    rows.append(["ours+plan as one CUDA graph", "", "", num(median(r["graph"])), ""])
    return table(["contender", "adapter, summed per call", "call", "back-to-back loop (wall)",
                  "ModelPatcher.patch_model"], rows)


@generated
def variants(load) -> str:
    blocks = (10, 20, 40, 80, 160, 640, 1280)
    rows = []
    for path, where in (("h200_sdxl.json", "GPU"), ("cpu_sdxl.json", "CPU")):
        for shape in ("1280x1280", "10240x1280"):
            v = load(path)["variants"][shape]
            rows.append([f"{shape} {where}", num(v["reference"]),
                         *(f"{num(v[f'block {b}'])} ({'k=' if b == 10 else ''}{v[f'k {b}']})" for b in blocks),
                         num(v["plan build (default)"])])
    return table(["B @ W", "reference", "block 10", *(str(b) for b in blocks[1:]), "plan build"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", nargs="*", help="bench result JSON files to print as text")
    p.add_argument("--results-md", action="store_true", help="print RESULTS.md's tables")
    p.add_argument("--write", action="store_true", help="write the tables into RESULTS.md")
    p.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md's tables differ from the JSON")
    args = p.parse_args(argv)
    for path in args.result:
        with open(path) as f:
            print(text(json.load(f)))
    if not (args.results_md or args.write or args.check):
        return 0
    tables = results_md()
    with open(RESULTS_MD) as f:
        md = f.read()
    missing = sorted(set(tables) - {m.group(2) for m in MARKER.finditer(md)})
    if args.results_md:
        for name, tab in tables.items():
            print(f"<!-- report.py: {name} -->\n{tab}\n<!-- /report.py -->\n")
    new = fill(md, tables)
    if args.write and new != md:
        with open(RESULTS_MD, "w") as f:
            f.write(new)
    if args.check and (new != md or missing):
        print(f"RESULTS.md is not what report.py makes from bench/results (missing markers: {missing}); "
              "run python bench/report.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
