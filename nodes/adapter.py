"""Our WeightAdapterBase subclasses: ComfyUI calls them; they delegate to boft_core."""

from __future__ import annotations

import torch
from comfy.weight_adapter.base import WeightAdapterBase

from ..boft_core import BoftError, BoftLayer, apply, apply_, check_weight, prepare
from ..boft_core.formats import PEFT_PREFIX, boft_r_layer, lycoris_layer
from ..boft_core.merge import prepare_many


class BOFTAdapter(WeightAdapterBase):
    """Exact BOFT merge for one layer.

    ``weights = (blocks, scale, alpha, kind, mode, name)``: every tensor lives in ``weights`` so
    that hosts which rebuild adapters as ``type(v)(v.loaded_keys, weights)`` keep working.
    """

    name = "boft_exact"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights
        self._patches = {}  # (strength, device, dtype) -> boft_core Patch: one rotation per strength
        self._fits = set()  # weight shapes already checked (the low-VRAM path calls us per forward)

    @classmethod
    def from_layer(cls, layer: BoftLayer, mode: str) -> BOFTAdapter:
        alpha = torch.tensor(layer.alpha, dtype=torch.float64)
        return cls(set(layer.keys), (layer.blocks, layer.scale, alpha, layer.kind, mode, layer.name))

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        """Core's ``load_lora`` hook: takes ``oft_blocks`` (LyCORIS) and ``boft_R`` (PEFT/kohya) layers."""
        if loaded_keys is None:
            loaded_keys = set()
        if f"{x}.oft_blocks" in lora:
            parts = {"oft_blocks": lora[f"{x}.oft_blocks"], "rescale": lora.get(f"{x}.rescale"),
                     "alpha": None if alpha is None else torch.tensor(float(alpha))}
            layer = lycoris_layer("LoRA file", x, parts)
        elif f"{x}.boft_R" in lora:
            parts = {"boft_R": lora[f"{x}.boft_R"], "boft_s": lora.get(f"{x}.boft_s")}
            kind = "peft-boft" if x.startswith(PEFT_PREFIX) else "kohya-boft"
            layer = boft_r_layer("LoRA file", x, parts, kind)
        else:
            return None
        loaded_keys.update(k for k in layer.keys if not k.endswith(".alpha"))
        adapter = cls.from_layer(layer, "lycoris")
        adapter.loaded_keys = loaded_keys
        return adapter

    def layer(self) -> BoftLayer:
        blocks, scale, alpha, kind, _, name = self.weights
        return BoftLayer(name=name, kind=kind, blocks=blocks, alpha=float(alpha), scale=scale)

    def patch_for(self, strength: float, device, dtype):
        """The prepared rotation for this strength, computed once per (strength, device, dtype)."""
        cache_key = (float(strength), str(device), dtype)  # a tensor's device: always indexed
        patch = self._patches.get(cache_key)
        if patch is None:
            layer = self.layer()
            layer.blocks = layer.blocks.to(device)
            layer.scale = None if layer.scale is None else layer.scale.to(device)
            patch = prepare(layer, strength, self.weights[4], dtype=dtype)
            self._patches[cache_key] = patch
        return patch

    @staticmethod
    def prepare_all(adapters: list[BOFTAdapter], strength: float, device, dtype=torch.float32) -> None:
        """Fill the adapters' caches for (strength, device, dtype) in one batched pass: equal-shaped
        layers share one Cayley solve and plan build (on a GPU, instead of dozens of small kernels
        per layer at patch time). The loader nodes call it for the model's load device."""
        cache_key = (float(strength), _device_key(device), dtype)
        by_mode: dict[str, list[BOFTAdapter]] = {}
        for adapter in adapters:
            if cache_key not in adapter._patches:
                by_mode.setdefault(adapter.weights[4], []).append(adapter)
        for mode, todo in by_mode.items():
            patches = prepare_many([a.layer() for a in todo], strength, mode, dtype=dtype, device=device)
            for adapter, patch in zip(todo, patches, strict=True):
                adapter._patches[cache_key] = patch

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if weight.shape not in self._fits:
            try:
                check_weight(self.layer(), weight.shape)
            except BoftError as e:
                raise BoftError(f"{key}: {e}") from None
            self._fits.add(weight.shape)
        dtype = torch.promote_types(intermediate_dtype, torch.float32)
        patch = self.patch_for(strength, weight.device, dtype)
        # In place: for offset patches ComfyUI keeps the narrowed view's base, not our return value.
        if is_identity(function) and apply_(patch, weight):
            return weight  # merged straight into ComfyUI's float32 copy: no weight-sized buffer
        new = apply(patch, weight)
        weight += function(new.sub_(weight))  # new - weight computed into new itself
        return weight


def _device_key(device) -> str:
    """``cuda`` as the tensors it makes report it (``cuda:0``, the current device), so that
    prepare_all's entries are the ones patch_for looks up."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


_IDENTITY = (lambda a: a).__code__


def is_identity(function) -> bool:
    """Whether ``function`` is ``lambda a: a`` in any spelling (ComfyUI passes a fresh one per
    call when a patch has no function): then ``weight + function(new - weight)`` is ``new``."""
    code = getattr(function, "__code__", None)
    return (code is not None and code.co_code == _IDENTITY.co_code and code.co_argcount == 1
            and not code.co_kwonlyargcount and not getattr(function, "__defaults__", None))


class BOFTBiasAdapter(WeightAdapterBase):
    """PEFT's trained bias (``bias="boft_only"/"all"``): ``b + s * (b_trained - b)``."""

    name = "boft_bias"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        return None  # only our loader nodes create these; core's load_lora cannot map a bias key

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        trained = self.weights[0].to(weight.device, weight.dtype)
        if trained.shape != weight.shape:
            raise BoftError(f"{key}: the trained bias has shape {tuple(trained.shape)}, the layer's "
                            f"{tuple(weight.shape)}.")
        weight += function(strength * (trained - weight))
        return weight
