"""Properties on fresh random inputs, against float64 dense matrices built independently."""

import pytest
import torch

from boft_core import BoftLayer, bypass_forward, merge_weight, prepare
from boft_core.butterfly import INTERLEAVED, cayley, dense_matrix

KINDS = ["lycoris-boft", "lycoris-diag-oft", "peft-boft", "kohya-boft"]


def random_layer(kind, seed, m=3, nb=8, b=6, scaled=True, alpha=0.0):
    g = torch.Generator().manual_seed(seed)
    if kind == "lycoris-diag-oft":
        m = 1
    blocks = torch.randn(m, nb, b, b, generator=g, dtype=torch.float64) * 0.2
    out = nb * b if kind.startswith("lycoris") else 24  # input-side layers: 24 outputs
    scale = 1 + 0.1 * torch.randn(out, generator=g, dtype=torch.float64) if scaled else None
    return BoftLayer(name="layer", kind=kind, blocks=blocks, alpha=alpha, scale=scale)


def dense_row(kind, m, i, t, j, b):
    """The row of the model that position j of block t of stage i acts on (formats doc)."""
    h = b // 2
    k = 2**i * h
    if kind == "lycoris-boft":  # interleaved: order = arange(n).view(-1, 2, k).transpose(1, 2)
        pos = t * b + j
        group, within = divmod(pos, 2 * k)
        return group * 2 * k + (within % 2) * k + within // 2
    if m == 1:  # one stage of contiguous blocks
        return t * b + j
    group, chunk = divmod(t, 2**i)  # concatenated half-chunks c and c + 2^i
    half, e = divmod(j, h)
    return group * 2 * k + half * k + chunk * h + e


def dense_reference(layer, s=1.0, mode="lycoris"):
    """B(s) from the formats doc, written out with explicit index loops in float64."""
    a = layer.blocks.double()
    m, nb, b, _ = a.shape
    n = nb * b
    eye = torch.eye(b, dtype=torch.float64)
    if layer.kind == "lycoris-boft":
        q = a - a.transpose(-1, -2)
    elif layer.kind == "lycoris-diag-oft":
        q = a - a.transpose(-1, -2)
    else:
        q = (a - a.transpose(-1, -2)) / 2
    if layer.alpha * n > 0 and q.norm() + 1e-8 > layer.alpha * n:
        q = q * layer.alpha * n / (q.norm() + 1e-8)
    if layer.kind == "lycoris-boft":
        r = (eye + s * q if mode == "orthogonal" else eye + q) @ torch.linalg.inv(
            eye - s * q if mode == "orthogonal" else eye - q)
    elif layer.kind == "lycoris-diag-oft":  # R, applied transposed
        qq = s * q if mode == "orthogonal" else q
        r = ((eye + qq) @ torch.linalg.inv(eye - qq)).transpose(-1, -2)
    else:  # PEFT: (I - S)(I + S)^-1
        qq = s * q if mode == "orthogonal" else q
        r = (eye - qq) @ torch.linalg.inv(eye + qq)
    if mode == "lycoris" and s != 1:
        r = s * r + (1 - s) * eye
    total = torch.eye(n, dtype=torch.float64)
    for i in range(m):
        mat = torch.zeros(n, n, dtype=torch.float64)
        for t in range(nb):
            for p in range(b):
                for c in range(b):
                    mat[dense_row(layer.kind, m, i, t, p, b), dense_row(layer.kind, m, i, t, c, b)] = r[i, t, p, c]
        total = mat @ total
    return total


def reference_weight(layer, w, s=1.0, mode="lycoris"):
    big = dense_reference(layer, 1.0 if mode == "linear" else s, mode)
    flat = w.double().reshape(w.shape[0], -1)
    scale = layer.scale
    if scale is not None and mode == "orthogonal":
        scale = 1 + s * (scale - 1)
    new = big @ flat if layer.kind.startswith("lycoris") else flat @ big.t()
    if scale is not None:
        new = new * scale.unsqueeze(1)
    if mode == "linear":
        new = flat + s * (new - flat)
    return new.reshape(w.shape)


def weight_for(layer, seed, conv=False):
    g = torch.Generator().manual_seed(seed)
    n = layer.blocks.shape[1] * layer.blocks.shape[2]
    if layer.side == "out":
        shape = (n, 4, 3, 3) if conv else (n, 20)
    else:
        shape = (24, n // 9, 3, 3) if conv else (24, n)
    return torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["lycoris", "linear", "orthogonal"])
