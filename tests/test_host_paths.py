"""The pack's adapter on the patch paths of the host it runs in (ComfyUI 0.3.75 or 0.28), on the CPU.

ComfyUI 0.28 hands adapters float16 working copies on a modern GPU (``lora_compute_dtype``),
calls them with ``intermediate_dtype=weight.dtype`` on the low-VRAM path, and with dynamic VRAM
rebuilds them from staging copies (``LowVramPatch.prepare`` -> ``comfy.lora.prefetch_prepared_value``)
each time a module's weights are loaded. These tests drive the host's own functions with the
arguments the GPU path uses, on the CPU, and compare every result with a float64 dense
reference: at most one unit in the last place of the working dtype away (what rounding the exact
result to that dtype allows). Tests of functions a host lacks are skipped there.

The second half tests ``boft_core.cache.PatchCache`` itself (keys, budgets, eviction, logging).
"""

import logging
import sys
import zlib

import pytest
import torch

import boft_core
from boft_core import butterfly, merge
from boft_core.cache import PatchCache

HALF = [torch.float16, torch.bfloat16]


def seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def make_layer(gen, kind="lycoris-boft", m=4, nb=16, b=10, rows=None, alpha=0.0):
    """A layer with non-trivial rotations and a per-channel scale (``rows`` output channels)."""
    n = nb * b
    rows = n if rows is None else rows
    return boft_core.BoftLayer("x", kind, torch.randn(m, nb, b, b, generator=gen) * 0.15, alpha=alpha,
                               scale=1 + 0.1 * torch.randn(rows, generator=gen))


def reference(layer, strength, mode, weight) -> torch.Tensor:
    """``scale * B W`` (output side) or ``scale * W Bᵀ`` (input side) with B a float64 dense n x n
    matrix of the float64 rotations: independent of the fast and fused paths."""
    patch = merge.prepare(layer, strength, mode, dtype=torch.float64)
    dense = butterfly.dense_matrix(patch.rotations, patch.layout)
    w = weight.double().reshape(weight.shape[0], -1)
    new = dense @ w if patch.side == "out" else w @ dense.t()
    if patch.scale is not None:
        new = new * patch.scale.unsqueeze(1)
    return new.reshape(weight.shape)


def assert_within_one_ulp(got: torch.Tensor, want64: torch.Tensor):
    """|got - exact| <= one unit in the last place of got's dtype at the exact value (plus what
    float32 arithmetic adds, 1e-6 of the largest value: it matters only for values near zero,
    whose ulp is tiny), everywhere; no worse than rounding the exact result, at worst; and equal
    to the correctly rounded value almost everywhere."""
    dtype = got.dtype
    rounded = want64.to(dtype)
    mag = rounded.abs()
    ulp = (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).double()
    err = (got.double() - want64).abs()
    slack = 1e-6 * want64.abs().max()
    assert (err <= ulp + slack).all(), f"{((err - slack) / ulp).max().item():.3f} ulp at worst"
    assert err.max() <= (rounded.double() - want64).abs().max() + slack
    assert (got == rounded).double().mean().item() > 0.98  # a flip only where exact is near a tie


def adapter_for(pack, layer, mode="lycoris"):
    adapter_mod = sys.modules[pack.__name__ + ".nodes.adapter"]
    return adapter_mod, adapter_mod.BOFTAdapter.from_layer(layer, mode)


