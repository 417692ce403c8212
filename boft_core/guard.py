"""The checks between untrusted input and a model's weights: strength, rotations, merged values.

* :func:`check_strength`: a strength is a finite real number (NaN passes ComfyUI's min/max check).
* :func:`load`: :func:`formats.read_file` plus :func:`check_rotations` on every layer, so a file
  whose rotations cannot be computed (blocks so large that the Cayley solve fails or loses
  orthogonality) is refused when it is read.
* :func:`check_bypass`: the same guard for bypass mode, where no weight is written and each
  layer's output is rotated at run time (``scale * B(s) (f(x) - b) + b``, or ``f(Bᵀ x)`` scaled): a
  layer prepared at a strength must be finite, and its output at most ``AMPLIFY_MAX`` times the
  layer's own (the merge's :func:`gain`), checked once per strength when the layer is prepared.
* :func:`check_merge`: the one finite-result guard, run before any weight is written. It refuses a
  layer, strength and mode whose merged weight could be non-finite in the weight's working dtype
  (or over a million times the layer's own), from the bound ``|W'_ij| <= gain * max line norm
  of W`` (:func:`gain`), computing the merge only when the bound cannot decide: output side
  ``W' = diag(s) B W`` gives ``|W'_ij| <= |s_i| ‖B‖₂ ‖W_:j‖₂``; input side ``W' = diag(s) W Bᵀ``
  gives ``|W'_ij| <= |s_i| ‖W_i:‖₂ ‖B‖₂``; ``‖B‖₂ <= prod_k max_t ‖R_k,t‖₂`` over the stages.

``‖R_k,t‖₂`` is known without computing the rotation when a block's generator ``Q`` is moderate
(``‖Q‖_F <= SAFE_GENERATOR``, where float32's Cayley solve is accurate): a rotation has norm 1,
and LyCORIS's blend ``s R + (1 - s) I`` of a rotation by angles up to ``θ = 2 atan ‖Q‖₂`` has
norm ``sqrt(1 + 2 s (s - 1)(1 - cos θ))`` for ``s`` outside [0, 1]. Larger generators (broken or
adversarial files only) are prepared and measured (:func:`block_norm_bound`). Cheap: one pass
over the blocks; the weight is read only when the gain exceeds ``FREE_GAIN``.
"""

from __future__ import annotations

import math

import torch

from .formats import BoftError, BoftFile, BoftLayer, all_finite, read_file
from .merge import MODES, Patch, merge_weight, prepare

SAFE_GENERATOR = 100.0  # ‖Q‖_F of a block up to which the float32 Cayley solve is accurate to ~1e-4
ROUNDING = 1.01  # slack per stage for float32 rounding in the bounds computed without the rotation
ROTATION_TOLERANCE = 2.0  # at strength 1 every stage is a rotation (norm 1): a bound above this is garbage
FREE_GAIN = 64.0  # gains up to this pass without reading the weight (its lines' norms stay << dtype max / 128)
AMPLIFY_MAX = 1e6  # a merged weight this many times the layer's own is no adapter: the model would overflow


def check_strength(value, what: str = "strength") -> float:
    """``value`` as a float; BoftError unless it is a finite real number."""
    try:
        strength = float(value)
    except (TypeError, ValueError, OverflowError):
        raise BoftError(f"{what} must be a number, got {str(value)[:40]!r}.") from None
    if isinstance(value, bool) or not math.isfinite(strength):
        raise BoftError(f"{what} must be a finite number, got {str(value)[:40]}.")
    return strength


def load(path: str) -> BoftFile:
    """Read a BOFT file or PEFT adapter folder (:func:`formats.read_file`) and refuse it unless every
    layer's rotation can be computed (:func:`check_rotations`)."""
    boft_file = read_file(path)
    for layer in boft_file.layers.values():
        check_rotations(layer, boft_file.path)
    return boft_file


