"""Files that mix BOFT with other adapter kinds, through our loader nodes in the in-process host.

Oracles: LyCORIS's own merge of a file it wrote with a per-module algorithm map (``boft``, ``lora``,
``full``); the host's own LoraLoader (``comfy.sd.load_lora_for_models``) for a file's non-BOFT
keys plus float64 dense merges (``boft_core.merge_weight``, tested against LyCORIS elsewhere) for
its BOFT layers.
"""

import copy
from importlib import import_module

import oracles
import pytest
import torch
from lycoris_comfy import lycoris_names
from safetensors.torch import load_file, save_file
from test_nodes import load_model, patched_state, rel

import boft_core
import boft_core.cli

BLOCK = "input_blocks.1.1.transformer_blocks.0."  # the tiny SD1.5 UNet's one input transformer


def write_mixed_lycoris(path, module, algos: dict[str, str], seed: int = 0):
    """A LyCORIS file for ``module`` (names ``lora_unet_...``) whose modules ``algos`` lists (path ->
    algorithm) each get their own algorithm through LyCORIS's ``name_algo_map`` preset."""
    from lycoris import create_lycoris
    from lycoris.wrapper import LycorisNetwork

    settings = ("LORA_PREFIX", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "NAME_ALGO_MAP", "USE_FNMATCH")
    saved = {name: getattr(LycorisNetwork, name) for name in settings}
    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet", "target_module": [], "target_name": [],
                                 "name_algo_map": {name: {"algo": algo} for name, algo in algos.items()}})
    try:
        net = create_lycoris(copy.deepcopy(module).float(), 1.0, linear_dim=16, linear_alpha=4, algo="boft")
        net.apply_to()
        oracles.randomize(net, ("oft_blocks", "lora_up.weight", "lora_down.weight"), seed + 1, 0.05)
        with torch.no_grad():  # a full module's trained copy: the original plus fresh noise
            g = torch.Generator().manual_seed(seed + 2)
            for lora in net.loras:
                if type(lora).__name__ == "FullModule":
                    lora.weight.add_(torch.randn(lora.weight.shape, generator=g) * 0.05)
                    if lora.bias is not None:
                        lora.bias.add_(torch.randn(lora.bias.shape, generator=g) * 0.05)
        net.save_weights(str(path), torch.float32, {})
    finally:
        for name, value in saved.items():
            setattr(LycorisNetwork, name, value)
    return load_file(str(path))


def lycoris_mixed_merge(path, module, strength: float) -> dict[str, torch.Tensor]:
    """LyCORIS's own merge of its mixed file into a float32 copy of ``module``: ``merge_to`` for
    boft and lora modules; for full modules (whose ``merge_to`` fails after ``apply_to`` took the
    weight off the layer, LyCORIS 4.1.3) the weight and bias LyCORIS's ``make_weight`` builds."""
    from lycoris import create_lycoris_from_weights

    target = copy.deepcopy(module).float()
    names = {id(m): name for name, m in target.named_modules()}
    with lycoris_names("lora_unet"):
        net, _ = create_lycoris_from_weights(1.0, str(path), target)
        net = net.float()
        net.apply_to()
        full = {}
        for lora in net.loras:
            if type(lora).__name__ == "FullModule":
                weight, bias = lora.make_weight(strength)
                full[names[id(lora.org_module[0])] + ".weight"] = weight
                if bias is not None:
                    full[names[id(lora.org_module[0])] + ".bias"] = bias
            else:
                lora.merge_to(strength)
    merged = {k: v.detach().clone() for k, v in target.state_dict().items()}
    merged.update({k: v.detach().clone() for k, v in full.items()})
    return merged


def test_lycoris_preset_mixing_algorithms(comfy, pack, sd15_ckpt, loras_dir):
    """boft, lora and full modules in one LyCORIS file: every weight is LyCORIS's own merge."""
    model = load_model(comfy, sd15_ckpt)
    unet = model.model.diffusion_model
    base = {k: v.clone().float() for k, v in unet.state_dict().items()}
    algos = {BLOCK + "attn1.to_q": "boft", BLOCK + "attn1.to_k": "lora", BLOCK + "attn1.to_v": "full",
             BLOCK + "attn1.to_out.0": "boft", BLOCK + "ff.net.0.proj": "lora", BLOCK + "ff.net.2": "full"}
    path = loras_dir / "mixed_lycoris.safetensors"
    tensors = write_mixed_lycoris(path, unet, algos)
    assert any(k.endswith(".oft_blocks") for k in tensors) and any(k.endswith(".lora_up.weight") for k in tensors)
    assert any(k.endswith(".diff") for k in tensors) and any(k.endswith(".diff_b") for k in tensors)
    adapter = boft_core.load(str(path))
    assert len(adapter.layers) == 2  # the two boft modules; the rest is for the host
    node = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]()
    for s in (1.0, 0.6):
        out = node.load_boft(model, path.name, s, "lycoris", unique_id="mixed")
        report = out["ui"]["boft_report"][0]
        assert "applied 2 of 2" in report
        assert "4 other layers applied by ComfyUI's own adapters (full 2, lora 2)" in report
        got = patched_state(comfy, out["result"][0])
        want = lycoris_mixed_merge(path, unet, s)
        changed = [k for k in want if not torch.equal(want[k], base[k])]
        assert {k.rsplit(".", 1)[0] for k in changed} == set(algos), sorted(changed)
        for key in changed:
            assert rel(got[key], want[key], base[key]) < 1e-4, (key, s)
        for key in set(base) - set(changed):
            assert torch.equal(got[key], base[key]), key
    run = import_module(pack.__name__ + ".nodes.loader").LAST_RUNS.latest(["mixed"], path.name)
    assert run["host"] == {"lora_unet_" + name.replace(".", "_"): algo for name, algo in algos.items()
                           if algo != "boft"}
    info = boft_core.cli.describe(adapter)
    assert {o["name"]: o["kind"] for o in info["other_layers"]} == run["host"]


