"""The butterfly ``B @ x`` in place: one dense block product per run, rows never move.

``fast.Butterfly`` multiplies dense ``d x d`` blocks but gathers rows between its runs, writes
each product to a new buffer and puts the rows back in order at the end. Here the rows stay
where they are: for run ``j`` (stages ``s .. e-1``, see ``fast.py``), ``idx_j[k]`` lists the
ORIGINAL row indices that block ``k`` mixes (in the block's row order), and

    for every run j in the order B applies them:  x[idx_j[k]] = blocks_j[k] @ x[idx_j[k]]  (all k)

leaves ``B @ x`` in ``x`` (``Bᵀ``: runs reversed, blocks transposed). A run's blocks touch
disjoint rows, so each block can be done by its own program that reads its rows, multiplies and
writes the same rows back: no scatter, no gather, no buffer the size of the weight.

:class:`FusedButterfly` holds that plan. ``apply_(x)`` runs it in place: with Triton on a CUDA
float32 ``x`` (one kernel launch per run, or one per layer, see ``MODE``), else in plain torch
(``apply_torch_``: gather, ``bmm``, ``index_copy_``; the CPU tests use it). Triton is optional:
this module imports and its torch path works without it.

Precision: the Triton kernel multiplies with ``tl.dot``. Its default for float32 (TF32) is about
1e-3 off; ``"tf32x3"`` (three TF32 products, the default here) and ``"ieee"`` (plain float32 FMA)
stay near float32 rounding; ``bench/fused_gpu.py`` measures both.
"""

from __future__ import annotations

import torch

from . import fast
from .butterfly import CONCATENATED, INTERLEAVED, check_butterfly_shape

try:  # optional: only the CUDA kernels need it
    import triton
    import triton.language as tl
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = _knobs = _driver = None

# tl.dot's input precision for float32: "tf32x3" or "ieee" (see the module doc); "tf32" is too coarse.
PRECISION = "tf32x3"
# "runs": one launch per run, a program per (column tile, block). "strip": one launch per layer,
# a program per column tile that does every run on its columns (a barrier between runs).
MODE = "runs"
# Largest run strip kernel handles in one launch; more runs fall back to "runs".
_STRIP_SLOTS = 4


_AVAILABLE = None


