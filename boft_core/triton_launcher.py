"""Calling a compiled Triton kernel without the JIT's per-call work: the one place that uses
Triton's internals.

A Triton upgrade must check, here and nowhere else (the kernel's self-test in ``fused.py`` runs
every launch path twice per device, and falls back to the torch path if they fail):

* ``CompiledKernel.run``'s positional arguments (grid x/y/z, stream, ``function``,
  ``packed_metadata``, launch metadata, enter hook, exit hook, then the kernel's arguments and
  constants), and ``CompiledKernel.launch_metadata``;
* that ``CompiledKernel.run`` is the CUDA backend's ``CudaLauncher``, whose ``launch`` (the
  compiled C launcher) takes grid x/y/z, stream, ``function``, ``launch_cooperative_grid``,
  ``launch_pdl``, the global and profile scratch (None when ``global_scratch_size`` and
  ``profile_scratch_size`` are 0), then ``CompiledKernel.run``'s arguments from
  ``packed_metadata`` on (:func:`_direct`: called without ``CudaLauncher.__call__``);
* ``triton.knobs.runtime.launch_enter_hook`` / ``launch_exit_hook`` (where the hooks live; a
  ``HookChain`` in Triton 3.6, empty unless something watches launches: :func:`_hooked`);
* ``triton.runtime.driver.active.get_current_stream`` / ``get_current_device``;
* what Triton specialises a compiled kernel on (:meth:`Launch._specialisation`: pointers'
  dtypes and 16-byte alignment; integers equal to 1, divisible by 16, 32-bit or not), and that
  ``kernel[grid](...)`` still returns the compiled kernel.

Written against Triton 3.6 (torch 2.11); see README's Limitations.
"""

from __future__ import annotations

import torch

try:  # optional: only the CUDA kernels need it
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
except ImportError:  # pragma: no cover - depends on the machine
    _knobs = _driver = None

_COMPILED: dict = {}  # specialisation -> compiled kernel, shared by every plan's launches


def _hooked(hook) -> bool:
    """Whether a launch hook does anything: None does not, nor an empty ``HookChain`` (Triton 3.6
    always sets one; handing it to the launcher costs a metadata object and two Python calls
    per launch)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _direct(compiled):
    """The compiled kernel's C launcher with its fixed arguments, ``(launch, cooperative, pdl)``,
    when calling it directly is what ``CudaLauncher.__call__`` would do (no scratch to allocate);
    else None."""
    launcher = compiled.run
    if (getattr(launcher, "global_scratch_size", None) == 0 and getattr(launcher, "profile_scratch_size", None) == 0
            and hasattr(launcher, "launch")):
        return (launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl)
    return None


def current_stream():
    """The current CUDA stream as Triton's launcher takes it (one lookup serves every launch of a
    call)."""
    return _driver.active.get_current_stream(_driver.active.get_current_device())


class Launch:
    """One kernel launch with its grid, sizes and strides fixed; the tensors come with each call.

    The first call goes through Triton's JIT (compiling if needed); later calls hand the
    arguments straight to the compiled kernel's launcher, which skips the JIT's argument binding
    and cache lookup. The tensors must keep the dtypes and 16-byte alignment they had (the
    specialisation Triton compiled for; ``FusedButterfly`` keys its launches on them, and a
    plan's blocks start at 16-byte multiples of an allocation). ``offset``/``size``: the slice
    of the storage argument that holds this launch's blocks.
    """

    def __init__(self, kernel, grid: tuple, ints: tuple, consts: dict, num_warps: int, num_stages: int,
                 offset: int, size: int):
        self.kernel, self.grid, self.ints, self.consts = kernel, grid, ints, consts
        self.num_warps, self.num_stages, self.offset, self.size = num_warps, num_stages, offset, size
        self.compiled = None
        self._consts = tuple(consts.values())
        self._direct = False  # the C launcher (_direct), resolved after the first compiled call

    def _specialisation(self, args: list) -> tuple:
        """What Triton compiles a kernel for besides the constants: the pointers' dtypes and
        16-byte alignment; the integers' value 1 (a constant then), divisibility by 16 and width."""
        flags = tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                      else (a == 1, a % 16 == 0, -2**31 <= a < 2**31) for a in args)
        return (self.kernel, tuple(self.consts.items()), self.num_warps, self.num_stages, args[0].device, flags)

    def run(self, tensors: tuple, stream=None) -> None:
        """Run it on ``tensors``, the kernel's pointer arguments in order (the per-run kernels:
        source, destination, this launch's blocks, the vectors to subtract and add, the blocks
        standing in for an unused one); ``stream``: the current CUDA stream's handle
        (:func:`current_stream`) when the caller has it, else looked up here."""
        args = [*tensors, *self.ints]
        c = self.compiled
        if c is None:
            # another plan's launch of the same specialisation (layers of one shape) already
            # compiled it: skip the JIT's binding, which costs more than the kernel here
            c = self.compiled = _COMPILED.get(self._specialisation(args))
        if c is None:
            # The JIT path: compiles on first use and returns the compiled kernel (None when
            # interpreted, TRITON_INTERPRET=1, which then stays on this path).
            compiled = self.kernel[self.grid](*args, **self.consts, num_warps=self.num_warps,
                                              num_stages=self.num_stages)
            if compiled is not None:
                self.compiled = _COMPILED[self._specialisation(args)] = compiled
            return
        if stream is None:
            stream = current_stream()
        enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
        x, y, z = self.grid
        if _hooked(enter) or _hooked(leave):  # a profiler, or a library that watches launches
            meta = c.launch_metadata(self.grid, stream, *args, *self._consts)
            c.run(x, y, z, stream, c.function, c.packed_metadata, meta, enter, leave, *args, *self._consts)
            return
        direct = self._direct
        if direct is False:
            direct = self._direct = _direct(c)
        if direct is None:
            c.run(x, y, z, stream, c.function, c.packed_metadata, None, None, None, *args, *self._consts)
        else:
            launch, cooperative, pdl = direct
            launch(x, y, z, stream, c.function, cooperative, pdl, None, None, c.packed_metadata, None, None, None,
                   *args, *self._consts)
