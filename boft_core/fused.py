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

Precision (``precision``): ``"tf32x3"`` (default: ``tl.dot`` as three TF32 products, about
4e-7 relative error on the SDXL set), ``"fma"`` (no ``tl.dot``: rank-1 updates in float32, about
2e-7, slower), ``"ieee"`` (``tl.dot`` in float32 FMA; spills badly for blocks over 64 rows),
``"tf32"`` (about 1e-3: too coarse for merges). ``bench/fused_gpu.py`` measures them; the numbers
behind the defaults are in its docstring.
"""

from __future__ import annotations

import logging

import torch

from . import fast
from .butterfly import CONCATENATED, INTERLEAVED

try:  # optional: only the CUDA kernels need it
    import triton
    import triton.language as tl
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = _knobs = _driver = None

# The Triton kernel's arithmetic (see the module doc).
PRECISION = "tf32x3"
PRECISIONS = ("tf32x3", "fma", "ieee", "tf32")
# Largest dense block d of a plan on a CUDA device: h * 2^k <= this (d = 40, padded to 64 for
# tl.dot, for b = 10). On an H200 it beat 80 (padded to 128) on every SDXL class measured:
# 36 against 47 us for a 1280x1280 layer, 301 against 402 us for 10240x1280.
CUDA_BLOCK = 40
# What the kernels read and write; they compute in float32 and round once (see the module doc).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Default float32 scratch for half-precision x with several runs, in elements (16 MB).
SCRATCH_ELEMS = 1 << 22


_AVAILABLE = None
_VERIFIED: dict = {}  # CUDA device -> whether the kernel passed its self-test there


def available() -> bool:
    """Whether the Triton kernels can run here (Triton importable and a CUDA device present)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = triton is not None and torch.cuda.is_available()
    return _AVAILABLE


def usable(x: torch.Tensor) -> bool:
    """Whether :meth:`FusedButterfly.apply_triton_` should take ``x``: a 2-D float32, float16 or
    bfloat16 CUDA tensor with contiguous rows and at least two columns, on a device where the kernel has passed a
    self-test (run once per device against the float64 reference; the launcher the kernel uses
    after its first call belongs to Triton's internals, so a Triton that changed it falls back to
    the torch path with a warning instead of computing garbage)."""
    if not (x.is_cuda and x.dtype in KERNEL_DTYPES and x.ndim == 2 and available()):
        return False
    if x.shape[1] < 2 or x.stride(1) != 1:  # (Triton would specialise a stride or width of 1 away)
        return False
    if x.requires_grad and torch.is_grad_enabled():  # the kernel writes behind autograd's back
        return False
    ok = _VERIFIED.get(x.device)
    if ok is None:
        ok = _VERIFIED[x.device] = _self_test(x.device)
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