def available() -> bool:
    """Whether the Triton kernels can run here (Triton importable and a CUDA device present)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = triton is not None and torch.cuda.is_available()
    return _AVAILABLE


class Run:
    """One run's blocks: ``idx`` (batch, d) original rows, ``blocks`` (batch, d, d), same order."""

    __slots__ = ("idx", "blocks", "d", "padded", "_dev")

    def __init__(self, idx: torch.Tensor, blocks: torch.Tensor):
        self.idx = idx
        self.blocks = blocks
        self.d = idx.shape[1]
        self.padded = max(16, 1 << (self.d - 1).bit_length())  # tl.dot wants powers of two >= 16
        self._dev = None

    def device_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``idx`` (batch, D) int32 and ``blocks`` (batch, D, D) float32, zero-padded to ``D``."""
        if self._dev is None:
            batch, d, big = self.idx.shape[0], self.d, self.padded
            idx = torch.zeros(batch, big, dtype=torch.int32, device=self.idx.device)
            idx[:, :d] = self.idx
            blocks = torch.zeros(batch, big, big, dtype=torch.float32, device=self.blocks.device)
            blocks[:, :d, :d] = self.blocks
            self._dev = (idx, blocks)
        return self._dev


class FusedButterfly:
    """``B`` (or ``Bᵀ``) of ``rotations`` (m, nb, b, b) as an in-place plan; see the module doc.

    ``runs``: the :class:`Run` s in the order they are applied. ``apply_(x)`` overwrites ``x``
    (shape ``(nb*b, ...)``, the rotations' device) with ``butterfly.apply_stages(x, rotations,
    layout, transpose)`` and returns it. ``precision`` and ``mode``: the Triton kernel's
    ``tl.dot`` precision and launch mode (defaults: ``PRECISION``, ``MODE``).
    """

    def __init__(self, rotations: torch.Tensor, layout: str, transpose: bool = False,
                 max_block: int | None = None, precision: str | None = None, mode: str | None = None):
        if layout not in (INTERLEAVED, CONCATENATED):
            raise ValueError(f"unknown butterfly layout {layout!r}")
        if rotations.ndim != 4 or rotations.shape[-1] != rotations.shape[-2]:
            raise ValueError(f"rotations must be (m, nb, b, b), got {tuple(rotations.shape)}")
        m, nb, b, _ = rotations.shape
        why = check_butterfly_shape(m, nb, b, layout)
        if why:
            raise ValueError(f"rotations of shape {tuple(rotations.shape)}: {why}")
        if max_block is None:
            max_block = fast.GPU_BLOCK if rotations.device.type == "cuda" else fast.CPU_BLOCK
        self.n = nb * b
        self.transpose = transpose
        self.precision = PRECISION if precision is None else precision
        self.mode = MODE if mode is None else mode
        if self.precision not in ("ieee", "tf32x3", "tf32"):
            raise ValueError(f"unknown precision {self.precision!r}")
        if self.mode not in ("runs", "strip"):
            raise ValueError(f"unknown mode {self.mode!r}")
        rows = torch.arange(self.n, device=rotations.device)
        if b % 2:  # one stage of contiguous odd blocks (concatenated layout only)
            self.unit, self.sizes = b, [nb]
            blocks = rotations[0]
            runs = [Run(rows.view(nb, b), blocks.transpose(-1, -2) if transpose else blocks)]
        else:
            self.unit = b // 2
            spans = fast._split(m, self.unit, max_block)
            # Row axes, most significant first: top, then one per run (last run first), then u.
            self.sizes = [nb // 2 ** (m - 1)] + [2 ** (e - s) for s, e in reversed(spans)]
            unit = len(self.sizes)
            runs = []
            for j, span in enumerate(spans):
                axis = unit - 1 - j
                others = [a for a in range(unit) if a != axis]
                # fast.Butterfly's probe, which needs only n, unit and sizes of its instance
                blocks = fast.Butterfly._blocks(self, rotations, layout, span, axis, others + [axis])
                idx = rows.view(self.sizes + [self.unit]).permute(others + [axis, unit])
                idx = idx.reshape(blocks.shape[0], blocks.shape[1])
                runs.append(Run(idx, blocks.transpose(-1, -2) if transpose else blocks))
            if transpose:
                runs.reverse()
        for run in runs:
            run.blocks = run.blocks.contiguous()
        self.runs = runs
        self._launch = {}  # (cols, strides, data alignment) -> list of prepared launches

    def variant(self, precision: str | None = None, mode: str | None = None) -> FusedButterfly:
        """The same plan (shared blocks) with another kernel precision or launch mode."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.precision = self.precision if precision is None else precision
        other.mode = self.mode if mode is None else mode
        other._launch = {}
        return other

    # --- applying -----------------------------------------------------------------------------

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """``x = B @ x`` in place (Triton on a CUDA float32 ``x`` when available); returns ``x``."""
        self._check(x)
        if self._triton_ok(x):
            return self.apply_triton_(x)
        return self.apply_torch_(x)

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``B @ x`` into a new tensor (or into ``out``, which may be ``x``); ``x`` is left alone."""
        self._check(x)
        if out is None:
            return self.apply_(x.clone())
        if out.shape != x.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, x {tuple(x.shape)}")
        return self.apply_(out.copy_(x) if out is not x else out)

    def apply_torch_(self, x: torch.Tensor) -> torch.Tensor:
        """The plan in plain torch, in place: per run one gather, one ``bmm``, one ``index_copy_``."""
        self._check(x)
        flat = x.view(self.n, -1) if _viewable(x) else x.reshape(self.n, -1).clone()
        width = flat.shape[1]
        for run in self.runs:
            rows = run.idx.reshape(-1)
            if run.blocks.dtype != flat.dtype or run.blocks.device != flat.device:
                raise ValueError(f"x is {flat.dtype} on {flat.device}, the plan "
                                 f"{run.blocks.dtype} on {run.blocks.device}")
            part = flat.index_select(0, rows).view(run.idx.shape[0], run.d, width)
            flat.index_copy_(0, rows, torch.bmm(run.blocks, part).view(self.n, width))
        if not _viewable(x):
            x.copy_(flat.view(x.shape))
        return x

    def apply_triton_(self, x: torch.Tensor) -> torch.Tensor:
        """The plan with the Triton kernels, in place, on a float32 CUDA ``x`` (n, ...)."""
        self._check(x)
        if not self._triton_ok(x):
            raise ValueError("the Triton path needs Triton and a float32 CUDA x viewable as (n, cols)")
        flat = x if x.ndim == 2 else x.view(self.n, -1)
        cols = flat.shape[1]
        if cols == 0:
            return x
        s0, s1 = flat.stride()
        key = (cols, s0, s1, flat.data_ptr() % 16 == 0)
        launches = self._launch.get(key)
        if launches is None:
            launches = self._launch[key] = self._prepare(cols, s0, s1)
        for launch in launches:
            launch(flat)
        return x

    # --- helpers ------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[0] != self.n:
            raise ValueError(f"butterfly acts on {self.n} rows, got a tensor of shape {tuple(x.shape)}")

    def _triton_ok(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and x.dtype == torch.float32 and available() and self.runs[0].blocks.is_cuda
                and (x.ndim == 2 or _viewable(x)))

    def _prepare(self, cols: int, s0: int, s1: int) -> list:
        """Launches (callables of x) for x (n, cols) with strides (s0, s1)."""
        if self.mode == "strip" and len(self.runs) <= _STRIP_SLOTS:
            return [_strip_launch(self.runs, cols, s0, s1, self.precision)]
        return [_run_launch(run, cols, s0, s1, self.precision) for run in self.runs]


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

# Column tile and warps per padded block size D (tuned on an H200, bench/fused_gpu.py).
TILES = {16: (128, 4), 32: (128, 4), 64: (64, 4), 128: (64, 4), 256: (32, 8)}
STRIP_TILES = {16: (32, 4), 32: (32, 4), 64: (32, 4), 128: (32, 4), 256: (16, 8)}


def _tile(table: dict, big: int) -> tuple[int, int]:
    return table.get(big, (16, 8))


if triton is not None:

    @triton.jit
    def _mix_block(x_ptr, idx_ptr, blk_ptr, k, cc, cmask, stride_r, stride_c,
                   d: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
        """Rows idx[k] of x's column tile cc = blocks[k] @ those rows."""
        r = tl.arange(0, D)
        rows = tl.load(idx_ptr + k * D + r).to(tl.int64)
        ptrs = x_ptr + rows[:, None] * stride_r + cc[None, :] * stride_c
        mask = (r < d)[:, None] & cmask[None, :]
        tile = tl.load(ptrs, mask=mask, other=0.0)
        blk = tl.load(blk_ptr + k * D * D + r[:, None] * D + r[None, :])
        acc = tl.dot(blk, tile, input_precision=PREC)
        tl.store(ptrs, acc, mask=mask)

    @triton.jit
    def _run_kernel(x_ptr, idx_ptr, blk_ptr, cols, stride_r, stride_c,
                    d: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        """One run: program (column tile, block)."""
        cc = tl.program_id(0) * BN + tl.arange(0, BN)
        cmask = cc < cols
        _mix_block(x_ptr, idx_ptr, blk_ptr, tl.program_id(1), cc.to(tl.int64), cmask, stride_r, stride_c,
                   d, D, PREC)

    @triton.jit
    def _strip_run(x_ptr, idx_ptr, blk_ptr, nblk, cc, cmask, stride_r, stride_c,
                   d: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
        for k in range(nblk):  # nblk: a constexpr (the interpreter cannot loop to a runtime bound)
            _mix_block(x_ptr, idx_ptr, blk_ptr, k, cc, cmask, stride_r, stride_c, d, D, PREC)

    @triton.jit
    def _strip_kernel(x_ptr, cols, stride_r, stride_c,
                      i0, b0, i1, b1, i2, b2, i3, b3,
                      n0: tl.constexpr, d0: tl.constexpr, D0: tl.constexpr,
                      n1: tl.constexpr, d1: tl.constexpr, D1: tl.constexpr,
                      n2: tl.constexpr, d2: tl.constexpr, D2: tl.constexpr,
                      n3: tl.constexpr, d3: tl.constexpr, D3: tl.constexpr,
                      RUNS: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        """Every run on one column tile: a program owns all rows of its columns."""
        cc = tl.program_id(0) * BN + tl.arange(0, BN)
        cmask = cc < cols
        cc = cc.to(tl.int64)
        _strip_run(x_ptr, i0, b0, n0, cc, cmask, stride_r, stride_c, d0, D0, PREC)
        if RUNS > 1:
            tl.debug_barrier()  # this program's writes of the last run are read below
            _strip_run(x_ptr, i1, b1, n1, cc, cmask, stride_r, stride_c, d1, D1, PREC)
        if RUNS > 2:
            tl.debug_barrier()
            _strip_run(x_ptr, i2, b2, n2, cc, cmask, stride_r, stride_c, d2, D2, PREC)
        if RUNS > 3:
            tl.debug_barrier()
            _strip_run(x_ptr, i3, b3, n3, cc, cmask, stride_r, stride_c, d3, D3, PREC)


class _Launch:
    """One kernel launch with its grid and arguments fixed except x.

    The first call goes through Triton's JIT (compiling if needed); later calls hand the same
    arguments straight to the compiled kernel's launcher, which skips the JIT's argument binding
    and cache lookup (most of a launch's host time). x must keep the strides and the 16-byte
    alignment it had (``FusedButterfly`` keys its launches on them).
    """

    def __init__(self, kernel, grid: tuple, args: list, consts: dict, num_warps: int):
        self.kernel, self.grid, self.args, self.consts = kernel, grid, args, consts
        self.num_warps = num_warps
        self.compiled = None

    def __call__(self, x: torch.Tensor) -> None:
        c = self.compiled
        if c is None or _knobs.runtime.launch_enter_hook is not None:
            # The JIT path: compiles on first use; returns the compiled kernel (None when
            # interpreted, TRITON_INTERPRET=1, which then stays on this path).
            self.compiled = self.kernel[self.grid](x, *self.args, **self.consts, num_warps=self.num_warps)
            if self.compiled is not None:
                self.device, self.stream = (_driver.active.get_current_device,
                                            _driver.active.get_current_stream)
            return
        c.run(self.grid[0], self.grid[1], self.grid[2], self.stream(self.device()), c.function,
              c.packed_metadata, None, None, None, x, *self.args, *self.consts.values())


def _run_launch(run: Run, cols: int, s0: int, s1: int, precision: str) -> _Launch:
    idx, blocks = run.device_tensors()
    bn, warps = _tile(TILES, run.padded)
    grid = (triton.cdiv(cols, bn), idx.shape[0], 1)
    consts = {"d": run.d, "D": run.padded, "BN": bn, "PREC": precision}
    return _Launch(_run_kernel, grid, [idx, blocks, cols, s0, s1], consts, warps)


def _strip_launch(runs: list[Run], cols: int, s0: int, s1: int, precision: str) -> _Launch:
    args, consts = [cols, s0, s1], {}
    bn, warps = _tile(STRIP_TILES, max(run.padded for run in runs))
    for slot in range(_STRIP_SLOTS):
        run = runs[min(slot, len(runs) - 1)]
        idx, blocks = run.device_tensors()
        args += [idx, blocks]
        consts.update({f"n{slot}": idx.shape[0], f"d{slot}": run.d, f"D{slot}": run.padded})
    consts.update(RUNS=len(runs), BN=bn, PREC=precision)
    return _Launch(_strip_kernel, (triton.cdiv(cols, bn), 1, 1), args, consts, warps)