def check_rotations(layer: BoftLayer, where: str = "") -> None:
    """BoftError unless ``layer``'s butterfly at strength 1 is a product of rotations as computed
    (finite, every stage of norm about 1)."""
    norms = stage_norms(layer, 1.0, "lycoris", where)
    if max(norms) > ROTATION_TOLERANCE and layer.neumann:
        raise BoftError(
            f"{_prefix(where)}layer {layer.name}: its blocks (largest |value| {_largest(layer.blocks):.3g}) "
            f"are too large for a {layer.neumann}-term Cayley-Neumann series: it gives blocks of norm up to "
            f"{max(norms):.3g}, far from a rotation (norm 1). The file is broken."
        )
    if max(norms) > ROTATION_TOLERANCE:
        raise BoftError(
            f"{_prefix(where)}layer {layer.name}: its blocks (largest |value| "
            f"{_largest(layer.blocks):.3g}) are too large to compute a rotation from: the Cayley "
            f"solve gives stages of norm up to {max(norms):.3g} instead of 1. The file is broken."
        )


def check_merge(layer: BoftLayer, strength: float, mode: str, weight: torch.Tensor,
                where: str = "") -> float:
    """BoftError (naming the layer) unless merging ``layer`` at ``strength`` in ``mode`` into
    ``weight`` gives finite values in the weight's working dtype (:func:`working_limit`) that are
    at most ``AMPLIFY_MAX`` times the weight's largest line norm (a file with finite but huge
    values, e.g. a rescale of 3e38, would otherwise make the model compute inf: a black image).

    Three steps, each only when the one before cannot decide: a gain (:func:`gain`, from the
    file alone) up to ``FREE_GAIN`` passes; then ``gain * max line norm of weight`` within both
    limits passes; then the merge itself is computed (float32, float64 for float64 weights) and
    its peak must be within them. ``weight``: the tensor the merge will change (a view or a row
    slice is fine; never written). Run it before writing any weight. Returns the gain.
    """
    s = check_strength(strength)
    g = gain(layer, s, mode, where)
    limit = working_limit(weight.dtype)
    head = f"{_prefix(where)}layer {layer.name}: at strength {s:g} ({mode})"
    if not math.isfinite(g):
        raise BoftError(f"{head} its merged weight would not be finite ({_values(layer)}).")
    if g > FREE_GAIN:
        if weight.is_meta:  # no values to read (a model not materialized): the gain alone decides
            if not g < min(limit / 2, AMPLIFY_MAX):
                raise BoftError(f"{head} its merged weight could be up to {g:.3g} times the layer's own: "
                                f"{_values(layer)}. Use a smaller strength, or a file with sane values.")
            return g
        lines = _line_norm(layer, weight)
        if not (g * lines < limit / 2 and g < AMPLIFY_MAX):
            # the bound is loose (every stage at its worst): only such layers pay for an exact merge,
            # on the CPU, where the layer's tensors are
            work = torch.float64 if weight.dtype == torch.float64 else torch.float32
            peak = _largest(merge_weight(weight.detach().to("cpu", work), layer, s, mode))
            if not peak <= limit:  # NaN too
                what = f"reaches {peak:.3g}" if math.isfinite(peak) else "is not finite"
                raise BoftError(
                    f"{head} its merged weight {what}, beyond what {str(weight.dtype).replace('torch.', '')} "
                    f"holds ({limit:.3g}): {_values(layer)}. Use a smaller strength, or a file with sane values."
                )
            if peak > AMPLIFY_MAX * lines:
                raise BoftError(
                    f"{head} its merged weight reaches {peak:.3g}, {peak / lines:.3g} times the "
                    f"layer's own weights: {_values(layer)}. The model would compute inf or NaN (a "
                    "black image). Use a smaller strength, or a file with sane values."
                )
    if layer.bias is not None and not abs(s) * _largest(layer.bias) < min(limit / 4, AMPLIFY_MAX):
        raise BoftError(f"{head} its merged bias would be out of range (bias values up to "
                        f"{_largest(layer.bias):.3g}).")
    return g


