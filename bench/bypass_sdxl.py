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

``--launches per-run,per-layer,auto``: the bypass forward with each of the kernel's launch
choices in turn, on the same injected adapters (``bypass_<choice>_ms`` and ``_gpu_ms``; the
last one's also as ``bypass_ms``): one launch per run, one for every run of a layer wherever the
kernel can (``kernel.layer_launch``), or the default rule (``kernel.DEFAULT_TUNING``).
``--sweep``: per call shape of one forward (plan, activation shape, layout), the GPU time of one
call per launch choice (``shape_sweep``).
"""

from __future__ import annotations

import argparse
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


def launch_tunings(kernel):
    """The kernel's launch choices by name (``--launches``; ``per-layer-<BN>[-s<stages>]``: another
    column tile, software pipelining of the block loop)."""
    import dataclasses

    default = kernel.DEFAULT_TUNING
    tunings = {"per-run": dataclasses.replace(default, layer_programs=None),
               "per-layer": dataclasses.replace(default, layer_programs=0), "auto": default}
    for bn in (16, 32, 64):
        for stages in (1, 3):
            tunings[f"per-layer-{bn}" + ("" if stages == 1 else f"-s{stages}")] = dataclasses.replace(
                default, layer_programs=0, layer_tile=(bn, default.layer_tile[1]), stages=stages)
    return tunings


def pack_modules(adapters):
    """The pack's ``boft_core.fused`` and ``boft_core.kernel`` as the host loaded them (under the
    custom node's package name, not this script's ``boft_core``), from an injected adapter's plan."""
    plan = next(iter(adapters.values()))._held[1].fused()
    fused = sys.modules[type(plan).__module__]
    return fused, sys.modules[fused.__name__.rsplit(".", 1)[0] + ".kernel"]


def use_tuning(adapters, tuning):
    """Bench only: every injected adapter's held plan (``NodeAdapter._held``, prepared by a forward)
    replaced by a variant with ``tuning`` (same blocks; compiled kernels are shared by all)."""
    for adapter in adapters.values():
        patch = adapter._held[1]
        patch._plans["fused"] = patch.fused().variant(tuning=tuning)


def call_shapes(fused, forward):
    """Bench only: the distinct calls of ``FusedButterfly.apply_channels`` in one ``forward``:
    {(n, runs, shape, stride, channel_dim, dtype, sub, add): [count, plan]}."""
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


def shape_sweep(fused, tunings, names, forward, reps=20):
    """Per distinct call of one forward (:func:`call_shapes`), with each tuning in ``names``: the GPU
    time of one call (``us``: CUDA events while ``torch.cuda._sleep`` keeps the queue full, so the
    host's launch time is hidden; median of ``reps``), the host time of the call (``host_us``:
    views, checks, launches) and the result's relative difference from the first name's. Tiles
    other than 16 compile on first use (only shapes with at least 128 column tiles x matrices at
    BN 16 get them)."""
    rows = []
    for (n, runs, shape, stride, dim, dtype, has_sub, has_add, in_place), (count, plan, scratch) in \
            sorted(call_shapes(fused, forward).items(), key=lambda kv: -kv[1][0]):
        dev = plan.storage.device
        y0 = torch.empty_strided(shape, stride, dtype=getattr(torch, dtype), device=dev).normal_()
        reference = None
        bias = torch.randn(n, device=dev, dtype=y0.dtype)
        view = fused._channels_view(y0, dim)
        batch, cols = view.shape[0], view.shape[2]
        row = {"n": n, "runs": runs, "shape": list(shape), "channel_dim": dim, "batch": batch, "cols": cols,
               "count": count, "dtype": dtype, "in_place": in_place, "us": {}}
        for name in names:
            tuning = tunings[name]
            if name.startswith("per-layer-") and batch * -(-cols // 16) < 128 and not name.startswith("per-layer-16"):
                continue
            variant = plan.variant(tuning=tuning)
            y = y0.clone()
            kw = dict(out=None if in_place else torch.empty_like(y), sub=bias if has_sub else None,
                      add=bias if has_add else None, scratch_elems=scratch)
            got = variant.apply_channels(y, dim, **kw)
            if got is None:
                continue
            got = got.float()
            if reference is None:  # the first name's result (per-run): the others must agree with it
                reference = got
            row.setdefault("rel_to_first", {})[name] = ((got - reference).norm() / reference.norm()).item()
            y.copy_(y0)
            times, host = [], []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(2_000_000)  # ~1 ms of GPU time queued before the call
                start.record()
                t0 = time.perf_counter()
                variant.apply_channels(y, dim, **kw)
                host.append((time.perf_counter() - t0) * 1e6)
                end.record()
                sync()
                times.append(start.elapsed_time(end) * 1e3)
            call_ = next(iter(variant._calls.values()))
            row["us"][name] = statistics.median(times)
            row.setdefault("host_us", {})[name] = statistics.median(host)
            row.setdefault("one_launch", {})[name] = call_ is not None and call_.layer is not None
        rows.append(row)
    return rows


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
    p.add_argument("--launches", default="auto",
                   help="comma-separated launch choices to time the bypass forward with: per-run, per-layer, "
                        "auto (the default rule), per-layer-16/32/64 (one launch, that column tile)")
    p.add_argument("--sweep", action="store_true", help="GPU time per call shape and launch choice")
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

        res["triton_launch_enter_hook"] = repr(knobs.runtime.launch_enter_hook)
    profiles = []
    names = args.launches.split(",") if device.type == "cuda" else ["auto"]
    if device.type == "cuda":
        fused, kernel = pack_modules(adapters)
        tunings = launch_tunings(kernel)
        res["default_tuning"] = repr(kernel.DEFAULT_TUNING)
    for name in names:  # the timed forwards first: the profilers below leave launch hooks behind
        if device.type == "cuda":
            use_tuning(adapters, tunings[name])
            res[f"first_{name}_ms"], _ = once(forward)  # compiles what this choice adds
        res[f"bypass_{name}_ms"], res[f"bypass_{name}_all"] = timed(forward, args.runs)
        res["bypass_ms"], res["bypass_all"] = res[f"bypass_{name}_ms"], res[f"bypass_{name}_all"]
    for name in names:
        if device.type == "cuda":  # where a bypass forward's GPU time goes
            use_tuning(adapters, tunings[name])
            forward()
            res[f"bypass_{name}_gpu_ms"], table = gpu_profile(forward)
            res["bypass_gpu_ms"] = res[f"bypass_{name}_gpu_ms"]
            profiles.append(f"--- {name}: GPU\n{table}")
        prof = python_profile(forward)
        res[f"python_profile_{name}"] = prof
        profiles.append(f"--- {name}: Python\n{prof}")
    if device.type == "cuda":
        res["triton_launch_enter_hook_after_profiles"] = repr(knobs.runtime.launch_enter_hook)
    if args.sweep and device.type == "cuda":
        res["sweep"] = shape_sweep(fused, tunings, ["per-run", "per-layer-16", "per-layer-16-s3", "per-layer-64"],
                                   forward)
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
    print("\n".join(profiles))
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_all") and not k.startswith("python_profile")
                      and k != "sweep"}, indent=1))
    if args.json:
        harness.write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
