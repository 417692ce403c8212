"""Per call: each contender's synced calls over the set, per layer class and summed.

``python bench/per_call.py --help``. Every contender gets the same inputs through the call
ComfyUI makes in ``patch_weight_to_device``: a copy of the stored weight in the working dtype,
``comfy.lora.calculate_weight`` and the result cast back to the stored dtype; each of the three
is timed (host timer on the CPU, CUDA events on a GPU). Key ``timing`` of the JSON result:
``classes`` (median ms per layer of each class) and ``total`` (median over runs of the per-run
sums; ``adapter_ms`` = calculate_weight only, ``call_ms`` = with the copy in and cast back).
"""

from __future__ import annotations

import gc
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (bench/harness.py)


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


def summarize(timings: dict, layers: list[harness.Layer]) -> dict:
    """Median per layer class and whole-set totals (median over runs of the per-run sums)."""
    median = statistics.median
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


def measure(work: harness.Workload, args) -> dict:
    timings = time_layers(work.comfy, work.layers, work.names, args.runs, harness.Clock(work.device))
    return summarize(timings, work.layers)


def main(argv=None) -> dict:
    return harness.run(__doc__, "timing", measure, argv)


if __name__ == "__main__":
    main()
