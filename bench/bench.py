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

This file builds the workload once (bench/harness.py) and runs several measurements on it, each
the file of its name beside this one (which also runs alone): accuracy and per_call always,
back_to_back, cuda_graph and the node cache's state on a GPU, the others by flag. One JSON with
a key per measurement; bench/report.py prints it.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accuracy  # noqa: E402  (the measurements: bench/<name>.py)
import back_to_back  # noqa: E402
import cuda_graph  # noqa: E402
import dynamic  # noqa: E402
import harness  # noqa: E402
import lowvram  # noqa: E402
import memory  # noqa: E402
import patcher  # noqa: E402
import per_call  # noqa: E402
import report  # noqa: E402
import scaling  # noqa: E402
import variants  # noqa: E402


def parse_args(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--patcher", action="store_true", help="time ModelPatcher.patch_model (patcher.py)")
    p.add_argument("--lowvram", action="store_true", help="time the per-forward LowVramPatch (lowvram.py)")
    p.add_argument("--dynamic", action="store_true",
                   help="GPU, ComfyUI 0.28: time dynamic VRAM's per-load re-patch against copying the weights in "
                        "(dynamic.py)")
    p.add_argument("--memory", action="store_true", help="measure peak extra memory (memory.py)")
    p.add_argument("--scaling", action="store_true", help="time against out_dim and layer count (scaling.py)")
    p.add_argument("--variants", action="store_true", help="time fast.Butterfly block sizes (variants.py)")
    accuracy.add_args(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = harness.workload(args, "model" if args.patcher else "layers")
    cuda = work.device.type == "cuda"
    res = harness.header(args, work)
    jpath = args.json

    def section(key, module):
        harness.section(res, key, lambda: module.measure(work, args), jpath)

    section("accuracy", accuracy)
    section("timing", per_call)
    if cuda:
        section("loop", back_to_back)
        section("graph", cuda_graph)
    harness.section(res, "cache", lambda: harness.cache_state(work.comfy, work.layers, work.device), jpath)
    if args.dynamic and cuda:
        section("dynamic", dynamic)
    if args.memory:
        section("memory", memory)
    if args.patcher:
        section("patcher", patcher)
    if args.lowvram:
        res["lowvram_dtype"] = lowvram.DTYPES
        section("lowvram", lowvram)
    if args.scaling:
        section("scaling", scaling)
    if args.variants:
        section("variants", variants)
    res["seconds"] = time.perf_counter() - work.started
    print(report.text(res))
    if jpath:
        harness.write_json(jpath, res)
    return res


if __name__ == "__main__":
    main()