# --- both hosts --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", ["lycoris-boft", "peft-boft"])
def test_calculate_weight_merges_half_working_copies_in_place(comfy, pack, kind, dtype):
    """``comfy.lora.calculate_weight`` on a float16/bfloat16 working copy, as 0.28's
    ``patch_weight_to_device`` calls it on a GPU (the copy is in ``lora_compute_dtype``: float16
    at compute capability >= 8) and its low-VRAM path (``intermediate_dtype=weight.dtype``): the
    adapter merges into the copy itself (the CUDA kernel there, the CPU column slices here), in
    float32, rounded once; also for a row slice of a bigger weight (an offset patch)."""
    gen = torch.Generator().manual_seed(seed("cw", kind, str(dtype)))
    n = 160
    out_side = kind == "lycoris-boft"
    shape = (n, 12, 3, 3) if out_side else (48, n)
    layer = make_layer(gen, kind, rows=shape[0])
    _, adapter = adapter_for(pack, layer)
    weight = torch.randn(shape, generator=gen).to(dtype)
    want = reference(layer, 0.7, "lycoris", weight)
    for intermediate in (dtype, torch.float32):  # low-VRAM path, then patch_weight_to_device
        work = weight.clone()
        got = comfy.lora.calculate_weight([(0.7, adapter, 1.0, None, None)], work, "k",
                                          intermediate_dtype=intermediate)
        assert got is work and got.dtype == dtype
        assert_within_one_ulp(got, want)
    if out_side:  # a row slice: ComfyUI narrows the weight to the offset and keeps the rest
        big = torch.randn((3 * n,) + shape[1:], generator=gen).to(dtype)
        big[n:2 * n] = weight
        before = big.clone()
        got = comfy.lora.calculate_weight([(0.7, adapter, 1.0, (0, n, n), None)], big, "k",
                                          intermediate_dtype=dtype)
        assert got is big
        assert_within_one_ulp(big[n:2 * n], want)
        assert torch.equal(big[:n], before[:n]) and torch.equal(big[2 * n:], before[2 * n:])


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
def test_lowvram_patch_call(comfy, pack, dtype):
    """``comfy.model_patcher.LowVramPatch(key, patches)(weight)``: what ``comfy.ops`` runs per
    forward on a module whose weights stay off the GPU (0.28: also dynamic VRAM's per-load
    patch), with ``intermediate_dtype=weight.dtype``; the weight in the module's dtype."""
    gen = torch.Generator().manual_seed(seed("lowvram", str(dtype)))
    layer = make_layer(gen, alpha=0.004)
    _, adapter = adapter_for(pack, layer, "orthogonal")
    weight = torch.randn(160, 40, generator=gen).to(dtype)
    want = reference(layer, 0.6, "orthogonal", weight)
    fn = comfy.model_patcher.LowVramPatch("k", {"k": [(0.6, adapter, 1.0, None, None)]})
    got = fn(weight.clone())
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 2e-6
    else:
        assert_within_one_ulp(got, want)


