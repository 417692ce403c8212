"""boft_core.stats: the probe estimate of ‖B − I‖ against explicit float64 dense matrices, block names."""

import math

import pytest
import torch
from test_properties import KINDS, dense_reference, random_layer

from boft_core import BoftFile, BoftLayer
from boft_core.stats import block_of, group_stats, layer_stats, rotation_distance, summary, trigger_text


def exact_distance(layer):
    big = dense_reference(layer)  # index loops in float64, independent of butterfly.py
    n = big.shape[0]
    return (torch.linalg.matrix_norm(big - torch.eye(n, dtype=torch.float64)) / math.sqrt(n)).item()


@pytest.mark.parametrize("kind", KINDS)
def test_distance_estimates_the_dense_norm(kind):
    for seed in range(3):
        layer = random_layer(kind, seed, m=3, nb=8, b=6, alpha=0.0)
        exact = exact_distance(layer)
        assert exact > 0.05
        # 32 probes: a cheap estimate, within a few percent for a spread-out rotation.
        assert rotation_distance(layer, probes=32, seed=seed) == pytest.approx(exact, rel=0.12)
        # Many probes converge on the exact value.
        assert rotation_distance(layer, probes=4096, seed=seed) == pytest.approx(exact, rel=0.02)


def test_distance_respects_constraint_and_ignores_scale():
    layer = random_layer("lycoris-boft", 7, m=2, nb=4, b=4, alpha=0.001, scaled=True)
    assert rotation_distance(layer, probes=4096) == pytest.approx(exact_distance(layer), rel=0.02)
    unscaled = BoftLayer(name="x", kind=layer.kind, blocks=layer.blocks, alpha=layer.alpha)
    assert rotation_distance(unscaled, probes=64) == rotation_distance(layer, probes=64)


def test_distance_is_zero_for_identity_and_seeded():
    zero = BoftLayer(name="z", kind="lycoris-boft", blocks=torch.zeros(4, 8, 4, 4))
    assert rotation_distance(zero) == 0.0
    layer = random_layer("kohya-boft", 3)
    assert rotation_distance(layer, seed=5) == rotation_distance(layer, seed=5)
    assert rotation_distance(layer, seed=5) != rotation_distance(layer, seed=6)
    with pytest.raises(ValueError):
        rotation_distance(layer, probes=0)


def test_distance_stays_cheap_on_a_wide_layer():
    """n = 10240 (an SDXL ff layer): probes only, never an n x n matrix."""
    g = torch.Generator().manual_seed(0)
    layer = BoftLayer(name="w", kind="lycoris-boft", blocks=torch.randn(11, 1024, 10, 10, generator=g) * 0.01)
    value = rotation_distance(layer, probes=8)
    assert 0 < value < 2


@pytest.mark.parametrize("name, want", [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", ("down", 0)),
    ("lycoris_up_blocks_3_attentions_2_proj_out", ("up", 3)),
    ("lora_unet_mid_block_attentions_0_proj_in", ("mid", None)),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", ("down", 1)),
    ("lora_unet_input_blocks_8_1_proj_in", ("down", 2)),
    ("lora_unet_input_blocks_0_0", ("in", None)),
    ("lora_unet_middle_block_1_proj_in", ("mid", None)),
    ("lora_unet_output_blocks_5_1_proj_out", ("up", 1)),
    ("base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", ("down", 1)),
    ("unet.up_blocks.1.attentions.0.to_out.0", ("up", 1)),
    ("diffusion_model.output_blocks.0.1.proj_in", ("up", 0)),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", ("text encoder", None)),
    ("lora_te1_text_model_encoder_layers_3_mlp_fc1", ("text encoder", None)),
    ("lora_te2_text_model_encoder_layers_3_mlp_fc1", ("text encoder 2", None)),
    ("lora_te_encoder_layers_0_self_attn_k_proj", ("text encoder", None)),
    ("base_model.model.text_model.encoder.layers.0.self_attn.q_proj", ("text encoder", None)),
    ("text_encoder_2.text_model.encoder.layers.0.mlp.fc2", ("text encoder 2", None)),
    ("lycoris_double_blocks_3_img_attn_qkv", ("double", 3)),
    ("lycoris_single_blocks_12_linear1", ("single", 12)),
    ("transformer.transformer_blocks.0.attn.to_q", ("double", 0)),
    ("transformer.single_transformer_blocks.7.proj_out", ("single", 7)),
    ("lora_unet_joint_blocks_2_x_block_attn_qkv", ("joint", 2)),
    ("proj", ("proj", None)),
    ("encoder.block.0.layer", ("encoder", None)),
])
def test_block_of(name, want):
    assert block_of(name) == want


def boft_file(names, scales):
    g = torch.Generator().manual_seed(1)
    layers = {}
    for name, s in zip(names, scales, strict=True):
        blocks = torch.randn(2, 4, 4, 4, generator=g) * s
        layers[name] = BoftLayer(name=name, kind="lycoris-boft", blocks=blocks, alpha=0.5 if "up" in name else 0.0,
                                 scale=torch.ones(16) if "mid" in name else None)
    return BoftFile(path="x.safetensors", format="lycoris-boft", layers=layers)


def test_layer_and_group_stats_in_model_order():
    names = ["lora_unet_up_blocks_1_a", "lora_unet_down_blocks_0_b", "lora_unet_mid_block_c",
             "lora_unet_up_blocks_0_d", "lora_te_text_model_e", "lora_unet_down_blocks_0_a"]
    f = boft_file(names, [0.2, 0.01, 0.05, 0.2, 0.01, 0.01])
    rows = layer_stats(f)
    assert [r["name"] for r in rows] == [
        "lora_te_text_model_e", "lora_unet_down_blocks_0_a", "lora_unet_down_blocks_0_b",
        "lora_unet_mid_block_c", "lora_unet_up_blocks_0_d", "lora_unet_up_blocks_1_a"]
    groups = group_stats(rows)
    assert [g["section"] for g in groups] == ["text encoder", "down", "mid", "up"]
    assert [g["layers"] for g in groups] == [1, 2, 1, 2]
    assert sum(g["share"] for g in groups) == pytest.approx(1.0)
    assert groups[-1]["share"] > 0.5  # the up blocks carry most of the rotation
    s = summary(f)
    assert s == {"block_sizes": [[4, 6]], "depths": [[2, 6]], "constraints": [[0.0, 4], [0.5, 2]],
                 "rescaled": 1, "sides": [["out", 6]]}


def test_trigger_text():
    meta = {"ss_tag_frequency": '{"a": {"sks dog": 10, "grass": 3}, "b": {"grass": 8, "<b>x</b>": 1}}'}
    assert trigger_text(meta) == "grass, sks dog, <b>x</b>"
    assert trigger_text(meta, limit=1) == "grass"
    assert trigger_text({}) == ""
    assert trigger_text({"ss_tag_frequency": "not json"}) == ""
