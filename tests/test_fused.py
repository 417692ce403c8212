"""The in-place butterfly plan (boft_core.fused) against the reference and a float64 dense matrix.

The plan and its torch path run everywhere; the Triton kernels only where Triton and CUDA are
(skipped otherwise).
"""

import zlib

import pytest
import torch
from oracles import within_one_ulp

from boft_core import butterfly, fused

LAYOUTS = (butterfly.INTERLEAVED, butterfly.CONCATENATED)
# (m, nb, b): m = 1 (odd b too, concatenated only), b = 2, full butterflies, PEFT-style block
# counts (multiples of 2^(m-1)), and 10 x 10 blocks (SDXL's) up to m = 11.
SHAPES = [(1, 1, 4), (1, 6, 4), (1, 5, 3), (1, 4, 7), (2, 2, 4), (2, 6, 6), (3, 4, 2), (6, 32, 2),
          (3, 8, 10), (3, 12, 4), (4, 8, 12), (5, 16, 6), (7, 64, 10), (8, 256, 10), (11, 1024, 10)]
CASES = [(layout, shape) for layout in LAYOUTS for shape in SHAPES
         if butterfly.check_butterfly_shape(*shape, layout) is None]
needs_triton = pytest.mark.skipif(not fused.available(), reason="needs Triton and a CUDA device")


def seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def rotations(m, nb, b, gen, dtype=torch.float64):
    a = torch.randn(m, nb, b, b, generator=gen, dtype=torch.float64) * 0.3
    return butterfly.cayley(a - a.transpose(-1, -2)).to(dtype)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("layout,shape", CASES)
