"""Our WeightAdapterBase subclasses: ComfyUI calls them; they delegate to boft_core."""

from __future__ import annotations

import torch
from comfy.weight_adapter.base import WeightAdapterBase

from ..boft_core import (
    BoftError,
    BoftLayer,
    apply,
    bias_delta,
    bypass,
    check_merge,
    check_strength,
    check_weight,
    try_merge_into,
)
from ..boft_core.cache import PatchCache
from ..boft_core.formats import boft_r_layer, lycoris_layer
from ..boft_core.guard import FREE_GAIN, check_bypass, check_rotations
from ..boft_core.names import boft_r_kind

# Every adapter of this process shares one cache of prepared layers, keyed by the token in its
# weights: ComfyUI 0.28 rebuilds adapters (staging, dynamic VRAM) and a per-adapter cache would
# start empty each time. Its budgets are the loader's to set (prepare_all).
CACHE = PatchCache()
# (token, strength, mode, dtype) the finite-result guard passed from the file alone: adapters are
# rebuilt at every load on 0.28, and the low-VRAM path calls calculate_weight per forward; and
# (token, strength, mode, "bypass") the bypass guard passed.
FINITE: set[tuple] = set()
FINITE_LIMIT = 1 << 16

# BoftLayer fields besides the tensors that decide its rotations (kohya/OneTrainer's conv and
# block_share are resolved by merge.fit before an adapter is made)
RULE_FIELDS = ("constraint", "neumann", "neumann_legacy", "coft_norm", "q_scale")


def _passed(seen: tuple) -> None:
    """Remember a guard that passed (:data:`FINITE`, cleared when it reaches its limit)."""
    if len(FINITE) >= FINITE_LIMIT:
        FINITE.clear()
    FINITE.add(seen)


