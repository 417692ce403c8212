"""The orthogonal family beyond BOFT (formats doc §6): OFTv2 from PEFT, kohya oft_v2 and OneTrainer,
kohya's legacy networks.oft (Flux parts too), ComfyUI-trained OFT, and PEFT's old oft_r refused.

Oracles: PEFT's own save_pretrained + merge_and_unload for PEFT files; for the others float64
dense matrices built here from the doc's definitions (never boft_core's own functions), and on the
0.28 host ComfyUI's own OFTDiff for ComfyUI-trained files.
"""

import copy
import json
import math
import os
import subprocess
import sys

import oracles
import pytest
import torch
from safetensors.torch import load_file, save_file

import boft_core
from boft_core.formats import with_constraint


def rel(ours, ref, base):
    return ((ours.double() - ref.double()).norm() / (ref.double() - base.double()).norm()).item()


# ------------------------------------------------------------------------- dense references
def skew(packed, b):
    """Q (rows, b, b) from packed upper triangles (rows, b(b-1)/2), in float64."""
    u = torch.zeros(packed.shape[0], b, b, dtype=torch.float64)
    i, j = torch.triu_indices(b, b, 1)
    u[:, i, j] = packed.double()
    return u - u.transpose(-1, -2)


def neumann5(q, legacy=False):
    """Doc §6a, 5 terms: I + 2Q + 2Q² + 2Q³ + Q⁴ (PEFT 0.16-0.17: 2Q⁴)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    q2 = q @ q
    return eye + 2 * q + 2 * q2 + 2 * q2 @ q + (2 if legacy else 1) * q2 @ q2


def exact_cayley(q):
    """(I + Q)(I - Q)^-1, by an explicit inverse."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def block_diag(blocks):
    return torch.block_diag(*blocks.unbind(0))


def input_side(w, r, untransposed=False):
    """W_flat · BD(R)ᵀ (PEFT, linears) or W_flat · BD(R) (kohya/OneTrainer convs)."""
    bd = block_diag(r)
    flat = w.double().reshape(w.shape[0], -1)
    return (flat @ (bd if untransposed else bd.t())).reshape(w.shape)


def output_side_transposed(w, r):
    """W'_k = R_kᵀ W_k for contiguous output-channel blocks k (kohya OFT, ComfyUI OFT, diag-OFT)."""
    blocks = w.double().reshape(r.shape[0], r.shape[-1], -1)  # (k, b, rest): output channel k*b + row
    return torch.einsum("kba,kbi->kai", r.double(), blocks).reshape(w.shape)


def clamp(q, threshold):
    norm = q.norm()
    return q * (threshold / (norm + 1e-8)) if threshold > 0 and norm + 1e-8 > threshold else q


# ------------------------------------------------------------------------------ PEFT OFTv2
def peft_oft(folder, *, neumann=True, terms=5, coft=False, block_share=False, bias="none", seed=0,
             model=None, block_size=4, targets=("proj", "conv", "mlp"), std=0.1):
    from peft import OFTConfig, get_peft_model

    model = oracles.Toy(seed) if model is None else model
    config = OFTConfig(oft_block_size=block_size, r=0, target_modules=list(targets), use_cayley_neumann=neumann,
                       num_cayley_neumann_terms=terms, coft=coft, eps=0.05, block_share=block_share, bias=bias)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    oracles.randomize(peft_model, ("oft_R.default.weight",), seed + 1, std)
    if bias != "none":
        oracles.randomize(peft_model, ("base_layer.bias",), seed + 2, std=0.5)
    peft_model.save_pretrained(folder)
    return peft_model


