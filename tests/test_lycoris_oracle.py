"""boft_core against LyCORIS: files written by LyCORIS's save code, merged by its merge_to."""

import subprocess
import sys

import oracles
import pytest
import torch
from safetensors.torch import load_file, save_file

import boft_core
from boft_core.merge import generators

STRENGTHS = {"lycoris": (1.0, 0.5, -1.0, 2.0), "linear": (0.5, -1.0)}


def rel_change_error(ours, ref, base):
    return ((ours.double() - ref.double()).norm() / (ref.double() - base.double()).norm()).item()


def base_key(layer_name):
    return layer_name[len("lycoris_"):] + ".weight"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rescaled", [False, True])
@pytest.mark.parametrize("constraint", [0.0, 0.01])
@pytest.mark.parametrize("algo", ["boft", "diag-oft"])
def test_merge_matches_lycoris(tmp_path, algo, constraint, rescaled, dtype):
    path = str(tmp_path / "a.safetensors")
    seed = hash((algo, constraint, rescaled, str(dtype))) % 1000
    model = oracles.lycoris_file(path, algo, constraint=constraint, rescaled=rescaled,
                                 dtype=dtype, seed=seed)
    adapter = boft_core.load(path)
    assert adapter.format == {"boft": "lycoris-boft", "diag-oft": "lycoris-diag-oft"}[algo]
    assert set(adapter.layers) == {"lycoris_proj", "lycoris_conv", "lycoris_mlp"}
    base = model.state_dict()
    if constraint:  # the constraint must actually bite, or this case tests nothing
        for layer in adapter.layers.values():
            raw = layer.blocks.float() - layer.blocks.float().transpose(-1, -2)
            assert raw.norm() > layer.alpha * layer.dim
    full = oracles.lycoris_merged(path, model, 1.0)
    for mode, strengths in STRENGTHS.items():
        for s in strengths:
            ref = oracles.lycoris_merged(path, model, s) if mode == "lycoris" else None
            for name, layer in adapter.layers.items():
                key = base_key(name)
                w = base[key]
                expected = ref[key] if mode == "lycoris" else w + s * (full[key] - w)
                ours = boft_core.merge_weight(w, layer, s, mode)
                assert ours.dtype == w.dtype and ours.shape == w.shape
                assert rel_change_error(ours, expected, w) <= 1e-4, (mode, s, name)


def test_constraint_threshold_scales_with_out_dim(tmp_path):
    path = str(tmp_path / "a.safetensors")
    oracles.lycoris_file(path, "boft", constraint=0.02)
    layer = boft_core.load(path).layers["lycoris_proj"]
    q = generators(layer)
    assert q.norm().item() == pytest.approx(0.02 * 64, rel=1e-5)


def test_file_without_alpha_is_unconstrained(tmp_path):
    """LyCORIS 2.1.x wrote no .alpha; it means no constraint, never a skipped layer."""
    path = str(tmp_path / "a.safetensors")
    model = oracles.lycoris_file(path, "boft", constraint=0.0, rescaled=True)
    ref = oracles.lycoris_merged(path, model, 1.0)
    tensors = {k: v for k, v in load_file(path).items() if not k.endswith(".alpha")}
    old = str(tmp_path / "old.safetensors")
    save_file(tensors, old)
    adapter = boft_core.load(old)
    assert len(adapter.layers) == 3
    for name, layer in adapter.layers.items():
        assert layer.alpha == 0
        w = model.state_dict()[base_key(name)]
        assert rel_change_error(boft_core.merge_weight(w, layer), ref[base_key(name)], w) < 1e-5


def test_merge_on_bf16_and_fp16_weights_keeps_their_dtype(tmp_path):
    path = str(tmp_path / "a.safetensors")
    model = oracles.lycoris_file(path, "boft", rescaled=True)
    layer = boft_core.load(path).layers["lycoris_proj"]
    w = model.state_dict()["proj.weight"]
    exact = boft_core.merge_weight(w, layer, 0.5)
    for dtype in (torch.float16, torch.bfloat16):
        ours = boft_core.merge_weight(w.to(dtype), layer, 0.5)
        assert ours.dtype == dtype
        assert (ours.float() - exact).abs().max() < 0.02


@pytest.mark.parametrize("algo", ["boft", "diag-oft"])
def test_cli_merge_matches_lycoris(tmp_path, algo):
    path = str(tmp_path / "a.safetensors")
    model = oracles.lycoris_file(path, algo, rescaled=True, dtype=torch.float16, seed=7)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    base["extra.int_buffer"] = torch.arange(5)
    base["proj.weight"] = base["proj.weight"].half()  # a stored dtype other than the adapter's
    save_file(base, str(tmp_path / "base.safetensors"), {"note": "kept"})
    runs = [("lycoris", s) for s in STRENGTHS["lycoris"]] + [("linear", s) for s in STRENGTHS["linear"]]
    full = oracles.lycoris_merged(path, model, 1.0)
    for i, (mode, s) in enumerate(runs):
        out = str(tmp_path / f"out_{mode}_{s}.safetensors")
        cmd = [sys.executable, "-m", "boft_core", "merge", str(tmp_path / "base.safetensors"),
               path, "--out", out, "--strength", str(s), "--mode", mode, "--threads", str(1 + i % 3)]
        subprocess.run(cmd, check=True, capture_output=True)
        merged = load_file(out)
        assert set(merged) == set(base)
        assert torch.equal(merged["extra.int_buffer"], base["extra.int_buffer"])
        assert merged["proj.weight"].dtype == torch.float16
        ref = oracles.lycoris_merged(path, model, s) if mode == "lycoris" else None
        for key in ("conv.weight", "mlp.weight", "proj.weight"):
            w = model.state_dict()[key]
            expected = ref[key] if ref is not None else w + s * (full[key] - w)
            tol = 1e-2 if key == "proj.weight" else 1e-4  # proj stored as fp16 in BASE
            assert rel_change_error(merged[key], expected, w) <= tol, (mode, s, key)
        for key in ("conv.bias", "mlp.bias", "proj.bias"):
            assert torch.equal(merged[key], base[key])
    # the workers (one layer each) change nothing: the same bytes with 1 and 3 of them
    first = str(tmp_path / f"out_{runs[0][0]}_{runs[0][1]}.safetensors")
    again = str(tmp_path / "again.safetensors")
    subprocess.run([sys.executable, "-m", "boft_core", "merge", str(tmp_path / "base.safetensors"), path,
                    "--out", again, "--strength", str(runs[0][1]), "--mode", runs[0][0], "--threads", "3"],
                   check=True, capture_output=True)
    with open(first, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