def check_bypass(layer: BoftLayer, patch: Patch, strength, mode: str, where: str = "") -> float:
    """BoftError (naming the layer and the values) unless ``patch``, ``layer`` prepared at ``strength``
    in ``mode`` for bypass mode, keeps every output finite: the strength a finite number, the
    prepared rotation blocks and scale finite, and the output at most ``AMPLIFY_MAX`` times the
    layer's own. The output of a bypassed layer is its merged weight's, so the bound is the merge's
    gain (:func:`gain`, from the file alone: cheap for every sane layer); bypass reads no weight and
    the activations are not known ahead of a forward, so the gain alone decides. Run it once per
    strength, before the first forward uses the patch. Returns the gain."""
    s = check_strength(strength, f"{_prefix(where)}layer {layer.name}: strength")
    head = f"{_prefix(where)}layer {layer.name}: at strength {s:g} ({mode}) in bypass mode"
    parts = [patch.rotations] + ([patch.scale] if patch.scale is not None else [])
    if not all(all_finite(t) for t in parts):
        raise BoftError(f"{head} its prepared rotation is not finite ({_values(layer)}).")
    g = gain(layer, s, mode, where)
    if not g < AMPLIFY_MAX:  # NaN too
        raise BoftError(f"{head} its output could be up to {g:.3g} times the layer's own: {_values(layer)}. "
                        "The model would compute inf or NaN (a black image). Use a smaller strength, "
                        "or a file with sane values.")
    return g


def gain(layer: BoftLayer, strength: float, mode: str, where: str = "") -> float:
    """An upper bound of ``max_ij |W'_ij| / ‖line of W‖₂`` for ``layer`` at ``strength`` in ``mode``.

    ``max|scale(s)| * prod_k max(1, ‖M_k‖₂)`` (the factors of 1 also bound the partial products
    the merge computes); ``linear``: ``W + s (W'(1) - W)`` adds ``|1 - s| + |s| *`` that. inf when
    a bound overflows; BoftError when the rotation cannot be computed.
    """
    s = float(strength)
    if mode not in MODES:
        raise BoftError(f"unknown strength mode {mode!r}; expected one of {', '.join(MODES)}.")
    rotation = math.prod(max(1.0, n) for n in stage_norms(layer, s, mode, where))
    if layer.scale is None:
        scale = 1.0
    else:
        values = layer.scale.to(torch.float64)
        scale = float((1 + s * (values - 1) if mode == "orthogonal" else values).abs().max())
    g = scale * rotation
    if mode == "linear":
        g = max(g, abs(1 - s) + abs(s) * g)
    return g


def stage_norms(layer: BoftLayer, strength: float, mode: str, where: str = "") -> list[float]:
    """Upper bounds of each stage's largest block spectral norm at ``strength`` in ``mode``."""
    s = float(strength)
    q = generator_norm(layer)
    # a Neumann-parameterised R (OFTv2) is not a rotation: always measured
    if not layer.neumann and (abs(s) * q if mode == "orthogonal" else q) <= SAFE_GENERATOR:
        if mode != "lycoris" or 0 <= s <= 1:
            return [ROUNDING] * layer.m  # a rotation, or a convex blend of one with I
        # s R + (1 - s) I: the bound grows with the rotation angle, so here each stage's largest
        # ‖A - Aᵀ‖_F is worth its cost (a blend of the generators' norms at most SAFE_GENERATOR)
        a = layer.blocks.to(torch.float32)
        per_stage = torch.linalg.matrix_norm(a - a.transpose(-1, -2)).amax(dim=1).to(torch.float64)
        per_stage = per_stage * _generator_factor(layer)
        return [math.sqrt(1 + 2 * s * (s - 1) * (1 - math.cos(2 * math.atan(float(qk))))) * ROUNDING
                for qk in per_stage.clamp(max=q)]
    try:
        rotations = prepare(layer, s, mode).rotations
    except RuntimeError as e:  # torch.linalg.LinAlgError: a singular I - Q in the Cayley solve
        raise BoftError(f"{_prefix(where)}layer {layer.name}: its rotation cannot be computed "
                        f"({_values(layer)}): {str(e).splitlines()[0]}") from None
    if not all_finite(rotations):
        raise BoftError(f"{_prefix(where)}layer {layer.name}: its rotation is not finite at strength "
                        f"{s:g} ({mode}): {_values(layer)}.")
    return [float(v) for v in block_norm_bound(rotations).amax(dim=1)]


