"""Prepared layers shared by every adapter of a process, keyed by the layer's data.

ComfyUI 0.28 rebuilds weight adapters as ``type(v)(v.loaded_keys, weights)`` whenever it stages
their tensors (``comfy.lora.prefetch_prepared_value``, dynamic VRAM's ``LowVramPatch.prepare``):
a cache inside the adapter starts empty every time. :class:`PatchCache` keys a prepared layer by
a ``token`` that the adapter carries in ``weights`` as a plain string (rebuilds keep non-tensors
as they are), plus the strength, mode and compute dtype.

What it keeps, and where:

* **host entries** (CPU memory, LRU within ``host_budget`` bytes): the :class:`~.merge.Patch`
  (rotations, scale, bias) on the CPU, its CPU fast-path blocks (``Patch.butterfly()``), and,
  for output-side layers that the CUDA kernel merges, the kernel plan's blocks with the scale
  folded in (``fused.FusedButterfly.storage``, pinned when CUDA is there so that copying it to
  the GPU is one asynchronous transfer).
* **device entries** (per CUDA device, LRU within ``device_budget`` bytes): a kernel plan's
  blocks on that device (about 1.3x the rotations: n * (sum of run block sizes) floats), or,
  for layers the kernel does not take (input side, a blend, a non-identity patch function), the
  Patch and its fast-path blocks on that device. A miss copies from the host entry.

So VRAM held by the cache stays within ``device_budget`` (default 256 MB, 5% of SDXL's UNet
in float16), and a layer evicted from the GPU costs one
host-to-device copy, not a new Cayley solve and plan build. Evictions are logged (logger
``comfyui-boft``): the first of each cache at INFO, the rest at DEBUG.

:meth:`PatchCache.prepare_many` fills the cache for many layers at once (equal-shaped layers
share one batched Cayley solve and plan build on the target device, ``merge.prepare_many``).
Nothing here imports ComfyUI.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from . import fast, fused, merge
from .formats import BoftLayer

DEVICE_BUDGET = 256 * 10**6  # bytes: 5% of SDXL's UNet in float16 (5.13 GB)
HOST_BUDGET = 4 << 30


def device_key(device) -> str:
    """``cuda`` as the tensors it makes report it (``cuda:0``, the current device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


@dataclass
class _Host:
    patch: merge.Patch  # CPU tensors
    plan: fused.FusedButterfly | None  # CPU (pinned) storage, scale folded; None: no kernel path
    nbytes: int


def _to_host(tensors: list, pin=()) -> list:
    """CPU copies of ``tensors`` (None and CPU tensors as they are), one transfer per underlying
    storage: views of one storage (a group's layers prepared together) stay views of one copy.
    Storages of the tensors whose ``id`` is in ``pin`` are pinned (fast, asynchronous copies back)."""
    copies, out = {}, []
    for t in tensors:
        if t is None or t.device.type == "cpu":
            out.append(t)
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in copies:  # the whole storage as bytes, into (pinned) memory from torch's caching allocator
            src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
            copies[key] = torch.empty(src.shape, dtype=torch.uint8, pin_memory=id(t) in pin).copy_(src)
        out.append(torch.empty(0, dtype=t.dtype).set_(copies[key].untyped_storage(), t.storage_offset(),
                                                      t.size(), t.stride()))
    return out


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _butterfly_bytes(plan: fast.Butterfly) -> int:
    out = _nbytes(plan.final)
    for rows, _, blocks in plan.steps:
        out += _nbytes(rows, blocks)
    return out


class PatchCache:
    """Prepared layers by ``(token, strength, mode, dtype)``, on the host and on devices; see the
    module doc. ``device_budget`` / ``host_budget``: bytes (per CUDA device / in CPU memory);
    ``pin``: pin the host copies of kernel plans (when CUDA is available)."""

    def __init__(self, device_budget: int = DEVICE_BUDGET, host_budget: int = HOST_BUDGET,
                 pin: bool = True, logger: logging.Logger | None = None):
        self.device_budget = int(device_budget)
        self.host_budget = int(host_budget)
        self.pin = pin
        self.log = logger or logging.getLogger("comfyui-boft")
        self._host: OrderedDict = OrderedDict()  # key -> _Host
        self._device: dict[str, OrderedDict] = {}  # device -> (key, device, what) -> (value, nbytes)
        self._held: dict[str, int] = {}  # "cpu" / device -> bytes
        self.counts = {"prepared": 0, "host hits": 0, "device hits": 0, "copied": 0, "evicted": 0}
        self._logged_eviction = False

    # --- lookups ------------------------------------------------------------------------------

    def patch(self, token: str, layer: Callable[[], BoftLayer], strength: float, mode: str,
              dtype: torch.dtype, device) -> merge.Patch:
        """The prepared :class:`~.merge.Patch` with its tensors (and fast-path blocks) on
        ``device``. ``layer()`` gives the layer's data on a miss."""
        host = self._host_entry(token, layer, strength, mode, dtype, device)
        dev = device_key(device)
        if dev == "cpu":
            return host.patch
        key = ((token, float(strength), mode, dtype), dev, "patch")
        hit = self._device_get(key)
        if hit is not None:
            return hit
        p = host.patch
        def to(t):
            return None if t is None else t.to(dev, non_blocking=True)
        moved = merge.Patch(p.name, p.side, p.layout, to(p.rotations), to(p.scale), p.blend, to(p.bias))
        plan = moved.butterfly()
        self._device_put(key, moved, _nbytes(moved.rotations, moved.scale, moved.bias) + _butterfly_bytes(plan))
        return moved

    def plan(self, token: str, layer: Callable[[], BoftLayer], strength: float, mode: str,
             dtype: torch.dtype, device) -> tuple[merge.Patch, fused.FusedButterfly] | None:
        """The host Patch and its in-place kernel plan (``scale * B``) on CUDA ``device``, for
        ``merge.try_merge_into(patch, weight, plan)``; None where the kernel does not apply (CPU, no
        Triton, input-side layers, the linear mode's blend, float64)."""
        dev = device_key(device)
        if dtype != torch.float32 or not merge.batches_on(dev):
            return None
        host = self._host_entry(token, layer, strength, mode, dtype, device)
        if host.plan is None:
            return None
        key = ((token, float(strength), mode, dtype), dev, "plan")
        plan = self._device_get(key)
        if plan is None:
            plan = host.plan.with_storage(host.plan.storage.to(dev, non_blocking=True))
            self._device_put(key, plan, _nbytes(plan.storage))
        return host.patch, plan

    def prepare_many(self, items: list[tuple[str, Callable[[], BoftLayer]]], strength: float, mode: str,
                     dtype: torch.dtype, device) -> int:
        """Prepare every ``(token, layer)`` not held yet, at once on ``device``: equal-shaped layers
        share one batched Cayley solve and kernel plan build. Their kernel plans stay on the device
        while the budget allows (no eviction for this), all of it on the host. Returns how many
        were prepared."""
        todo = [(token, layer) for token, layer in items
                if (token, float(strength), mode, dtype) not in self._host]
        if not todo:
            return 0
        dev = device_key(device)
        layers = [layer() for _, layer in todo]
        patches = merge.prepare_many(layers, strength, mode, dtype=dtype, device=dev)
        built = [self._kernel_plan(patch, dev) for patch in patches]
        # one device-to-host copy per group (its layers' tensors are views of one storage each)
        tensors = [t for patch, plan in zip(patches, built, strict=True)
                   for t in (patch.rotations, patch.scale, patch.bias, None if plan is None else plan.storage)]
        host = _to_host(tensors, pin={id(plan.storage) for plan in built if plan is not None} if self.pin else ())
        for i, ((token, _), patch, plan) in enumerate(zip(todo, patches, built, strict=True)):
            key = (token, float(strength), mode, dtype)
            entry = self._host_from(patch, dev, plan, host[4 * i:4 * i + 4])
            self._host_put(key, entry)
            if plan is not None and dev != "cpu":
                size = _nbytes(plan.storage)
                if self._held.get(dev, 0) + size <= self.device_budget:
                    kept = entry.plan.with_storage(plan.storage.clone())  # not a view of the group's
                    self._device_put(((key, dev, "plan")), kept, size)
        return len(todo)

    # --- accounting ---------------------------------------------------------------------------

    def held(self, device="cpu") -> int:
        """Bytes held on ``device`` ("cpu": the host entries)."""
        return self._held.get(device_key(device), 0)

    def entries(self, token: str) -> dict:
        """The host entries of one layer: ``(strength, mode, dtype) -> Patch`` (CPU tensors)."""
        return {key[1:]: host.patch for key, host in self._host.items() if key[0] == token}

    def clear(self) -> None:
        self._host.clear()
        self._device.clear()
        self._held.clear()

    # --- internals ----------------------------------------------------------------------------

    def _host_entry(self, token, layer, strength, mode, dtype, device) -> _Host:
        key = (token, float(strength), mode, dtype)
        host = self._host.get(key)
        if host is not None:
            self._host.move_to_end(key)
            self.counts["host hits"] += 1
            return host
        dev = device_key(device)
        data = layer()
        if dev.startswith("cuda"):  # a GPU solves and builds faster; elsewhere: where the data is
            data = replace(data, blocks=data.blocks.to(dev), scale=None if data.scale is None else data.scale.to(dev))
        patch = merge.prepare(data, strength, mode, dtype=dtype)
        host = self._host_from(patch, dev, self._kernel_plan(patch, dev))
        self._host_put(key, host)
        return host

    def _kernel_plan(self, patch: merge.Patch, dev: str) -> fused.FusedButterfly | None:
        """The in-place kernel plan of ``patch`` (built where it is) if a CUDA target merges with it."""
        if dev.startswith("cuda") and merge.kernel_merges(patch):
            return patch.fused()
        return None

    def _host_from(self, patch: merge.Patch, dev: str, plan: fused.FusedButterfly | None = None,
                   host: list | None = None) -> _Host:
        """The host entry of ``patch`` (on any device): CPU tensors (``host``: copies of its rotations,
        scale, bias and ``plan``'s storage made already), the CPU fast path's blocks (CPU target),
        and ``plan`` (the kernel plan, for a CUDA target) over a pinned CPU copy of its storage."""
        self.counts["prepared"] += 1
        if host is None:
            tensors = [patch.rotations, patch.scale, patch.bias, None if plan is None else plan.storage]
            host = _to_host(tensors, pin={id(plan.storage)} if plan is not None and self.pin else ())
        rotations, scale, bias, storage = host
        entry = merge.Patch(patch.name, patch.side, patch.layout, rotations, scale, patch.blend, bias)
        size = _nbytes(rotations, scale, bias)
        if plan is not None:
            plan = plan.with_storage(storage)
            size += _nbytes(storage)
        elif dev == "cpu":
            size += _butterfly_bytes(entry.butterfly())
        return _Host(entry, plan, size)

    def _host_put(self, key, host: _Host) -> None:
        old = self._host.pop(key, None)
        if old is not None:
            self._held["cpu"] -= old.nbytes
        self._host[key] = host
        self._held["cpu"] = self._held.get("cpu", 0) + host.nbytes
        while self._held["cpu"] > self.host_budget and len(self._host) > 1:
            old_key, old = self._host.popitem(last=False)
            self._held["cpu"] -= old.nbytes
            self._evicted("cpu", old_key, old.nbytes, self.host_budget)

    def _device_get(self, key):
        entries = self._device.get(key[1])
        hit = None if entries is None else entries.get(key)
        if hit is None:
            return None
        entries.move_to_end(key)
        self.counts["device hits"] += 1
        return hit[0]

    def _device_put(self, key, value, nbytes: int) -> None:
        dev = key[1]
        self.counts["copied"] += 1
        if nbytes > self.device_budget:
            return  # larger than the whole budget: used once, not kept
        entries = self._device.setdefault(dev, OrderedDict())
        old = entries.pop(key, None)
        if old is not None:
            self._held[dev] -= old[1]
        entries[key] = (value, nbytes)
        self._held[dev] = self._held.get(dev, 0) + nbytes
        while self._held[dev] > self.device_budget:
            old_key, (_, size) = entries.popitem(last=False)
            self._held[dev] -= size
            self._evicted(dev, old_key[0], size, self.device_budget)

    def _evicted(self, dev: str, key, nbytes: int, budget: int) -> None:
        self.counts["evicted"] += 1
        level = logging.DEBUG if self._logged_eviction else logging.INFO
        self._logged_eviction = True
        self.log.log(level, "comfyui-boft: evicted a prepared BOFT layer (%.1f MB) from %s, least recently "
                     "used, to stay within its budget of %.0f MB%s", nbytes / 2**20, dev, budget / 2**20,
                     "" if level == logging.DEBUG else " (further evictions are logged at debug level)")