def test_matches_float64_dense_reference(kind, mode):
    for seed, s in enumerate((1.0, 0.5, -1.0, 2.0, 0.0)):
        conv = seed % 2 == 1
        alpha = 0.01 if seed % 2 and kind.startswith("lycoris") else 0
        layer = random_layer(kind, seed, nb=12 if conv else 8, alpha=alpha)  # 72 = 8 * 3 * 3
        w = weight_for(layer, seed + 100, conv=conv)
        got = merge_weight(w, layer, s, mode)
        want = reference_weight(layer, w, s, mode)
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-9), (kind, mode, s)
        got32 = merge_weight(w.float(), layer, s, mode)
        assert torch.allclose(got32.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_orthogonal_mode_keeps_every_stage_a_rotation(kind):
    torch.manual_seed(0)
    for s in torch.empty(6).uniform_(-3, 3).tolist() + [-1.0, 0.5, 2.0]:
        layer = random_layer(kind, 7, scaled=False)
        w = weight_for(layer, 8)
        got = merge_weight(w, layer, s, "orthogonal")
        if layer.side == "out":  # B orthogonal => W'ᵀW' = WᵀW
            assert torch.allclose(got.t() @ got, w.t() @ w, atol=1e-9)
        else:  # input side => W'W'ᵀ = WWᵀ
            assert torch.allclose(got @ got.t(), w @ w.t(), atol=1e-9)
        rot = prepare(layer, s, "orthogonal", dtype=torch.float64).rotations
        eye = torch.eye(rot.shape[-1], dtype=torch.float64)
        assert torch.allclose(rot @ rot.transpose(-1, -2), eye.expand_as(rot), atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["linear", "orthogonal"])
def test_strength_zero_is_identity(kind, mode):
    layer = random_layer(kind, 3)
    w = weight_for(layer, 4).float()
    assert torch.equal(merge_weight(w, layer, 0.0, mode), w)


def test_lycoris_mode_at_zero_applies_rescale_only():
    layer = random_layer("lycoris-boft", 5)
    w = weight_for(layer, 6)
    assert torch.allclose(merge_weight(w, layer, 0.0), w * layer.scale.unsqueeze(1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["lycoris", "linear", "orthogonal"])
def test_all_modes_agree_at_one_and_inverse_at_minus_one(kind, mode):
    layer = random_layer(kind, 9)
    w = weight_for(layer, 10)
    assert torch.allclose(merge_weight(w, layer, 1.0, mode), merge_weight(w, layer, 1.0), atol=1e-12)
    if mode == "orthogonal":  # s = -1 inverts every stage: the whole of a 1-stage butterfly
        plain = random_layer(kind, 9, m=1, scaled=False)
        there = merge_weight(w, plain, 1.0, mode)
        assert torch.allclose(merge_weight(there, plain, -1.0, mode), w, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["lycoris", "linear", "orthogonal"])
def test_bypass_equals_merge(kind, mode):
    layer = random_layer(kind, 11)
    g = torch.Generator().manual_seed(12)
    for conv in (False, True):
        if conv and layer.side == "in":
            continue
        w = weight_for(layer, 13, conv=conv)
        x = torch.randn((2, w.shape[1], 5, 5) if conv else (3, 7, w.shape[1]), generator=g,
                        dtype=torch.float64)
        for s in (1.0, 0.5, -1.0):
            patch = prepare(layer, s, mode, dtype=torch.float64)
            merged = merge_weight(w, layer, s, mode)
            op = torch.nn.functional.conv2d if conv else torch.nn.functional.linear
            kwargs = {"padding": 1} if conv else {}
            got = bypass_forward(x, w, None, patch, **kwargs)
            assert torch.allclose(got, op(x, merged, None, **kwargs), atol=1e-10), (conv, s)


def test_lycoris_bypass_rotates_the_bias_like_lycoris():
    layer = random_layer("lycoris-boft", 14)
    w = weight_for(layer, 15)
    bias = torch.randn(w.shape[0], dtype=torch.float64)
    x = torch.randn(4, w.shape[1], dtype=torch.float64)
    patch = prepare(layer, 1.0, dtype=torch.float64)
    big = dense_reference(layer) * layer.scale.unsqueeze(1)
    want = (big @ (w @ x.t() + bias.unsqueeze(1))).t()
    assert torch.allclose(bypass_forward(x, w, bias, patch), want, atol=1e-10)


def test_dense_matrix_is_orthogonal():
    layer = random_layer("lycoris-boft", 16)
    rot = cayley(layer.blocks - layer.blocks.transpose(-1, -2))
    big = dense_matrix(rot, INTERLEAVED)
    assert torch.allclose(big @ big.t(), torch.eye(big.shape[0], dtype=torch.float64), atol=1e-12)
