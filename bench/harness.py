"""The benchmarks' harness: the ComfyUI host, the call it makes, and the SDXL/Flux workload.

One module that loads ComfyUI from a checkout (``--comfyui``, ``$BOFT_COMFYUI_DIR`` or
``.comfyui/ComfyUI``; never written into), makes the call ComfyUI makes for one patched weight
(:meth:`Comfy.calculate`, :func:`call`), and builds the workload (model shapes from ComfyUI's own
model classes, LyCORIS BOFT tensors, the contenders). Each measurement is its own file beside
this one (bench.py, cold_start.py, cli_merge.py, fused_gpu.py) and imports this.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from boft_core import fast, fused, merge  # noqa: E402
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
