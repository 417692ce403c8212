"""The butterfly ``B @ x`` as a few dense batched matmuls: the fast path of ``apply_stages``.

Why it is equal (see ``butterfly.py``): write a row index as ``r = (top, q_{m-1} .. q_0, u)``
with ``u = r mod h`` (``h = b / 2``) and one bit ``q_i`` per stage. Stage ``i`` only mixes
``(q_i, u)``, with one ``b x b`` block for every value of the other bits. So a run of stages
``s .. e-1`` only mixes ``(q_s .. q_{e-1}, u)``: for every value of the other bits it is one
dense ``d x d`` matrix, ``d = h * 2^(e - s)``. Stages ``0 .. L-1`` mix contiguous rows, so the
first run is a plain batched matmul on ``x``; a later run needs its bits next to ``u``: a
strided view where the layout allows (the product's rows may be written in either order),
else a row gather. ``B`` becomes ``k`` batched matmuls of ``d x d`` blocks and at most ``k``
gathers instead of ``m`` gathers, tiny matmuls and scatters. On the CPU the columns are done
a slice at a time, so every pass but the first read and the last write stays in the cache.

:class:`Butterfly` holds the dense blocks (build it once per rotation tensor and reuse it);
:func:`apply_dense` has the contract of ``butterfly.apply_stages``, which stays the reference.

The three engines, one contract (``B @ x``, ``Bᵀ @ x`` for ``x`` of shape ``(n, ...)``):

* ``butterfly.apply_stages``: the reference (per stage a gather, a tiny ``bmm``, a scatter);
* :class:`Butterfly` (here): dense blocks, any device and dtype; ``apply(x, out=None)`` and
  ``apply_(x)`` (in place, through a column-slice buffer);
* ``fused.FusedButterfly``: in place, rows never move, the scale folded in; ``apply(x,
  out=None)`` and ``apply_(x)``, which chooses the Triton kernel or its torch path.

Which one merges a given weight is decided in one place, ``merge.try_merge_into`` (the in-place
merge) with ``merge.kernel_merges`` (whether a patch goes to the kernel at all).
"""

from __future__ import annotations

import math
import threading

import torch

from .butterfly import CONCATENATED, INTERLEAVED, check_butterfly_shape

# Largest dense block d (rows mixed by one batched matmul), the one table of them. Larger
# blocks mean fewer passes over the weight but more arithmetic (2*d multiply-adds per element and
# pass); measured in bench/RESULTS.md. "cuda in place": the Triton kernel's plans (fused.py):
# d = 40, padded to 64 for tl.dot, for b = 10; on an H200 it beat 80 (padded to 128) on every
# SDXL class measured: 36 against 47 us for a 1280x1280 layer, 301 against 402 us for 10240x1280.
MAX_BLOCK = {"cpu": 40, "cuda": 80, "cuda in place": 40}
# Column slice on the CPU, in elements of the (rows x slice) working buffer: a few MB of float32
# stay in the cache between passes. With one torch thread (the merge CLI's workers, one layer
# each) wider slices measured faster: 218 against 269 ms for the CLI benchmark's 22 SDXL layers
# on one Xeon core, and no slower on the 2-core AMD VM (bench/RESULTS.md, the CLI section).
CPU_SLICE = 1 << 18
CPU_SLICE_ONE_THREAD = 1 << 22
# Column slice on a GPU for float16/bfloat16 x (computed in float32 a slice at a time), elements.
GPU_HALF_SLICE = 1 << 22


def default_block(device, in_place: bool = False) -> int:
    """The largest dense block for plans whose blocks live on ``device`` (:data:`MAX_BLOCK`);
    ``in_place``: for ``fused.FusedButterfly``'s kernel rather than :class:`Butterfly`."""
    kind = torch.device(device).type
    if kind == "cuda":
        return MAX_BLOCK["cuda in place" if in_place else "cuda"]
    return MAX_BLOCK["cpu"]


