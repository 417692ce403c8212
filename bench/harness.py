"""The benchmarks' harness: the ComfyUI host, the call it makes, and the SDXL/Flux workload.

One module that loads ComfyUI from a checkout (``--comfyui``, ``$BOFT_COMFYUI_DIR`` or
``.comfyui/ComfyUI``; never written into), makes the call ComfyUI makes for one patched weight
(:meth:`Comfy.calculate`, :func:`call`), builds the workload (model shapes from ComfyUI's own
model classes, LyCORIS BOFT tensors, the contenders) and runs one measurement into a JSON result
(:func:`parser`, :func:`workload`, :func:`run`, :func:`write_json`). Each measurement is its own
file beside this one and imports this; ``bench.py`` runs several of them on one workload, and
``report.py`` turns the JSON results into text and RESULTS.md's tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from boft_core import fast, fused, kernel, merge  # noqa: E402
from boft_core.formats import parse_lycoris  # noqa: E402

# ComfyUI 0.3.75's own SDXL UNet config (comfy/model_detection.py, unet_config_from_diffusers_unet)
# and the Flux.1-dev config its detect_unet_config derives from a checkpoint; the model classes
# are ComfyUI's (model_config_from_unet_config picks them and checks the match).
SDXL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
FLUX = {
    "image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0,
    "theta": 10000, "out_channels": 16, "qkv_bias": True, "in_channels": 16, "hidden_size": 3072,
    "context_in_dim": 4096, "patch_size": 2, "vec_in_dim": 768, "depth": 19,
    "depth_single_blocks": 38, "guidance_embed": True,
}
MODELS = {"sdxl": SDXL, "flux": FLUX}


# --- host --------------------------------------------------------------------------------------


def default_comfyui() -> str:
    """The ComfyUI checkout: ``$BOFT_COMFYUI_DIR``, else the one scripts/setup.sh makes."""
    return os.environ.get("BOFT_COMFYUI_DIR") or os.path.join(ROOT, ".comfyui", "ComfyUI")


class Comfy:
    """The ComfyUI modules the benchmark uses, imported from a checkout."""

    def __init__(self, path: str, device: torch.device, work_dtype: str = "auto"):
        if not os.path.isfile(os.path.join(path, "comfy", "lora.py")):
            raise SystemExit(f"no ComfyUI at {path}: pass --comfyui or set BOFT_COMFYUI_DIR")
        sys.path.insert(0, path)
        import comfy.cli_args

        comfy.cli_args.args.cpu = device.type == "cpu"
        import comfy.float
        import comfy.lora
        import comfy.model_detection
        import comfy.model_management
        import comfy.model_patcher
        import comfy.utils
        from comfy.weight_adapter.base import WeightAdapterBase
        from comfy.weight_adapter.boft import BOFTAdapter

        self.path = path
        self.lora, self.float, self.utils = comfy.lora, comfy.float, comfy.utils
        self.detection, self.patcher = comfy.model_detection, comfy.model_patcher
        self.BOFTAdapter = BOFTAdapter
        self.Ours, self.InPlace = adapter_classes(WeightAdapterBase)
        self.NodeAdapter = node_adapter_class()
        self.mm = comfy.model_management
        # The working copy's dtype: what patch_weight_to_device hands adapters (0.28:
        # lora_compute_dtype, float16 on CUDA at compute capability >= 8; 0.3.75: float32).
        compute = getattr(comfy.model_management, "lora_compute_dtype", None)
        self.work_dtype = compute(device) if compute is not None and work_dtype == "auto" else \
            getattr(torch, "float32" if work_dtype == "auto" else work_dtype)
        try:
            import comfyui_version

            self.version = comfyui_version.__version__
        except ImportError:
            self.version = "unknown"

    def calculate(self, adapter, temp, key):
        """``comfy.lora.calculate_weight`` with ``adapter`` as the one patch on ``temp`` (strength
        1, no offset or function): the call ComfyUI makes, spelled once."""
        return self.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], temp, key)


def node_adapter_class():
    """The pack's own adapter (nodes/adapter.py) without running the pack's or nodes' __init__.

    Empty package modules stand in for the pack root and ``nodes`` so that only adapter.py and
    boft_core load (the nodes' __init__ also wires routes into ComfyUI's server).
    """
    import importlib
    import types

    for name, path in (("boft_bench_pack", ROOT), ("boft_bench_pack.nodes", f"{ROOT}/nodes")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [path]
            sys.modules[name] = module
    return importlib.import_module("boft_bench_pack.nodes.adapter").BOFTAdapter


def adapter_classes(base):
    """Our boft_core contenders as ComfyUI weight adapters (ours, in place)."""

    class Ours(base):
        """``merge.apply``: a new merged weight (the Patch keeps its fast-path plan)."""

        name = "boft_core"

        def __init__(self, patch: merge.Patch):
            self.patch, self.loaded_keys, self.weights = patch, set(), []

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            return merge.apply(self.patch, weight)

    class InPlace(Ours):
        """``merge.try_merge_into``: written into ComfyUI's float32 copy (core's adapters add into it)."""

        name = "boft_core, in place"

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            if merge.try_merge_into(self.patch, weight):
                return weight
            return merge.apply(self.patch, weight)

    return Ours, InPlace


# --- workload ----------------------------------------------------------------------------------


def power2factorization(dim: int, lora_dim: int) -> tuple[int, int] | None:
    """LyCORIS's (b, block_num): the largest even b <= lora_dim with dim / b a power of two."""
    for b in range(lora_dim - lora_dim % 2, 0, -2):
        if dim % b == 0 and (dim // b) & (dim // b - 1) == 0:
            return b, dim // b
    return None


@dataclass
class Layer:
    name: str  # module path inside the diffusion model
    shape: tuple[int, ...]
    kind: str  # Linear / Conv2d
    b: int
    nb: int
    weight: torch.Tensor | None = None  # stored dtype, on the device
    tensors: dict = field(default_factory=dict)  # the LyCORIS file's keys for this layer
    contenders: dict = field(default_factory=dict)  # contender name -> ComfyUI adapter

    @property
    def key(self) -> str:
        return f"diffusion_model.{self.name}.weight"

    @property
    def lname(self) -> str:
        return "lycoris_" + self.name.replace(".", "_")

    @property
    def label(self) -> str:
        return f"{self.kind} {'x'.join(map(str, self.shape))}"

    @property
    def weight_numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def m(self) -> int:
        return self.nb.bit_length()  # log2(nb) + 1: LyCORIS's full butterfly


def build_model(comfy: Comfy, model: str, device, dtype):
    config = dict(MODELS[model], dtype=dtype)
    model_config = comfy.detection.model_config_from_unet_config(config)
    if model_config is None:
        raise SystemExit(f"ComfyUI did not recognise the {model} config")
    with torch.device("meta"):
        net = model_config.get_model({})
    if device != "meta":
        net = net.to_empty(device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.02, generator=gen)
    return net, type(model_config).__name__


def model_layers(net, lora_dim: int) -> list[Layer]:
    """Every Linear and Conv2d that LyCORIS BOFT can adapt at ``lora_dim`` (out dim factors)."""
    layers = []
    for name, module in net.diffusion_model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            shape = tuple(module.weight.shape)
            fac = power2factorization(shape[0], lora_dim)
            if fac is not None:
                layers.append(Layer(name, shape, type(module).__name__, *fac))
    return layers


def subset(layers: list[Layer], count: int | None) -> list[Layer]:
    """``count`` layers spread over the list (all if None), so every kind of layer shows up."""
    if not count or count >= len(layers):
        return layers
    step = len(layers) / count
    return [layers[int(i * step)] for i in range(count)]


def make_adapters(comfy: Comfy, layer: Layer, device, block_dtype, seed: int, block: int | None = None,
                  slice_elems: int | None = None) -> None:
    """The LyCORIS file's tensors (random non-zero blocks) and the contenders built from them.
    ``block`` / ``slice_elems``: tuning of ours and in place's engines (fast path and kernel
    plan, built here with these arguments and kept with the patch)."""
    make_tensors(layer, block_dtype, seed)
    # Core keeps the file's tensors on the CPU and casts them to the weight's device per call,
    # as comfy.lora.load_lora leaves them; ours is prepared once on the device (node cache).
    core = comfy.BOFTAdapter.load(layer.lname, layer.tensors, 0.0, None)
    node = comfy.NodeAdapter.load(layer.lname, layer.tensors, 0.0, None)
    if core is None or node is None:
        raise RuntimeError(f"an adapter did not take {layer.lname}")
    (ours_layer,) = parse_lycoris("bench", layer.tensors).values()
    ours_layer.blocks = ours_layer.blocks.to(device)
    patch = merge.prepare(ours_layer, 1.0, "lycoris")
    if block or slice_elems:
        n = patch.rotations.shape[1] * patch.rotations.shape[2]
        cols = max(32, slice_elems // n) if slice_elems else None
        patch.kept(False, lambda: fast.Butterfly(patch.rotations, patch.layout, max_block=block, slice_cols=cols))
        if merge.kernel_merges(patch):
            patch.kept("fused", lambda: fused.FusedButterfly(patch.rotations, patch.layout, max_block=block,
                                                             scale=patch.scale))
    layer.contenders = {"core": core, "node": node, "ours": comfy.Ours(patch),
                        "in place": comfy.InPlace(patch)}


def make_tensors(layer: Layer, block_dtype, seed: int) -> None:
    """``layer.tensors``: the LyCORIS file's keys for the layer (random non-zero blocks)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = (torch.randn(layer.m, layer.nb, layer.b, layer.b, generator=gen) * 0.05)
    layer.tensors = {f"{layer.lname}.oft_blocks": blocks.to(block_dtype),
                     f"{layer.lname}.alpha": torch.tensor(0.0)}


def call(comfy: Comfy, adapter, weight, key):
    """What ModelPatcher.patch_weight_to_device does for one key: a working copy, the adapter
    through ComfyUI's calculate_weight, the result rounded back to the stored dtype."""
    temp = weight.to(comfy.work_dtype, copy=True)
    out = comfy.calculate(adapter, temp, key)
    return comfy.float.stochastic_rounding(out, weight.dtype, seed=0)


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


# --- one measurement's run ---------------------------------------------------------------------


def write_json(path: str, result: dict) -> None:
    """A result as the benchmarks keep them (bench/results/*.json)."""
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def finish(result: dict, path: str | None) -> dict:
    """A measurement's end: ``result`` printed as JSON, and written to ``path`` if one is given."""
    print(json.dumps(result, indent=1, default=str))
    if path:
        write_json(path, result)
    return result


def parser(doc: str) -> argparse.ArgumentParser:
    """The flags of every measurement on the SDXL/Flux set (bench.py and the files beside it)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
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
    p.add_argument("--work-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="the working copy's dtype (auto: the host's lora_compute_dtype, else float32)")
    p.add_argument("--json", help="also write all numbers to this file")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--block", type=int,
                   help="largest dense block of ours and in place (fast path and kernel plan; "
                        "default: boft_core.fast.MAX_BLOCK)")
    p.add_argument("--slice", type=int,
                   help="column slice of ours and in place's fast path, in elements "
                        "(default: boft_core.fast's)")
    return p


@dataclass
class Workload:
    """What a measurement runs on: the host, the contenders' names and the layers with theirs."""

    comfy: Comfy | None
    device: torch.device
    names: list[str]
    layers: list[Layer]
    net: object = None  # the model (only when a measurement needs it: ModelPatcher)
    model_class: str | None = None
    started: float = 0.0


def workload(args, needs: str = "layers") -> Workload:
    """The host and the set. ``needs``: "layers" (random stored weights and every contender per
    layer), "model" (the same, the weights being the model's own, on the device), "host"
    (ComfyUI only) or "none" (not even ComfyUI)."""
    started = time.perf_counter()
    device = torch.device(args.device)
    names = (["core"] if not args.no_core else []) + ["node", "ours", "in place"]
    if needs == "none":
        return Workload(None, device, names, [], started=started)
    comfy = Comfy(args.comfyui, device, args.work_dtype)
    if needs == "host":
        return Workload(comfy, device, names, [], started=started)
    need_model = needs == "model"
    net, model_class = build_model(comfy, args.model, device if need_model else "meta", torch.float16)
    layers = subset(model_layers(net, args.lora_dim), args.subset)
    for i, layer in enumerate(layers):
        if need_model:
            layer.weight = comfy.utils.get_attr(net, layer.key)
        else:
            gen = torch.Generator(device=device).manual_seed(1000 + i)
            layer.weight = (torch.randn(layer.shape, generator=gen, device=device) * 0.02).half()
        make_adapters(comfy, layer, device, torch.float16, i, args.block, args.slice)
    print(f"[bench] {len(layers)} layers ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return Workload(comfy, device, names, layers, net if need_model else None, model_class, started)


def header(args, work: Workload, argv=None) -> dict:
    """What every result starts with: the machine, the host, the command, the set."""
    comfy = work.comfy
    return {
        "machine": machine(work.device), "device": work.device.type,
        "comfyui": comfy.version if comfy else None,
        "command": " ".join([os.path.basename(sys.executable)] + (sys.argv if argv is None else [sys.argv[0], *argv])),
        "model": args.model, "model_class": work.model_class, "layers": len(work.layers),
        "elements": sum(layer.weight.numel() for layer in work.layers), "dtype": "float16",
        "work_dtype": str(comfy.work_dtype) if comfy else None,
        "runs": args.runs, "contenders": work.names,
        "blocks": {"cpu": args.block or fast.MAX_BLOCK["cpu"], "gpu": args.block or fast.MAX_BLOCK["cuda"],
                   "fused (in place, CUDA)": args.block or fast.MAX_BLOCK["cuda in place"],
                   "fused precision": fused.PRECISION,
                   "triton": getattr(kernel.triton, "__version__", None) if fused.available() else None},
    }


def section(res: dict, key: str, fn, json_path: str | None) -> None:
    """Run one measurement; a failure is recorded (and printed) so the others still report."""
    start = time.perf_counter()
    try:
        res[key] = fn()
    except Exception as e:  # a benchmark keeps the numbers it has
        res.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    print(f"[bench] {key}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if json_path:
        write_json(json_path, res)


def run(doc: str, key: str, measure, argv=None, needs: str = "layers", add_args=None, extra=None,
        gpu_only: bool = False) -> dict:
    """A measurement file's ``main``: the common flags (and ``add_args``'s), the workload,
    ``measure(work, args)`` as ``res[key]``, the report on stdout and ``--json``."""
    import report  # bench/report.py

    p = parser(doc)
    if add_args:
        add_args(p)
    args = p.parse_args(argv)
    if gpu_only and torch.device(args.device).type != "cuda":
        raise SystemExit(f"{key}: a GPU measurement, pass --device cuda (not {args.device})")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = workload(args, needs)
    res = header(args, work, argv)
    res.update(extra or {})
    section(res, key, lambda: measure(work, args), args.json)
    res["seconds"] = time.perf_counter() - work.started
    print(report.text(res))
    if args.json:
        write_json(args.json, res)
    return res