def trainer_file(path, unet, seed=0):
    """ComfyUI's trainer's layout: ``diffusion_model.<path>.oft_blocks`` (k, b, b) + ``.alpha`` for
    linear layers, ``.diff`` (trained norm weights) and ``.diff_b`` (trained biases) beside them.
    alpha is far above the blocks' norm, so no constraint rule changes them."""
    g = torch.Generator().manual_seed(seed)
    sd = unet.state_dict()
    tensors = {}
    for name in (BLOCK + "attn1.to_q", BLOCK + "ff.net.2"):
        out = sd[name + ".weight"].shape[0]
        tensors[f"diffusion_model.{name}.oft_blocks"] = torch.randn(out // 16, 16, 16, generator=g) * 0.02
        tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(1000.0)
    for name in (BLOCK + "norm1", BLOCK + "norm3"):
        tensors[f"diffusion_model.{name}.diff"] = torch.randn(sd[name + ".weight"].shape, generator=g) * 0.05
        tensors[f"diffusion_model.{name}.diff_b"] = torch.randn(sd[name + ".bias"].shape, generator=g) * 0.05
    bias = sd[BLOCK + "ff.net.2.bias"]
    tensors[f"diffusion_model.{BLOCK}ff.net.2.diff_b"] = torch.randn(bias.shape, generator=g) * 0.05
    save_file(tensors, str(path))
    return tensors


@pytest.mark.parametrize("mode", ["lycoris", "orthogonal"])
def test_trainer_diffs_beside_oft_blocks(comfy, pack, sd15_ckpt, loras_dir, mode):
    """Our exact merge for oft_blocks, the host's LoraLoader for .diff/.diff_b, in one patch set."""
    model = load_model(comfy, sd15_ckpt)
    unet = model.model.diffusion_model
    base = {k: v.clone().float() for k, v in unet.state_dict().items()}
    path = loras_dir / f"trainer_mixed_{mode}.safetensors"
    tensors = trainer_file(path, unet)
    adapter = boft_core.load(str(path))
    others = {k: v for k, v in tensors.items() if not k.endswith((".oft_blocks", ".alpha"))}
    assert set(adapter.others) == set(others)
    s = 0.8
    out = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]().load_boft(model, path.name, s, mode)
    assert "applied 2 of 2" in out["ui"]["boft_report"][0]
    got = patched_state(comfy, out["result"][0])
    host, _ = comfy.sd.load_lora_for_models(model, None, dict(others), s, 0)
    host_state = patched_state(comfy, host)
    for name, layer in adapter.layers.items():
        key = name[len("diffusion_model."):] + ".weight"
        want = boft_core.merge_weight(base[key].double(), layer, s, mode)
        assert rel(got[key], want, base[key]) < 1e-5, key
    touched = {k.rsplit(".", 1)[0] + (".weight" if k.endswith(".diff") else ".bias")
               for k in others}
    touched = {k[len("diffusion_model."):] for k in touched}
    assert len(touched) == 5
    for key in touched:
        assert not torch.equal(host_state[key], base[key]) and torch.equal(got[key], host_state[key]), key
    boft_keys = {name[len("diffusion_model."):] + ".weight" for name in adapter.layers}
    for key in set(base) - touched - boft_keys:
        assert torch.equal(got[key], base[key]), key


def pack_error(pack):
    return import_module(pack.__name__ + ".boft_core").BoftError  # the pack's own copy


def test_a_key_nobody_understands_is_an_error(comfy, pack, sd15_ckpt, loras_dir):
    model = load_model(comfy, sd15_ckpt)
    path = loras_dir / "trainer_unknown.safetensors"
    tensors = trainer_file(path, model.model.diffusion_model)
    tensors[f"diffusion_model.{BLOCK}norm2.mystery_tensor"] = torch.randn(3, 5)
    save_file(tensors, str(path))
    with pytest.raises(pack_error(pack), match=r"norm2\.mystery_tensor \(3, 5\)"):
        pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]().load_boft(model, path.name, 1.0, "lycoris")
    assert not model.patches


def test_a_diff_of_the_wrong_shape_is_an_error(comfy, pack, sd15_ckpt, loras_dir):
    model = load_model(comfy, sd15_ckpt)
    path = loras_dir / "trainer_wrong_diff.safetensors"
    tensors = trainer_file(path, model.model.diffusion_model)
    tensors[f"diffusion_model.{BLOCK}norm1.diff"] = torch.randn(7)
    save_file(tensors, str(path))
    with pytest.raises(pack_error(pack), match=r"norm1.*\(7,\).*\(320,\)"):
        pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]().load_boft(model, path.name, 1.0, "lycoris")
    assert not model.patches
