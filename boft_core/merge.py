"""Merging a BOFT layer into a weight, in three strength modes, plus the forward-time form.

Modes (``s`` = strength):

* ``lycoris``: what LyCORIS's ``merge_to(s)`` computes: every stage's blocks blended
  ``s*R + (1-s)*I``, rescale applied at every ``s`` (so ``s = 0`` gives ``rescale * W``).
  For PEFT/kohya files: the same per-stage blend in their convention, ``boft_s`` always applied.
* ``linear``: ``W + s*(W'(1) - W)``: LyCORIS's "precise" merge and kohya's own strength.
* ``orthogonal``: every block is ``cayley(s*Q)``, a rotation for every ``s`` (``s = -1`` is the
  inverse rotation); the scale is ``1 + s*(scale - 1)``; ``s = 0`` gives ``W`` exactly.

All modes agree at ``s = 1``. Computation runs in float32 (float64 for float64 weights) and the
result has the weight's own dtype; float16/bfloat16 weights merged in place (:func:`try_merge_into`) are
computed in float32 a column slice (or a kernel tile) at a time and rounded once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from . import fused
from .butterfly import cayley, neumann
from .fast import Butterfly
from .formats import PACKED, TRANSPOSED, BoftError, BoftLayer
from .modes import MODES


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else BoftError."""
    if mode not in MODES:
        raise BoftError(f"unknown strength mode {mode!r}; expected one of {', '.join(MODES)}.")
    return mode


def batches_on(device) -> bool:
    """Whether preparing many layers at once (:func:`prepare_many`) pays on ``device``: where the
    Triton kernel runs (a CUDA device with Triton), one batched Cayley solve and plan build
    replace dozens of small kernels per layer. The loader nodes ask this before batching."""
    return device is not None and torch.device(device).type == "cuda" and fused.available()


def kernel_merges(patch: Patch) -> bool:
    """Whether the Triton kernel's in-place plan (:meth:`Patch.fused`) merges ``patch``: on a
    device where it runs (:func:`batches_on`), output side (rows of the weight), float32
    rotations and no linear blend. Otherwise :func:`try_merge_into` uses :class:`fast.Butterfly`."""
    return (patch.side == "out" and patch.blend is None and patch.rotations.dtype == torch.float32
            and batches_on(patch.rotations.device))


def generators(layer: BoftLayer, dtype=torch.float32, parts: int = 1) -> torch.Tensor:
    """Skew-symmetric ``Q`` (m, nb, b, b) with ``R = rotation(Q)`` (:func:`rotate`) in ``layer.layout``.

    LyCORIS BOFT: ``Q = A - Aᵀ``; diag-OFT, kohya and ComfyUI OFT apply ``Rᵀ = cayley(-Q)``;
    PEFT/kohya BOFT: ``(I - S)(I + S)^-1`` with ``S = (A - Aᵀ)/2`` is ``cayley(-S)``; OFTv2
    (``A`` the unpacked upper triangles): Neumann ``R(Q)``, or PEFT's exact ``(I - Q)(I + Q)^-1 =
    cayley(-Q)``, after coft's per-block clamp. The ``.alpha`` constraint rescales the whole
    tensor to Frobenius norm ``alpha * out_dim`` (``comfyui`` rule: ``alpha``) when it is larger.
    """
    a = layer.blocks.to(dtype)
    q = a - a.transpose(-1, -2)
    if layer.q_scale != 1:
        q = q * layer.q_scale
    if layer.kind in TRANSPOSED or (layer.kind in PACKED and not layer.neumann):
        q = -q
    elif layer.kind in ("peft-boft", "kohya-boft"):
        q = q * -0.5
    if layer.coft_norm > 0:  # PEFT's _project_batch: a block beyond the norm is scaled onto it
        norm = torch.linalg.matrix_norm(q)[..., None, None]
        q = torch.where(norm > layer.coft_norm, q * (layer.coft_norm / norm), q)
    threshold = layer.alpha * (layer.dim / parts if layer.constraint == "lycoris" else 1.0)
    if threshold > 0:  # per part (layers stacked along the block axis), without a device sync
        split = q.unflatten(1, (parts, -1))
        norm = torch.linalg.vector_norm(split, dim=(0, 2, 3, 4)) + 1e-8
        q = (split * (threshold / norm).clamp(max=1.0).view(1, parts, 1, 1, 1)).flatten(1, 2)
    return q


