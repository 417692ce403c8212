"""boft_core against PEFT: adapters saved by PEFT's save_pretrained, merged by merge_and_unload."""

import os
import subprocess
import sys

import oracles
import pytest
import torch
from safetensors.torch import load_file, save_file

import boft_core


def rel_change_error(ours, ref, base):
    return ((ours.double() - ref.double()).norm() / (ref.double() - base.double()).norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", ["none", "boft_only"])
@pytest.mark.parametrize("factors", [1, 2, 3])
def test_merge_matches_peft(tmp_path, peft_factors, factors, bias, dtype):
    folder = str(tmp_path / "adapter")
    peft_model = oracles.peft_adapter(folder, factors=factors, bias=bias, dtype=dtype,
                                      targets=("proj", "conv", "mlp"), seed=factors)
    merged = oracles.peft_merged(peft_model)
    base = oracles.Toy(factors).state_dict()
    adapter = boft_core.load(folder)
    assert adapter.format == "peft-boft"
    assert adapter.config["peft_type"] == "BOFT"
    assert set(adapter.layers) == {"proj", "conv", "mlp"}
    for name, layer in adapter.layers.items():
        assert layer.m == factors
        assert (layer.bias is not None) == (bias != "none")
        w = base[f"{name}.weight"]
        for mode in boft_core.MODES:  # every mode is PEFT's merge at s = 1
            ours = boft_core.merge_weight(w, layer, 1.0, mode)
            assert rel_change_error(ours, merged[f"{name}.weight"], w) <= 1e-5, (name, mode)
        if layer.bias is not None:
            patch = boft_core.prepare(layer)
            got = boft_core.merge_bias(base[f"{name}.bias"], patch, 1.0)
            assert torch.allclose(got, merged[f"{name}.bias"], atol=1e-6)


def test_peft_strength_modes(tmp_path, peft_factors):
    """lycoris mode: per-stage blend in PEFT's convention; linear: linear in weight space."""
    folder = str(tmp_path / "adapter")
    peft_model = oracles.peft_adapter(folder, factors=2, targets=("proj",))
    merged = oracles.peft_merged(peft_model)["proj.weight"]
    layer = boft_core.load(folder).layers["proj"]
    w = oracles.Toy(0).state_dict()["proj.weight"]
    for s in (0.5, -1.0, 2.0):
        linear = boft_core.merge_weight(w, layer, s, "linear")
        assert rel_change_error(linear, w + s * (merged - w), w) < 1e-5
        # Independent per-stage blend from PEFT's own matrices: B(s) = prod(s*M_i + (1-s)*I)?
        # No: the blend is per block inside each stage, which is the same thing since each M_i
        # is a permuted block diagonal; build it from PEFT's boft_P and Cayley blocks.
        module = peft_model.base_model.model.proj
        r = module.boft_R["default"].detach()
        q = module.cayley_batch(r.reshape(-1, *r.shape[-2:])).reshape(r.shape)
        eye = torch.eye(q.shape[-1])
        blended = s * q + (1 - s) * eye
        stages = torch.stack([torch.block_diag(*stage) for stage in blended])
        p = module.boft_P.to(stages.dtype)
        mats = p @ stages @ p.transpose(1, 2)
        b = mats[0]
        for i in range(1, mats.shape[0]):
            b = mats[i] @ b
        expected = (w @ b.t()) * module.boft_s["default"].detach()
        assert rel_change_error(boft_core.merge_weight(w, layer, s), expected, w) < 1e-5


def test_adapter_file_path_also_works(tmp_path):
    folder = str(tmp_path / "adapter")
    oracles.peft_adapter(folder, targets=("proj",))
    by_file = boft_core.load(os.path.join(folder, "adapter_model.safetensors"))
    assert by_file.format == "peft-boft" and by_file.config is not None


def test_cli_merge_matches_peft(tmp_path, peft_factors):
    folder = str(tmp_path / "adapter")
    peft_model = oracles.peft_adapter(folder, factors=2, bias="boft_only", targets=("proj", "conv"))
    merged = oracles.peft_merged(peft_model)
    base = oracles.Toy(0).state_dict()
    save_file(base, str(tmp_path / "base.safetensors"))
    out = str(tmp_path / "out.safetensors")
    subprocess.run([sys.executable, "-m", "boft_core", "merge", str(tmp_path / "base.safetensors"),
                    folder, "--out", out], check=True, capture_output=True)
    got = load_file(out)
    for name in ("proj", "conv"):
        w = base[f"{name}.weight"]
        assert rel_change_error(got[f"{name}.weight"], merged[f"{name}.weight"], w) <= 1e-5
        assert torch.allclose(got[f"{name}.bias"], merged[f"{name}.bias"], atol=1e-6)
    assert torch.equal(got["mlp.weight"], base["mlp.weight"])
