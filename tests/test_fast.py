"""The fast butterfly (boft_core.fast) against the simple reference and a float64 dense matrix."""

import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
from oracles import within_one_ulp

from boft_core import butterfly, fast, merge
from boft_core.formats import BoftLayer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = (butterfly.INTERLEAVED, butterfly.CONCATENATED)
# (m, nb, b): m = 1 (also odd b, concatenated only), full butterflies (nb = 2^(m-1)), block
# counts that are multiples of 2^(m-1) (PEFT), the SDXL shapes' m/b, and b = 2 (h = 1).
SHAPES = [(1, 1, 4), (1, 6, 4), (1, 5, 3), (1, 4, 7), (2, 2, 4), (2, 6, 6), (3, 4, 2),
          (3, 8, 10), (3, 12, 4), (4, 8, 12), (5, 16, 6), (6, 32, 10), (7, 64, 10)]
DTYPES = {torch.float64: 1e-12, torch.float32: 2e-6}


def rotations(m, nb, b, dtype, gen):
    """Orthogonal random blocks, as prepare() makes them."""
    a = torch.randn(m, nb, b, b, generator=gen, dtype=torch.float64) * 0.3
    return butterfly.cayley(a - a.transpose(-1, -2)).to(dtype)


def dense(rot: torch.Tensor, layout: str) -> torch.Tensor:
    """B = M_{m-1} ... M_0 in float64, written from the formulas in boft-formats.md."""
    m, nb, b, _ = rot.shape
    n = nb * b
    total = torch.eye(n, dtype=torch.float64)
    for i in range(m):
        if b % 2:  # odd blocks: one stage of contiguous blocks
            order = torch.arange(n)
        elif layout == butterfly.INTERLEAVED:  # LyCORIS: view(-1, 2, k).transpose(1, 2)
            order = torch.arange(n).view(-1, 2, 2**i * b // 2).transpose(1, 2).flatten()
        else:  # PEFT: chunks c and c + 2^i of b/2 rows, concatenated
            order = torch.arange(n).view(-1, 2, 2**i, b // 2).permute(0, 2, 1, 3).flatten()
        stage = torch.zeros(n, n, dtype=torch.float64)
        for t in range(nb):
            idx = order[t * b:(t + 1) * b]
            stage[idx.unsqueeze(1), idx.unsqueeze(0)] = rot[i, t].double()
        total = stage @ total
    return total


def seed(*parts) -> int:
    """A fixed seed per test case (fresh data per case, reproducible across runs)."""
    return zlib.crc32(repr(parts).encode())


def valid(layout, m, nb, b):
    return butterfly.check_butterfly_shape(m, nb, b, layout) is None


CASES = [(layout, shape) for layout in LAYOUTS for shape in SHAPES if valid(layout, *shape)]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout,shape", CASES)
def test_fast_matches_reference_and_dense(layout, shape, dtype, transpose):
    m, nb, b = shape
    gen = torch.Generator().manual_seed(seed(layout, shape, dtype, transpose))
    rot = rotations(m, nb, b, dtype, gen)
    x = torch.randn(nb * b, 11, generator=gen, dtype=torch.float64).to(dtype)
    mat = dense(rot, layout)
    want = (mat.t() if transpose else mat) @ x.double()
    ref = butterfly.apply_stages(x, rot, layout, transpose)
    tol = DTYPES[dtype]
    for max_block in (None, 1, 8, 24, 10_000):  # every run length from one stage to all
        plan = fast.Butterfly(rot, layout, transpose, max_block=max_block)
        for slice_cols in (None, 1, 4):
            got = plan.apply(x, slice_cols=slice_cols)
            assert got.dtype == dtype and got.shape == x.shape
            scale = want.abs().max()
            assert (got.double() - want).abs().max() <= tol * scale, (max_block, slice_cols)
            assert (got - ref).abs().max() <= tol * scale, (max_block, slice_cols)
    got = fast.apply_dense(x, rot, layout, transpose=transpose)
    assert (got.double() - want).abs().max() <= tol * want.abs().max()


def test_dense_reference_is_the_reference():
    """The test's own dense matrix agrees with butterfly.dense_matrix (two readings of one spec)."""
    gen = torch.Generator().manual_seed(3)
    for layout in LAYOUTS:
        rot = rotations(4, 8, 6, torch.float64, gen)
        assert torch.allclose(dense(rot, layout), butterfly.dense_matrix(rot, layout), atol=1e-13)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_input_shapes_strides_and_no_mutation(layout):
    gen = torch.Generator().manual_seed(5)
    rot = rotations(5, 16, 4, torch.float32, gen)
    n = 64
    plan = fast.Butterfly(rot, layout)
    for x in (torch.randn(n, generator=gen), torch.randn(n, 3, 5, generator=gen),
              torch.randn(n, 3, 3, 3, generator=gen)):
        keep = x.clone()
        got = plan.apply(x, slice_cols=4)
        assert got.shape == x.shape and torch.equal(x, keep)
        want = butterfly.apply_stages(x, rot, layout)
        assert torch.allclose(got, want, atol=1e-5)
    wide = torch.randn(37, n, generator=gen)
    xt = wide.t()  # (n, 37) transposed view, as merge uses for input-side layers
    for slice_cols in (None, 5, 100):
        got = plan.apply(xt, slice_cols=slice_cols)
        assert got.stride() == xt.stride()
        assert torch.allclose(got, butterfly.apply_stages(xt, rot, layout), atol=1e-5)
        assert got.data_ptr() != xt.data_ptr()
    with pytest.raises(ValueError, match="acts on 64 rows"):
        plan.apply(torch.randn(65, 2))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("transpose", [False, True])
def test_out_and_in_place(layout, transpose):
    gen = torch.Generator().manual_seed(seed("out", layout, transpose))
    rot = rotations(6, 32, 6, torch.float64, gen)
    plan = fast.Butterfly(rot, layout, transpose, max_block=12)
    for slice_cols in (None, 3, 1000):
        x = torch.randn(192, 4, 5, generator=gen, dtype=torch.float64)
        want = butterfly.apply_stages(x, rot, layout, transpose)
        out = torch.full_like(x, float("nan"))
        assert plan.apply(x, slice_cols=slice_cols, out=out) is out
        assert torch.allclose(out, want, atol=1e-12)
        assert plan.apply(x, slice_cols=slice_cols, out=x) is x  # in place
        assert torch.allclose(x, want, atol=1e-12)
    with pytest.raises(ValueError, match="out has shape"):
        plan.apply(torch.randn(192, 3, dtype=torch.float64), out=torch.empty(192, 4))


def test_rejects_bad_rotations():
    with pytest.raises(ValueError, match="odd"):
        fast.Butterfly(torch.randn(2, 2, 3, 3), butterfly.CONCATENATED)
    with pytest.raises(ValueError, match="layout"):
        fast.Butterfly(torch.randn(1, 2, 4, 4), "diagonal")


@pytest.mark.parametrize("kind", ["lycoris-boft", "peft-boft", "kohya-boft", "lycoris-diag-oft"])
@pytest.mark.parametrize("mode", ["lycoris", "linear", "orthogonal"])
def test_merge_uses_fast_path_correctly(kind, mode):
    """merge.apply (fast path) equals the reference formula on conv and linear weights."""
    gen = torch.Generator().manual_seed(seed(kind, mode))
    m, nb, b = (1, 8, 4) if kind == "lycoris-diag-oft" else (3, 8, 4)
    n = nb * b
    side_out = kind.startswith("lycoris")
    shape = (n, 4, 3, 3) if side_out else (24, n)  # conv rotated on outputs; linear on inputs
    scale = 1 + 0.1 * torch.randn(shape[0], generator=gen)
    layer = BoftLayer("x", kind, torch.randn(m, nb, b, b, generator=gen) * 0.1, scale=scale)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    patch = merge.prepare(layer, 0.7, mode, dtype=torch.float64)
    flat = weight.reshape(shape[0], -1)
    if layer.side == "out":
        rotated = butterfly.apply_stages(flat, patch.rotations, patch.layout)
    else:
        rotated = butterfly.apply_stages(flat.t(), patch.rotations, patch.layout).t()
    rotated = rotated * patch.scale.unsqueeze(1)
    want = rotated if patch.blend is None else flat + patch.blend * (rotated - flat)
    got = merge.apply(patch, weight)
    assert got.shape == weight.shape and got.is_contiguous()
    assert torch.allclose(got.reshape(shape[0], -1), want, atol=1e-12)


def test_bypass_forward_matches_merge_with_fast_path():
    gen = torch.Generator().manual_seed(11)
    for kind in ("lycoris-boft", "peft-boft"):
        layer = BoftLayer("x", kind, torch.randn(4, 8, 4, 4, generator=gen) * 0.1,
                          scale=1 + 0.1 * torch.randn(32, generator=gen))
        patch = merge.prepare(layer, 1.0, "lycoris", dtype=torch.float64)
        weight = torch.randn(32, 32, generator=gen, dtype=torch.float64)
        x = torch.randn(2, 7, 32, generator=gen, dtype=torch.float64)
        merged = merge.apply(patch, weight)
        got = merge.bypass_forward(x, weight, None, patch)
        assert torch.allclose(got, x @ merged.t(), atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_on_cuda(layout):
    gen = torch.Generator().manual_seed(13)
    rot = rotations(6, 32, 10, torch.float64, gen)
    x = torch.randn(320, 50, generator=gen, dtype=torch.float64)
    want = butterfly.apply_stages(x, rot, layout)
    got = fast.Butterfly(rot.cuda(), layout).apply(x.cuda()).cpu()
    assert torch.allclose(got, want, atol=1e-12)


def comfyui_dir():
    return os.environ.get("BOFT_COMFYUI_DIR") or os.path.join(ROOT, ".comfyui", "ComfyUI")


@pytest.mark.skipif(not os.path.isfile(os.path.join(comfyui_dir(), "comfy", "lora.py")),
                    reason="no ComfyUI checkout (scripts/setup.sh makes one)")
def test_bench_smoke(tmp_path):
    """A seconds-long bench run: ours agrees with the float64 reference and with core at s = 1."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--subset", "3", "--runs",
           "1", "--accuracy-layers", "3", "--comfyui", comfyui_dir(), "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "errors" not in data, data["errors"]
    assert len(data["accuracy"]) == 3
    for row in data["accuracy"]:
        assert row["change"] > 0.01  # the adapter really rotates the weight
        for name in ("core", "node", "ours", "in place"):
            assert row[name] <= 1e-5, row
    assert "Whole set" in res.stdout


@pytest.mark.skipif(not os.path.isfile(os.path.join(comfyui_dir(), "comfy", "lora.py")),
                    reason="no ComfyUI checkout (scripts/setup.sh makes one)")
def test_bench_measurement_alone(tmp_path):
    """One measurement file run by itself (harness.run): its key in the JSON, checked as above."""
    out = tmp_path / "accuracy.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "accuracy.py"), "--subset", "2", "--accuracy-layers", "2",
           "--comfyui", comfyui_dir(), "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "errors" not in data and "timing" not in data, data
    assert len(data["accuracy"]) == 2
    for row in data["accuracy"]:
        assert row["change"] > 0.01
        for name in ("core", "node", "ours", "in place"):
            assert row[name] <= 1e-5, row
    assert "Relative error" in res.stdout


def test_bench_results_md_from_json():
    """RESULTS.md's generated tables are what bench/report.py makes from bench/results/*.json."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "report.py"), "--check"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("kind", ["lycoris-boft", "peft-boft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_in_place(kind, dtype):
    """merge.try_merge_into writes W' into the weight itself (whole tensor or a row slice of a bigger
    one, as ComfyUI's offset patches pass): same result as apply, nothing else touched."""
    gen = torch.Generator().manual_seed(seed("apply_", kind, str(dtype)))
    m, nb, b = 4, 16, 10
    n = nb * b
    side_out = kind.startswith("lycoris")
    shape = (n, 6, 3, 3) if side_out else (24, n)
    layer = BoftLayer("x", kind, torch.randn(m, nb, b, b, generator=gen) * 0.1,
                      scale=1 + 0.1 * torch.randn(shape[0], generator=gen))
    patch = merge.prepare(layer, 0.8, "orthogonal", dtype=dtype)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    # float64 reference from the simple path, on float64 rotations
    ref_patch = merge.prepare(layer, 0.8, "orthogonal", dtype=torch.float64)
    want = merge.apply(ref_patch, weight)
    big = torch.randn((3 * shape[0],) + shape[1:], generator=gen, dtype=dtype)
    before = big.clone()
    rows = slice(shape[0], 2 * shape[0])
    big[rows] = weight.to(dtype)
    target = big[rows]
    assert merge.try_merge_into(patch, target) is True
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert (target.double() - want).abs().max() <= tol * want.abs().max()
    assert torch.equal(big[:shape[0]], before[:shape[0]]) and torch.equal(big[2 * shape[0]:], before[2 * shape[0]:])


def test_apply_in_place_refuses_what_it_cannot_do():
    gen = torch.Generator().manual_seed(seed("apply_ refuses"))
    layer = BoftLayer("x", "lycoris-boft", torch.randn(3, 8, 4, 4, generator=gen) * 0.1)
    weight = torch.randn(32, 12, generator=gen)
    keep = weight.clone()
    linear = merge.prepare(layer, 0.5, "linear")  # a blend needs the old weight
    assert merge.try_merge_into(linear, weight) is False
    patch = merge.prepare(layer, 1.0)
    assert merge.try_merge_into(patch, weight.double()) is False  # a wider dtype than the patch: apply() casts
    assert merge.try_merge_into(merge.prepare(layer, 1.0, dtype=torch.float64), weight.half()) is False
    assert merge.try_merge_into(patch, weight.t().contiguous().t()) is False  # rows not viewable
    assert torch.equal(weight, keep)
    with pytest.raises(merge.BoftError, match="32 rows"):
        merge.try_merge_into(patch, torch.randn(16, 12))


def test_cpu_scratch_is_per_thread():
    """The CPU path reuses a scratch buffer per thread: concurrent calls must not share it."""
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(seed("threads"))
    rot = rotations(5, 16, 10, torch.float32, gen)
    plan = fast.Butterfly(rot, butterfly.INTERLEAVED)
    xs = [torch.randn(160, 700, generator=gen) for _ in range(8)]
    want = [butterfly.apply_stages(x.double(), rot.double(), butterfly.INTERLEAVED) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: plan.apply(x, slice_cols=64), xs))
    for g, w in zip(got, want, strict=True):
        assert (g.double() - w).abs().max() <= 2e-6 * w.abs().max()


def test_cast_patch_and_its_plan_are_kept():
    """A float32 patch used on float64 inputs (bypass, merge) casts once, not per call."""
    gen = torch.Generator().manual_seed(seed("cast kept"))
    layer = BoftLayer("x", "lycoris-boft", torch.randn(3, 8, 4, 4, generator=gen) * 0.1)
    patch = merge.prepare(layer, 1.0)
    weight = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    first = merge.bypass_forward(x, weight, None, patch)
    cast = patch._plans[("dtype", torch.float64)]
    plan = cast.butterfly()
    second = merge.bypass_forward(x, weight, None, patch)
    assert patch._plans[("dtype", torch.float64)] is cast and cast.butterfly() is plan
    assert torch.equal(first, second)
    assert torch.allclose(first, x @ merge.apply(merge.prepare(layer, 1.0, dtype=torch.float64), weight).t(),
                          atol=1e-6)


def test_cpu_path_inside_and_outside_inference_mode_and_with_grad():
    """ComfyUI executes under torch.inference_mode(); tests and the CLI do not; weights may
    require grad. The CPU path works in all three, in any order, in one thread."""
    gen = torch.Generator().manual_seed(seed("modes"))
    rot = rotations(4, 8, 10, torch.float32, gen)
    plan = fast.Butterfly(rot, butterfly.INTERLEAVED)
    x = torch.randn(80, 300, generator=gen)
    want = butterfly.apply_stages(x.double(), rot.double(), butterfly.INTERLEAVED)
    with torch.inference_mode():
        inside = plan.apply(x.clone())
    outside = plan.apply(x.clone())
    with_grad = plan.apply(x.clone().requires_grad_())
    with torch.inference_mode():
        again = plan.apply(x.clone())
    for got in (inside, outside, with_grad.detach(), again):
        assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max()


@pytest.mark.parametrize("mode", ["lycoris", "linear", "orthogonal"])
def test_prepare_many_equals_prepare(mode):
    """Layers prepared together (grouped by kind and block shape, one batched Cayley solve per
    group) give the same patches as prepared one by one, in the input order."""
    gen = torch.Generator().manual_seed(seed("prepare_many", mode))
    shapes = [(4, 16, 10), (3, 8, 4), (4, 16, 10), (4, 16, 10), (3, 8, 4)]
    layers = [BoftLayer(f"l{i}", "lycoris-boft" if i != 4 else "peft-boft",
                        torch.randn(*s, s[-1], generator=gen).half() * 0.1, alpha=0.02 if i == 2 else 0.0,
                        scale=1 + 0.1 * torch.randn(s[1] * s[2] if i != 4 else 5, generator=gen))
              for i, s in enumerate(shapes)]
    many = merge.prepare_many(layers, 0.7, mode)
    for layer, got in zip(layers, many, strict=True):
        want = merge.prepare(layer, 0.7, mode)
        assert got.name == layer.name and got.blend == want.blend
        assert torch.allclose(got.rotations, want.rotations, atol=1e-6)
        assert torch.allclose(got.scale, want.scale)
        weight = torch.randn(layer.dim, 7, generator=gen) if layer.side == "out" else torch.randn(5, layer.dim)
        assert torch.allclose(merge.apply(got, weight), merge.apply(want, weight), atol=1e-5)


def test_fused_split_equals_separate_plans():
    """One in-place plan built for butterflies stacked along the block axis, split per part,
    equals each part's own plan (torch path; the kernel path is in test_fused.py)."""
    from boft_core import fused

    gen = torch.Generator().manual_seed(seed("split"))
    for layout in LAYOUTS:
        parts = [rotations(5, 16, 10, torch.float64, gen) for _ in range(3)]
        pieces = fused.FusedButterfly(torch.cat(parts, dim=1), layout).split(3)
        for rot, piece in zip(parts, pieces, strict=True):
            x = torch.randn(160, 9, generator=gen, dtype=torch.float64)
            want = butterfly.apply_stages(x, rot, layout)
            assert torch.allclose(piece.apply(x), want, atol=1e-12)
    with pytest.raises(ValueError, match="equal parts"):
        fused.FusedButterfly(rotations(2, 4, 10, torch.float64, gen), LAYOUTS[0]).split(3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_half_x_in_float32_slices(layout, transpose, dtype):
    """fast.Butterfly with float32 blocks on a float16/bfloat16 x: computed in float32 a column
    slice at a time and rounded once (into x itself, or a new tensor), with row/column scales;
    float64 dense reference."""
    gen = torch.Generator().manual_seed(seed("half", layout, transpose, str(dtype)))
    m, nb, b = 5, 16, 10
    rot = rotations(m, nb, b, torch.float64, gen)
    x = torch.randn(nb * b, 70, generator=gen).to(dtype)
    rs = 1 + 0.1 * torch.randn(nb * b, generator=gen, dtype=torch.float64)
    cs = 1 + 0.1 * torch.randn(70, generator=gen, dtype=torch.float64)
    mat = dense(rot, layout)
    want = (mat.t() if transpose else mat) @ x.double()
    plan = fast.Butterfly(rot.float(), layout, transpose)
    for slice_cols in (None, 1, 32, 1000):
        got = plan.apply(x, slice_cols=slice_cols)
        assert got.dtype == dtype and within_one_ulp(got, want)
        y = x.clone()
        assert plan.apply(y, slice_cols=slice_cols, out=y, row_scale=rs.float(), col_scale=cs.float()) is y
        assert within_one_ulp(y, rs.unsqueeze(1) * want * cs)


@pytest.mark.parametrize("kind", ["lycoris-boft", "peft-boft"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_in_place_half(kind, dtype):
    """merge.try_merge_into on a float16/bfloat16 weight with a float32 patch (ComfyUI 0.28's working
    copies): in place, within one ulp of the float64 merge, a row slice leaves the rest alone."""
    gen = torch.Generator().manual_seed(seed("apply_ half", kind, str(dtype)))
    m, nb, b = 4, 16, 10
    n = nb * b
    shape = (n, 6, 3, 3) if kind.startswith("lycoris") else (24, n)
    layer = BoftLayer("x", kind, torch.randn(m, nb, b, b, generator=gen) * 0.1,
                      scale=1 + 0.1 * torch.randn(shape[0], generator=gen))
    patch = merge.prepare(layer, 0.8, "lycoris")
    weight = torch.randn(shape, generator=gen).to(dtype)
    want = merge.apply(merge.prepare(layer, 0.8, "lycoris", dtype=torch.float64), weight.double())
    big = torch.randn((3 * shape[0],) + shape[1:], generator=gen).to(dtype)
    before = big.clone()
    rows = slice(shape[0], 2 * shape[0])
    big[rows] = weight
    assert merge.try_merge_into(patch, big[rows]) is True
    assert within_one_ulp(big[rows], want)
    assert torch.equal(big[:shape[0]], before[:shape[0]]) and torch.equal(big[2 * shape[0]:], before[2 * shape[0]:])


# ------------------------------------------------- Cayley: the CPU's batched elimination vs LAPACK
def generators_of_norm(count, b, norm, dtype, gen):
    """``count`` skew-symmetric b x b blocks, each of Frobenius norm ``norm``."""
    a = torch.randn(count, b, b, generator=gen, dtype=torch.float64)
    q = a - a.mT
    return (q * (norm / torch.linalg.matrix_norm(q)[..., None, None])).to(dtype)


def solve64(q):
    """The float64 reference: ``X (I - Q) = I + Q`` by LAPACK."""
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    return torch.linalg.solve(eye - q.double(), eye + q.double(), left=False)


def lapack(q):
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return torch.linalg.solve(eye - q, eye + q, left=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [2, 4, 10, 16])
@pytest.mark.parametrize("norm", [1e-3, 0.3, 1.0, 3.0, 10.0])
def test_cayley_elimination_matches_float64_solve(dtype, b, norm, monkeypatch):
    """Within a small factor of LAPACK's own error in the same dtype, for the norms it is used at;
    taken in several chunks (a small chunk here), with leading axes (m, nb)."""
    gen = torch.Generator().manual_seed(seed("cayley", b, norm, str(dtype)))
    q = generators_of_norm(3 * 37, b, norm, dtype, gen).view(3, 37, b, b)
    monkeypatch.setattr(butterfly, "ELIMINATE_CHUNK", 2 * b * b * 16)  # 16 blocks a chunk: 7 chunks
    got = butterfly._cayley_eliminate(q)
    assert got.dtype == dtype and got.shape == q.shape
    ref = solve64(q)
    eps = torch.finfo(dtype).eps
    err, err_lapack = (got.double() - ref).abs().max(), (lapack(q).double() - ref).abs().max()
    assert err <= 4 * err_lapack + 16 * eps, (err, err_lapack)
    eye = torch.eye(b, dtype=torch.float64)  # and orthogonal as well as LAPACK's
    assert (got.double().mT @ got.double() - eye).abs().max() <= 64 * eps


@pytest.mark.parametrize("norm", [30.0, 100.0, 1e3])
def test_cayley_large_norms(norm):
    """Beyond ELIMINATE_MAX_NORM ``cayley`` solves with LAPACK (exactly its result); the
    elimination itself stays finite, its error growing like ‖Q‖² (measured below 1e-8 ‖Q‖²)."""
    gen = torch.Generator().manual_seed(seed("cayley large", norm))
    q = generators_of_norm(1024, 10, norm, torch.float32, gen)
    assert torch.equal(butterfly.cayley(q), lapack(q))
    ref = solve64(q)
    assert (butterfly._cayley_eliminate(q).double() - ref).abs().max() <= 1e-7 * norm ** 2
    mixed = q.clone()
    mixed[:-1] *= 1e-3  # one large block decides for all
    assert torch.equal(butterfly.cayley(mixed), lapack(mixed))


def test_cayley_chooses_elimination_only_where_it_pays(monkeypatch):
    calls = []
    eliminate = butterfly._cayley_eliminate
    monkeypatch.setattr(butterfly, "_cayley_eliminate", lambda q: calls.append(tuple(q.shape)) or eliminate(q))
    gen = torch.Generator().manual_seed(seed("cayley choice"))

    def used(q) -> bool:
        calls.clear()
        got = butterfly.cayley(q)
        assert (got.double() - solve64(q.detach())).abs().max() <= 2e-6 * max(1.0, q.detach().abs().max())
        return bool(calls)

    q = generators_of_norm(1024, 10, 1.0, torch.float32, gen)
    assert used(q) and used(q.double()) and used(q.view(8, 128, 10, 10))
    assert not used(q[:128])  # too few blocks
    assert not used(generators_of_norm(1024, 20, 1.0, torch.float32, gen))  # blocks too large
    assert not used(q * 11 / torch.linalg.matrix_norm(q).amax())  # a block's norm above 10
    grad = q.clone().requires_grad_()
    assert not used(grad)  # autograd: LAPACK's solve
    with torch.no_grad():
        assert used(grad)
    nan = q.clone()
    nan[5, 1, 2] = float("nan")
    calls.clear()
    assert torch.isnan(butterfly.cayley(nan)).any() and not calls