def rotate(q: torch.Tensor, layer: BoftLayer) -> torch.Tensor:
    """The blocks ``R(q)``: Cayley ``(I + Q)(I - Q)^-1``, or for OFTv2 the layer's Neumann series."""
    if layer.neumann:
        return neumann(q, layer.neumann, layer.neumann_legacy)
    return cayley(q)


def rule_of(layer: BoftLayer) -> tuple:
    """What besides the blocks' shape decides how a layer's rotations are computed."""
    return (layer.kind, layer.alpha, layer.constraint, layer.neumann, layer.neumann_legacy, layer.coft_norm,
            layer.q_scale)


def fit(layer: BoftLayer, shape) -> BoftLayer:
    """``layer`` for a target weight of ``shape``: OFTv2's shared block (block_share) repeated over
    the weight's input features, and a kohya oft_v2 / OneTrainer conv's untransposed ``BD(R)``
    (``W BD(R) = W BD(Rᵀ)ᵀ``; transposing ``A`` negates ``Q``, and ``R(-Q) = R(Q)ᵀ``). Other layers
    are returned as they are. The copy's cache token derives from the original's."""
    shape = tuple(shape)
    changes, tags = {}, []
    if layer.shared:
        cols = math.prod(shape[1:]) if len(shape) >= 2 else 0
        b = layer.block_size
        if cols == 0 or cols % b:
            raise BoftError(f"layer {layer.name}: its shared block (block_share) of size {b} does not divide "
                            f"the weight's {cols} input features (weight shape {shape}).")
        changes.update(blocks=layer.blocks.expand(1, cols // b, b, b), shared=False)
        tags.append(f"x{cols // b}")
    if layer.conv_untransposed and len(shape) > 2:
        changes.update(blocks=changes.get("blocks", layer.blocks).transpose(-1, -2), conv_untransposed=False)
        tags.append("conv")
    if not changes:
        return layer
    return replace(layer, **changes, token=f"{layer.token}:{'/'.join(tags)}")


@dataclass
class Patch:
    """One layer ready to apply at a fixed strength and mode; cache it, it holds no weight."""

    name: str
    side: str  # "out" or "in", see BoftLayer.side
    layout: str
    rotations: torch.Tensor  # (m, nb, b, b) orthogonal blocks, strength already folded in
    scale: torch.Tensor | None  # (out,)
    blend: float | None  # linear mode: W + blend * (W' - W); None otherwise
    bias: torch.Tensor | None = None  # PEFT trained bias, blended by strength
    _plans: dict = field(default_factory=dict, repr=False, compare=False)

    def kept(self, key, build):
        """``build()``, made on first use and kept with the patch under ``key``."""
        value = self._plans.get(key)
        if value is None:
            value = self._plans[key] = build()
        return value

    def butterfly(self, transpose: bool = False) -> Butterfly:
        """``B`` (or ``Bᵀ``) as dense blocks, built on first use and kept with the patch."""
        return self.kept(transpose, lambda: Butterfly(self.rotations, self.layout, transpose))

    def fused(self) -> fused.FusedButterfly:
        """``scale * B`` as an in-place plan (rows never move; Triton kernels on a GPU; the scale
        folded into its last blocks), kept likewise. Output-side patches only."""
        return self.kept("fused", lambda: fused.FusedButterfly(self.rotations, self.layout, scale=self.scale))


def prepare(layer: BoftLayer, strength: float = 1.0, mode: str = "lycoris",
            dtype=torch.float32) -> Patch:
    """Rotations and scale for ``layer`` at ``strength`` in ``mode`` (see the module docstring)."""
    rotations, blend = _rotations(generators(layer, dtype), float(strength), mode, layer)
    return _patch(layer, rotations, blend, float(strength), mode, dtype)


def prepare_many(layers: list[BoftLayer], strength: float = 1.0, mode: str = "lycoris",
                 dtype=torch.float32, device=None) -> list[Patch]:
    """:func:`prepare` for many layers at once, on ``device``: layers of one kind and block shape
    share one batched Cayley solve and, where the Triton kernel runs, one in-place plan build
    (each Patch keeps its slice). On a GPU this replaces dozens of small kernels per layer by a
    few per group; the result equals preparing each layer alone."""
    strength = float(strength)
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault((rule_of(layer), tuple(layer.blocks.shape)), []).append(i)
    patches: list[Patch | None] = [None] * len(layers)
    for members in groups.values():
        first = layers[members[0]]
        blocks = torch.cat([layers[i].blocks for i in members], dim=1).to(device)  # one copy
        stacked = replace(first, blocks=blocks, scale=None, bias=None)
        rotations, blend = _rotations(generators(stacked, dtype, parts=len(members)), strength, mode, first)
        nb = first.blocks.shape[1]
        mine = [_patch(layers[i], rotations[:, j * nb:(j + 1) * nb], blend, strength, mode, dtype)
                for j, i in enumerate(members)]
        if len(members) > 1 and kernel_merges(mine[0]):
            n = nb * first.blocks.shape[2]
            scale = None
            if any(p.scale is not None for p in mine):
                scale = torch.cat([torch.ones(n, dtype=dtype, device=rotations.device) if p.scale is None else p.scale
                                   for p in mine])
            plans = fused.FusedButterfly(rotations, first.layout, scale=scale).split(len(members))
            for patch, plan in zip(mine, plans, strict=True):
                patch.kept("fused", lambda plan=plan: plan)
        for i, patch in zip(members, mine, strict=True):
            patches[i] = patch
    return patches


def _rotations(q: torch.Tensor, strength: float, mode: str, layer: BoftLayer) -> tuple[torch.Tensor, float | None]:
    """The blocks for generators ``q`` at ``strength`` in ``mode`` (orthogonal: ``R(s Q)``, for a
    Neumann-parameterised ``R`` too), and the blend."""
    check_mode(mode)
    if mode == "orthogonal":
        return rotate(q * strength, layer), None
    rotations = rotate(q, layer)
    if mode == "linear":
        return rotations, strength
    if strength != 1:
        eye = torch.eye(rotations.shape[-1], dtype=rotations.dtype, device=rotations.device)
        rotations = strength * rotations + (1 - strength) * eye
    return rotations, None


def _patch(layer: BoftLayer, rotations, blend, strength: float, mode: str, dtype) -> Patch:
    device = rotations.device
    scale = None if layer.scale is None else layer.scale.to(device, dtype)
    if scale is not None and mode == "orthogonal":
        scale = 1 + strength * (scale - 1)
    bias = None if layer.bias is None else layer.bias.to(device, dtype)
    return Patch(layer.name, layer.side, layer.layout, rotations, scale, blend, bias)


def _check(patch: Patch, shape) -> None:
    _check_fit(patch.name, patch.side, patch.rotations.shape[1] * patch.rotations.shape[2],
               patch.scale, shape)


def _check_fit(name: str, side: str, n: int, scale: torch.Tensor | None, shape) -> None:
    """BoftError unless a butterfly of ``n`` rows on ``side`` (and ``scale``) fits a weight of
    ``shape``: the one check behind :func:`check_weight` and every merge."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise BoftError(f"layer {name}: the target has shape {shape}, not a linear or conv weight.")
    rows = shape[0]
    cols = 1
    for d in shape[1:]:
        cols *= d
    dim, what = (rows, "output channels") if side == "out" else (cols, "input features")
    if dim != n or (scale is not None and scale.numel() != rows):
        more = "" if scale is None else f" and a scale of {scale.numel()} channels"
        raise BoftError(
            f"layer {name}: the weight has shape {shape} ({dim} {what}), but the adapter's "
            f"butterfly has {n} rows{more}. The adapter was made for another model."
        )


def _rotate(patch: Patch, flat: torch.Tensor) -> torch.Tensor:
    """``scale * B W`` (output side) or ``scale * W Bᵀ`` (input side) on a 2-D weight."""
    if patch.side == "out":
        new = patch.butterfly().apply(flat)
    else:
        new = patch.butterfly().apply(flat.t()).t()
    if patch.scale is not None:
        new.mul_(patch.scale.unsqueeze(1))  # new is ours: no second weight-sized buffer
    return new


def apply(patch: Patch, weight: torch.Tensor) -> torch.Tensor:
    """The merged weight ``W'`` for any real weight (linear 2-D, conv 3-D/4-D); same dtype."""
    if patch.blend == 0:
        return weight.clone()
    compute = torch.promote_types(weight.dtype, patch.rotations.dtype)
    patch = _in_dtype(patch, compute)
    _check(patch, weight.shape)
    flat = weight.to(compute).reshape(weight.shape[0], -1)
    new = _rotate(patch, flat)
    if patch.blend is not None:
        new = flat + patch.blend * (new - flat)
    return new.reshape(weight.shape).to(weight.dtype)


def try_merge_into(patch: Patch, weight: torch.Tensor, plan: fused.FusedButterfly | None = None,
                   source: torch.Tensor | None = None) -> bool:
    """The in-place merge and its engine chooser: ``W'`` written into ``weight`` itself when it
    can be, returning True: a weight that is a view of its own
    rows (ComfyUI's working copy, or a row slice of it) in the patch's dtype, or float16/bfloat16
    with a float32 patch (computed in float32, rounded once), and a mode without a blend.
    Returns False, leaving ``weight`` untouched, when it cannot; then use :func:`apply`. Needs
    no weight-sized buffer. ``plan``: the patch's in-place plan (:meth:`Patch.fused`, scale
    folded) already on ``weight``'s device, e.g. from a cache; the patch's tensors may then live
    elsewhere. ``source``: merge this tensor instead (``weight``'s shape, dtype and device, its
    rows contiguous lines too) and write ``W'`` of it into ``weight``, ``source`` left alone.
    """
    if patch.blend is not None or weight.ndim < 2 or not _computes(weight.dtype, patch.rotations.dtype):
        return False
    flat = fused.contiguous_rows(weight)
    src = flat if source is None else fused.contiguous_rows(source)
    if flat is None or src is None or src.shape != flat.shape or src.dtype != flat.dtype:
        return False
    _check(patch, weight.shape)
    rows = flat if patch.side == "out" else flat.t()  # the butterfly mixes these rows
    if patch.side == "out" and fused.usable(rows):
        if plan is None and weight.device == patch.rotations.device:
            plan = patch.fused()
        if plan is not None and plan.storage.device == weight.device:
            if src is not flat:
                flat.copy_(src)
            plan.apply_triton_(rows)  # GPU: one kernel per run, scale folded in, no weight-sized buffer
            return True
    if weight.device != patch.rotations.device:
        return False
    scale = patch.scale
    patch.butterfly().apply(src if patch.side == "out" else src.t(), out=rows,
                            row_scale=scale if patch.side == "out" else None,
                            col_scale=scale if patch.side == "in" else None)
    return True


def _computes(weight_dtype, patch_dtype) -> bool:
    """Whether a patch in ``patch_dtype`` merges in place into a weight of ``weight_dtype``."""
    return weight_dtype == patch_dtype or (
        weight_dtype in (torch.float16, torch.bfloat16) and patch_dtype == torch.float32)


def merge_weight(weight: torch.Tensor, layer: BoftLayer, strength: float = 1.0,
                 mode: str = "lycoris") -> torch.Tensor:
    """``W'`` for ``layer`` at ``strength`` in ``mode``; see :func:`prepare` and :func:`apply`."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return apply(prepare(fit(layer, weight.shape), strength, mode, dtype=dtype), weight)


def _in_dtype(patch: Patch, dtype) -> Patch:
    """``patch`` with its tensors in ``dtype``; the cast copy (and so its plans) is kept with it."""
    if patch.rotations.dtype == dtype:
        return patch
    def to(t):
        return None if t is None else t.to(dtype)
    return patch.kept(("dtype", dtype), lambda: Patch(
        patch.name, patch.side, patch.layout, to(patch.rotations), to(patch.scale), patch.blend, to(patch.bias)))


def merge_bias(bias: torch.Tensor | None, patch: Patch, strength: float) -> torch.Tensor | None:
    """PEFT's trained bias replaces the layer's at s = 1; ``b + s*(b_trained - b)`` otherwise."""
    if patch.bias is None:
        return bias
    if bias is None:
        return bias_delta(None, patch.bias, strength, f"layer {patch.name}")
    b = bias.to(patch.bias.dtype)
    return (b + bias_delta(b, patch.bias, strength, f"layer {patch.name}")).to(bias.dtype)


def bias_delta(bias: torch.Tensor | None, trained: torch.Tensor, strength: float, where: str) -> torch.Tensor:
    """``s * (b_trained - b)`` (``b`` None: zero), in ``trained``'s dtype: what the blend of PEFT's
    trained bias adds to the layer's; BoftError naming ``where`` if the shapes differ."""
    if bias is None:
        return trained * strength
    if bias.shape != trained.shape:
        raise BoftError(f"{where}: the trained bias has shape {tuple(trained.shape)}, the layer's "
                        f"{tuple(bias.shape)}.")
    return strength * (trained - bias.to(trained.dtype))


def _rotate_channels(patch: Patch, y: torch.Tensor, channel_dim: int, transpose: bool = False,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * B y`` (``Bᵀ``, no scale by default) on the channel axis of ``y`` (any shape), in
    ``patch``'s dtype. Channels last (linear layers): the butterfly reads a transposed view and
    writes channels-last memory, so no transpose is copied either way."""
    if channel_dim in (-1, y.ndim - 1):
        flat = y.reshape(-1, y.shape[-1]).t()
        return patch.butterfly(transpose).apply(flat, row_scale=scale).t().reshape(y.shape)
    moved = y.movedim(channel_dim, 0)
    out = patch.butterfly(transpose).apply(moved.reshape(moved.shape[0], -1), row_scale=scale)
    return out.reshape(moved.shape).movedim(0, channel_dim)


def _channel_view(t: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """A per-channel vector ``t`` (n,) shaped to broadcast along ``channel_dim`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[channel_dim] = -1
    return t.reshape(shape)


# Float32 scratch between a bypass kernel's runs, in elements (256 MB): a whole activation of
# an SDXL or Flux layer at once; larger ones (video) go a column slice at a time.
BYPASS_SCRATCH = 1 << 26


def bypass(patch: Patch, x: torch.Tensor, forward, bias: torch.Tensor | None = None,
           channel_dim: int = -1) -> torch.Tensor:
    """The output of the layer ``forward`` with ``patch`` applied at run time, the weight untouched.

    ``forward(x) = W x + bias`` is the layer as the host runs it (any dtype: float16, float8
    weights, offloading), returning a new tensor; ``bias`` the layer's bias (n,) or None;
    ``channel_dim`` the channel axis of ``x`` and of the output (-1 for a linear layer, 1 for a
    convolution). Output side (LyCORIS): ``scale * B (f(x) - bias) + bias``; input side
    (PEFT/kohya, linear layers only): ``scale * f(Bᵀ x) + (1 - scale) * bias``; the linear mode
    blends ``f(x) + blend (new - f(x))``. With the layer's ``bias`` this equals the output of the
    layer with the merged weight (:func:`apply`) and the bias unchanged; ``bias=None`` treats
    ``f`` as linear (then an output-side bias is rotated too, as LyCORIS's own ``bypass_forward``
    does). Rotations run in float32 (the patch's dtype, at least) whatever the activations' dtype;
    the result has ``f``'s dtype.

    Engines: on a CUDA device with Triton, the rotation is the in-place plan's kernel
    (:meth:`fused.FusedButterfly.apply_channels`: one launch per run, the bias subtracted and
    added inside it, ``f(x)`` rotated where it lies); elsewhere (CPU, the linear mode, a float64
    patch) dense blocks in torch.
    """
    compute = torch.promote_types(torch.promote_types(x.dtype, patch.rotations.dtype), torch.float32)
    patch = _in_dtype(patch, compute)
    if patch.side != "out" and channel_dim != -1 and channel_dim != x.ndim - 1:
        raise BoftError(
            f"layer {patch.name}: an input-side (PEFT/kohya) BOFT on a convolution mixes kernel "
            "positions and has no forward-time form; merge it into the weight instead."
        )
    kernel = _bypass_kernel(patch, x)
    if patch.side == "out":
        base = forward(x)
        if kernel is not None:
            b = bias
            if b is not None and (b.device != base.device or b.dtype not in fused.KERNEL_DTYPES or b.ndim != 1):
                b = b.to(base.device, b.dtype if b.dtype in fused.KERNEL_DTYPES else torch.float32).reshape(-1)
            if kernel.apply_channels(base, channel_dim, sub=b, add=b, scratch_elems=BYPASS_SCRATCH) is not None:
                return base  # S B (f(x) - b) + b, written over f(x) in its own dtype
        b = None if bias is None else bias.to(x.device, compute)
        # f(x) - bias in the compute dtype (one kernel: the subtraction promotes)
        y = base.to(compute) if b is None else torch.sub(base, _channel_view(b, base.ndim, channel_dim))
        new = _rotate_channels(patch, y, channel_dim, scale=patch.scale)
        if b is not None:
            new += _channel_view(b, new.ndim, channel_dim)
    else:
        rotated = None
        if kernel is not None:  # Bᵀ x in x's dtype, computed in float32 by the kernel
            rotated = kernel.apply_channels(x, -1, out=torch.empty_like(x), scratch_elems=BYPASS_SCRATCH)
        if rotated is None:
            rotated = _rotate_channels(patch, x.to(compute), -1, transpose=True).to(x.dtype)  # x as row vectors
        new = forward(rotated)
        if patch.scale is None and patch.blend is None:
            return new
        new = new.to(compute)
        if patch.scale is not None:
            new = new * patch.scale
            if bias is not None:
                new = new + (1 - patch.scale) * bias.to(x.device, compute)
        base = None
    if patch.blend is not None:
        base = forward(x) if base is None else base
        y = base.to(compute)
        new = y + patch.blend * (new - y)
    out_dtype = base.dtype if base is not None else x.dtype
    return new.to(out_dtype)


def _bypass_kernel(patch: Patch, x: torch.Tensor) -> fused.FusedButterfly | None:
    """The in-place plan that rotates activations for :func:`bypass` (output side ``S B``, input
    side ``Bᵀ``), kept with the patch; None where the torch path runs (no Triton kernel on
    ``x``'s device, the linear mode's blend, rotations not float32)."""
    if (patch.blend is not None or patch.rotations.dtype != torch.float32 or not x.is_cuda
            or patch.rotations.device != x.device or not fused.available()):
        return None
    if patch.side == "out":
        return patch.fused()
    return patch.kept(("fused", "transposed"), lambda: fused.FusedButterfly(patch.rotations, patch.layout,
                                                                           transpose=True))


def bypass_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   patch: Patch, **conv_args) -> torch.Tensor:
    """:func:`bypass` for a plain weight: the forward-time form LyCORIS and PEFT define.

    Output side (LyCORIS): ``y = scale * B (W x + bias)``; like LyCORIS's ``bypass_forward`` it
    rotates the bias too. Input side (PEFT/kohya, linear layers): ``y = scale * W (Bᵀ x) + bias``.
    ``weight.ndim > 2`` means a convolution (``conv_args`` go to it). Equal to the merge when
    ``bias`` is None.
    """
    compute = torch.promote_types(x.dtype, patch.rotations.dtype)
    x, weight = x.to(compute), weight.to(compute)
    bias = None if bias is None else bias.to(compute)
    _check(patch, weight.shape)
    if weight.ndim > 2:
        op = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.ndim]
        def forward(inp):
            return op(inp, weight, bias, **conv_args)
    else:
        def forward(inp):
            return F.linear(inp, weight, bias)
    channel_dim = 1 if weight.ndim > 2 else -1
    return bypass(patch, x, forward, None if patch.side == "out" else bias, channel_dim)


def check_weight(layer: BoftLayer, shape) -> None:
    """BoftError unless ``layer`` fits a weight of ``shape``; cheap, for validating before patching."""
    if len(tuple(shape)) >= 2:
        layer = fit(layer, shape)
    _check_fit(layer.name, layer.side, layer.dim, layer.scale, shape)