def edit_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("rotation", [("neumann", 5), ("neumann", 3), ("exact", 0)])
@pytest.mark.parametrize("coft", [False, True])
@pytest.mark.parametrize("block_share", [False, True])
def test_peft_oft_matches_peft_merge(tmp_path, rotation, coft, block_share):
    """Linear and Conv2d, Neumann (5 and 3 terms) and exact Cayley, coft, block_share: every mode
    at strength 1 is PEFT's merge_and_unload."""
    folder = str(tmp_path / "oft")
    peft_model = peft_oft(folder, neumann=rotation[0] == "neumann", terms=rotation[1] or 5, coft=coft,
                          block_share=block_share, bias="oft_only", seed=len(str(tmp_path)) % 7)
    merged = oracles.peft_merged(peft_model)
    base = {k: v for k, v in peft_model.base_model.model.state_dict().items() if "oft_R" not in k}
    adapter = boft_core.load(folder)
    assert adapter.format == "peft-oft"
    assert set(adapter.layers) == {"proj", "conv", "mlp"}
    for name, layer in adapter.layers.items():
        w = base[f"{name}.base_layer.weight"]
        for mode in boft_core.MODES:
            ours = boft_core.merge_weight(w, layer, 1.0, mode)
            assert rel(ours, merged[f"{name}.weight"], w) <= 1e-5, (name, mode)
        patch = boft_core.prepare(boft_core.merge.fit(layer, w.shape))
        got = boft_core.merge_bias(base[f"{name}.base_layer.bias"], patch, 1.0)
        assert torch.allclose(got, merged[f"{name}.bias"], atol=1e-6)


def test_peft_version_picks_the_neumann_series(tmp_path):
    """peft_version >= 0.18: I + 2Q + 2Q² + 2Q³ + Q⁴; 0.16-0.17, a 0.18 pre-release, or no
    peft_version (added in 0.18): the last term doubled. Unknown versions are refused."""
    folder = str(tmp_path / "oft")
    peft_model = peft_oft(folder, targets=("proj",), std=0.3)
    w = oracles.Toy(0).state_dict()["proj.weight"]
    packed = load_file(os.path.join(folder, "adapter_model.safetensors"))["base_model.model.proj.oft_R.weight"]
    for version, legacy in (("0.21.2", False), ("0.18.0", False), ("0.18.1@abc123", False), ("0.17.1", True),
                            ("0.16.0", True), ("0.18.0.dev0", True), (None, True)):
        edit_config(folder, peft_version=version)
        layer = boft_core.load(folder).layers["proj"]
        want = input_side(w, neumann5(skew(packed, 4), legacy))
        assert rel(boft_core.merge_weight(w, layer), want, w) < 1e-5, version
        other = input_side(w, neumann5(skew(packed, 4), not legacy))
        assert rel(other, want, w) > 1e-3  # the two series differ visibly at this size
    assert rel(boft_core.merge_weight(w, boft_core.load(folder).layers["proj"]),
               oracles.peft_merged(peft_model)["proj.weight"], w) > 1e-3  # PEFT 0.21 reads it as new: 0.17 is not
    for version in ("banana", "0.15.0", "1", 5):
        edit_config(folder, peft_version=version)
        with pytest.raises(boft_core.BoftError, match=r"adapter_config.json: peft_version"):
            boft_core.load(folder)


def test_peft_oft_strength_modes(tmp_path):
    """lycoris: each block s R + (1 - s) I; linear: W + s (W' - W); orthogonal: R(s Q), the
    Neumann series of the scaled generator; exact Cayley likewise with (I - sQ)(I + sQ)^-1."""
    for neumann in (True, False):
        folder = str(tmp_path / f"oft{neumann}")
        peft_oft(folder, neumann=neumann, targets=("proj", "conv"))
        packed = load_file(os.path.join(folder, "adapter_model.safetensors"))
        adapter = boft_core.load(folder)
        base = oracles.Toy(0).state_dict()
        for name in ("proj", "conv"):
            w = base[f"{name}.weight"]
            q = skew(packed[f"base_model.model.{name}.oft_R.weight"], 4)
            build = neumann5 if neumann else (lambda q: exact_cayley(-q))
            eye = torch.eye(4, dtype=torch.float64)
            full = input_side(w, build(q))
            for s in (0.5, -1.0, 2.0):
                layer = adapter.layers[name]
                want = {"lycoris": input_side(w, s * build(q) + (1 - s) * eye),
                        "linear": w.double() + s * (full - w.double()),
                        "orthogonal": input_side(w, build(s * q))}
                for mode, ref in want.items():
                    assert rel(boft_core.merge_weight(w, layer, s, mode), ref, w) < 1e-5, (name, s, mode)


