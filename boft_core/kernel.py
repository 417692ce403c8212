"""The Triton kernels of the in-place butterfly (``fused.py``) and how each run is launched.

``fused.FusedButterfly`` is the plan (which rows each block mixes, the blocks); this module turns
one run of a plan into a launch: the kernel, its grid, column tile and warps
(:class:`KernelTuning`). Calling the compiled kernel fast is ``triton_launcher.py``'s job (the
one module that touches Triton's internals). Triton is optional: without it this module imports,
:func:`available` is False and nothing here is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .triton_launcher import Launch

try:  # optional: only the CUDA kernels need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None

# The kernel's arithmetic (see fused.py's module doc); the numbers are in bench/fused_gpu.py.
PRECISION = "tf32x3"
PRECISIONS = ("tf32x3", "fma", "ieee", "tf32")
# What the kernels read and write; they compute in float32 and round once.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_AVAILABLE = None


def available() -> bool:
    """Whether the Triton kernels can run here (Triton importable and a CUDA device present)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = triton is not None and torch.cuda.is_available()
    return _AVAILABLE


@dataclass(frozen=True)
class KernelTuning:
    """How runs are launched. ``tiles`` / ``fma_tiles``: (column tile BN, warps) per padded block
    size D, for ``tl.dot`` and for ``"fma"``. Measured on an H200 (bench/fused_gpu.py --sweep, a
    1280x1280 layer): D = 64: BN 64 / 4 warps 36 us, the others (BN 32..256, 4 or 8 warps)
    38..78 us; D = 128: BN 64 / 8 warps 47 us. D = 16 and 256: guesses. ``programs``: programs per
    run in multiples of the SM count (column tiles shared out so that each program loads its
    block once for several tiles); 0: one program per (block, column tile), which measured faster
    (1280x1280: 36 against 44 us with 2 x SMs). ``stages``: software pipelining (num_stages)."""

    tiles: dict = field(default_factory=lambda: {16: (64, 4), 32: (64, 4), 64: (64, 4), 128: (64, 8),
                                                 256: (32, 8)})
    fma_tiles: dict = field(default_factory=lambda: {16: (64, 4), 32: (64, 4), 64: (64, 4), 128: (64, 4),
                                                     256: (32, 8)})
    programs: int = 0
    stages: int = 1

    def tile(self, precision: str, padded: int) -> tuple[int, int]:
        return (self.fma_tiles if precision == "fma" else self.tiles).get(padded, (32, 8))

    def key(self) -> tuple:
        """A hashable summary (plans key their launches on it)."""
        return (tuple(sorted(self.tiles.items())), tuple(sorted(self.fma_tiles.items())), self.programs,
                self.stages)


DEFAULT_TUNING = KernelTuning()


