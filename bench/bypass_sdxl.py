"""Per-forward cost of a BOFT in ComfyUI 0.28's bypass mode: the whole SDXL UNet, 1024x1024.

The host's own SDXL model class (random weights, float16/bfloat16 on the device), a full-depth
LyCORIS BOFT on every layer ``bench.py`` uses (794 layers at lora_dim 16), injected through
0.28's own ``BypassInjectionManager`` with the pack's adapter, as ``LoraLoaderBypass`` and our
loader's ``apply=bypass`` do. Latent 128x128, batch 1, one UNet forward (no sampler, no VAE).

Measured (CUDA events, median of ``--runs``): the plain forward; the plain forward with every
adapted layer's output read and written once more (``touch``: the floor of any rotation that runs
as its own kernel after the layer); the forward in bypass mode;
the first forward after a strength change (new adapters at a new strength: every rotation is
prepared during that forward, lazily per layer, or before it in one batched pass, as our loader
does on a GPU). Example::

    python bench/bypass_sdxl.py --comfyui /path/to/ComfyUI-0.28 --dtype float16 --json out.json

``--sweep``: per distinct call of one forward (plan, activation shape, layout), the GPU time and
the host time of one ``apply_channels`` call (``shape_sweep``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402  (bench/harness.py: the host loader and SDXL workload)


def adapters_for(comfy, layers, seed=0):
    """The pack's adapter for each layer, from a LyCORIS file's tensors (random, non-zero blocks)."""
    out = {}
    for i, layer in enumerate(layers):
        gen = torch.Generator().manual_seed(seed + i)
        blocks = torch.randn(layer.m, layer.nb, layer.b, layer.b, generator=gen) * 0.05
        tensors = {f"{layer.lname}.oft_blocks": blocks.half(), f"{layer.lname}.alpha": torch.tensor(0.0)}
        out[layer.key] = comfy.NodeAdapter.load(layer.lname, tensors, 0.0, None)
    return out


def inject(net, adapters, strength):
    import comfy.weight_adapter

    manager = comfy.weight_adapter.BypassInjectionManager()
    for key, adapter in adapters.items():
        manager.add_adapter(key, adapter, strength=strength)
    (injection,) = manager.create_injections(net)
    injection.inject(None)
    return injection


class NullAdapter:
    """An adapter whose bypass_forward is the layer itself (see ``hook_only_ms``)."""

    weights = ()

    def bypass_forward(self, org_forward, x, *args, **kwargs):
        return org_forward(x, *args, **kwargs)


def pack_fused(adapters):
    """The pack's ``boft_core.fused`` as the host loaded it (under the custom node's package name,
    not this script's ``boft_core``), from an injected adapter's prepared plan."""
    return sys.modules[type(next(iter(adapters.values()))._held[1].fused()).__module__]


def call_shapes(fused, forward):
    """Bench only: the distinct calls of ``FusedButterfly.apply_channels`` in one ``forward``:
    {(n, runs, shape, stride, channel_dim, dtype, sub, add, in place): [count, plan, scratch_elems]}."""
    seen = {}
    original = fused.FusedButterfly.apply_channels

    def record(plan, y, channel_dim, out=None, sub=None, add=None, scratch_elems=None):
        key = (plan.n, len(plan.runs), tuple(y.shape), tuple(y.stride()), channel_dim, str(y.dtype).split(".")[1],
               sub is not None, add is not None, out is None)
        seen.setdefault(key, [0, plan, scratch_elems])[0] += 1
        return original(plan, y, channel_dim, out=out, sub=sub, add=add, scratch_elems=scratch_elems)

    fused.FusedButterfly.apply_channels = record
    try:
        forward()
    finally:
        fused.FusedButterfly.apply_channels = original
    return seen


def shape_sweep(fused, forward, reps=20):
    """Per distinct call of one forward (:func:`call_shapes`): the GPU time of one call (``us``:
    CUDA events while ``torch.cuda._sleep`` keeps the queue full, so the host's launch time is
    hidden) and its host time (``host_us``: views, checks, launches, until the call returns; and
    ``host_us_hooked`` with a no-op launch hook, :func:`launch_hook`), medians of ``reps``."""
    rows = []
    for (n, runs, shape, stride, dim, dtype, has_sub, has_add, in_place), (count, plan, scratch) in \
            sorted(call_shapes(fused, forward).items(), key=lambda kv: -kv[1][0]):
        dev = plan.storage.device
        y = torch.empty_strided(shape, stride, dtype=getattr(torch, dtype), device=dev).normal_()
        bias = torch.randn(n, device=dev, dtype=y.dtype)
        view = fused._channels_view(y, dim)
        kw = dict(out=None if in_place else torch.empty_like(y), sub=bias if has_sub else None,
                  add=bias if has_add else None, scratch_elems=scratch)
        if plan.apply_channels(y, dim, **kw) is None:
            continue
        times, host, hooked = [], [], []
        for i in range(2 * reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(2_000_000)  # ~1 ms of GPU time queued before the call
            with launch_hook(i % 2):
                start.record()
                t0 = time.perf_counter()
                plan.apply_channels(y, dim, **kw)
                (hooked if i % 2 else host).append((time.perf_counter() - t0) * 1e6)
                end.record()
            sync()
            if not i % 2:
                times.append(start.elapsed_time(end) * 1e3)
        rows.append({"n": n, "runs": runs, "shape": list(shape), "channel_dim": dim, "batch": view.shape[0],
                     "cols": view.shape[2], "count": count, "dtype": dtype, "in_place": in_place,
                     "us": statistics.median(times), "host_us": statistics.median(host),
                     "host_us_hooked": statistics.median(hooked)})
    return rows


@contextlib.contextmanager
def launch_hook(on=True):
    """A no-op Triton launch hook while in the block (``on``): every launch then takes the hooked
    path (launch metadata, the hook calls, ``CudaLauncher.__call__``), which is what the launcher
    did on every launch before it skipped Triton 3.6's empty hook chain (bench/RESULTS.md,
    Session 11)."""
    from triton import knobs

    chain = knobs.runtime.launch_enter_hook
    if not on or not hasattr(chain, "add"):
        yield
        return
    chain.add(_noop)
    try:
        yield
    finally:
        chain.remove(_noop)


def _noop(*args):
    return None


def gpu_profile(fn):
    """One call of ``fn`` under the profiler: its GPU time in ms (every kernel's own time, summed)
    and the table of the kernels that took most."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    events = prof.key_averages()
    return (sum(e.self_device_time_total for e in events) / 1e3,
            events.table(sort_by="cuda_time_total", row_limit=14))


def python_profile(fn, top=18):
    """cProfile of one call of ``fn``: the functions with the most time of their own."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    sync()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, runs, warmup=2):
    for _ in range(warmup):
        fn()
    times = [once(fn)[0] for _ in range(runs)]
    return statistics.median(times), times


def once(fn):
    """Wall time of ``fn()`` in ms, the device synced before and after (the forward is one
    stream of kernels: the host waits at the end, so this is the GPU time plus launch gaps)."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return (time.perf_counter() - t0) * 1e3, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("BOFT_COMFYUI_DIR", ""))
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--json")
    p.add_argument("--sweep", action="store_true", help="GPU and host time per call shape")
    p.add_argument("--smoke", action="store_true",
                   help="a check of this script on the CPU: a small SDXL-family UNet, 16x16 latent, float32")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else getattr(torch, args.dtype)
    comfy = harness.Comfy(args.comfyui, device)
    size = 128
    if args.smoke:  # tests/tiny_models.py's SDXL: Segmind-Vega depths, detected as SDXL, 109 M parameters
        harness.MODELS["sdxl"] = dict(harness.SDXL, channel_mult=[1, 1, 1], transformer_depth=[0, 0, 1, 1, 2, 2],
                                      transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2],
                                      transformer_depth_middle=-2)
        size = 16
    net, model_class = harness.build_model(comfy, "sdxl", device, dtype)
    net.eval()
    layers = harness.model_layers(net, 16)
    unet = net.diffusion_model
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, 4, size, size, generator=gen, device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    context = torch.randn(1, 77, 2048, generator=gen, device=device, dtype=dtype)
    y = torch.randn(1, 2816, generator=gen, device=device, dtype=dtype)

    def forward():
        with torch.inference_mode():
            return unet(x, timesteps=t, context=context, y=y)

    res = {"comfyui": comfy.version, "model": model_class, "dtype": args.dtype, "layers": len(layers),
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "latent": [1, 4, size, size]}
    res["plain_ms"], res["plain_all"] = timed(forward, args.runs, warmup=3)
    plain_out = forward().float()
    if device.type == "cuda":
        res["plain_gpu_ms"], _ = gpu_profile(forward)
    # The host's own bypass hook around every layer with an adapter that does nothing: the floor
    # of any adapter's bypass_forward in this host.
    null = inject(net, {layer.key: NullAdapter() for layer in layers}, 1.0)
    res["hook_only_ms"], _ = timed(forward, args.runs)
    null.eject(None)
    # The floor of any rotation run as its own kernel after the layer: one read and one write
    # of every adapted layer's output (an in-place multiply by 1 in a forward hook).
    modules = dict(unet.named_modules())
    hooks = [modules[layer.name].register_forward_hook(lambda mod, inp, out: out.mul_(1.0)) for layer in layers]
    res["touch_ms"], _ = timed(forward, args.runs)
    for hook in hooks:
        hook.remove()

    adapter_cls = type(next(iter(adapters_for(comfy, layers[:1]).values())))
    cache = sys.modules[adapter_cls.__module__].CACHE
    # first forward after a strength change, lazily: each layer prepares its rotation when it runs
    adapters = adapters_for(comfy, layers)
    injection = inject(net, adapters, 1.0)
    res["first_lazy_ms"], out = once(forward)
    if device.type == "cuda":
        from triton import knobs

        res["triton_launch_enter_hooks"] = repr(getattr(knobs.runtime.launch_enter_hook, "calls", "?"))
    res["bypass_ms"], res["bypass_all"] = timed(forward, args.runs)  # before any profiler (launch hooks)
    if device.type == "cuda":
        with launch_hook():  # every launch through the hooked path, as before Session 11
            res["bypass_hooked_ms"], res["bypass_hooked_all"] = timed(forward, args.runs)
        # where a bypass forward's GPU time goes
        res["bypass_gpu_ms"], res["profile"] = gpu_profile(forward)
    res["python_profile"] = python_profile(forward)
    if device.type == "cuda":
        res["triton_launch_enter_hooks_after_profiles"] = repr(getattr(knobs.runtime.launch_enter_hook, "calls", "?"))
        if args.sweep:
            res["sweep"] = shape_sweep(pack_fused(adapters), forward)
    res["bypass_changed_output_rel"] = ((out.float() - plain_out).norm() / plain_out.norm()).item()
    injection.eject(None)
    # a strength change with the batched preparation our loader runs on a GPU before sampling
    adapters = adapters_for(comfy, layers, seed=10_000)
    res["prepare_all_ms"], _ = once(lambda: adapter_cls.prepare_all(list(adapters.values()), 0.7, device))
    injection = inject(net, adapters, 0.7)
    res["first_prepared_ms"], _ = once(forward)
    res["bypass_ms_s07"], _ = timed(forward, args.runs)
    injection.eject(None)
    res["plain_ms_after"], _ = timed(forward, args.runs)
    plain = min(res["plain_ms"], res["plain_ms_after"])
    res["overhead_pct"] = 100 * (res["bypass_ms"] / plain - 1)
    res["touch_overhead_pct"] = 100 * (res["touch_ms"] / plain - 1)
    res["hook_only_overhead_pct"] = 100 * (res["hook_only_ms"] / plain - 1)
    res["cache_counts"] = dict(cache.counts)
    if device.type == "cuda":
        res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(res.pop("profile", ""))
    print(res["python_profile"])
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_all") and k not in ("python_profile", "sweep")},
                     indent=1))
    if args.json:
        harness.write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