# -------------------------------------------------------------------- kohya oft_v2 / OneTrainer
def packed_file(path, kind, *, dtype=torch.float32, seed=0, coft_eps=None, scaled=False, shared=False):
    """A kohya oft_v2 / OneTrainer OFT_2 file for Toy's proj (Linear 32 -> 64, b = 8) and conv
    (Conv2d 16 -> 32, 3x3: 144 inputs, b = 4 or one shared block). Returns the packed weights."""
    g = torch.Generator().manual_seed(seed)
    prefix = {"kohya": "lora_unet_", "onetrainer": "diffusion_model."}[kind]
    packed = {"proj": torch.randn(4, 28, generator=g) * 0.1,
              "conv": torch.randn(1 if shared else 36, 6, generator=g) * 0.1}
    tensors = {}
    for name, value in packed.items():
        tensors[f"{prefix}{name}.oft_R.weight"] = value.to(dtype)
        if scaled:
            tensors[f"{prefix}{name}.oft_R.scaled_oft"] = torch.tensor(1.0, dtype=dtype)
    meta = {}
    if kind == "kohya":
        args = {"coft": "True", "coft_eps": str(coft_eps)} if coft_eps else {}
        meta = {"ss_network_module": "networks.oft_v2", "ss_network_args": json.dumps(args)}
    save_file(tensors, path, meta)
    return {k: v.to(dtype) for k, v in packed.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["kohya", "kohya-coft", "onetrainer", "onetrainer-scaled", "onetrainer-shared"])