def launch(geometry: tuple[int, int, int], count: int, d: int, padded: int, offset: int, cols: int,
           strides_in: tuple[int, int, int], strides_out: tuple[int, int, int], precision: str,
           tuning: KernelTuning, batch: int = 1, sub: bool = False, add: bool = False) -> Launch:
    """The launch of one run (``count`` blocks of ``d x d``, padded to ``padded``, at ``offset`` in
    the storage; ``geometry`` as ``fused.Run``'s) over ``cols`` columns of ``batch`` matrices.
    ``strides_in``/``strides_out``: (row, column, batch) strides of what the run reads and writes
    (a weight: (row stride, 1, 0); channels-last activations: (1, channels, ...)). ``sub``/``add``:
    the run subtracts a per-row vector from what it reads / adds one to what it writes (the
    bypass's bias)."""
    bn, warps = tuning.tile(precision, padded)
    tiles = triton.cdiv(cols, bn)
    if tuning.programs > 0:
        chunks = min(tiles, max(1, -(-tuning.programs * _sm_count() // count)))
        per = -(-tiles // chunks)
        chunks = -(-tiles // per)
    else:
        chunks, per = tiles, 1
    inner, size, unit = geometry
    # CONTIG: both column strides 1 (a weight's rows): the merge's loads, vectorised along them
    contig = strides_in[1] == 1 and strides_out[1] == 1
    consts = {"INNER": inner, "SIZE": size, "UNIT": unit, "d": d, "D": padded, "BN": bn, "TPP": per,
              "SUB": sub, "ADD": add, "CONTIG": contig}
    if precision == "fma":
        kernel = _run_kernel_fma
    else:
        kernel = _run_kernel
        consts["PREC"] = precision
    ints = (cols, strides_in[0], strides_out[0], strides_in[1], strides_out[1], strides_in[2], strides_out[2])
    return Launch(kernel, (count, chunks, batch), ints, consts, warps, tuning.stages, offset, count * d * d)


_SMS = None


def _sm_count() -> int:
    global _SMS
    if _SMS is None:
        _SMS = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return _SMS


if triton is not None:

    @triton.jit
    def _rows(k, r, INNER: tl.constexpr, SIZE: tl.constexpr, UNIT: tl.constexpr):
        """Row ``r`` of block ``k`` of a run of geometry (INNER, SIZE, UNIT): ``Run.geometry``'s formula."""
        return (k // INNER) * (SIZE * INNER * UNIT) + (r // UNIT) * (INNER * UNIT) + (k % INNER) * UNIT + r % UNIT

    @triton.jit
    def _columns(cc, cstride_s, cstride_d, CONTIG: tl.constexpr):
        """Offsets of columns ``cc`` in the source and the destination. CONTIG (both column strides
        1, a weight's rows): ``cc`` itself, int32, which lets the loads vectorise along the
        columns; else ``cc`` times each column stride in int64 (activations)."""
        if CONTIG:
            scol = cc
            dcol = cc
        else:
            scol = cc.to(tl.int64) * cstride_s
            dcol = cc.to(tl.int64) * cstride_d
        return scol, dcol

    @triton.jit
    def _run_kernel(src_ptr, dst_ptr, blk_ptr, sub_ptr, add_ptr, cols, stride_s, stride_d, cstride_s, cstride_d,
                    bstride_s, bstride_d,
                    INNER: tl.constexpr, SIZE: tl.constexpr, UNIT: tl.constexpr, d: tl.constexpr,
                    D: tl.constexpr, BN: tl.constexpr, TPP: tl.constexpr, SUB: tl.constexpr, ADD: tl.constexpr,
                    CONTIG: tl.constexpr, PREC: tl.constexpr):
        """One run from src to dst, (batch, n, cols) with any strides (they may be the same
        tensor): program (block k, column chunk c, matrix z) does rows idx[k] (``Run.geometry``'s
        formula) of column tiles c, c + chunks, ... (TPP of them), in float32, stored in dst's
        dtype; ``SUB``: minus sub[row] before the product, ``ADD``: plus add[row] after it."""
        k = tl.program_id(0)
        z = tl.program_id(2).to(tl.int64)
        r = tl.arange(0, D)
        rows = _rows(k, r, INNER, SIZE, UNIT)
        rmask = r < d
        soff = rows.to(tl.int64) * stride_s + z * bstride_s
        doff = rows.to(tl.int64) * stride_d + z * bstride_d
        blk = tl.load(blk_ptr + k.to(tl.int64) * (d * d) + r[:, None] * d + r[None, :],
                      mask=rmask[:, None] & rmask[None, :], other=0.0)  # zero-padded to D x D
        if SUB:
            below = tl.load(sub_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        if ADD:
            above = tl.load(add_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        for i in range(TPP):
            cc = (tl.program_id(1) + i * tl.num_programs(1)) * BN + tl.arange(0, BN)
            mask = rmask[:, None] & (cc < cols)[None, :]
            scol, dcol = _columns(cc, cstride_s, cstride_d, CONTIG)
            tile = tl.load(src_ptr + soff[:, None] + scol[None, :], mask=mask, other=0.0).to(tl.float32)
            if SUB:
                tile = tile - below[:, None]  # padded rows stay zero (both loads are 0 there)
            # tl.dot reads the whole tile (through shared memory) before any thread stores
            out = tl.dot(blk, tile, input_precision=PREC)
            if ADD:
                out = out + above[:, None]
            tl.store(dst_ptr + doff[:, None] + dcol[None, :], out.to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _run_kernel_fma(src_ptr, dst_ptr, blk_ptr, sub_ptr, add_ptr, cols, stride_s, stride_d, cstride_s,
                        cstride_d, bstride_s, bstride_d,
                        INNER: tl.constexpr, SIZE: tl.constexpr, UNIT: tl.constexpr, d: tl.constexpr,
                        D: tl.constexpr, BN: tl.constexpr, TPP: tl.constexpr, SUB: tl.constexpr,
                        ADD: tl.constexpr, CONTIG: tl.constexpr):
        """``_run_kernel`` without tl.dot: d rank-1 updates in float32 (exact FMA, no padding in k)."""
        k = tl.program_id(0)
        z = tl.program_id(2).to(tl.int64)
        r = tl.arange(0, D)
        rows = _rows(k, r, INNER, SIZE, UNIT)
        rmask = r < d
        doff = rows.to(tl.int64) * stride_d + z * bstride_d
        bptr = blk_ptr + k.to(tl.int64) * (d * d) + r * d
        if ADD:
            above = tl.load(add_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        for i in range(TPP):
            cc = (tl.program_id(1) + i * tl.num_programs(1)) * BN + tl.arange(0, BN)
            cmask = cc < cols
            scol, dcol = _columns(cc, cstride_s, cstride_d, CONTIG)
            acc = tl.zeros((D, BN), dtype=tl.float32)
            for j in range(d):
                rj = _rows(k, j, INNER, SIZE, UNIT)
                xr = tl.load(src_ptr + rj.to(tl.int64) * stride_s + z * bstride_s + scol, mask=cmask,
                             other=0.0).to(tl.float32)
                if SUB:
                    xr = xr - tl.load(sub_ptr + rj).to(tl.float32)
                acc += tl.load(bptr + j, mask=rmask, other=0.0)[:, None] * xr[None, :]
            if ADD:
                acc = acc + above[:, None]
            tl.debug_barrier()  # every thread has read these rows before any writes them
            tl.store(dst_ptr + doff[:, None] + dcol[None, :], acc.to(dst_ptr.dtype.element_ty),
                     mask=rmask[:, None] & cmask[None, :])