def generator_norm(layer: BoftLayer) -> float:
    """An upper bound of any block's ``‖Q‖_F`` before LyCORIS's constraint (which only shrinks
    it): ``‖A - Aᵀ‖_F <= 2 ‖A‖_F <= 2 b max|A|``. Loose (about 4x for random blocks), but one
    cheap pass (for a full SDXL BOFT a tenth of a second on a CPU, ten times less than
    ``‖A - Aᵀ‖_F`` per block)."""
    if layer.blocks.numel() == 0:
        return 0.0
    blocks = layer.blocks
    if blocks.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        blocks = blocks.to(torch.float32)  # float8: no amax on the CPU
    largest = float(blocks.abs().amax().to(torch.float64))
    return 2 * layer.block_size * largest * _generator_factor(layer)


def _generator_factor(layer: BoftLayer) -> float:
    """``‖Q‖ / ‖A - Aᵀ‖``: PEFT/kohya BOFT's ``S = (A - Aᵀ) / 2``, OneTrainer's scaled_oft."""
    return (0.5 if layer.kind in ("peft-boft", "kohya-boft") else 1.0) * layer.q_scale


def block_norm_bound(blocks: torch.Tensor) -> torch.Tensor:
    """Upper bounds of the spectral norms of ``blocks`` (..., b, b), without an SVD.

    With ``U = R / ‖R‖_F`` and ``G = UᵀU``: ``‖U‖₂² = λmax(G) <= ‖G⁸‖_F^(1/8)``, and ``G⁸`` never
    overflows (``‖G‖₂ <= 1``). In float64; at most ``b^(1/32)`` (1.16 for b = 128) above the norm.
    """
    r = blocks.to(torch.float64)
    frobenius = torch.linalg.matrix_norm(r)
    unit = r / frobenius.clamp_min(1e-300)[..., None, None]
    g = unit.transpose(-1, -2) @ unit
    for _ in range(3):
        g = g @ g
    return frobenius * torch.linalg.matrix_norm(g) ** (1 / 16) * (1 + 1e-9)


def working_limit(dtype: torch.dtype) -> float:
    """The largest magnitude a merged weight of ``dtype`` may take on its way: ComfyUI computes a
    patch in float32 (float16/bfloat16 weights in their own dtype in low-VRAM mode) and rounds
    float8 weights through float16."""
    if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return float(torch.finfo(dtype).max)
    return float(torch.finfo(torch.float16).max)


def _line_norm(layer: BoftLayer, weight: torch.Tensor) -> float:
    """The largest norm of the lines of ``weight`` the butterfly mixes (columns for the output
    side, rows for the input side, of the weight flattened to 2-D)."""
    flat = weight.detach().reshape(weight.shape[0], -1).to(torch.float32)
    if flat.numel() == 0:
        return 0.0
    return float(torch.linalg.vector_norm(flat, dim=0 if layer.side == "out" else 1).max())


def _largest(t: torch.Tensor) -> float:
    return float(t.to(torch.float64).abs().max()) if t.numel() else 0.0


def _values(layer: BoftLayer) -> str:
    text = f"blocks up to {_largest(layer.blocks):.3g}"
    return text + (f", scale up to {_largest(layer.scale):.3g}" if layer.scale is not None else "")


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""
