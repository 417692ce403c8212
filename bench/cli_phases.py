"""Where the merge CLI's time goes, on one thread: its phases timed one after another.

``python bench/cli_phases.py --help``. The workload of ``cli_merge.py`` (the same files: pass its
``--dir`` to reuse them). Torch runs one thread, as each of the CLI's workers does; every phase
is timed ``--runs`` times in a row over all layers and its median kept (milliseconds):

* ``read``: the adapter read and checked (``guard.load``), the base mapped;
* ``match_check``: names matched and ``check_merge`` for every layer;
* ``prepare``: ``merge.prepare`` (generators, Cayley, blend) for every layer;
* ``cayley`` / ``cayley_lapack``: ``butterfly.cayley`` on the layers' generators, and LAPACK's
  ``torch.linalg.solve`` on the same (the solve ``cayley`` used before its CPU elimination);
* ``dense_blocks``: ``fast.Butterfly`` built for every patch;
* ``merge``: ``merge.try_merge_into`` from the mapped base into a buffer per layer;
* ``finite``: ``formats.all_finite`` on every merged layer;
* ``cli_one_thread``: the whole ``cli.main(["merge", ..., "--threads", "1"])``, a new file each run.

Not a test: speed is never asserted. Results in bench/RESULTS.md (the CLI section).
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
import cli_merge  # noqa: E402  (bench/cli_merge.py: the workload)
import harness  # noqa: E402

from boft_core import butterfly, cli  # noqa: E402
from boft_core.fast import Butterfly  # noqa: E402
from boft_core.formats import all_finite, map_tensors, with_constraint  # noqa: E402
from boft_core.guard import check_merge, load  # noqa: E402
from boft_core.merge import fit, generators, prepare, try_merge_into  # noqa: E402


def lapack(q: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return torch.linalg.solve(eye - q, eye + q, left=False)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", default=harness.default_comfyui(), help="ComfyUI checkout (writes the files)")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dir", help="where the files are or go (default: a temporary folder)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    folder = args.dir or tempfile.mkdtemp(prefix="boft_cli_phases_")
    base, adapter = os.path.join(folder, "base.safetensors"), os.path.join(folder, "adapter.safetensors")
    if not (os.path.exists(base) and os.path.exists(adapter)):
        comfy = harness.Comfy(args.comfyui, torch.device("cpu"), "float32")
        cli_merge.write_files(comfy, folder, args.layers, 0)
    ms: dict[str, float] = {}

    def phase(name, fn):
        times, out = [], None
        for _ in range(args.runs):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        ms[name] = statistics.median(times) * 1e3
        return out

    boft, (tensors, _) = phase("read", lambda: (with_constraint(load(adapter), "auto"), map_tensors(base)))

    def match_check():
        pairs = []
        for name, key in cli.match_layers(boft, list(tensors)).items():
            layer = fit(boft.layers[name], tensors[key].shape)
            check_merge(layer, 1.0, "lycoris", tensors[key], adapter)
            pairs.append((layer, tensors[key]))
        return pairs

    pairs = phase("match_check", match_check)
    for _, weight in pairs:
        weight.float().sum()  # the base's pages read once, before the merge is timed
    patches = phase("prepare", lambda: [prepare(layer) for layer, _ in pairs])
    qs = [generators(layer) for layer, _ in pairs]
    phase("cayley", lambda: [butterfly.cayley(q) for q in qs])
    phase("cayley_lapack", lambda: [lapack(q) for q in qs])
    plans = phase("dense_blocks", lambda: [Butterfly(patch.rotations, patch.layout) for patch in patches])
    for patch, plan in zip(patches, plans, strict=True):
        patch.kept(False, lambda plan=plan: plan)
    outs = [torch.empty_like(weight) for _, weight in pairs]

    def merge_all():
        for patch, (_, weight), out in zip(patches, pairs, outs, strict=True):
            if not try_merge_into(patch, out, source=weight):
                raise RuntimeError(f"{patch.name}: not merged in place")

    phase("merge", merge_all)
    phase("finite", lambda: [all_finite(out) for out in outs])
    target = os.path.join(folder, "phases_out.safetensors")

    def whole():
        if os.path.exists(target):
            os.remove(target)  # (a new file each run, as cli_merge.py)
        if cli.main(["merge", base, adapter, "--out", target, "--threads", "1"]) != 0:
            raise RuntimeError("the CLI failed")

    phase("cli_one_thread", whole)
    torch.set_num_threads(1)  # (the CLI's pool set it on its own threads only; kept for the record)
    res = {"machine": harness.machine(torch.device("cpu")), "load_before": os.getloadavg(),
           "layers": len(pairs), "elements": sum(w.numel() for _, w in pairs),
           "blocks": sum(q.shape[0] * q.shape[1] for q in qs), "runs": args.runs,
           "ms": {k: round(v, 1) for k, v in ms.items()}}
    return harness.finish(res, args.json)


if __name__ == "__main__":
    main()