def test_plan_matches_reference_and_dense(layout, shape, transpose):
    m, nb, b = shape
    gen = torch.Generator().manual_seed(seed(layout, shape, transpose))
    rot = rotations(m, nb, b, gen)
    x = torch.randn(nb * b, 5, generator=gen, dtype=torch.float64)
    ref = butterfly.apply_stages(x, rot, layout, transpose)
    if nb * b <= 1280:  # the dense matrix: a float64 n x n product
        mat = butterfly.dense_matrix(rot, layout)
        assert torch.allclose(ref, (mat.t() if transpose else mat) @ x, atol=1e-12)
    for max_block in (None, 1, 8, 80, 10_000) if nb * b <= 2560 else (None,):  # run lengths, one stage to all
        plan = fused.FusedButterfly(rot, layout, transpose, max_block=max_block)
        rows = torch.cat([run.idx.reshape(-1) for run in plan.runs])
        counts = torch.bincount(rows, minlength=nb * b)
        assert (counts == len(plan.runs)).all()  # each run's blocks cover every row once
        for run in plan.runs:  # the kernel's formula for idx
            inner, size, unit = run.geometry
            k = torch.arange(run.idx.shape[0]).unsqueeze(1)
            r = torch.arange(run.d).unsqueeze(0)
            rows = (k // inner) * size * inner * unit + (r // unit) * inner * unit + (k % inner) * unit + r % unit
            assert torch.equal(rows, run.idx)
        y = x.clone()
        got = plan.apply_(y)
        assert got is y
        assert (got - ref).abs().max() <= 1e-12 * ref.abs().max(), max_block


def test_plan_definition_by_hand():
    """x[idx_j[k]] = blocks_j[k] @ x[idx_j[k]], run by run, is the documented contract."""
    gen = torch.Generator().manual_seed(1)
    rot = rotations(5, 16, 6, gen)
    x = torch.randn(96, 3, generator=gen, dtype=torch.float64)
    for transpose in (False, True):
        plan = fused.FusedButterfly(rot, butterfly.INTERLEAVED, transpose, max_block=12)
        assert len(plan.runs) > 1
        y = x.clone()
        for j, run in enumerate(plan.runs):
            for k in range(run.idx.shape[0]):
                y[run.idx[k]] = plan.blocks(j)[k] @ y[run.idx[k]]
        assert torch.allclose(y, butterfly.apply_stages(x, rot, butterfly.INTERLEAVED, transpose), atol=1e-12)


def test_float32_shapes_strides_and_apply():
    gen = torch.Generator().manual_seed(2)
    rot = rotations(4, 8, 10, gen)
    plan = fused.FusedButterfly(rot.float(), butterfly.INTERLEAVED)
    for x in (torch.randn(80, 7, generator=gen), torch.randn(80, 3, 2, 2, generator=gen),
              torch.randn(9, 80, generator=gen).t(),  # unit row stride
              torch.randn(80, 3, 4, generator=gen).transpose(1, 2),  # not viewable as (80, -1)
              torch.randn(80, generator=gen)):
        ref = butterfly.apply_stages(x.double(), rot, butterfly.INTERLEAVED)
        before = x.clone()
        out = plan.apply(x)
        assert torch.equal(x, before) and out.shape == x.shape
        assert rel(out, ref) < 1e-6
        y = x.clone()
        assert plan.apply_(y) is y and rel(y, ref) < 1e-6


def test_rejects_bad_input():
    rot = torch.eye(4).expand(2, 2, 4, 4)
    with pytest.raises(ValueError):
        fused.FusedButterfly(rot, "diagonal")
    with pytest.raises(ValueError):
        fused.FusedButterfly(torch.eye(3).expand(2, 2, 3, 3), butterfly.INTERLEAVED)
    with pytest.raises(ValueError):
        fused.FusedButterfly(rot, butterfly.INTERLEAVED, precision="tf16")
    with pytest.raises(ValueError):
        fused.FusedButterfly(rot, butterfly.INTERLEAVED).variant("bf16")
    plan = fused.FusedButterfly(rot, butterfly.INTERLEAVED)
    with pytest.raises(ValueError):
        plan.apply_(torch.zeros(7, 2))
    with pytest.raises(ValueError):
        plan.apply_(torch.zeros(8, 2, dtype=torch.float64))


def test_module_imports_without_triton():
    assert fused.available() in (True, False)
    if fused.triton is None:
        assert not fused.available()


@needs_triton
@pytest.mark.parametrize("precision", ["tf32x3", "fma", "ieee"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_matches_float64(layout, transpose, precision):
    gen = torch.Generator().manual_seed(seed("triton", layout, transpose, precision))
    for m, nb, b in [(1, 5, 3), (1, 1, 4), (3, 8, 10), (5, 16, 6), (8, 128, 10), (11, 1024, 10)]:
        if butterfly.check_butterfly_shape(m, nb, b, layout):
            continue
        rot = rotations(m, nb, b, gen, torch.float32).cuda()
        plan = fused.FusedButterfly(rot, layout, transpose, precision=precision)
        for cols in (1, 77, 300):
            x = torch.randn(nb * b, cols, generator=gen).cuda()
            ref = butterfly.apply_stages(x.double(), rot.double(), layout, transpose)
            for i in range(2):  # the JIT launch, then the direct one
                y = x.clone()
                assert plan.apply_triton_(y) is y
                assert rel(y, ref) < 1e-5, (m, nb, b, cols, i)


@needs_triton
def test_triton_needs_contiguous_rows_else_torch_path():
    gen = torch.Generator().manual_seed(3)
    rot = rotations(4, 8, 10, gen, torch.float32).cuda()
    plan = fused.FusedButterfly(rot, butterfly.INTERLEAVED)
    x = torch.randn(33, 80, generator=gen).cuda().t()  # unit row stride
    ref = butterfly.apply_stages(x.double(), rot.double(), butterfly.INTERLEAVED)
    with pytest.raises(ValueError):
        plan.apply_triton_(x.clone())
    y = x.t().contiguous().t()
    assert plan.apply_(y) is y and rel(y, ref) < 1e-5


@needs_triton
@pytest.mark.parametrize("kind", ["lycoris-boft", "peft-boft"])
def test_merge_in_place_on_cuda(kind):
    """merge.try_merge_into on a CUDA float32 weight: the Triton plan for output-side rotations (rows
    contiguous), the fast path for input-side ones (a transposed view); float64 reference."""
    from boft_core import merge
    from boft_core.formats import BoftLayer

    gen = torch.Generator().manual_seed(31)
    n = 1280
    shape = (n, 96) if kind.startswith("lycoris") else (72, n)
    layer = BoftLayer("x", kind, torch.randn(8, n // 10, 10, 10, generator=gen) * 0.1,
                      scale=1 + 0.1 * torch.randn(shape[0], generator=gen))
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    want = merge.apply(merge.prepare(layer, 0.6, "orthogonal", dtype=torch.float64), weight)
    patch = merge.prepare(layer, 0.6, "orthogonal")
    patch.rotations = patch.rotations.cuda()
    patch.scale = patch.scale.cuda()
    target = weight.float().cuda()
    assert merge.try_merge_into(patch, target)
    assert (("fused" in patch._plans) == kind.startswith("lycoris"))
    assert ((target.double().cpu() - want).norm() / want.norm()).item() < 1e-5


@needs_triton
def test_prepare_many_on_cuda_shares_one_plan_build():
    """merge.prepare_many on a GPU: one fused plan per group of equal layers, split per layer;
    each layer's in-place merge matches the float64 reference."""
    from boft_core import merge
    from boft_core.formats import BoftLayer

    gen = torch.Generator().manual_seed(37)
    layers = [BoftLayer(f"l{i}", "lycoris-boft", torch.randn(8, 128, 10, 10, generator=gen) * 0.1)
              for i in range(4)]
    patches = merge.prepare_many(layers, 0.8, "lycoris", device=torch.device("cuda"))
    for layer, patch in zip(layers, patches, strict=True):
        assert "fused" in patch._plans and patch._plans["fused"].n == 1280
        weight = torch.randn(1280, 200, generator=gen, dtype=torch.float64)
        want = merge.apply(merge.prepare(layer, 0.8, "lycoris", dtype=torch.float64), weight)
        target = weight.float().cuda()
        assert merge.try_merge_into(patch, target)
        assert ((target.double().cpu() - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scale_folded_into_the_last_run_and_with_storage(layout):
    """FusedButterfly(scale=s) computes s * (B x) (float64, every run length); with_storage runs the
    same geometry over another layer's blocks; split pieces with a stacked scale are each part's."""
    gen = torch.Generator().manual_seed(seed("scale", layout))
    rot = rotations(5, 16, 10, gen)
    s = 1 + 0.1 * torch.randn(160, generator=gen, dtype=torch.float64)
    x = torch.randn(160, 7, generator=gen, dtype=torch.float64)
    for transpose in (False, True):
        want = s.unsqueeze(1) * butterfly.apply_stages(x, rot, layout, transpose)
        for max_block in (None, 1, 10_000):
            plan = fused.FusedButterfly(rot, layout, transpose, max_block=max_block, scale=s)
            assert torch.allclose(plan.apply(x), want, atol=1e-12)
    other = rotations(5, 16, 10, gen)
    plan = fused.FusedButterfly(rot, layout)
    swapped = plan.with_storage(fused.FusedButterfly(other, layout).storage)
    assert torch.allclose(swapped.apply(x), butterfly.apply_stages(x, other, layout), atol=1e-12)
    assert torch.allclose(plan.apply(x), butterfly.apply_stages(x, rot, layout), atol=1e-12)
    parts = [rotations(5, 16, 10, gen) for _ in range(3)]
    scales = [1 + 0.1 * torch.randn(160, generator=gen, dtype=torch.float64) for _ in range(3)]
    pieces = fused.FusedButterfly(torch.cat(parts, dim=1), layout, scale=torch.cat(scales)).split(3)
    for r, sc, piece in zip(parts, scales, pieces, strict=True):
        assert torch.allclose(piece.apply(x), sc.unsqueeze(1) * butterfly.apply_stages(x, r, layout), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_path_half_in_float32_slices(dtype):
    """The torch path on a float16/bfloat16 x with a float32 plan: float32 a slice at a time,
    rounded once (within one ulp of the float64 result)."""
    gen = torch.Generator().manual_seed(seed("torch half", str(dtype)))
    rot = rotations(8, 128, 10, gen)
    s = 1 + 0.1 * torch.randn(1280, generator=gen, dtype=torch.float64)
    x = torch.randn(1280, 45, generator=gen).to(dtype)
    want = s.unsqueeze(1) * butterfly.apply_stages(x.double(), rot, butterfly.INTERLEAVED)
    plan = fused.FusedButterfly(rot.float(), butterfly.INTERLEAVED, scale=s.float())
    for slice_cols in (None, 1, 16):
        y = x.clone()
        assert plan.apply_torch_(y, slice_cols=slice_cols) is y and within_one_ulp(y, want)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_half_in_place(layout, dtype):
    """The kernel on float16/bfloat16 x (ComfyUI 0.28's working copies on a GPU): one run in place
    (load half, float32 product, store half), several runs through a float32 scratch a column
    slice at a time (slices of 64 columns and a wider last one here, and the whole width); within
    one ulp of the float64 result, the scale folded in."""
    gen = torch.Generator().manual_seed(seed("triton half", layout, str(dtype)))
    for m, nb, b in [(3, 8, 10), (8, 128, 10), (11, 1024, 10)]:
        rot = rotations(m, nb, b, gen, torch.float32).cuda()
        s = (1 + 0.1 * torch.randn(nb * b, generator=gen)).cuda()
        plan = fused.FusedButterfly(rot, layout, scale=s)
        for cols in (2, 77, 300):
            x = torch.randn(nb * b, cols, generator=gen).to(dtype).cuda()
            want = s.double().unsqueeze(1) * butterfly.apply_stages(x.double(), rot.double(), layout)
            for scratch in (None, nb * b * 64):
                for i in range(2):  # the JIT launch, then the direct one
                    y = x.clone()
                    assert plan.apply_triton_(y, scratch_elems=scratch) is y
                    assert within_one_ulp(y.cpu(), want.cpu()), (m, cols, scratch, i)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cache_on_cuda_plans_budget_and_merge(dtype):
    """boft_core.cache on a GPU: prepare_many keeps kernel plans on the device within the budget
    (the rest on the host, pinned), plan() copies a missing one in and evicts the least recently
    used; every merge (weights in ``dtype``) matches float64."""
    from boft_core import merge
    from boft_core.cache import PatchCache
    from boft_core.formats import BoftLayer

    gen = torch.Generator().manual_seed(seed("cache cuda", str(dtype)))
    layers = [BoftLayer(f"l{i}", "lycoris-boft", torch.randn(8, 128, 10, 10, generator=gen) * 0.1,
                        scale=1 + 0.1 * torch.randn(1280, generator=gen)) for i in range(5)]
    probe = fused.FusedButterfly(torch.eye(10).expand(8, 128, 10, 10).cuda(), butterfly.INTERLEAVED)
    one = probe.storage.numel() * 4
    cache = PatchCache(device_budget=int(2.5 * one))
    assert cache.prepare_many([(lay.token, lambda lay=lay: lay) for lay in layers], 0.8, "lycoris",
                              torch.float32, "cuda") == 5
    assert cache.held("cuda") == 2 * one and cache.counts["evicted"] == 0
    for _ in range(2):
        for layer in layers:
            host, plan = cache.plan(layer.token, lambda: pytest.fail("prepared again"), 0.8, "lycoris",
                                    torch.float32, "cuda")
            assert plan.storage.is_cuda and cache.held("cuda") <= cache.device_budget
            weight = torch.randn(1280, 96, generator=gen).to(dtype)
            want = merge.apply(merge.prepare(layer, 0.8, "lycoris", dtype=torch.float64), weight.double())
            assert host is cache.patch(layer.token, None, 0.8, "lycoris", torch.float32, "cpu")
            target = weight.cuda()
            assert merge.try_merge_into(host, target, plan)
            got = target.cpu()
            if dtype == torch.float32:
                assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
            else:
                assert within_one_ulp(got, want)
    assert cache.counts["evicted"] > 0 and cache.counts["prepared"] == 5
    for layer in layers:  # the host copies (one per group, views into it) are the layers' rotations
        host = cache.patch(layer.token, None, 0.8, "lycoris", torch.float32, "cpu")
        assert host.rotations.device.type == "cpu"
        assert torch.allclose(host.rotations, merge.prepare(layer, 0.8, "lycoris").rotations, atol=1e-5)
        assert torch.allclose(host.scale, layer.scale)
    lazy = BoftLayer("lazy", "lycoris-boft", torch.randn(8, 128, 10, 10, generator=gen) * 0.1,
                     scale=1 + 0.1 * torch.randn(1280, generator=gen))  # prepared on first use, alone
    host, plan = cache.plan(lazy.token, lambda: lazy, 0.8, "lycoris", torch.float32, "cuda")
    assert torch.allclose(host.rotations, merge.prepare(lazy, 0.8, "lycoris").rotations, atol=1e-5)
    weight = torch.randn(1280, 96, generator=gen).to(dtype)
    want = merge.apply(merge.prepare(lazy, 0.8, "lycoris", dtype=torch.float64), weight.double())
    target = weight.cuda()
    assert merge.try_merge_into(host, target, plan)
    assert within_one_ulp(target.cpu(), want) if dtype != torch.float32 else \
        ((target.cpu().double() - want).norm() / want.norm()).item() < 1e-5


def _channels_cases(n, gen):
    """Activations of every layout the bypass meets, channels ``n``: (tensor, channel_dim)."""
    return [(torch.randn(1, 7, n, generator=gen), -1),  # a linear layer's (batch, tokens, channels)
            (torch.randn(2, 300, n, generator=gen), 2),
            (torch.randn(2, n, 5, 9, generator=gen), 1),  # a convolution's NCHW
            (torch.randn(2, n, 4, 6, generator=gen).to(memory_format=torch.channels_last), 1),
            (torch.randn(n, 3, generator=gen), 0)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("precision", ["tf32x3", "fma"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_apply_channels(layout, precision, dtype):
    """The bypass's kernel path: ``S B (y - sub) + add`` on the channel axis of activations as they
    lie (channels last, NCHW, channels_last memory, batches), in place and into another tensor,
    with the float32 scratch whole and in column slices; float64 reference. Input-side plans
    (``Bᵀ``, no scale) too."""
    gen = torch.Generator().manual_seed(seed("channels", layout, precision, str(dtype)))
    for m, nb, b in [(1, 5, 3), (3, 8, 10), (8, 128, 10)]:
        if butterfly.check_butterfly_shape(m, nb, b, layout):
            continue
        n = nb * b
        rot = rotations(m, nb, b, gen, torch.float32)
        s = 1 + 0.1 * torch.randn(n, generator=gen)
        bias = torch.randn(n, generator=gen)
        for transpose in (False, True):
            scale = None if transpose else s
            plan = fused.FusedButterfly(rot.cuda(), layout, transpose, precision=precision,
                                        scale=None if scale is None else scale.cuda())
            for y, dim in _channels_cases(n, gen):
                y = y.to(dtype)
                moved = y.double().movedim(dim, 0)
                bias_dev = bias.to(dtype)  # the bias as the layer holds it
                flat = moved.reshape(n, -1) - bias_dev.double()[:, None]
                want = butterfly.apply_stages(flat, rot.double(), layout, transpose)
                if scale is not None:
                    want = scale.double()[:, None] * want
                want = (want + bias_dev.double()[:, None]).reshape(moved.shape).movedim(0, dim)
                for scratch in (None, n * 64):
                    for into in (False, True):
                        got = y.cuda()
                        out = torch.empty_like(got) if into else None
                        b_dev = bias_dev.cuda()
                        done = plan.apply_channels(got, dim, out=out, sub=b_dev, add=b_dev, scratch_elems=scratch)
                        assert done is (out if into else got)
                        res = done.cpu()
                        if dtype == torch.float32:
                            assert rel(res, want) < 1e-5, (m, nb, b, y.shape, dim, scratch, into)
                        else:
                            assert within_one_ulp(res, want), (m, nb, b, y.shape, dim, scratch, into)
                        if into:
                            assert torch.equal(got.cpu(), y)  # the input is left alone


@needs_triton
def test_triton_apply_channels_declines_what_it_cannot_take():
    gen = torch.Generator().manual_seed(5)
    rot = rotations(3, 8, 10, gen, torch.float32)
    plan = fused.FusedButterfly(rot.cuda(), butterfly.INTERLEAVED)
    y = torch.randn(3, 4, 80, generator=gen).cuda().transpose(0, 1)  # tokens no longer one block
    assert plan.apply_channels(y, -1) is None
    assert plan.apply_channels(torch.randn(4, 80, generator=gen), -1) is None  # on the CPU
    assert plan.apply_channels(torch.randn(4, 80, generator=gen).double().cuda(), -1) is None
    assert plan.apply_channels(torch.randn(4, 81, generator=gen).cuda(), -1) is None  # wrong width


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lycoris-boft", "peft-boft"])
def test_bypass_kernel_equals_the_merged_layer(kind, dtype, monkeypatch):
    """merge.bypass on CUDA runs the kernel (the torch path is made to fail) in the orthogonal and
    lycoris modes, and its output equals the layer with the float64 merged weight (the bias
    unrotated), for linear and conv layers, in float32 (relative 1e-5) and half precision
    (rounding of the activations)."""
    import torch.nn.functional as F

    from boft_core import merge
    from boft_core.formats import BoftLayer

    gen = torch.Generator().manual_seed(seed("bypass kernel", kind, str(dtype)))
    n = 160  # the butterfly's rows: output channels (LyCORIS), input features (PEFT)
    out, k = (n, 96) if kind == "lycoris-boft" else (96, n)
    scale = 1 + 0.1 * torch.randn(out, generator=gen)  # LyCORIS's rescale, PEFT's boft_s
    layer = BoftLayer("L", kind, torch.randn(4, 16, 10, 10, generator=gen) * 0.1, scale=scale)
    torch_path = merge._rotate_channels
    for mode in ("lycoris", "orthogonal", "linear"):
        monkeypatch.setattr(merge, "_rotate_channels", torch_path if mode == "linear" else None)
        for strength in (-1.0, 0.5, 2.0):
            patch = merge.prepare(layer, strength, mode)
            cuda_patch = merge.Patch(patch.name, patch.side, patch.layout, patch.rotations.cuda(),
                                     patch.scale.cuda(), patch.blend)
            for conv in (False, True) if kind == "lycoris-boft" else (False,):
                shape = (out, k // 4, 2, 2) if conv else (out, k)
                w = torch.randn(*shape, generator=gen) * 0.1
                bias = torch.randn(out, generator=gen)
                x = torch.randn(2, k // 4, 6, 6, generator=gen) if conv else torch.randn(2, 33, k, generator=gen)
                merged = merge.apply(merge.prepare(layer, strength, mode, dtype=torch.float64), w.double())
                op = F.conv2d if conv else F.linear
                want = op(x.double(), merged, bias.double())
                wd, bd, xd = w.to(dtype).cuda(), bias.to(dtype).cuda(), x.to(dtype).cuda()
                got = merge.bypass(cuda_patch, xd, lambda t, wd=wd, bd=bd, op=op: op(t, wd, bd), bd,
                                   1 if conv else -1)
                assert got.dtype == dtype and got.shape == want.shape
                # the reference through the same rounded inputs: what the merged layer gives in dtype
                ref = op(xd.double().cpu(), merge.apply(merge.prepare(layer, strength, mode, dtype=torch.float64),
                                                        wd.double().cpu()), bd.double().cpu())
                tol = 1e-5 if dtype == torch.float32 else (4e-3 if dtype == torch.float16 else 3e-2)
                assert rel(got.cpu(), ref) < tol, (mode, strength, conv)
                assert rel(got.cpu(), want) < (1e-5 if dtype == torch.float32 else 5e-2)


def test_launch_hooks_only_when_something_listens():
    """The launcher hands Triton's launch hooks to a launch only when one is set: None and an empty
    ``HookChain`` (Triton 3.6's default) cost nothing per launch."""
    from boft_core import triton_launcher

    assert not triton_launcher._hooked(None)
    assert triton_launcher._hooked(lambda *a: None)  # an older Triton's plain callable
    if fused.triton is not None:
        from triton import knobs

        chain = type(knobs.runtime.launch_enter_hook)()
        if hasattr(chain, "calls"):
            assert not triton_launcher._hooked(chain)
            chain.add(print)
            assert triton_launcher._hooked(chain)


@needs_triton
def test_triton_with_a_launch_hook_installed():
    """With a launch hook set (a profiler's), the direct launches call it and still compute
    ``B @ x``; without, they skip it (float64 reference)."""
    from triton import knobs

    gen = torch.Generator().manual_seed(seed("launch hook"))
    rot = rotations(4, 16, 10, gen, torch.float32)
    plan = fused.FusedButterfly(rot.cuda(), butterfly.INTERLEAVED)
    x = torch.randn(160, 96, generator=gen)
    want = butterfly.apply_stages(x.double(), rot.double(), butterfly.INTERLEAVED)
    seen = []
    hook = seen.append
    for listening in (False, True, False):
        if listening and hasattr(knobs.runtime.launch_enter_hook, "add"):
            knobs.runtime.launch_enter_hook.add(hook)
        try:
            for _ in range(2):  # the JIT launch (first use), then the direct one
                got = plan.apply_triton_(x.cuda()).cpu()
                assert rel(got, want) < 1e-5
        finally:
            if listening and hasattr(knobs.runtime.launch_enter_hook, "remove"):
                knobs.runtime.launch_enter_hook.remove(hook)
        assert len(seen) == (2 * len(plan.runs) if listening else 0)  # compiled in the first pass: direct
        seen.clear()
