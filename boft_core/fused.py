"""The butterfly ``B @ x`` in place: one dense block product per run, rows never move.

``fast.Butterfly`` multiplies dense ``d x d`` blocks but gathers rows between its runs, writes
each product to a new buffer and puts the rows back in order at the end. Here the rows stay
where they are: for run ``j`` (stages ``s .. e-1``, see ``fast.py``), ``idx_j[k]`` lists the
ORIGINAL row indices that block ``k`` mixes (in the block's row order), and

    for every run j in the order B applies them:  x[idx_j[k]] = blocks_j[k] @ x[idx_j[k]]  (all k)

leaves ``B @ x`` in ``x`` (``Bᵀ``: runs reversed, blocks transposed). A run's blocks touch
disjoint rows, so each block can be done by its own program that reads its rows, multiplies and
writes the same rows back: no scatter, no gather, no buffer the size of the weight.

:class:`FusedButterfly` holds that plan: the runs' geometry, and every run's blocks in one flat
``storage`` tensor (one copy moves a plan between devices; plans of equal shape share their
compiled launches and differ only in ``storage``, see :meth:`FusedButterfly.with_storage`).
``apply_(x)`` runs it in place: with Triton (one kernel launch per run) on a CUDA float32,
float16 or bfloat16 ``x`` whose rows are contiguous (unit column stride), else in plain torch
(``apply_torch_``: gather, ``bmm``, ``index_copy_``; the CPU tests use it). Triton is optional:
this module imports and its torch path works without it.

Half-precision ``x`` (float16/bfloat16, ComfyUI 0.28's working copies) is computed in float32
and rounded once: a plan of one run reads, multiplies in float32 and stores in ``x``'s dtype; a
plan of several runs goes a column slice at a time through a float32 scratch of at most
``scratch_elems`` elements (first run: ``x`` -> scratch, then scratch in place, last run:
scratch -> ``x``), never a float32 buffer the size of the weight. ``scale`` (a per-row factor
applied after ``B``) is folded into the last run's blocks, so ``S B x`` costs no extra pass.

The plan is built here; ``kernel.py`` turns a run into a Triton launch (tile sizes and warps
by :class:`~.kernel.KernelTuning`, an argument), and ``triton_launcher.py`` holds the only code
that depends on Triton's internals.

Precision (``precision``): ``"tf32x3"`` (default: ``tl.dot`` as three TF32 products, about
4e-7 relative error on the SDXL set), ``"fma"`` (no ``tl.dot``: rank-1 updates in float32, about
2e-7, slower), ``"ieee"`` (``tl.dot`` in float32 FMA; spills badly for blocks over 64 rows),
``"tf32"`` (about 1e-3: too coarse for merges). ``bench/fused_gpu.py`` measures them; the numbers
behind the defaults are in its docstring.
"""

from __future__ import annotations

import logging
import math

import torch

from . import fast
from .butterfly import CONCATENATED, INTERLEAVED
from .kernel import (
    DEFAULT_TUNING,
    KERNEL_DTYPES,
    PRECISION,
    PRECISIONS,
    KernelTuning,
    available,
    triton,  # None without Triton
)
from .kernel import launch as _kernel_launch
from .triton_launcher import current_stream

__all__ = ["KERNEL_DTYPES", "PRECISION", "PRECISIONS", "FusedButterfly", "KernelTuning", "Run", "available",
           "contiguous_rows", "kernel_takes", "rows_view", "triton", "usable"]

# Default float32 scratch for half-precision x with several runs, in elements (16 MB).
SCRATCH_ELEMS = 1 << 22

_VERIFIED: dict = {}  # CUDA device -> whether the kernel passed its self-test there


