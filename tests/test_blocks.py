"""boft_core.blocks against tables written from LoRA Block Weight's documentation.

Source of the tables: hako-mikan/sd-webui-lora-block-weight, README "Weights Setting" (LoRA(17),
SDXL LoRA(12), LyCORIS(26), SDXL LyCORIS(20)) and its default presets (DEF_WEIGHT_PRESET in
scripts/lora_block_weight.py); ltdrdata/ComfyUI-Inspire-Pack resources/lbw-preset.txt (SDXL-*).
"""

import pytest
import torch
from safetensors.torch import load_file
from test_nodes import comfy_nodes_lora, load_model, lycoris_prefix, patched_state, rel, unet_adapter  # noqa: F401

import boft_core
from boft_core import BoftError
from boft_core.blocks import LBW26, describe_weights, lbw_block, parse_block_weights

# README "Weights Setting", LoRA(17) and SDXL LoRA(12) (its "OUT0".."OUT05" are OUT00..OUT05)
SD17 = "BASE IN01 IN02 IN04 IN05 IN07 IN08 MID OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11".split()
SDXL12 = "BASE IN04 IN05 IN07 IN08 MID OUT00 OUT01 OUT02 OUT03 OUT04 OUT05".split()
# lora_block_weight.py DEF_WEIGHT_PRESET (17 values each)
SD_PRESETS = {
    "NONE": [0] * 17, "ALL": [1] * 17,
    "INS": [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "IND": [1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "INALL": [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "MIDD": [1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTD": [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTS": [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    "OUTALL": [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "ALL0.5": [0.5] * 17,
}
SDXL_PRESETS = {  # Inspire Pack lbw-preset.txt
    "SDXL-NONE": [0] * 12, "SDXL-ALL": [1] * 12, "SDXL-INALL": [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
    "SDXL-MIDALL": [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0], "SDXL-OUTALL": [1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
}
# One layer name per block, as trainers write them (kohya LDM/SGM names and diffusers paths).
SD1_NAMES = {
    "BASE": ["lora_te_text_model_encoder_layers_0_self_attn_q_proj",
             "text_encoder.text_model.encoder.layers.3.mlp.fc1"],
    "IN01": ["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
             "lora_unet_down_blocks_0_attentions_0_proj_in"],
    "IN02": ["lora_unet_input_blocks_2_1_proj_out", "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"],
    "IN04": ["lora_unet_input_blocks_4_1_proj_in", "lycoris_down_blocks_1_attentions_0_proj_in"],
    "IN05": ["lora_unet_input_blocks_5_1_proj_in", "base_model.model.down_blocks.1.attentions.1.proj_in"],
    "IN07": ["lora_unet_input_blocks_7_1_proj_in", "lora_unet_down_blocks_2_attentions_0_proj_in"],
    "IN08": ["lora_unet_input_blocks_8_1_proj_in", "lora_unet_down_blocks_2_attentions_1_proj_in"],
    "MID": ["lora_unet_middle_block_1_proj_in", "lora_unet_mid_block_attentions_0_proj_in"],
    "OUT03": ["lora_unet_output_blocks_3_1_proj_in", "lora_unet_up_blocks_1_attentions_0_proj_in"],
    "OUT05": ["lora_unet_output_blocks_5_1_proj_in", "lora_unet_up_blocks_1_attentions_2_proj_in"],
    "OUT06": ["lora_unet_output_blocks_6_1_proj_in", "lora_unet_up_blocks_2_attentions_0_proj_in"],
    "OUT11": ["lora_unet_output_blocks_11_1_proj_in", "lora_unet_up_blocks_3_attentions_2_proj_in"],
}
NOT_IN_17 = {  # blocks the 17-value vector leaves out: LBW gives them 0 (to26)
    "IN00": "lora_unet_conv_in", "IN03": "lora_unet_down_blocks_0_downsamplers_0_conv",
    "IN11": "lora_unet_input_blocks_11_0_in_layers_2", "OUT02": "lora_unet_up_blocks_0_upsamplers_0_conv",
}
IN_NO_BLOCK = ["lora_unet_time_embed_0", "lora_unet_time_embedding_linear_1", "lora_unet_out_2", "lora_unet_conv_out"]


def vector(values):
    return ",".join(str(v) for v in values)


@pytest.mark.parametrize("block", SD1_NAMES)
def test_sd1_names_map_to_the_documented_blocks(block):
    want = "M00" if block == "MID" else block
    for name in SD1_NAMES[block]:
        assert lbw_block(name) == want, name
    for block_id, name in NOT_IN_17.items():
        assert lbw_block(name) == block_id
    for name in IN_NO_BLOCK:
        assert lbw_block(name) is None


def test_each_position_of_the_17_vector_weighs_its_block():
    for i, block in enumerate(SD17):
        values = [0.0] * 17
        values[i] = 0.25 + i
        weights = parse_block_weights(vector(values), "sd1")
        for other, names in SD1_NAMES.items():
            for name in names:
                want = values[i] if other == block else 0.0
                assert weights.weight(name) == want, (block, name)
        assert all(weights.weight(n) == 0 for n in NOT_IN_17.values())
        assert all(weights.weight(n) == 1 for n in IN_NO_BLOCK)


def test_each_position_of_the_12_vector_weighs_its_block():
    sdxl = {  # SDXL: 2 layers per level (input_blocks 4, 5, 7, 8; output_blocks 0-8)
        "BASE": ["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_0_mlp_fc1"],
        "IN04": ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_1_attentions_0_proj_in"],
        "IN05": ["lora_unet_input_blocks_5_1_proj_in", "lora_unet_down_blocks_1_attentions_1_proj_in"],
        "IN07": ["lora_unet_input_blocks_7_1_proj_in", "lora_unet_down_blocks_2_attentions_0_proj_in"],
        "IN08": ["lora_unet_input_blocks_8_1_proj_in", "lora_unet_down_blocks_2_attentions_1_proj_in"],
        "MID": ["lora_unet_middle_block_1_proj_in", "lora_unet_mid_block_attentions_0_proj_in"],
        "OUT00": ["lora_unet_output_blocks_0_1_proj_in", "lora_unet_up_blocks_0_attentions_0_proj_in"],
        "OUT02": ["lora_unet_output_blocks_2_1_proj_in", "lora_unet_up_blocks_0_attentions_2_proj_in"],
        "OUT03": ["lora_unet_output_blocks_3_1_proj_in", "lora_unet_up_blocks_1_attentions_0_proj_in"],
        "OUT05": ["lora_unet_output_blocks_5_1_proj_in", "lora_unet_up_blocks_1_attentions_2_proj_in"],
    }
    for i, block in enumerate(SDXL12):
        values = [0.0] * 12
        values[i] = 2.0 - i * 0.125
        weights = parse_block_weights(vector(values), "sdxl")
        for other, names in sdxl.items():
            for name in names:
                assert weights.weight(name) == (values[i] if other == block else 0.0), (block, name)
        assert weights.weight("lora_unet_output_blocks_6_1_proj_in") == 0  # OUT06: not in the 12


@pytest.mark.parametrize(("family", "presets"), [("sd1", SD_PRESETS), ("sdxl", SDXL_PRESETS)])
def test_presets_are_the_documented_vectors(family, presets):
    order = SD17 if family == "sd1" else SDXL12
    for name, values in presets.items():
        for spelling in (name, name.lower(), name.removeprefix("SDXL-"), "SD-" + name if family == "sd1" else name):
            weights = parse_block_weights(spelling, family)
            assert weights.kind == "preset" and list(weights.vector) == values, spelling
            assert weights.ids == {("M00" if b == "MID" else b): float(v) for b, v in zip(order, values, strict=True)}
    # a preset file's line "LABEL:values" is the same vector
    first = next(iter(presets))
    labelled = parse_block_weights("MINE:" + vector(presets[first]), family)
    assert labelled.vector == parse_block_weights(first, family).vector


def test_named_blocks():
    weights = parse_block_weights("TE:0, IN:0.5, MID:1.5, OUT:-1, IN04=2", "sd1")
    table = {SD1_NAMES["BASE"][0]: 0.0, SD1_NAMES["IN01"][1]: 0.5, SD1_NAMES["IN04"][0]: 2.0,
             SD1_NAMES["IN04"][1]: 2.0, SD1_NAMES["MID"][0]: 1.5, SD1_NAMES["OUT11"][1]: -1.0,
             "lora_unet_conv_in": 0.5, "lora_unet_time_embed_0": 0.5, "lora_unet_conv_out": -1.0}
    for name, want in table.items():
        assert weights.weight(name) == want, name
    assert parse_block_weights("mid:0", "sd1").weight(SD1_NAMES["IN01"][0]) == 1  # blocks not named stay at 1
    assert parse_block_weights("default:0, mid:0.5", "sd1").weight(SD1_NAMES["IN01"][0]) == 0
    sdxl = parse_block_weights("te1:0, te2:0.5, te:0.25, down:0.75, in:0.1", "sdxl")  # smaller groups win
    assert sdxl.weight("lora_te1_text_model_encoder_layers_0_mlp_fc1") == 0
    assert sdxl.weight("lora_te2_text_model_encoder_layers_0_mlp_fc1") == 0.5
    assert sdxl.weight("lora_unet_input_blocks_4_1_proj_in") == 0.75
    assert sdxl.weight("lora_unet_conv_in") == 0.1
    flux = parse_block_weights("double:1, single:0.6", "flux")
    assert flux.weight("lora_unet_double_blocks_0_img_attn_qkv") == 1
    assert flux.weight("transformer.single_transformer_blocks.3.proj_out") == 0.6
    assert flux.weight("lora_unet_final_layer_linear") == 1
    assert parse_block_weights("", "sd1").weight("anything") == parse_block_weights(None, "flux").weight("x") == 1
    names = [SD1_NAMES["IN01"][0], SD1_NAMES["MID"][0], "lora_unet_time_embed_0"]
    info = describe_weights(parse_block_weights("MIDD", "sd1"), names)
    assert info["blocks"] == [{"block": "IN01", "weight": 0.0}, {"block": "M00", "weight": 1.0},
                              {"block": "in", "weight": 1.0}]


@pytest.mark.parametrize(("text", "family", "problem", "accepts"), [
    ("1,1,1", "sd1", "3 values", ["17 or 26", "BASE,IN01,IN02,IN04", "MIDD", "OUTALL", "TE, BASE"]),
    (vector([1] * 17), "sdxl", "17 values", ["12 or 20", "BASE,IN04,IN05", "MIDALL", "TE2"]),
    ("MIDD", "sdxl", "unknown preset 'MIDD'", ["INALL, MIDALL, OUTALL"]),
    ("TEXT:0", "sd1", "unknown block name 'text'", ["TE, BASE, TE1, IN, DOWN, MID, OUT, UP", "block id"]),
    ("IN09:1", "sdxl", "no block IN09", ["12 or 20"]),
    ("double:1, joint:1", "flux", "unknown block name 'joint'", ["TE, double, single", "'double:1, single:0.6'"]),
    (vector([1] * 17), "flux", "LoRA Block Weight vectors exist for SD1.x/SD2.x and SDXL only", ["double, single"]),
    ("te:x", "sd1", "'x' is not a number", []),
    ("te:nan", "sd1", "'nan' is not a finite number", []),
    ("te:1, TE:0", "sd1", "'te' is given twice", []),
])
def test_errors_say_what_the_family_accepts(text, family, problem, accepts):
    with pytest.raises(BoftError) as info:
        parse_block_weights(text, family)
    message = str(info.value)
    assert message.startswith(f"block_weights {text!r}: {problem}"), message
    for part in accepts:
        assert part in message, (part, message)


# --------------------------------------------------------------------------- in the real host
# The loader nodes in ComfyUI's own ModelPatcher (in process): every layer equals the merge at its
# own strength (strength x its block's weight) in the chosen mode; a block at weight 0 is untouched.
SD26 = {"BASE": 1.0, "IN00": 0.5, "IN01": -0.5, "OUT00": 1.5, "OUT01": 0.0}  # the tiny SD1.5 UNet's blocks


@pytest.mark.usefixtures("lycoris_prefix")
def test_every_layer_is_merged_at_its_own_strength(comfy, pack, sd15_ckpt, loras_dir):
    model = load_model(comfy, sd15_ckpt)
    base = {k: v.clone().float() for k, v in model.model.diffusion_model.state_dict().items()}
    path = loras_dir / "blocks_boft.safetensors"
    unet_adapter(path, comfy, model, rescaled=True, constraint=0.001)
    adapter = boft_core.load(str(path))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    vector = ",".join(str(SD26.get(block, 0.0)) for block in LBW26)
    node = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]()
    seen = set()
    for mode, strength, text in (("lycoris", 0.8, vector), ("linear", 0.8, vector), ("orthogonal", -1.2, vector),
                                 ("lycoris", 0.7, "IN:0.5, OUT01:2, default:0")):
        weights = parse_block_weights(text, "sd1")
        out = node.load_boft(model, path.name, strength, mode, block_weights=text)
        report = out["ui"]["boft_report"][0]
        off = sum(weights.weight(name) == 0 for name in adapter.layers)
        assert f"applied {51 - off} of 51" in report and (f"{off} layers at weight 0" in report) == (off > 0), report
        got = patched_state(comfy, out["result"][0])
        for name, layer in adapter.layers.items():
            key = key_map[name][len("diffusion_model."):]
            w = weights.weight(name)
            seen.add((lbw_block(name), w))
            if w == 0:
                assert torch.equal(got[key], base[key]), name
            else:
                want = boft_core.merge_weight(base[key].double(), layer, strength * w, mode)
                assert rel(got[key], want, base[key]) < 1e-4, (mode, name)
    assert {w for _, w in seen} >= {0.5, -0.5, 1.5, 0.0, 1.0, 2.0}  # every kind of block weight was exercised
    assert not model.patches


@pytest.mark.usefixtures("lycoris_prefix")
def test_chained_with_a_lora_per_block(comfy, pack, sd15_ckpt, loras_dir):
    """LoRA then BOFT: W' = B(s·w)(W + s_l·ΔW); BOFT then LoRA: W' = B(s·w)W + s_l·ΔW, per layer."""
    import tiny_models

    model = load_model(comfy, sd15_ckpt)
    lora_path = loras_dir / "blocks_chain_lora.safetensors"
    chosen = tiny_models.make_kohya_lora(lora_path, sd15_ckpt, diffusers_names=False)
    boft_path = loras_dir / "blocks_chain_boft.safetensors"
    unet_adapter(boft_path, comfy, model)
    adapter = boft_core.load(str(boft_path))
    lora = load_file(str(lora_path))
    base = {k: v.clone().float() for k, v in model.model.diffusion_model.state_dict().items()}
    s_boft, s_lora, text = 0.8, 0.6, "IN:0.5, OUT:1.5"
    weights = parse_block_weights(text, "sd1")
    boft_node, lora_node = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"](), comfy_nodes_lora()
    lora_first = boft_node.load_boft(lora_node.load_lora_model_only(model, lora_path.name, s_lora)[0],
                                     boft_path.name, s_boft, "lycoris", block_weights=text)["result"][0]
    boft_first = lora_node.load_lora_model_only(
        boft_node.load_boft(model, boft_path.name, s_boft, "lycoris", block_weights=text)["result"][0],
        lora_path.name, s_lora)[0]
    got_a, got_b = patched_state(comfy, lora_first), patched_state(comfy, boft_first)
    for name, key in chosen.items():
        k, layer, w = key[len("diffusion_model."):], adapter.layers[name], base[key[len("diffusion_model."):]].double()
        up, down = lora[f"{name}.lora_up.weight"].double(), lora[f"{name}.lora_down.weight"].double()
        delta = s_lora * float(lora[f"{name}.alpha"]) / down.shape[0] * (up @ down)
        s = s_boft * weights.weight(name)
        assert weights.weight(name) in (0.5, 1.5)
        assert rel(got_a[k], boft_core.merge_weight(w + delta, layer, s), w) < 1e-4, name
        assert rel(got_b[k], boft_core.merge_weight(w, layer, s) + delta, w) < 1e-4, name


@pytest.mark.usefixtures("lycoris_prefix")
def test_every_block_at_weight_0_leaves_the_model_as_it_is(comfy, pack, sd15_ckpt, loras_dir):
    """Every layer at block weight 0 (``default:0``) is no wrong base model: the node returns its
    input model with no patch and says so, as at strength 0."""
    model = load_model(comfy, sd15_ckpt)
    path = loras_dir / "blocks_all_off.safetensors"
    unet_adapter(path, comfy, model)
    node = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]()
    out = node.load_boft(model, path.name, 1.0, "lycoris", block_weights="default:0")
    report = out["ui"]["boft_report"][0]
    assert out["result"][0] is model and not model.patches, report
    assert "applied 0 of 51" in report and "51 layers at weight 0" in report, report


@pytest.mark.usefixtures("lycoris_prefix")
def test_wrong_block_weights_fail_before_anything_is_patched(comfy, pack, sd15_ckpt, loras_dir):
    from importlib import import_module

    error = import_module(pack.__name__ + ".boft_core").BoftError
    model = load_model(comfy, sd15_ckpt)
    path = loras_dir / "blocks_bad.safetensors"
    unet_adapter(path, comfy, model)
    node = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]()
    for text, message in (("1,1,1,1,1,1,1,1,1,1,1,1", r"12 values\. For SD1\.x/SD2\.x models it accepts .*17 or 26"),
                          ("SDXL-OUTALL", r"unknown preset 'SDXL-OUTALL'.*MIDD"),
                          ("double:1", r"unknown block name 'double'.*TE, BASE")):
        for strength in (1.0, 0.0):  # a wrong string is an error even where nothing would be applied
            with pytest.raises(error, match=message):
                node.load_boft(model, path.name, strength, "lycoris", block_weights=text)
    assert not model.patches


@pytest.mark.usefixtures("lycoris_prefix")
def test_inspire_lora_loader_block_weight_path(comfy, pack, sd15_ckpt, loras_dir):
    """Inspire Pack's LoraLoaderBlockWeight with a BOFT file, in process, with the calls it makes
    (inspire/lora_block_weight.py ``load_lbw`` + ``load_lora_for_models``): core's key maps,
    ``comfy.lora.load_lora`` (which hands ``oft_blocks`` to our adapter, registered in core's list),
    then one ``add_patches({key: adapter}, strength_model * ratio)`` per key; a ratio of 0 is not
    patched. Its vector's entries go, in order, to the input, middle and output block numbers the file
    has (not LBW's fixed positions), the first to every other layer. Every layer comes out as our
    exact merge in ``lycoris`` mode at strength_model x its ratio."""
    import re

    model = load_model(comfy, sd15_ckpt)
    base = {k: v.clone().float() for k, v in model.model.diffusion_model.state_dict().items()}
    path = loras_dir / "inspire_boft.safetensors"
    unet_adapter(path, comfy, model, rescaled=True, constraint=0.001)
    adapter = boft_core.load(str(path))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(load_file(str(path)), key_map)
    assert {type(v).__name__ for v in loaded.values()} == {"BOFTAdapter"}
    strength_model, vector = 0.9, [1.0, 0.5, -0.5, 1.5, 0.0]  # BASE/others, then the blocks the file has
    blocks, ratios = [], {}
    for key in loaded:  # Inspire's grouping: (kind, block number) of the model key, in key order
        hit = re.match(r"diffusion_model\.(input_blocks|middle_block|output_blocks)\.(\d+)\.", key)
        if hit:
            blocks.append(((("input_blocks", "middle_block", "output_blocks").index(hit[1]), int(hit[2])), key))
        else:
            ratios[key] = vector[0]
    order = sorted({b for b, _ in blocks})
    assert len(order) == len(vector) - 1, order  # input 0, 1 and output 0, 1 in the tiny UNet
    for block, key in blocks:
        ratios[key] = vector[1 + order.index(block)]
    patcher = model.clone()
    for key, value in loaded.items():
        if ratios[key] != 0:
            patcher.add_patches({key: value}, strength_model * ratios[key])
    got = patched_state(comfy, patcher)
    names = {key_map[name]: name for name in adapter.layers}
    assert set(ratios.values()) == set(vector)
    for key, ratio in ratios.items():
        k = key[len("diffusion_model."):]
        if ratio == 0:
            assert torch.equal(got[k], base[k]), key
        else:
            want = boft_core.merge_weight(base[k].double(), adapter.layers[names[key]], strength_model * ratio)
            assert rel(got[k], want, base[k]) < 1e-4, key


def test_sdxl_family_takes_its_12_value_vectors(comfy, pack, tmp_path, loras_dir):
    """On an SDXL-family model (Segmind Vega layout, SDXL's block indices) the node takes SDXL's
    orders and presets, and refuses SD1.5's 17 values naming SDXL's."""
    from importlib import import_module

    import tiny_models
    from lycoris_comfy import write_boft

    error = import_module(pack.__name__ + ".boft_core").BoftError
    loader = import_module(pack.__name__ + ".nodes.loader")
    path = tiny_models.make_sdxl_unet_checkpoint(tmp_path / "sdxl.safetensors", verify=False)
    model = tiny_models.load_checkpoint(path, with_vae=False)[0]
    assert loader.model_family(model) == "sdxl"
    unet = model.model.diffusion_model
    base = {k: v.clone().float() for k, v in unet.state_dict().items()}
    boft_path = loras_dir / "sdxl_blocks.safetensors"
    write_boft(boft_path, unet, "lora_unet", ("input_blocks.4.1.proj_in", "input_blocks.7.1.proj_out",
                                              "output_blocks.3.1.proj_out"))
    adapter = boft_core.load(str(boft_path))
    node = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]()
    out = node.load_boft(model, boft_path.name, 0.7, "orthogonal", block_weights="SDXL-INALL")
    assert "applied 2 of 3" in out["ui"]["boft_report"][0]
    got = patched_state(comfy, out["result"][0])
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    for name, layer in adapter.layers.items():
        key = key_map[name][len("diffusion_model."):]
        if lbw_block(name) == "OUT03":
            assert torch.equal(got[key], base[key])
        else:
            want = boft_core.merge_weight(base[key].double(), layer, 0.7, "orthogonal")
            assert rel(got[key], want, base[key]) < 1e-4, name
    with pytest.raises(error, match=r"17 values\. For SDXL models it accepts .*12 or 20"):
        node.load_boft(model, boft_path.name, 1.0, "lycoris", block_weights=",".join(["1"] * 17))