def test_patch_model_with_half_working_copies(comfy, pack, monkeypatch):
    """``ModelPatcher.patch_model`` of a float16 module, with ``lora_compute_dtype`` made to
    answer float16 as it does for a CUDA device of compute capability >= 8 on 0.28 (0.3.75 has
    no such function and patches in a float32 copy; both round the exact result once). Unpatching
    restores every bit."""
    gen = torch.Generator().manual_seed(seed("patch_model"))
    mm = comfy.model_management
    monkeypatch.setattr(mm, "lora_compute_dtype", lambda device: torch.float16, raising=False)
    if hasattr(mm, "LORA_COMPUTE_DTYPES"):
        monkeypatch.setattr(mm, "LORA_COMPUTE_DTYPES", {})
    net = torch.nn.Sequential(torch.nn.Linear(40, 160), torch.nn.Conv2d(8, 160, 3)).half()
    layers = [make_layer(gen), make_layer(gen, m=3)]
    keys = ["0.weight", "1.weight"]
    adapters = {key: adapter_for(pack, layer)[1] for key, layer in zip(keys, layers, strict=True)}
    before = {key: net.state_dict()[key].clone() for key in keys}
    patcher = comfy.model_patcher.ModelPatcher(net, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    assert set(patcher.add_patches(adapters, 0.8)) == set(keys)
    patcher.patch_model(device_to=torch.device("cpu"))
    for key, layer in zip(keys, layers, strict=True):
        got = net.state_dict()[key]
        assert got.dtype == torch.float16
        assert_within_one_ulp(got, reference(layer, 0.8, "lycoris", before[key]))
    patcher.unpatch_model()
    for key in keys:
        assert torch.equal(net.state_dict()[key], before[key])


# --- ComfyUI 0.28: dynamic VRAM's staging and rebuilds -----------------------------------------


def needs_028(comfy):
    if not hasattr(comfy.lora, "prefetch_prepared_value") or not hasattr(comfy.model_patcher.LowVramPatch, "prepare"):
        pytest.skip("this host has no prefetch_prepared_value / LowVramPatch.prepare (ComfyUI < 0.28)")


@pytest.mark.parametrize("dtype", HALF)
def test_dynamic_vram_staging_rebuilds_reuse_the_prepared_rotation(comfy, pack, dtype):
    """Dynamic VRAM (0.28 ``ops.cast_modules_with_vbar``): ``LowVramPatch.memory_required()``,
    then ``prepare(destination, stream, copy=True, commit=True)`` copies every tensor of every
    patch into one staging buffer (on a GPU: a CUDA uint8 buffer; here a CPU one) and rebuilds
    the adapters as ``type(v)(v.loaded_keys, weights)``; ``__call__`` merges with those. The
    rebuilt adapter finds the rotation prepared for the original one (no new Cayley solve, no
    new plan), keeps alpha a float and the token a string, and the result is exact."""
    needs_028(comfy)
    adapter_mod, adapter = adapter_for(pack, make_layer(torch.Generator().manual_seed(seed("dyn", str(dtype))),
                                                        alpha=0.004))
    gen = torch.Generator().manual_seed(seed("dyn w", str(dtype)))
    layer = adapter.layer()
    weight = torch.randn(160, 72, generator=gen).to(dtype)
    want = reference(layer, 0.9, "lycoris", weight)
    patches = {"k": [(0.9, adapter, 1.0, None, None)]}
    first = comfy.model_patcher.LowVramPatch("k", patches)
    assert_within_one_ulp(first(weight.clone()), want)  # prepares the rotation (original adapter)
    prepared = adapter_mod.CACHE.counts["prepared"]
    for _ in range(3):  # each load after an eviction: a fresh LowVramPatch, fresh staging, a rebuild
        fn = comfy.model_patcher.LowVramPatch("k", patches)
        staging = torch.empty(fn.memory_required(), dtype=torch.uint8)
        rebuilt = fn.prepare(staging, None, copy=True, commit=True)[0][1]
        assert type(rebuilt) is type(adapter) and rebuilt is not adapter
        blocks, scale, alpha, kind, mode, name, token, rule = rebuilt.weights
        assert blocks.untyped_storage().data_ptr() == staging.untyped_storage().data_ptr()  # a staging copy
        assert torch.equal(blocks, layer.blocks) and isinstance(alpha, float) and token == adapter.weights[6]
        assert_within_one_ulp(fn(weight.clone()), want)
    assert adapter_mod.CACHE.counts["prepared"] == prepared


def test_prefetch_prepared_value_rebuild_then_calculate_weight(comfy, pack):
    """``comfy.lora.prefetch_prepared_value`` (0.28) on a patch list, with and without a
    destination (the GPU path passes a CUDA uint8 buffer and a stream): tensors become views of
    the buffer, alpha and the token pass through, and ``calculate_weight`` with the rebuilt
    adapters on a float16 copy and ``intermediate_dtype=weight.dtype`` is exact."""
    needs_028(comfy)
    gen = torch.Generator().manual_seed(seed("prefetch"))
    layers = [make_layer(gen, alpha=0.003), make_layer(gen, m=2)]
    _, a0 = adapter_for(pack, layers[0])
    _, a1 = adapter_for(pack, layers[1], "orthogonal")
    patches = [(0.5, a0, 1.0, None, None), (1.3, a1, 1.0, None, None)]
    counter = [0]
    comfy.lora.prefetch_prepared_value(patches, counter, None, None, False)  # sizing only
    buffer = torch.empty(counter[0], dtype=torch.uint8)
    rebuilt = comfy.lora.prefetch_prepared_value(patches, [0], buffer, None, True)
    for (_, new, *_), (_, old, *_) in zip(rebuilt, patches, strict=True):
        assert new is not old and new.weights[2:] == old.weights[2:]
        assert torch.equal(new.weights[0], old.weights[0]) and torch.equal(new.weights[1], old.weights[1])
    weight = torch.randn(160, 50, generator=gen).half()
    step = comfy.lora.calculate_weight(rebuilt[:1], weight.clone(), "k", intermediate_dtype=torch.float16)
    assert_within_one_ulp(step, reference(layers[0], 0.5, "lycoris", weight))
    both = comfy.lora.calculate_weight(rebuilt[1:], step.clone(), "k", intermediate_dtype=torch.float16)
    assert_within_one_ulp(both, reference(layers[1], 1.3, "orthogonal", step))
    got = comfy.lora.calculate_weight(rebuilt, weight.clone(), "k", intermediate_dtype=torch.float16)
    assert torch.equal(got, both)  # patches apply in order, each on the last one's result


# --- boft_core.cache ---------------------------------------------------------------------------


def test_cache_keys_by_token_strength_mode_and_dtype():
    """Entries are found by the layer's token, whatever object asks; another strength, mode or
    dtype is another entry; a CPU patch is merge.prepare's."""
    gen = torch.Generator().manual_seed(seed("cache keys"))
    layer = make_layer(gen)
    cache = PatchCache()
    def fetch(strength=0.5, mode="lycoris", dtype=torch.float32):
        return cache.patch(layer.token, lambda: make_copy(layer), strength, mode, dtype, "cpu")
    def make_copy(lay):
        return boft_core.BoftLayer(lay.name, lay.kind, lay.blocks.clone(), lay.alpha, lay.scale, token=lay.token)
    first = fetch()
    assert fetch() is first and cache.counts["prepared"] == 1
    assert torch.equal(first.rotations, merge.prepare(layer, 0.5, "lycoris").rotations)
    assert fetch(0.6) is not first and fetch(mode="orthogonal") is not first
    assert fetch(dtype=torch.float64).rotations.dtype == torch.float64
    assert cache.counts["prepared"] == 4 and len(cache.entries(layer.token)) == 4
    assert cache.held("cpu") > 0


def test_cache_host_budget_evicts_least_recently_used_and_logs(caplog):
    """Over ``host_budget`` the least recently used entry goes, with a log line (INFO the first
    time, DEBUG after); an evicted layer is prepared again when asked for."""
    gen = torch.Generator().manual_seed(seed("cache budget"))
    layers = [make_layer(gen) for _ in range(3)]
    probe = PatchCache()
    probe.patch(layers[0].token, lambda: layers[0], 1.0, "lycoris", torch.float32, "cpu")
    one = probe.held("cpu")
    cache = PatchCache(host_budget=int(2.5 * one))
    def get(i):
        return cache.patch(layers[i].token, lambda: layers[i], 1.0, "lycoris", torch.float32, "cpu")
    with caplog.at_level(logging.DEBUG, logger="comfyui-boft"):
        get(0), get(1)
        get(0)  # 0 is now the most recently used
        assert not caplog.records
        get(2)  # over budget: 1 goes
        assert cache.counts["evicted"] == 1 and cache.held("cpu") <= cache.host_budget
        assert caplog.records[-1].levelno == logging.INFO and "budget" in caplog.records[-1].getMessage()
        assert cache.entries(layers[1].token) == {} and cache.entries(layers[0].token)
        get(1)  # prepared again; 0 goes now
        assert cache.counts["prepared"] == 4 and caplog.records[-1].levelno == logging.DEBUG
        assert cache.entries(layers[0].token) == {}


def test_cache_device_budget_on_another_device():
    """Device entries (here on the meta device, which has the tensors' shapes and no data: the
    accounting and the LRU, not the values) stay within ``device_budget``; the host entry stays,
    so a device miss is a copy, not a new preparation."""
    gen = torch.Generator().manual_seed(seed("cache device"))
    layers = [make_layer(gen, kind="peft-boft", rows=40) for _ in range(3)]
    cache = PatchCache()
    cache.patch(layers[0].token, lambda: layers[0], 1.0, "lycoris", torch.float32, "meta")
    one = cache.held("meta")
    assert one > 0
    cache.device_budget = int(2.5 * one)
    for i in (1, 2, 0):
        got = cache.patch(layers[i].token, lambda i=i: layers[i], 1.0, "lycoris", torch.float32, "meta")
        assert got.rotations.device.type == "meta"
    assert cache.held("meta") <= cache.device_budget and cache.counts["evicted"] == 2  # 0, then 1
    assert cache.counts["prepared"] == 3  # the evicted one came back from its host entry


def test_cache_prepare_many_equals_one_by_one():
    """prepare_many (equal-shaped layers batched) gives the patches the lazy path gives."""
    gen = torch.Generator().manual_seed(seed("cache many"))
    layers = [make_layer(gen) for _ in range(3)] + [make_layer(gen, m=3, nb=8)]
    cache = PatchCache()
    assert cache.prepare_many([(lay.token, lambda lay=lay: lay) for lay in layers], 0.7, "lycoris",
                              torch.float32, "cpu") == 4
    assert cache.prepare_many([(layers[0].token, lambda: layers[0])], 0.7, "lycoris", torch.float32, "cpu") == 0
    for layer in layers:
        got = cache.patch(layer.token, lambda: pytest.fail("prepared again"), 0.7, "lycoris", torch.float32, "cpu")
        want = merge.prepare(layer, 0.7, "lycoris")
        assert torch.allclose(got.rotations, want.rotations, atol=1e-6)
    assert cache.counts["prepared"] == 4