def rows_view(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as ``(rows, the rest)`` without a copy (rows may be strided; the other dimensions
    must form one block), or None when only a copy could make it."""
    if x.ndim == 2:
        return x
    try:
        return x.view(x.shape[0], -1)
    except RuntimeError:
        return None


def contiguous_rows(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as ``(rows, the rest)`` without a copy and with unit column stride (each row one
    contiguous line, as ComfyUI's working copies and their row slices are), or None."""
    flat = rows_view(x)
    if flat is None or (flat.stride(1) != 1 and flat.shape[1] > 1):
        return None
    return flat


def _channels_view(y: torch.Tensor, channel_dim: int) -> torch.Tensor | None:
    """``y`` as (batch, channels, rest) without a copy, or None: channels last (a linear layer's
    activations) gives (1, C, tokens) with unit channel stride; channels at ``channel_dim`` of an
    NCHW-like tensor gives (N, C, H*W)."""
    if y.ndim < 1:
        return None
    channel_dim %= y.ndim
    n = y.shape[channel_dim]
    try:
        if channel_dim == y.ndim - 1:
            return y.view(-1, n).t().unsqueeze(0)
        return y.view(math.prod(y.shape[:channel_dim]), n, -1)
    except RuntimeError:
        return None


def kernel_takes(x: torch.Tensor) -> bool:
    """Whether the Triton kernel can compute on ``x`` in place: Triton and CUDA here, ``x`` a
    :data:`KERNEL_DTYPES` CUDA tensor whose rows are contiguous lines (:func:`contiguous_rows`;
    a single column is one too, whatever its stride), not tracked by autograd (the kernel writes
    behind its back). Says nothing about the self-test: see :func:`usable`."""
    if not (x.is_cuda and x.dtype in KERNEL_DTYPES and available()):
        return False
    if contiguous_rows(x) is None:
        return False
    return not (x.requires_grad and torch.is_grad_enabled())


def usable(x: torch.Tensor) -> bool:
    """Whether the chooser (:meth:`FusedButterfly.apply_`, ``merge.try_merge_into``) sends ``x``
    to the Triton kernel: :func:`kernel_takes` it, on a device where the kernel has passed a
    self-test (run once per device against the float64 reference; the launcher the kernel uses
    after its first call belongs to Triton's internals, so a Triton that changed it falls back to
    the torch path with a warning instead of computing garbage)."""
    if not kernel_takes(x):
        return False
    return _verified(x.device)


def _verified(device) -> bool:
    """Whether the kernel passed its self-test on ``device`` (run once per device)."""
    ok = _VERIFIED.get(device)
    if ok is None:
        ok = _VERIFIED[device] = _self_test(device)
    return ok


def _self_test(device) -> bool:
    from .butterfly import apply_stages, cayley

    try:
        gen = torch.Generator().manual_seed(0)
        for layout in (INTERLEAVED, CONCATENATED):
            a = torch.randn(4, 16, 10, 10, generator=gen, dtype=torch.float64) * 0.2
            rotations = cayley(a - a.transpose(-1, -2))
            x = torch.randn(160, 48, generator=gen, dtype=torch.float64)
            want = apply_stages(x, rotations, layout)
            plan = FusedButterfly(rotations.float().to(device), layout)
            for _ in range(2):  # the first call goes through Triton's JIT, the second does not
                got = plan.apply_triton_(x.float().to(device)).double().cpu()
                error = ((got - want).norm() / want.norm()).item()
                if not error < 1e-5:
                    raise RuntimeError(f"relative error {error:.3g} against float64")
            half = x.half()  # several runs through the float32 scratch, in two column slices
            want = apply_stages(half.double(), rotations, layout)
            got = plan.apply_triton_(half.to(device), scratch_elems=160 * 32).double().cpu()
            error = ((got - want).norm() / want.norm()).item()
            if not error < 1e-3:
                raise RuntimeError(f"float16: relative error {error:.3g} against float64")
            # the bypass's launches: channels-last activations (unit row stride), a batch of
            # NCHW ones, minus and plus a bias, into another tensor
            bias = torch.randn(160, generator=gen, dtype=torch.float64)
            for y in (torch.randn(2, 5, 160, generator=gen, dtype=torch.float64).view(1, 10, 160).transpose(1, 2),
                      torch.randn(2, 160, 7, generator=gen, dtype=torch.float64)):
                flat = y.transpose(0, 1).reshape(160, -1)
                want = apply_stages(flat - bias[:, None], rotations, layout) + bias[:, None]
                src = y.float().to(device)
                dst = torch.empty_like(src)
                b = bias.float().to(device)
                plan._triton(src, dst, None, b, b)
                got = dst.transpose(0, 1).reshape(160, -1).double().cpu()
                error = ((got - want).norm() / want.norm()).item()
                if not error < 1e-5:
                    raise RuntimeError(f"activations: relative error {error:.3g} against float64")
        return True
    except Exception as e:  # an environment problem, not bad input: the torch path is correct
        logging.getLogger(__name__).warning(
            "boft_core: the Triton butterfly kernel failed its self-test on %s (%s: %s); "
            "using the torch path.", device, type(e).__name__, e)
        return False


class Run:
    """One run: ``count`` blocks of ``d x d`` at ``offset`` (elements) in a plan's storage, and the
    rows they mix, ``idx`` (count, d) in the blocks' row order (:meth:`idx_on` a device).

    ``geometry`` ``(inner, size, unit)``: ``idx[k, r] = (k // inner) * size * inner * unit
    + (r // unit) * inner * unit + (k % inner) * unit + r % unit`` (the run's axis of ``size``
    values sits above ``inner`` values of the later axes and ``unit`` rows), which the kernel
    computes instead of loading ``idx``. A run holds no tensor but these indices, so plans of one
    geometry share their runs whatever their storage's device.
    """

    __slots__ = ("_idx", "offset", "count", "geometry", "d", "padded")

    def __init__(self, offset: int, count: int, d: int, geometry: tuple[int, int, int]):
        self._idx = {}  # device -> idx, computed from the geometry when first needed (torch path)
        self.offset, self.count, self.d, self.geometry = offset, count, d, geometry
        self.padded = max(16, 1 << (d - 1).bit_length())  # tl.dot wants powers of two >= 16

    @property
    def size(self) -> int:
        return self.count * self.d * self.d

    @property
    def idx(self) -> torch.Tensor:
        return self.idx_on(torch.device("cpu"))

    def idx_on(self, device) -> torch.Tensor:
        idx = self._idx.get(device)
        if idx is None:
            inner, size, unit = self.geometry
            k = torch.arange(self.count, device=device).unsqueeze(1)
            r = torch.arange(self.d, device=device).unsqueeze(0)
            idx = self._idx[device] = ((k // inner) * (size * inner * unit) + (r // unit) * (inner * unit)
                                       + (k % inner) * unit + r % unit)
        return idx


def _pack(blocks: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """The runs' blocks in one flat tensor, each run starting at a multiple of 4 elements (16
    bytes in float32, what the compiled kernels assume); returns it and the offsets."""
    offsets, total = [], 0
    for b in blocks:
        offsets.append(total)
        total += -(-b.numel() // 4) * 4
    storage = torch.zeros(total, dtype=blocks[0].dtype, device=blocks[0].device)
    for b, off in zip(blocks, offsets, strict=True):
        storage[off:off + b.numel()] = b.reshape(-1)
    return storage, offsets


def _steps(launches: list, storage: torch.Tensor, sub, add) -> list:
    """The runs' orchestration, one tuple per launch: (launch, its blocks sliced out of
    ``storage``, the tensor it reads, the one it writes, whether it subtracts ``sub``, whether it
    adds ``add``); tensors as indices into (source, destination, scratch): run 0 reads the source
    and subtracts, the last run writes the destination and adds, the others read and write the
    scratch (the destination itself where there is none)."""
    last = len(launches) - 1
    return [(launch, storage[launch.offset:launch.offset + launch.size], 0 if j == 0 else 2, 1 if j == last else 2,
             j == 0 and sub is not None, j == last and add is not None) for j, launch in enumerate(launches)]


def _run_steps(steps: list, tensors: tuple, sub, add, stream=None) -> None:
    """The launches of :func:`_steps` on ``tensors`` (source, destination, scratch)."""
    for launch, blocks, reads, writes, subtracts, adds in steps:
        launch.run((tensors[reads], tensors[writes], blocks, sub if subtracts else blocks, add if adds else blocks),
                   stream)


class _Call:
    """One call shape of :meth:`FusedButterfly.apply_channels`, worked out once: the launches
    (:func:`_steps`) and the float32 scratch's size; or, for activations past the scratch budget,
    the general column-sliced path (``sliced``)."""

    __slots__ = ("steps", "scratch", "sliced", "direct")

    def __init__(self, steps, scratch: int, sliced=None):
        self.steps, self.scratch, self.sliced = steps, scratch, sliced
        self.direct = False  # every launch compiled: the stream is looked up here, once per call

    def __call__(self, plan: FusedButterfly, y: torch.Tensor, dst: torch.Tensor, sub, add) -> None:
        if self.sliced is not None:
            channel_dim, scratch_elems = self.sliced
            plan._triton(_channels_view(y, channel_dim), _channels_view(dst, channel_dim), scratch_elems, sub, add)
            return
        tmp = torch.empty(self.scratch, dtype=torch.float32, device=y.device) if self.scratch else dst
        _run_steps(self.steps, (y, dst, tmp), sub, add, current_stream() if self.direct else None)
        if not self.direct:  # (the interpreter, TRITON_INTERPRET=1, never compiles: no stream there)
            self.direct = bool(self.steps) and all(step[0].compiled is not None for step in self.steps)


def _vector_key(v: torch.Tensor | None):
    """What a per-row vector's launches depend on (None: no vector)."""
    if v is None:
        return None
    return (v.shape, v.stride(), v.dtype, v.device, v.data_ptr() % 16)


class FusedButterfly:
    """``S B`` (or ``S Bᵀ``) of ``rotations`` (m, nb, b, b) as an in-place plan; see the module doc.

    ``runs``: the :class:`Run` s in the order they are applied; their blocks live in ``storage``
    (:meth:`blocks`). ``apply_(x)`` overwrites ``x`` (shape ``(nb*b, ...)``, the plan's device)
    with ``scale * butterfly.apply_stages(x, rotations, layout, transpose)`` and returns it.
    ``scale``: optional (nb*b,) factors for the result's rows, folded into the last run's blocks.
    ``precision``: the Triton kernel's arithmetic (default ``PRECISION``). ``max_block``: largest
    dense block (default ``fast.default_block(device, in_place=True)``). ``tuning``: the kernel's
    launch configuration (default ``kernel.DEFAULT_TUNING``).
    """

    def __init__(self, rotations: torch.Tensor, layout: str, transpose: bool = False,
                 max_block: int | None = None, precision: str | None = None,
                 scale: torch.Tensor | None = None, tuning: KernelTuning | None = None):
        m, nb, b = fast.check_rotations(rotations, layout)
        if max_block is None:
            max_block = fast.default_block(rotations.device, in_place=True)
        self.n = nb * b
        self.transpose = transpose
        self.precision = PRECISION if precision is None else precision
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}")
        self.tuning = DEFAULT_TUNING if tuning is None else tuning
        if scale is not None and tuple(scale.shape) != (self.n,):
            raise ValueError(f"scale must have {self.n} values, got shape {tuple(scale.shape)}")
        device = rotations.device
        rows = torch.arange(self.n, device=device)
        self.unit, self.sizes, spans = fast.row_axes(m, nb, b, max_block)
        built = []  # (blocks, geometry, idx)
        if b % 2:  # one stage of contiguous odd blocks (concatenated layout only)
            blocks = rotations[0]
            built.append((blocks.transpose(-1, -2) if transpose else blocks, (1, 1, b), rows.view(nb, b)))
        else:
            unit = len(self.sizes)
            for j, span in enumerate(spans):
                axis = unit - 1 - j
                others = [a for a in range(unit) if a != axis]
                blocks = fast.dense_blocks(rotations, layout, self.unit, self.sizes, span, axis, others + [axis])
                idx = rows.view(self.sizes + [self.unit]).permute(others + [axis, unit])
                idx = idx.reshape(blocks.shape[0], blocks.shape[1])
                inner = 1
                for size in self.sizes[axis + 1:]:
                    inner *= size
                geometry = (inner, self.sizes[axis], self.unit)
                built.append((blocks.transpose(-1, -2) if transpose else blocks, geometry, idx))
            if transpose:
                built.reverse()
        if scale is not None:  # S (M x) = (S_k M_k) x per block of the last run
            blocks, geometry, idx = built[-1]
            built[-1] = (blocks * scale.to(blocks.dtype)[idx].unsqueeze(-1), geometry, idx)
        self.storage, offsets = _pack([blocks for blocks, _, _ in built])
        self.runs = []
        for (blocks, geometry, idx), off in zip(built, offsets, strict=True):
            run = Run(off, blocks.shape[0], blocks.shape[1], geometry)
            run._idx[idx.device] = idx
            self.runs.append(run)
        self._launch = {}  # launch key -> list of prepared launches; shared by with_storage copies
        self._calls = {}  # apply_channels' call shapes (they hold this plan's blocks: never shared)

    def blocks(self, j: int, storage: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``j``'s blocks (count, d, d): a view of ``storage`` (default the plan's)."""
        run = self.runs[j]
        storage = self.storage if storage is None else storage
        return storage[run.offset:run.offset + run.size].view(run.count, run.d, run.d)

    def with_storage(self, storage: torch.Tensor) -> FusedButterfly:
        """The same plan over other blocks of the same layout (another layer of this shape, or
        this plan's storage on another device): shares the geometry and the compiled launches."""
        if storage.shape != self.storage.shape:
            raise ValueError(f"storage of shape {tuple(storage.shape)}, the plan's is {tuple(self.storage.shape)}")
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.storage, other._calls = storage, {}
        return other

    def split(self, parts: int) -> list[FusedButterfly]:
        """Plans of ``parts`` equal butterflies built as one: rotations stacked along the block
        axis (``torch.cat(..., dim=1)``) form one butterfly whose top rows are the parts, so each
        run's blocks and rows are the parts' in order. The pieces share one storage tensor
        (``storage.view(parts, -1)[i]``) and their compiled launches."""
        if parts < 1 or self.n % parts or any(run.count % parts for run in self.runs):
            raise ValueError(f"a plan of {self.n} rows does not split into {parts} equal parts")
        n = self.n // parts
        runs, blocks = [], []
        for j, run in enumerate(self.runs):
            count = run.count // parts
            runs.append(Run(0, count, run.d, run.geometry))
            blocks.append(self.blocks(j).view(parts, -1))
        per = [-(-b.shape[1] // 4) * 4 for b in blocks]
        storage = torch.zeros(parts, sum(per), dtype=self.storage.dtype, device=self.storage.device)
        off = 0
        for run, b, size in zip(runs, blocks, per, strict=True):
            run.offset = off
            storage[:, off:off + b.shape[1]] = b
            off += size
        template = object.__new__(type(self))
        template.__dict__.update(self.__dict__)
        template.n, template.runs, template._launch, template._calls = n, runs, {}, {}
        template.storage = storage[0]
        return [template.with_storage(storage[i]) for i in range(parts)]

    def variant(self, precision: str | None = None, tuning: KernelTuning | None = None) -> FusedButterfly:
        """The same plan (shared blocks) with another kernel precision and/or launch tuning."""
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.precision = self.precision if precision is None else precision
        other.tuning = self.tuning if tuning is None else tuning
        other._launch, other._calls = {}, {}
        return other

    # --- applying -----------------------------------------------------------------------------

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """``x = S B @ x`` in place; returns ``x``. The chooser: the Triton kernel when the plan
        can launch it for ``x`` (:meth:`kernel_rows`: float32 blocks on ``x``'s device, and
        :func:`usable`, self-test included), else the torch path (a transposed view, for one)."""
        self._check(x)
        if self.kernel_rows(x) is not None and usable(x):
            return self.apply_triton_(x)
        return self.apply_torch_(x)

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``S B @ x`` into a new tensor (or into ``out``, which may be ``x``); ``x`` is left alone."""
        self._check(x)
        if out is None:
            return self.apply_(x.clone())
        if out.shape != x.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, x {tuple(x.shape)}")
        return self.apply_(out.copy_(x) if out is not x else out)

    def apply_torch_(self, x: torch.Tensor, slice_cols: int | None = None) -> torch.Tensor:
        """The plan in plain torch, in place: per run one gather, one ``bmm``, one
        ``index_copy_``. An ``x`` of another (lower) precision than the plan is computed in the
        plan's dtype ``slice_cols`` columns at a time (default: ``SCRATCH_ELEMS // n``) and
        rounded once."""
        self._check(x)
        dtype = self.storage.dtype
        if x.dtype not in (dtype, torch.float16, torch.bfloat16) or x.device != self.storage.device:
            raise ValueError(f"x is {x.dtype} on {x.device}, the plan {dtype} on {self.storage.device}")
        view = rows_view(x)
        flat = view if view is not None else x.reshape(self.n, -1).clone()
        width = flat.shape[1]
        if x.dtype == dtype:
            self._torch_runs(flat)
        else:
            step = max(1, (SCRATCH_ELEMS if slice_cols is None else slice_cols * self.n) // self.n)
            for c0 in range(0, width, step):
                part = flat[:, c0:c0 + step].to(dtype)
                self._torch_runs(part)
                flat[:, c0:c0 + step] = part
        if view is None:
            x.copy_(flat.view(x.shape))
        return x

    def _torch_runs(self, flat: torch.Tensor) -> None:
        width = flat.shape[1]
        for j, run in enumerate(self.runs):
            rows = run.idx_on(flat.device).reshape(-1)
            part = flat.index_select(0, rows).view(run.count, run.d, width)
            flat.index_copy_(0, rows, torch.bmm(self.blocks(j), part).view(self.n, width))

    def apply_triton_(self, x: torch.Tensor, scratch_elems: int | None = None) -> torch.Tensor:
        """The plan with the Triton kernel, in place: one launch per run (per column slice for a
        half-precision ``x`` with several runs, through a float32 scratch of at most
        ``scratch_elems`` elements, default ``SCRATCH_ELEMS``). Forces the kernel (tests, the
        self-test, benchmarks) without asking for the self-test; :meth:`apply_` chooses."""
        self._check(x)
        flat = self.kernel_rows(x)
        if flat is None:
            raise ValueError("the Triton path needs Triton, float32 blocks and an x on the plan's CUDA "
                             f"device in {', '.join(map(str, KERNEL_DTYPES))} whose rows are contiguous "
                             "lines (x.view(n, -1).stride(1) == 1)")
        self._triton(flat.unsqueeze(0), flat.unsqueeze(0), scratch_elems)
        return x

    def apply_channels(self, y: torch.Tensor, channel_dim: int, out: torch.Tensor | None = None,
                       sub: torch.Tensor | None = None, add: torch.Tensor | None = None,
                       scratch_elems: int | None = None) -> torch.Tensor | None:
        """``S B (y - sub) + add`` on the channel axis of ``y`` (any float dtype, any layout whose
        dimensions before and after the channels each form one block: channels-last
        activations, NCHW ones), with the Triton kernel: one launch per run, reading ``y``'s
        memory as it lies (no transpose, no gather). Written into ``out`` (default ``y`` itself;
        same shape and dtype as ``y``, any such layout); ``sub``/``add``: optional per-channel
        vectors (n,), any float dtype. Computed in float32, rounded once (a half-precision ``y``
        of several runs goes through a float32 scratch of at most ``scratch_elems`` elements,
        default ``SCRATCH_ELEMS``). Returns ``out``, or None, having done nothing, when the kernel
        cannot take these tensors (no Triton or CUDA, another device, a layout that only a copy
        could bring to (batch, n, cols), autograd, failed self-test); then use the torch path.

        This runs once per layer and forward in bypass mode, where the Python around the kernels
        is most of the cost: what a call shape needs (views, checks, launches, the scratch's
        size) is worked out once and kept (:class:`_Call`)."""
        dst = y if out is None else out
        key = (y.shape, y.stride(), dst.shape, dst.stride(), y.dtype, dst.dtype, y.device, dst.device,
               channel_dim, y.data_ptr() % 16, dst.data_ptr() % 16, y.data_ptr() == dst.data_ptr(),
               _vector_key(sub), add is sub or _vector_key(add), scratch_elems)  # (a bias: sub is add)
        call = self._calls.get(key, False)
        if call is False:
            if len(self._calls) >= 64:  # activation shapes seen by one layer: a few per resolution
                self._calls.clear()
            call = self._calls[key] = self._call(y, dst, channel_dim, sub, add, scratch_elems)
        if call is None or (torch.is_grad_enabled() and (y.requires_grad or dst.requires_grad)):
            return None
        call(self, y, dst, sub, add)
        return dst

    def _call(self, y, dst, channel_dim, sub, add, scratch_elems) -> _Call | None:
        """What :meth:`apply_channels` does for this call shape, or None if the kernel cannot."""
        src_view, dst_view = _channels_view(y, channel_dim), _channels_view(dst, channel_dim)
        if (src_view is None or dst_view is None or src_view.shape != dst_view.shape or dst.dtype != y.dtype
                or src_view.shape[1] != self.n or self.storage.dtype != torch.float32
                or y.device != self.storage.device or dst.device != y.device or y.dtype not in KERNEL_DTYPES
                or not available()
                or any(v is not None and (v.shape != (self.n,) or v.device != y.device or not v.is_contiguous()
                                          or v.dtype not in KERNEL_DTYPES) for v in (sub, add))):
            return None
        if not _verified(y.device):
            return None
        if src_view.shape[2] == 0 or src_view.shape[0] == 0:
            return _Call([], 0)
        cols = src_view.shape[2]
        budget = SCRATCH_ELEMS if scratch_elems is None else scratch_elems
        several_half = len(self.runs) > 1 and y.dtype != torch.float32
        if several_half and src_view.numel() > budget:
            return _Call(None, 0, (channel_dim, scratch_elems))  # column slices: the general path
        # the scratch's columns are contiguous whatever ``y``'s layout: the runs between the first
        # and the last read and write it as the merge does a weight (coalesced along the columns)
        tmp_view = torch.empty(src_view.shape, dtype=torch.float32, device=y.device) if several_half else dst_view
        launches = self._launches(src_view, tmp_view, dst_view, cols, sub, add)
        return _Call(_steps(launches, self.storage, sub, add), src_view.numel() if several_half else 0)

    def _triton(self, src: torch.Tensor, dst: torch.Tensor, scratch_elems: int | None,
                sub: torch.Tensor | None = None, add: torch.Tensor | None = None) -> None:
        """The runs from ``src`` into ``dst`` ((batch, n, cols) views, any strides; the same
        tensor in place), one launch per run: run 0 reads ``src`` (minus ``sub``), the last writes
        ``dst`` (plus ``add``); between runs a half-precision tensor goes through a float32
        scratch, a column slice at a time."""
        cols = src.shape[2]
        if cols == 0 or src.shape[0] == 0:
            return
        if len(self.runs) == 1 or dst.dtype == torch.float32:  # run 0 src -> dst, then dst in place
            _run_steps(_steps(self._launches(src, dst, dst, cols, sub, add), self.storage, sub, add),
                       (src, dst, dst), sub, add)
            return
        # several runs on float16/bfloat16: float32 between runs, a column slice at a time
        budget = SCRATCH_ELEMS if scratch_elems is None else scratch_elems
        per_col = self.n * src.shape[0]
        step = max(64, budget // per_col // 64 * 64)  # multiples of 64 keep slices 16-byte aligned
        c0 = 0
        while c0 < cols:
            width = step if cols - c0 - step >= 64 else cols - c0  # no slice narrower than 64
            part, into = src[:, :, c0:c0 + width], dst[:, :, c0:c0 + width]
            tmp = torch.empty_like(part, dtype=torch.float32)  # part's layout if dense, else contiguous
            _run_steps(_steps(self._launches(part, tmp, into, width, sub, add), self.storage, sub, add),
                       (part, into, tmp), sub, add)
            c0 += width

    def _launches(self, src: torch.Tensor, tmp: torch.Tensor, dst: torch.Tensor, cols: int,
                  sub: torch.Tensor | None = None, add: torch.Tensor | None = None) -> list:
        """The launches for one call shape ((batch, n, cols) views): run 0 reads ``src`` (minus
        ``sub``), later runs read ``tmp``; the last writes ``dst`` (plus ``add``), earlier ones
        ``tmp`` (all one tensor for in-place plans)."""
        def strides(t):
            return (t.stride(1), t.stride(2), t.stride(0))

        def flags(t):
            return None if t is None else (t.dtype, t.data_ptr() % 16 == 0)

        key = (cols, src.shape[0], strides(src), strides(tmp), strides(dst), src.dtype, tmp.dtype, dst.dtype,
               src.device, src.data_ptr() % 16 == 0, tmp.data_ptr() % 16 == 0, dst.data_ptr() % 16 == 0,
               flags(sub), flags(add))
        launches = self._launch.get(key)
        if launches is None:
            last = len(self.runs) - 1
            launches = self._launch[key] = [
                _kernel_launch(run.geometry, run.count, run.d, run.padded, run.offset, cols,
                               strides(src if j == 0 else tmp), strides(dst if j == last else tmp),
                               self.precision, self.tuning, batch=src.shape[0],
                               sub=j == 0 and sub is not None, add=j == last and add is not None)
                for j, run in enumerate(self.runs)]
        return launches

    # --- helpers ------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[0] != self.n:
            raise ValueError(f"butterfly acts on {self.n} rows, got a tensor of shape {tuple(x.shape)}")

    def kernel_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x`` as (n, cols) if this plan can launch the Triton kernel on it (float32 blocks on
        ``x``'s device, :func:`kernel_takes`); else None."""
        if self.storage.dtype != torch.float32 or x.device != self.storage.device or not kernel_takes(x):
            return None
        return contiguous_rows(x)
