"""kohya sd-scripts networks.boft files, built from its spec and checked against PEFT's merge.

No library on the registry writes this format: the file is assembled from the parameters of a
PEFT adapter (same math, kohya's key names and (out, 1) boft_s for convs too), and the oracle is
PEFT's merge of those same parameters.
"""

import json

import oracles
from safetensors.torch import save_file

import boft_core


def kohya_file(path, peft_model):
    tensors = {}
    for name in ("proj", "conv", "mlp"):
        module = getattr(peft_model.base_model.model, name)
        r = module.boft_R["default"].detach()
        s = module.boft_s["default"].detach()
        if s.shape[0] == 1:  # PEFT stores (1, out) for conv; kohya always (out, 1)
            s = s.t()
        tensors[f"lora_unet_{name}.boft_R"] = r.contiguous()
        tensors[f"lora_unet_{name}.boft_s"] = s.contiguous()
    meta = {"ss_network_module": "networks.boft", "ss_network_dim": "4",
            "ss_network_args": json.dumps({"boft_block_size": "4"})}
    save_file(tensors, path, meta)


def rel(ours, ref, base):
    return ((ours.double() - ref.double()).norm() / (ref.double() - base.double()).norm()).item()


def test_kohya_matches_peft_merge(tmp_path, peft_factors):
    peft_model = oracles.peft_adapter(str(tmp_path / "peft"), factors=2,
                                      targets=("proj", "conv", "mlp"), seed=3)
    merged = oracles.peft_merged(peft_model)
    path = str(tmp_path / "kohya.safetensors")
    kohya_file(path, peft_model)
    adapter = boft_core.load(path)
    assert adapter.format == "kohya-boft"
    assert adapter.metadata["ss_network_module"] == "networks.boft"
    base = oracles.Toy(3).state_dict()
    for name in ("proj", "conv", "mlp"):
        layer = adapter.layers[f"lora_unet_{name}"]
        w = base[f"{name}.weight"]
        full = merged[f"{name}.weight"]
        assert rel(boft_core.merge_weight(w, layer), full, w) < 1e-5
        # kohya's own strength is linear in weight space: that is our "linear" mode
        for s in (0.5, -1.0, 2.0):
            got = boft_core.merge_weight(w, layer, s, "linear")
            assert rel(got, w + s * (full - w), w) < 1e-5