def test_kohya_v2_and_onetrainer_match_the_dense_reference(tmp_path, variant, dtype):
    """5-term Neumann; Linear W·BD(R)ᵀ, Conv2d W_flat·BD(R) (untransposed); coft from
    ss_network_args; scaled_oft divides by 2√(b−1); a 1-row conv block shared over the layer."""
    kind = variant.split("-")[0]
    path = str(tmp_path / "file.safetensors")
    eps = 0.2 if variant == "kohya-coft" else None
    packed = packed_file(path, kind, dtype=dtype, coft_eps=eps, scaled=variant.endswith("scaled"),
                         shared=variant.endswith("shared"))
    adapter = boft_core.load(path)
    assert adapter.format == {"kohya": "kohya-oft-v2", "onetrainer": "onetrainer-oft"}[kind]
    base = oracles.Toy(0).state_dict()
    prefix = {"kohya": "lora_unet_", "onetrainer": "diffusion_model."}[kind]
    for name, b in (("proj", 8), ("conv", 4)):
        w = base[f"{name}.weight"]
        q = skew(packed[name], b)
        if variant.endswith("scaled"):
            q = q / (2 * math.sqrt(b - 1))
        if eps:  # PEFT's coft: a block beyond eps/sqrt(rows) scaled onto it
            limit = eps / math.sqrt(q.shape[0])
            norms = q.norm(dim=(1, 2), keepdim=True)
            q = torch.where(norms > limit, q * limit / norms, q)
        r = neumann5(q)
        if r.shape[0] == 1:
            r = r.expand(w[0].numel() // b, b, b)
        want = input_side(w, r, untransposed=name == "conv")
        layer = adapter.layers[f"{prefix}{name}"]
        assert rel(boft_core.merge_weight(w, layer), want, w) < 1e-5, name
        if name == "conv":  # the transposed form would be wrong, visibly
            assert rel(input_side(w, r), want, w) > 1e-2


# -------------------------------------------------------------------------- kohya networks.oft
def test_kohya_legacy_oft_and_flux_parts(tmp_path):
    """W'_k = R_kᵀ W_k with ‖Q‖_F clamped to alpha·out_dim, strength m(R − I) + I (our lycoris
    mode); Flux's fused qkv stored as .oft_blocks.0..2 lands on its three row slices (CLI merge)."""
    g = torch.Generator().manual_seed(5)
    alpha = torch.tensor(0.01, dtype=torch.float16)  # stored as 0.010002136, which kohya uses
    tensors = {"oft_unet_proj.oft_blocks": torch.randn(8, 8, 8, generator=g) * 0.5, "oft_unet_proj.alpha": alpha}
    for i in range(3):
        tensors[f"oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.{i}"] = torch.randn(4, 4, 4, generator=g) * 0.5
    tensors["oft_unet_double_blocks_0_img_attn_qkv.alpha"] = alpha.clone()
    path = str(tmp_path / "kohya_oft.safetensors")
    save_file(tensors, path, {"ss_network_module": "networks.oft"})
    adapter = boft_core.load(path)
    assert adapter.format == "kohya-oft"
    qkv_name = "oft_unet_double_blocks_0_img_attn_qkv.oft_blocks"
    assert {n: layer.rows for n, layer in adapter.layers.items()} == {
        "oft_unet_proj": None, f"{qkv_name}.0": (0, 16), f"{qkv_name}.1": (16, 16), f"{qkv_name}.2": (32, 16)}
    w = oracles.Toy(0).state_dict()["proj.weight"]
    q = tensors["oft_unet_proj.oft_blocks"].double()
    q = q - q.transpose(1, 2)
    assert q.norm() > alpha.double().item() * 64  # the constraint clips
    q = clamp(q, alpha.double().item() * 64)
    r = exact_cayley(q)
    eye = torch.eye(8, dtype=torch.float64)
    for s in (1.0, 0.5, -1.0):
        want = output_side_transposed(w, s * (r - eye) + eye)
        assert rel(boft_core.merge_weight(w, adapter.layers["oft_unet_proj"], s), want, w) < 1e-5

    qkv = torch.randn(48, 24, generator=g)
    base = {"double_blocks.0.img_attn.qkv.weight": qkv, "proj.weight": w}
    save_file(base, str(tmp_path / "base.safetensors"))
    out = str(tmp_path / "out.safetensors")
    done = subprocess.run([sys.executable, "-m", "boft_core", "merge", str(tmp_path / "base.safetensors"), path,
                           "--out", out], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got = load_file(out)["double_blocks.0.img_attn.qkv.weight"]
    for i in range(3):
        part = tensors[f"oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.{i}"].double()
        qi = clamp(part - part.transpose(1, 2), alpha.double().item() * 16)
        want = output_side_transposed(qkv[16 * i:16 * (i + 1)], exact_cayley(qi))
        assert rel(got[16 * i:16 * (i + 1)], want, qkv[16 * i:16 * (i + 1)]) < 1e-5, i


# ---------------------------------------------------------------------- ComfyUI-trained OFT
def comfyui_file(path, *, seed=0, std=0.1, metadata=None):
    """What ComfyUI 0.28's trainer writes: diffusion_model.<path>.oft_blocks (k, b, b) + .alpha 1.0."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"diffusion_model.proj.oft_blocks": torch.randn(8, 8, 8, generator=g) * std,
               "diffusion_model.proj.alpha": torch.tensor(1.0),
               "diffusion_model.conv.oft_blocks": torch.randn(8, 4, 4, generator=g) * std,
               "diffusion_model.conv.alpha": torch.tensor(1.0)}
    save_file(tensors, path, metadata)
    return tensors


def test_comfyui_trained_oft_detected_and_its_rule_chosen(tmp_path):
    """auto reads ComfyUI-trained files by ComfyUI's rule (‖Q‖_F <= alpha); lycoris and comfyui
    force one; the same tensors with metadata are a LyCORIS diag-OFT (alpha·out_dim)."""
    path = str(tmp_path / "comfy.safetensors")
    tensors = comfyui_file(path)
    adapter = boft_core.load(path)
    assert adapter.format == "comfyui-oft"
    base = oracles.Toy(0).state_dict()
    for choice, rule in (("auto", "comfyui"), ("comfyui", "comfyui"), ("lycoris", "lycoris")):
        chosen = with_constraint(adapter, choice)
        assert boft_core.formats.constraint_rule(chosen) == rule
        for name in ("proj", "conv"):
            w = base[f"{name}.weight"]
            blocks = tensors[f"diffusion_model.{name}.oft_blocks"].double()
            q = blocks - blocks.transpose(1, 2)
            assert q.norm() > 1  # so that the rules differ
            q = clamp(q, 1.0 if rule == "comfyui" else w.shape[0])
            want = output_side_transposed(w, exact_cayley(q))
            assert rel(boft_core.merge_weight(w, chosen.layers[f"diffusion_model.{name}"]), want, w) < 1e-5
    lycoris = str(tmp_path / "lycoris.safetensors")
    comfyui_file(lycoris, metadata={"ss_network_module": "lycoris.kohya"})
    assert boft_core.load(lycoris).format == "lycoris-diag-oft"
    assert boft_core.formats.constraint_rule(boft_core.load(lycoris)) == "lycoris"


def test_comfyui_trained_oft_equals_comfyui_oftdiff(tmp_path, comfy):
    """The 0.28 host's own OFTDiff (the trainer's forward) on the same file, float32 and bf16."""
    oft = pytest.importorskip("comfy.weight_adapter.oft")
    if not hasattr(oft, "OFTDiff"):
        pytest.skip("this ComfyUI has no OFT trainer (OFTDiff arrived after 0.3.75)")
    for dtype in (torch.float32, torch.bfloat16):
        path = str(tmp_path / f"comfy_{dtype}.safetensors")
        tensors = {k: v.to(dtype) for k, v in comfyui_file(path, std=0.2).items()}
        save_file(tensors, path)
        adapter = boft_core.load(path)
        for name in ("proj", "conv"):
            w = oracles.Toy(0).state_dict()[f"{name}.weight"]
            blocks = tensors[f"diffusion_model.{name}.oft_blocks"].float()  # core's loader upcasts
            diff = oft.OFTDiff((blocks, None, 1.0, None))
            with torch.no_grad():
                want = diff(w.double().float())
            got = boft_core.merge_weight(w, adapter.layers[f"diffusion_model.{name}"])
            assert rel(got, want, w) < 1e-5, (dtype, name)


# ----------------------------------------------------------------------------- refused input
def test_old_peft_oft_refused_naming_the_version(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({"base_model.model.proj.oft_r": torch.randn(4, 16, 16)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT", "r": 4, "peft_version": "0.13.2"}))
    with pytest.raises(boft_core.BoftError, match=r"PEFT 0\.13\.2.*oft_r") as e:
        boft_core.load(str(folder))
    assert "base_model.model.proj.oft_r" in str(e.value)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(boft_core.BoftError, match="0.15 or older"):
        boft_core.load(str(folder))


def test_bad_oftv2_input_names_file_key_and_shapes(tmp_path):
    folder = str(tmp_path / "oft")
    peft_oft(folder, targets=("proj",))
    file = os.path.join(folder, "adapter_model.safetensors")
    good = load_file(file)
    save_file({"base_model.model.proj.oft_R.weight": torch.randn(8, 7)}, file)
    with pytest.raises(boft_core.BoftError, match=r"adapter_model.safetensors: base_model.model.proj.oft_R.weight "
                                                  r"has shape \(8, 7\).*width of 7"):
        boft_core.load(folder)
    save_file(good, file)
    for field in ("use_cayley_neumann", "num_cayley_neumann_terms", "block_share", "oft_block_size"):
        edit_config(folder, **{field: None})
        with pytest.raises(boft_core.BoftError, match=f"adapter_config.json lacks.*{field}"):
            boft_core.load(folder)
        peft_oft(folder, targets=("proj",))
    edit_config(folder, num_cayley_neumann_terms="5")
    with pytest.raises(boft_core.BoftError, match="num_cayley_neumann_terms is '5'"):
        boft_core.load(folder)
    # a block size that does not divide the layer: 4-blocks (8 rows = 32 inputs) on a 48-input weight
    peft_oft(folder, targets=("proj",))
    layer = boft_core.load(folder).layers["proj"]
    with pytest.raises(boft_core.BoftError, match=r"layer proj: the weight has shape \(64, 48\)"):
        boft_core.check_weight(layer, (64, 48))
    # a shared block that does not divide the layer
    path = str(tmp_path / "ot.safetensors")
    save_file({"diffusion_model.proj.oft_R.weight": torch.randn(1, 10) * 0.1}, path)  # b = 5
    shared = boft_core.load(path).layers["diffusion_model.proj"]
    with pytest.raises(boft_core.BoftError, match=r"shared block.*size 5 does not divide the weight's 32 input"):
        boft_core.merge_weight(torch.randn(64, 32), shared)
    # blocks far too large for the Neumann series to be near a rotation
    big = str(tmp_path / "big.safetensors")
    noise = torch.randn(4, 28, generator=torch.Generator().manual_seed(3))
    save_file({"diffusion_model.proj.oft_R.weight": noise}, big)
    with pytest.raises(boft_core.BoftError, match=r"big.safetensors: layer diffusion_model.proj: .*too large for a "
                                                  r"5-term Cayley-Neumann series"):
        boft_core.load(big)
    # a PEFT OFT file without its config
    os.remove(os.path.join(folder, "adapter_config.json"))
    with pytest.raises(boft_core.BoftError, match="without its adapter_config.json"):
        boft_core.load(folder)


def test_inspect_lists_the_new_formats(tmp_path):
    folder = str(tmp_path / "oft")
    peft_oft(folder, targets=("proj",), coft=True)
    edit_config(folder, peft_version="0.17.0")
    comfy_path = str(tmp_path / "comfy.safetensors")
    comfyui_file(comfy_path)
    runs = {}
    cases = (("peft", [folder]), ("comfy", [comfy_path]), ("forced", [comfy_path, "--constraint", "lycoris"]))
    for what, args in cases:
        done = subprocess.run([sys.executable, "-m", "boft_core", "inspect", "--json", *args],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        runs[what] = json.loads(done.stdout)
    assert runs["peft"]["format"] == "peft-oft"
    assert runs["peft"]["modules"][0]["rotation"].startswith("neumann-5 (PEFT<0.18 series, coft")
    assert runs["comfy"]["format"] == "comfyui-oft" and runs["comfy"]["constraint_rule"] == "comfyui"
    assert runs["forced"]["constraint_rule"] == "lycoris"


def test_kohya_flux_oft_parts_patch_row_slices_through_the_loader(comfy, pack, loras_dir, tmp_path):
    """kohya's Flux OFT (oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.0..2 + .alpha) through
    BOFTLoaderModelOnly on a real (tiny) Flux: each part rotates its 3072 rows of ComfyUI's fused
    qkv, as the float64 reference of kohya's math says; the other weights stay bit-identical."""
    import tiny_models

    path = tiny_models.make_flux_checkpoint(tmp_path / "flux.safetensors", verify=False)
    patcher = comfy.sd.load_diffusion_model(str(path))
    key = "double_blocks.0.img_attn.qkv.weight"
    base = patcher.model.diffusion_model.state_dict()[key].detach().float().clone()
    g = torch.Generator().manual_seed(21)
    alpha = torch.tensor(1e-3)
    tensors = {f"oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.{i}": torch.randn(256, 12, 12, generator=g) * 0.05
               for i in range(3)}
    tensors["oft_unet_double_blocks_0_img_attn_qkv.alpha"] = alpha
    name = "kohya_flux_oft.safetensors"
    save_file(tensors, str(loras_dir / name), {"ss_network_module": "networks.oft"})
    node = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]()
    out = node.load_boft(patcher, name, 1.0, "lycoris")
    report = out["ui"]["boft_report"][0]
    assert "(kohya-oft, lycoris" in report and "constraint rule lycoris): applied 3 of 3" in report, report
    patched = out["result"][0]
    assert set(patched.patches) == {"diffusion_model." + key}
    comfy.model_management.load_models_gpu([patched])  # a full load, as on --cpu
    try:
        got = patched.model.diffusion_model.state_dict()[key].detach().float().clone()
    finally:
        patched.unpatch_model(patched.offload_device)
        comfy.model_management.unload_all_models()
    for i in range(3):
        rows = slice(3072 * i, 3072 * (i + 1))
        blocks = tensors[f"oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.{i}"].double()
        q = clamp(blocks - blocks.transpose(1, 2), alpha.double().item() * 3072)
        want = output_side_transposed(base[rows], exact_cayley(q))
        assert rel(got[rows], want, base[rows]) < 1e-5, i