def check_rotations(rotations: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """``(m, nb, b)`` of a rotations tensor (m, nb, b, b) in ``layout``; ValueError if it is none."""
    if layout not in (INTERLEAVED, CONCATENATED):
        raise ValueError(f"unknown butterfly layout {layout!r}")
    if rotations.ndim != 4 or rotations.shape[-1] != rotations.shape[-2]:
        raise ValueError(f"rotations must be (m, nb, b, b), got {tuple(rotations.shape)}")
    m, nb, b, _ = rotations.shape
    why = check_butterfly_shape(m, nb, b, layout)
    if why:
        raise ValueError(f"rotations of shape {tuple(rotations.shape)}: {why}")
    return m, nb, b


def row_axes(m: int, nb: int, b: int, max_block: int) -> tuple[int, list[int], list[tuple[int, int]]]:
    """``(unit, sizes, runs)``: a row index is (top, one axis per run (last run first), u) with
    these sizes, ``u`` of ``unit`` rows; ``runs`` are the stage ranges ``[s, e)`` grouped into one
    dense block each (see :func:`_split`). Odd ``b``: one stage of contiguous blocks."""
    if b % 2:
        return b, [nb], [(0, 1)]
    unit = b // 2
    runs = _split(m, unit, max_block)
    return unit, [nb // 2 ** (m - 1)] + [2 ** (e - s) for s, e in reversed(runs)], runs


def dense_blocks(rotations, layout: str, unit: int, sizes: list[int], run: tuple[int, int], axis: int,
                 target: list[int]) -> torch.Tensor:
    """Dense blocks of the stages in ``run``, one per value of the other axes, ``target`` order.

    Applies the stages to a probe that is the identity on the run's axis and ``u``, repeated
    for every value of the other axes, and reads the blocks off the result.
    """
    n = unit
    for size in sizes:
        n *= size
    d = sizes[axis] * unit
    others = [a for a in range(len(sizes)) if a != axis]
    eye = torch.eye(d, dtype=rotations.dtype, device=rotations.device)
    probe = eye.expand(n // d, d, d).reshape([sizes[a] for a in others] + [sizes[axis], unit, d])
    probe = probe.movedim(len(others), axis).reshape(n, d)  # rows in original order
    for i in range(*run):
        probe = _stage(probe, rotations[i], i, layout)
    # probe[r, c] = block(other axes of r)[local position of r, c]
    perm = target + [len(sizes), len(sizes) + 1]
    return probe.view(sizes + [unit, d]).permute(perm).reshape(-1, d, d)


def _split(m: int, h: int, max_block: int) -> list[tuple[int, int]]:
    """Stages ``0..m-1`` cut into runs ``[s, e)`` of near-equal length with ``h*2^(e-s)`` at most
    ``max_block`` (one stage per run if even that is larger)."""
    per_run = max(1, int(math.floor(math.log2(max(max_block / h, 1.0)))))
    runs = -(-m // per_run)
    bounds = [round(i * m / runs) for i in range(runs + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _schedule(start: tuple, axes: list[int], unit: int):
    """Row layouts for the steps that need the fewest row gathers.

    A step on run axis ``g`` multiplies ``(batch, d, w)`` views of ``x`` whose rows are
    ``(g, u)``: that needs ``g`` right before ``u`` and the other axes on one side, so that
    the batch has one stride (``[others, g, u]`` or ``[g, u, others]``). Otherwise the rows are
    gathered into such a layout first. A product's rows may come out as ``(g, u)`` or
    ``(u, g)`` (reordering the blocks' rows is free), after the batch axes. Returns per step
    ``(layout used, order of the product's rows)`` and the layout left at the end.
    """
    states = {start: (0, [])}  # layout -> (gathers so far, choices)
    for g in axes:
        following = {}
        for layout, (cost, choices) in states.items():
            others = tuple(a for a in layout if a not in (g, unit))
            options = [(target, cost + 1) for target in (others + (g, unit), (g, unit) + others)]
            i = layout.index(g)
            if layout[i + 1:i + 2] == (unit,) and (i == 0 or i + 2 == len(layout)):
                options.insert(0, (layout, cost))  # already a valid view: no gather
            for target, total in options:
                for out in ((g, unit), (unit, g)):
                    nxt = others + out
                    if nxt not in following or total < following[nxt][0]:
                        following[nxt] = (total, choices + [(target, out)])
        states = following
    end = min(states, key=lambda lay: states[lay][0] + (lay != start))
    return states[end][1], end


class Butterfly:
    """``B`` (or ``Bᵀ``) of ``rotations`` (m, nb, b, b) as dense blocks, ready for many ``x``.

    ``apply(x)`` equals ``butterfly.apply_stages(x, rotations, layout, transpose)`` for any
    ``x`` of shape ``(nb*b, ...)`` with the rotations' dtype and device. Tuning: ``max_block``
    (default :func:`default_block`) and ``slice_cols``, the default of :meth:`apply`'s.
    """

    def __init__(self, rotations: torch.Tensor, layout: str, transpose: bool = False,
                 max_block: int | None = None, slice_cols: int | None = None):
        layout_name = layout
        self.slice_cols = slice_cols
        m, nb, b = check_rotations(rotations, layout)
        if max_block is None:
            max_block = default_block(rotations.device)
        self.n = nb * b
        self.transpose = transpose
        self.unit, self.sizes, runs = row_axes(m, nb, b, max_block)
        # Row axes: ids 0..len(sizes)-1 (id 0 = top, id len-1-j = run j), then u (id len(sizes));
        # axes of size 1 play no part in the memory order.
        dims = self.sizes + [self.unit]
        unit = len(self.sizes)
        start = tuple(a for a in range(len(dims)) if dims[a] > 1 or a == unit)
        axes = [unit - 1 - j for j in range(len(runs))]  # run j's axis, in the order B applies
        if transpose:
            axes.reverse()
        schedule, end = _schedule(start, axes, unit)
        rows = torch.arange(self.n, device=rotations.device)
        self.steps = []  # (rows to gather or None, (batch, d, batch stride, row stride), blocks)
        self.moves = []  # per step: the same gather as an axis permutation (_permutation), or None
        layout = start
        for axis, (target, out) in zip(axes, schedule, strict=True):
            others = [a for a in target if a not in (axis, unit)]
            j = unit - 1 - axis
            ones = [a for a in range(unit) if dims[a] == 1]  # size-1 axes: anywhere in the batch
            blocks = dense_blocks(rotations, layout_name, self.unit, self.sizes, runs[j], axis, ones + others + [axis])
            if transpose:
                blocks = blocks.transpose(-1, -2)
            batch, d = blocks.shape[0], blocks.shape[1]
            if out[0] == unit:  # write the product's rows as (u, run axis): a free reorder
                blocks = blocks.reshape(batch, dims[axis], self.unit, d).transpose(1, 2)
            view = (batch, d, d, 1) if target[-1] == unit else (batch, d, 1, batch)
            gather = self._gather(rows, dims, layout, target)
            self.steps.append((gather, view, blocks.reshape(batch, d, d).contiguous()))
            self.moves.append(_permutation(dims, layout, target))
            layout = tuple(others) + out
        # The last product's rows are laid out as ``end``: result = last[final].
        self.final = self._gather(rows, dims, end, start)
        self.final_move = _permutation(dims, end, start)

    def _gather(self, rows, dims, layout, target) -> torch.Tensor | None:
        """Row indices that take rows laid out as ``layout`` to ``target``; None if equal."""
        if target == layout:
            return None
        perm = [layout.index(a) for a in target]
        return rows.view([dims[a] for a in layout]).permute(perm).reshape(-1)

    def apply(self, x: torch.Tensor, slice_cols: int | None = None,
              out: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
              col_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``B @ x`` (``Bᵀ @ x`` if built with ``transpose``) for ``x`` (n, ...).

        ``out``: where to write the result; it may be ``x`` itself (each column slice is read
        before it is written), which spares a new weight-sized buffer. Default: a new tensor,
        with a transposed 2-D view's strides if ``x`` is one. ``slice_cols``: columns per pass
        (default: all on a GPU, on the CPU a slice of :data:`CPU_SLICE` elements, or
        :data:`CPU_SLICE_ONE_THREAD` where torch runs one thread). ``row_scale`` (n,) /
        ``col_scale`` (columns,): factors for the result's rows / columns of its (n, -1) view,
        applied before it is written. An ``x`` in float16/bfloat16 with float32 blocks is
        computed in float32 a column slice at a time and rounded once when written (then the
        GPU's default slice is ``GPU_HALF_SLICE`` elements, not the whole width).
        """
        if x.shape[0] != self.n:
            raise ValueError(
                f"butterfly acts on {self.n} rows, got a tensor of shape {tuple(x.shape)}"
            )
        if out is not None and out.shape != x.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, x {tuple(x.shape)}")
        dtype = self.steps[0][2].dtype
        upcast = x.dtype != dtype
        flat = x.reshape(self.n, -1)
        cols = flat.shape[1]
        if slice_cols is None:
            slice_cols = self.slice_cols
        if slice_cols is None:
            if x.device.type == "cpu":
                elems = CPU_SLICE_ONE_THREAD if torch.get_num_threads() == 1 else CPU_SLICE
                slice_cols = max(32, elems // self.n)
            else:
                slice_cols = max(32, GPU_HALF_SLICE // self.n) if upcast else cols
        if out is None and slice_cols >= cols and flat.is_contiguous() and not upcast:  # whole width (GPU)
            result = self._run(flat)
            if self.final is not None:
                result = result.index_select(0, self.final)
            if row_scale is not None:
                result.mul_(row_scale.unsqueeze(1))
            if col_scale is not None:
                result.mul_(col_scale)
            return result.view(x.shape)
        dest = torch.empty_like(flat) if out is None else out.view(self.n, cols)
        grad = torch.is_grad_enabled() and (flat.requires_grad or self.steps[0][2].requires_grad)
        use_scratch = flat.device.type == "cpu" and not grad  # (out= ops do not record autograd)
        scratch = _scratch(2 * self.n * min(slice_cols, cols), dtype, flat.device) if use_scratch else None
        # The final row order, the scale and the rounding to dest's dtype in one pass: a copy (or
        # a multiply) from a permuted view of the last product into dest viewed in the same axes.
        move = self.final_move
        rows_scale = None if row_scale is None else _as_axes(row_scale.unsqueeze(1), move)
        for c0 in range(0, cols, slice_cols):
            part = self._run(flat[:, c0:c0 + slice_cols], scratch)
            w = part.shape[1]
            cut, part = _as_axes(dest[:, c0:c0 + w], move), _permuted(part, move)
            if rows_scale is not None and col_scale is not None:  # (both: still rounded once)
                part = part * rows_scale
            factor = col_scale[c0:c0 + w] if col_scale is not None else rows_scale
            if factor is None:
                cut.copy_(part)
            elif grad:  # (out= ops do not record autograd)
                cut.copy_(part * factor)
            else:
                torch.mul(part, factor, out=cut)
        return dest.view(x.shape) if out is None else out

    def apply_(self, x: torch.Tensor, slice_cols: int | None = None) -> torch.Tensor:
        """``x = B @ x`` in place (through a column-slice buffer); returns ``x``."""
        return self.apply(x, slice_cols=slice_cols, out=x)

    def _run(self, x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """All steps on ``x`` (n, w), rows as the last step left them: a new (n, w) tensor, or a
        view of ``scratch`` (2*n*w elements at least, used as two buffers in turn). An ``x`` of
        another dtype than the blocks' is converted on the way (with the first gather if any)."""
        n, width = self.n, x.shape[1]
        turn = 0

        def buffer(shape):  # the next half of scratch, or None: a new tensor
            nonlocal turn
            if scratch is None:
                return None
            turn ^= 1
            return scratch[(1 - turn) * n * width:(2 - turn) * n * width].view(shape)

        for (rows, (batch, d, batch_stride, row_stride), blocks), move in zip(self.steps, self.moves, strict=True):
            if rows is not None and x.dtype != blocks.dtype:  # the gather and the conversion in one copy
                into = buffer((n, width))
                into = torch.empty((n, width), dtype=blocks.dtype, device=x.device) if into is None else into
                _as_axes(into, move).copy_(_permuted(x, move))
                x = into
            elif rows is not None:
                x = torch.index_select(x, 0, rows, out=buffer((n, width)))
            elif x.dtype != blocks.dtype:
                into = buffer((n, width))
                x = x.to(blocks.dtype) if into is None else into.copy_(x)
            s0, s1 = x.stride()
            x = x.as_strided((batch, d, width), (batch_stride * s0, row_stride * s0, s1),
                             x.storage_offset())
            x = torch.bmm(blocks, x, out=buffer((batch, d, width))).view(n, width)
        return x


def _permutation(dims: list[int], layout: tuple, target: tuple) -> tuple | None:
    """The gather of :meth:`Butterfly._gather` (rows laid out as ``layout`` into ``target``) as an
    axis permutation: ``(row axes' sizes as laid out, in target order, axis order)``; None if equal."""
    if target == layout:
        return None
    return [dims[a] for a in layout], [dims[a] for a in target], [layout.index(a) for a in target]


def _permuted(x: torch.Tensor, move: tuple | None) -> torch.Tensor:
    """``x`` (n, w) with its rows in ``move``'s target order: a view (row axes..., w); no copy."""
    if move is None:
        return x
    return x.view(*move[0], x.shape[-1]).permute(*move[2], len(move[2]))


def _as_axes(x: torch.Tensor, move: tuple | None) -> torch.Tensor:
    """``x`` (n, w) viewed with ``move``'s target row axes, the shape :func:`_permuted` gives."""
    return x if move is None else x.view(*move[1], x.shape[-1])


_SCRATCH = threading.local()
_SCRATCH_KEEP = 1 << 23  # elements; a larger scratch (unusual slice widths) is not kept


def _scratch(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread CPU buffer of at least ``size`` elements, reused across calls: the column
    slices' passes then allocate nothing (fresh slice-sized buffers per pass cost page faults
    whenever the allocator has handed memory back to the system)."""
    if size > _SCRATCH_KEEP:
        return torch.empty(size, dtype=dtype, device=device)
    buf = getattr(_SCRATCH, "buf", None)
    if (buf is None or buf.numel() < size or buf.dtype != dtype or buf.device != device
            or buf.is_inference() != torch.is_inference_mode_enabled()):  # (ComfyUI runs in inference mode)
        buf = _SCRATCH.buf = torch.empty(size, dtype=dtype, device=device)
    return buf


def _stage(x: torch.Tensor, rot: torch.Tensor, i: int, layout: str) -> torch.Tensor:
    """``M_i @ x`` for stage ``i`` with blocks ``rot`` (nb, b, b) and ``x`` (n, w), by einsum.

    Rows are ``(group, half, chunk, u)``; block ``(group, chunk)`` mixes ``(half, u)`` ordered
    ``(u, half)`` (interleaved) or ``(half, u)`` (concatenated); see ``butterfly.stage_index``.
    """
    nb, b, _ = rot.shape
    w = x.shape[1]
    if b % 2:  # odd blocks: one stage of contiguous blocks
        return torch.bmm(rot, x.view(nb, b, w)).view(-1, w)
    h, chunks = b // 2, 2**i
    xs = x.view(nb // chunks, 2, chunks, h, w)
    if layout == INTERLEAVED:
        out = torch.einsum("gcxayb,gbcyw->gacxw", rot.view(-1, chunks, h, 2, h, 2), xs)
    else:
        out = torch.einsum("gcaxby,gbcyw->gacxw", rot.view(-1, chunks, 2, h, 2, h), xs)
    return out.reshape(-1, w)


def apply_dense(x: torch.Tensor, rotations: torch.Tensor, layout: str,
                transpose: bool = False) -> torch.Tensor:
    """``B @ x`` (or ``Bᵀ @ x``); same contract and result as ``butterfly.apply_stages``.

    Builds the dense blocks on every call; keep a :class:`Butterfly` to reuse them.
    """
    m, nb, b, _ = rotations.shape
    if x.shape[0] != nb * b:
        raise ValueError(
            f"butterfly acts on {nb * b} rows, got a tensor of shape {tuple(x.shape)}"
        )
    return Butterfly(rotations, layout, transpose).apply(x)