class FusedButterfly:
    """``S B`` (or ``S Bᵀ``) of ``rotations`` (m, nb, b, b) as an in-place plan; see the module doc.

    ``runs``: the :class:`Run` s in the order they are applied; their blocks live in ``storage``
    (:meth:`blocks`). ``apply_(x)`` overwrites ``x`` (shape ``(nb*b, ...)``, the plan's device)
    with ``scale * butterfly.apply_stages(x, rotations, layout, transpose)`` and returns it.
    ``scale``: optional (nb*b,) factors for the result's rows, folded into the last run's blocks.
    ``precision``: the Triton kernel's arithmetic (default ``PRECISION``). ``max_block``: largest
    dense block (default ``CUDA_BLOCK`` for rotations on a CUDA device, ``fast.CPU_BLOCK``
    otherwise).
    """

    def __init__(self, rotations: torch.Tensor, layout: str, transpose: bool = False,
                 max_block: int | None = None, precision: str | None = None,
                 scale: torch.Tensor | None = None):
        m, nb, b = fast.check_rotations(rotations, layout)
        if max_block is None:
            max_block = CUDA_BLOCK if rotations.device.type == "cuda" else fast.CPU_BLOCK
        self.n = nb * b
        self.transpose = transpose
        self.precision = PRECISION if precision is None else precision
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}")
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
        other.storage = storage
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
        template.n, template.runs, template._launch = n, runs, {}
        template.storage = storage[0]
        return [template.with_storage(storage[i]) for i in range(parts)]

    def variant(self, precision: str) -> FusedButterfly:
        """The same plan (shared blocks) with another kernel precision."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.precision = precision
        other._launch = {}
        return other

    # --- applying -----------------------------------------------------------------------------

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """``x = S B @ x`` in place; returns ``x``. Triton when :func:`available`, ``x`` is on the
        plan's CUDA device in a :data:`KERNEL_DTYPES` dtype and its rows are contiguous
        (``x.view(n, -1).stride(1) == 1``), else the torch path (a transposed view, for one)."""
        self._check(x)
        if self._triton_rows(x) is not None:
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
        flat = x.view(self.n, -1) if _viewable(x) else x.reshape(self.n, -1).clone()
        width = flat.shape[1]
        if x.dtype == dtype:
            self._torch_runs(flat)
        else:
            step = max(1, (SCRATCH_ELEMS if slice_cols is None else slice_cols * self.n) // self.n)
            for c0 in range(0, width, step):
                part = flat[:, c0:c0 + step].to(dtype)
                self._torch_runs(part)
                flat[:, c0:c0 + step] = part
        if not _viewable(x):
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
        ``scratch_elems`` elements, default ``SCRATCH_ELEMS``); see :meth:`apply_`."""
        self._check(x)
        flat = self._triton_rows(x)
        if flat is None:
            raise ValueError("the Triton path needs Triton and an x on the plan's CUDA device in "
                             f"{', '.join(map(str, KERNEL_DTYPES))} whose rows are contiguous "
                             "(x.view(n, -1).stride(1) == 1)")
        cols = flat.shape[1]
        if cols == 0:
            return x
        storage = self.storage
        if flat.dtype == torch.float32 or len(self.runs) == 1:
            for launch in self._launches(flat, flat, cols):
                launch(flat, flat, storage)
            return x
        # several runs on float16/bfloat16: float32 between runs, a column slice at a time
        budget = SCRATCH_ELEMS if scratch_elems is None else scratch_elems
        step = max(64, budget // self.n // 64 * 64)  # multiples of 64 keep slices 16-byte aligned
        scratch = torch.empty(self.n, min(step + 63, cols), dtype=torch.float32, device=flat.device)
        c0 = 0
        while c0 < cols:
            width = step if cols - c0 - step >= 64 else cols - c0  # no slice narrower than 64
            src = flat[:, c0:c0 + width]
            tmp = scratch[:, :width]
            launches = self._launches(src, tmp, width)
            last = len(launches) - 1
            for j, launch in enumerate(launches):
                launch(src if j == 0 else tmp, src if j == last else tmp, storage)
            c0 += width
        return x

    def _launches(self, src: torch.Tensor, dst: torch.Tensor, cols: int) -> list:
        """The launches for one call shape: run 0 reads ``src`` and writes ``dst`` (the same
        tensor for in-place plans), later runs read and write ``dst``, the last writes ``src``
        when they differ (a scratch in between)."""
        key = (cols, src.stride(0), dst.stride(0), src.dtype, dst.dtype, src.device,
               src.data_ptr() % 16 == 0, dst.data_ptr() % 16 == 0, src.data_ptr() == dst.data_ptr())
        launches = self._launch.get(key)
        if launches is None:
            last = len(self.runs) - 1
            s, t = src.stride(0), dst.stride(0)
            launches = self._launch[key] = [
                _run_launch(run, cols, s if j == 0 else t, s if j == last and j > 0 else t, self.precision)
                for j, run in enumerate(self.runs)]
        return launches

    # --- helpers ------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[0] != self.n:
            raise ValueError(f"butterfly acts on {self.n} rows, got a tensor of shape {tuple(x.shape)}")

    def _triton_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x`` as (n, cols) with unit column stride, if the Triton kernel can take it; else None."""
        if not (x.is_cuda and x.dtype in KERNEL_DTYPES and available() and self.storage.dtype == torch.float32
                and x.device == self.storage.device):
            return None
        if x.ndim == 2:
            flat = x
        elif _viewable(x):
            flat = x.view(self.n, -1)
        else:
            return None
        return flat if flat.stride(1) == 1 or flat.shape[1] == 1 else None

    def _triton_ok(self, x: torch.Tensor) -> bool:
        return self._triton_rows(x) is not None


def _viewable(x: torch.Tensor) -> bool:
    """Whether ``x.view(n, -1)`` works (rows may be strided; the rest must be one block)."""
    if x.ndim <= 2:
        return True
    try:
        x.view(x.shape[0], -1)
    except RuntimeError:
        return False
    return True


def apply_(x: torch.Tensor, rotations: torch.Tensor, layout: str, transpose: bool = False) -> torch.Tensor:
    """``x = B @ x`` in place (``butterfly.apply_stages``'s result); builds the plan each call."""
    return FusedButterfly(rotations, layout, transpose).apply_(x)


# --- Triton ---------------------------------------------------------------------------------------

# (column tile BN, warps) per padded block size D, for tl.dot and for "fma". Measured on an H200
# (bench/fused_gpu.py --sweep, a 1280x1280 layer): D = 64: BN 64 / 4 warps 36 us, the other
# (BN 32..256, 4 or 8 warps) 38..78 us; D = 128: BN 64 / 8 warps 47 us. D = 16 and 256: guesses.
TILES = {16: (64, 4), 32: (64, 4), 64: (64, 4), 128: (64, 8), 256: (32, 8)}
FMA_TILES = {16: (64, 4), 32: (64, 4), 64: (64, 4), 128: (64, 4), 256: (32, 8)}
# Software-pipelining stages (num_stages) of the kernels.
STAGES = 1
# Programs per run, in multiples of the SM count: column tiles are shared out so that each program
# loads its block once for several tiles. 0: one program per (block, column tile), which measured
# faster (1280x1280: 36 against 44 us with 2 x SMs).
PROGRAMS = 0


def _tile(table: dict, big: int) -> tuple[int, int]:
    return table.get(big, (32, 8))


if triton is not None:

    @triton.jit
    def _run_kernel(src_ptr, dst_ptr, blk_ptr, cols, stride_s, stride_d,
                    INNER: tl.constexpr, SIZE: tl.constexpr, UNIT: tl.constexpr, d: tl.constexpr,
                    D: tl.constexpr, BN: tl.constexpr, TPP: tl.constexpr, PREC: tl.constexpr):
        """One run from src to dst (n, cols), unit column stride (they may be the same tensor):
        program (block k, column chunk c) does rows idx[k] (``Run.geometry``'s formula) of column
        tiles c, c + chunks, ... (TPP of them), in float32, stored in dst's dtype."""
        k = tl.program_id(0)
        r = tl.arange(0, D)
        rows = (k // INNER) * (SIZE * INNER * UNIT) + (r // UNIT) * (INNER * UNIT) + (k % INNER) * UNIT + r % UNIT
        rmask = r < d
        soff = rows.to(tl.int64) * stride_s
        doff = rows.to(tl.int64) * stride_d
        blk = tl.load(blk_ptr + k.to(tl.int64) * (d * d) + r[:, None] * d + r[None, :],
                      mask=rmask[:, None] & rmask[None, :], other=0.0)  # zero-padded to D x D
        for i in range(TPP):
            cc = (tl.program_id(1) + i * tl.num_programs(1)) * BN + tl.arange(0, BN)
            mask = rmask[:, None] & (cc < cols)[None, :]
            tile = tl.load(src_ptr + soff[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            # tl.dot reads the whole tile (through shared memory) before any thread stores
            out = tl.dot(blk, tile, input_precision=PREC)
            tl.store(dst_ptr + doff[:, None] + cc[None, :], out.to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _run_kernel_fma(src_ptr, dst_ptr, blk_ptr, cols, stride_s, stride_d,
                        INNER: tl.constexpr, SIZE: tl.constexpr, UNIT: tl.constexpr, d: tl.constexpr,
                        D: tl.constexpr, BN: tl.constexpr, TPP: tl.constexpr):
        """``_run_kernel`` without tl.dot: d rank-1 updates in float32 (exact FMA, no padding in k)."""
        k = tl.program_id(0)
        r = tl.arange(0, D)
        base = (k // INNER) * (SIZE * INNER * UNIT) + (k % INNER) * UNIT
        rows = base + (r // UNIT) * (INNER * UNIT) + r % UNIT
        rmask = r < d
        doff = rows.to(tl.int64) * stride_d
        bptr = blk_ptr + k.to(tl.int64) * (d * d) + r * d
        for i in range(TPP):
            cc = (tl.program_id(1) + i * tl.num_programs(1)) * BN + tl.arange(0, BN)
            cmask = cc < cols
            acc = tl.zeros((D, BN), dtype=tl.float32)
            for j in range(d):
                rj = base + (j // UNIT) * (INNER * UNIT) + j % UNIT
                xr = tl.load(src_ptr + rj.to(tl.int64) * stride_s + cc, mask=cmask, other=0.0).to(tl.float32)
                acc += tl.load(bptr + j, mask=rmask, other=0.0)[:, None] * xr[None, :]
            tl.debug_barrier()  # every thread has read these rows before any writes them
            tl.store(dst_ptr + doff[:, None] + cc[None, :], acc.to(dst_ptr.dtype.element_ty),
                     mask=rmask[:, None] & cmask[None, :])


_COMPILED: dict = {}  # specialisation -> compiled kernel, shared by every plan's launches


class _Launch:
    """One kernel launch with its grid, sizes and strides fixed; the tensors come with each call.

    The first call goes through Triton's JIT (compiling if needed); later calls hand the
    arguments straight to the compiled kernel's launcher, which skips the JIT's argument binding
    and cache lookup. The tensors must keep the dtypes and 16-byte alignment they had (the
    specialisation Triton compiled for; ``FusedButterfly`` keys its launches on them, and a
    plan's blocks start at 16-byte multiples of an allocation).
    """

    def __init__(self, kernel, grid: tuple, ints: tuple, consts: dict, num_warps: int, run: Run):
        self.kernel, self.grid, self.ints, self.consts = kernel, grid, ints, consts
        self.num_warps, self.offset, self.size = num_warps, run.offset, run.size
        self.compiled = None

    def _specialisation(self, args: list) -> tuple:
        """What Triton compiles a kernel for besides the constants: the pointers' dtypes and
        16-byte alignment; the integers' value 1 (a constant then), divisibility by 16 and width."""
        flags = tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                      else (a == 1, a % 16 == 0, -2**31 <= a < 2**31) for a in args)
        return (self.kernel, tuple(self.consts.items()), self.num_warps, STAGES, args[0].device, flags)

    def __call__(self, src: torch.Tensor, dst: torch.Tensor, storage: torch.Tensor) -> None:
        args = [src, dst, storage[self.offset:self.offset + self.size], *self.ints]
        c = self.compiled
        if c is None:
            # another plan's launch of the same specialisation (layers of one shape) already
            # compiled it: skip the JIT's binding, which costs more than the kernel here
            c = self.compiled = _COMPILED.get(self._specialisation(args))
        if c is None:
            # The JIT path: compiles on first use and returns the compiled kernel (None when
            # interpreted, TRITON_INTERPRET=1, which then stays on this path).
            compiled = self.kernel[self.grid](*args, **self.consts, num_warps=self.num_warps, num_stages=STAGES)
            if compiled is not None:
                self.compiled = _COMPILED[self._specialisation(args)] = compiled
            return
        stream = _driver.active.get_current_stream(_driver.active.get_current_device())
        enter = _knobs.runtime.launch_enter_hook
        if enter is None:
            c.run(self.grid[0], self.grid[1], self.grid[2], stream, c.function, c.packed_metadata, None, None,
                  None, *args, *self.consts.values())
        else:  # hooks (a profiler, or a library that watches launches) get what the JIT gives them
            meta = c.launch_metadata(self.grid, stream, *args, *self.consts.values())
            c.run(self.grid[0], self.grid[1], self.grid[2], stream, c.function, c.packed_metadata, meta, enter,
                  _knobs.runtime.launch_exit_hook, *args, *self.consts.values())


def _run_launch(run: Run, cols: int, stride_in: int, stride_out: int, precision: str) -> _Launch:
    bn, warps = _tile(FMA_TILES if precision == "fma" else TILES, run.padded)
    tiles = triton.cdiv(cols, bn)
    nblk = run.count
    if PROGRAMS > 0:
        chunks = min(tiles, max(1, -(-PROGRAMS * _sm_count() // nblk)))
        per = -(-tiles // chunks)
        chunks = -(-tiles // per)
    else:
        chunks, per = tiles, 1
    inner, size, unit = run.geometry
    consts = {"INNER": inner, "SIZE": size, "UNIT": unit, "d": run.d, "D": run.padded, "BN": bn, "TPP": per}
    if precision == "fma":
        kernel = _run_kernel_fma
    else:
        kernel = _run_kernel
        consts["PREC"] = precision
    return _Launch(kernel, (nblk, chunks, 1), (cols, stride_in, stride_out), consts, warps, run)


_SMS = None


def _sm_count() -> int:
    global _SMS
    if _SMS is None:
        _SMS = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return _SMS