class BOFTAdapter(WeightAdapterBase):
    """Exact BOFT merge for one layer.

    ``weights = (blocks, scale, alpha, kind, mode, name, token, rule)``: every tensor lives in
    ``weights`` so that hosts which rebuild adapters as ``type(v)(v.loaded_keys, weights)``
    keep working (their tensors may then be staging copies on the GPU, or cast to the module's
    dtype by bypass's ``inject``); alpha is a Python float and the token (``BoftLayer.token``)
    a string, and ``rule`` (:data:`RULE_FIELDS`, how the rotations are built) a tuple of Python
    values, which they keep as they are. The token finds the layer's prepared rotation in
    :data:`CACHE` whatever adapter object asks.
    """

    name = "boft_exact"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights
        self._fits = set()  # weight shapes already checked (the low-VRAM path calls us per forward)

    @property
    def weights(self):
        return self._weights

    @weights.setter
    def weights(self, new):
        """Hosts may move our tensors, never round them: 0.28's bypass ``inject()`` casts every
        tensor in ``weights`` to the module's dtype (a float16 model would round the blocks and
        the rescale); a tensor whose dtype changed is taken at its old dtype on the new device."""
        old = getattr(self, "_weights", None)
        if old is not None and isinstance(new, (tuple, list)) and len(new) == len(old):
            new = tuple(o.to(n.device) if isinstance(o, torch.Tensor) and isinstance(n, torch.Tensor)
                        and n.dtype != o.dtype else n for o, n in zip(old, new, strict=True))
        self._weights = new

    @classmethod
    def from_layer(cls, layer: BoftLayer, mode: str) -> BOFTAdapter:
        rule = tuple(getattr(layer, f) for f in RULE_FIELDS)
        return cls(set(layer.keys), (layer.blocks, layer.scale, float(layer.alpha), layer.kind, mode,
                                     layer.name, layer.token, rule))

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
            layer = boft_r_layer("LoRA file", x, parts, boft_r_kind(x))
        else:
            return None
        check_rotations(layer, "LoRA file")  # blocks too large for a rotation: refused by the loader node
        loaded_keys.update(k for k in layer.keys if not k.endswith(".alpha"))
        adapter = cls.from_layer(layer, "lycoris")
        adapter.loaded_keys = loaded_keys
        return adapter

    @property
    def _patches(self) -> dict:
        """This layer's prepared patches in :data:`CACHE` by (strength, mode, dtype)."""
        return CACHE.entries(self.weights[6])

    def layer(self) -> BoftLayer:
        blocks, scale, alpha, kind, _, name, token, rule = self.weights
        return BoftLayer(name=name, kind=kind, blocks=blocks, alpha=float(alpha), scale=scale, token=token,
                         **dict(zip(RULE_FIELDS, rule, strict=True)))

    def patch_for(self, strength: float, device, dtype):
        """The prepared rotation for this strength on ``device`` (from :data:`CACHE`)."""
        return CACHE.patch(self.weights[6], self.layer, strength, self.weights[4], dtype, device)

    @staticmethod
    def prepare_all(adapters: list[BOFTAdapter], strength: float, device, dtype=torch.float32,
                    budget: int | None = None) -> None:
        """Prepare every adapter's layer for (strength, dtype) in one batched pass on ``device``:
        equal-shaped layers share one Cayley solve and plan build (on a GPU, instead of dozens of
        small kernels per layer at patch time). ``budget``: bytes of ``device`` memory the cache
        may keep (the loader passes 5% of the model's weights). The loader nodes call it for a
        CUDA load device."""
        if budget is not None:
            CACHE.device_budget = int(budget)
        by_mode: dict[str, list[BOFTAdapter]] = {}
        for adapter in adapters:
            by_mode.setdefault(adapter.weights[4], []).append(adapter)
        for mode, todo in by_mode.items():
            CACHE.prepare_many([(a.weights[6], a.layer) for a in todo], strength, mode, dtype, device)

    def check_finite(self, weight, key, strength) -> None:
        """The finite-result guard (``boft_core.check_merge``) on ComfyUI's working copy, before it
        is written. Core's loaders give no strength before patching starts, so this is the first
        point that knows both; a refusal here fails the load, and the host then restores every
        weight it had already patched (``ModelPatcher.partially_load``: ``detach`` on an error)."""
        seen = (self.weights[6], strength, self.weights[4], weight.dtype)
        if seen in FINITE:
            return
        if check_merge(self.layer(), strength, self.weights[4], weight, str(key)) <= FREE_GAIN:
            _passed(seen)  # decided without reading the weight

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        strength = float(strength)  # hooks pass a 0-dim tensor, which would key the caches by identity
        if weight.shape not in self._fits:
            try:
                check_weight(self.layer(), weight.shape)
            except BoftError as e:
                raise BoftError(f"{key}: {e}") from None
            self._fits.add(weight.shape)
        self.check_finite(weight, key, strength)
        dtype = torch.promote_types(intermediate_dtype, torch.float32)  # fp16/bf16 copies: float32
        token, mode = self.weights[6], self.weights[4]
        # In place: for offset patches ComfyUI keeps the narrowed view's base, not our return value.
        if is_identity(function):
            kernel = CACHE.plan(token, self.layer, strength, mode, dtype, weight.device) if weight.is_cuda else None
            if kernel is not None and try_merge_into(kernel[0], weight, kernel[1]):
                return weight  # the CUDA kernel, in ComfyUI's working copy (any float dtype)
            patch = self.patch_for(strength, weight.device, dtype)
            if try_merge_into(patch, weight):
                return weight  # merged straight into ComfyUI's working copy: no weight-sized buffer
        else:
            patch = self.patch_for(strength, weight.device, dtype)
        new = apply(patch, weight)
        weight += function(new.sub_(weight))  # new - weight computed into new itself
        return weight


    # --- 0.28's bypass protocol (comfy/weight_adapter/bypass.py): the hook sets ``multiplier``
    # (the strength), ``is_conv`` and ``kw_dict`` on the adapter, then calls bypass_forward.

    def bypass_forward(self, org_forward, x, *args, **kwargs):
        """The layer's output with this BOFT at ``self.multiplier``, equal to the output with the
        merged weight; the module's weights are never written (float8/quantized stay as they are).
        Output side: the output channels are rotated (the bias kept as it is); input side on a
        linear layer: the input is rotated before the layer. Input side on a convolution (the
        rotation mixes kernel positions): the weight is merged on the fly in the working dtype."""
        module = _module_of(org_forward)
        strength = float(getattr(self, "multiplier", 1.0))
        weight = getattr(module, "weight", None)
        if weight is not None and weight.shape not in self._fits:
            try:
                check_weight(self.layer(), weight.shape)
            except BoftError as e:
                raise BoftError(f"bypass: {e}") from None
            self._fits.add(tuple(weight.shape))
        patch = self._bypass_patch(strength, x.device)
        is_conv = bool(getattr(self, "is_conv", False))
        if is_conv and patch.side == "in":
            return self._merged_conv(module, patch, x)
        bias = getattr(module, "bias", None)
        bias = bias if isinstance(bias, torch.Tensor) else None
        return bypass(patch, x, lambda inp: org_forward(inp, *args, **kwargs), bias, 1 if is_conv else -1)

    def _bypass_patch(self, strength: float, device):
        """The prepared rotation, held by this adapter while it is injected: a forward needs every
        layer's rotation on the device each time (as core holds a LoRA's weights there), and the
        shared cache's device budget would evict and re-copy them on every step. A new strength is
        checked (``guard.check_bypass``: finite, a bounded gain) before any forward uses it."""
        key = (strength, device)
        held = getattr(self, "_held", None)
        if held is None or held[0] != key:
            check_strength(strength, f"layer {self.weights[5]}: bypass strength")  # NaN: refused before preparing
            patch = self.patch_for(strength, device, torch.float32)
            self.check_bypass(patch, strength)
            held = self._held = (key, patch)
        return held[1]

    def check_bypass(self, patch, strength) -> None:
        """The bypass guard (``boft_core.guard.check_bypass``) on this layer's prepared ``patch``, once
        per (layer, strength, mode) in this process; a refusal fails the forward before it computes."""
        seen = (self.weights[6], strength, self.weights[4], "bypass")
        if seen in FINITE:
            return
        check_bypass(self.layer(), patch, strength, self.weights[4])
        _passed(seen)

    def _merged_conv(self, module, patch, x):
        """An input-side BOFT on a convolution: the weight merged on the fly in the working dtype
        (what the host casts it to for this forward: dequantized, patched, offloaded as it does)."""
        import comfy.ops

        weight, bias = comfy.ops.cast_bias_weight(module, x)
        merged = apply(patch, weight)
        return module._conv_forward(x, merged, bias)

    def g(self, y):
        """``scale * B(s) y`` on the channels (the bias rotated too, as LyCORIS's bypass does); the
        hook calls :meth:`bypass_forward` instead, which equals the merge. Output side only."""
        patch = self._bypass_patch(float(getattr(self, "multiplier", 1.0)), y.device)
        if patch.side != "out":
            raise BoftError(f"layer {self.weights[5]}: an input-side BOFT has no output transform g().")
        # a copy to rotate: bypass() writes over what ``forward`` returns, and ``y`` is the caller's
        return bypass(patch, y, torch.clone, None, 1 if getattr(self, "is_conv", False) else -1)


def _module_of(org_forward):
    """The module whose forward the hook wraps: ``org_forward`` is its bound ``forward``, or
    another bypass hook's (``BypassForwardHook._bypass_forward``, whose ``module`` it is)."""
    owner = getattr(org_forward, "__self__", None)
    return getattr(owner, "module", owner) if not isinstance(owner, torch.nn.Module) else owner


_IDENTITY = (lambda a: a).__code__


def is_identity(function) -> bool:
    """Whether ``function`` is ``lambda a: a`` in any spelling: then ``weight + function(new -
    weight)`` is ``new`` and the merge may be written in place.

    Why bytecode and not a sturdier contract: the host gives none. ``comfy.lora.calculate_weight``
    (0.3.75 and 0.28 alike) reads a patch's function as ``function = p[4]`` and, when that is None,
    replaces it with a fresh ``function = lambda a: a`` before calling an adapter; the None never
    reaches us, the lambda is a new object per call and nothing marks it. Comparing its code is
    the only test that needs no change in ComfyUI; a host that spells the identity differently
    only loses the in-place path (the general path below is exact for any function)."""
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
        weight += function(bias_delta(weight, trained, strength, key))
        return weight
