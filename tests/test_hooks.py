"""BOFT as ComfyUI weight hooks, in process with the host's own hook classes and nodes.

Core's ``CreateHookLora`` (through our adapter in core's adapter list) and our ``Create Hook
BOFT`` are scheduled with core's keyframe nodes and registered on the host's ModelPatcher / CLIP
patcher as sampling and ``SetClipHooks`` do; the host's own keyframe logic
(``prepare_hook_patches_current_keyframe``) then walks the keyframes. At each keyframe the
weights must equal a merge at that keyframe's strength: ``boft_core.merge_weight`` in float64
(tested against LyCORIS and PEFT elsewhere) and PEFT's own ``merge_and_unload`` at strength 1.
The prepared-rotation cache must stay within its budget across 200 distinct strengths.
"""

from __future__ import annotations

import copy
import sys

import oracles
import pytest
import tiny_models
import torch
from lycoris_comfy import write_boft
from safetensors.torch import save_file

import boft_core

STRENGTH = 0.8
TARGETS = ("*.attn1.to_q", "*.proj_in", "*.ff.net.2")


@pytest.fixture(scope="module")
def nh(comfy):
    """Core's hook nodes (``comfy_extras/nodes_hooks.py``) and ``comfy.hooks``."""
    import comfy.hooks  # noqa: F401  (comfy.hooks, used through the comfy fixture)
    import comfy_extras.nodes_hooks

    return comfy_extras.nodes_hooks


def load_model(ckpt):
    import tiny_models

    return tiny_models.load_checkpoint(ckpt, with_vae=False)[0]


def rel(got, want, base) -> float:
    return ((got.double() - want.double()).norm() / (want.double() - base.double()).norm()).item()


def walk_keyframes(comfy, patcher, hooks):
    """For each keyframe of the (one) hook in ``hooks``: step the host's keyframe logic to that
    keyframe's start, let the patcher apply the hooks, yield ``(keyframe, strength the host now
    uses)``. Unpatches at the end."""
    (hook,) = hooks.hooks
    hook.initialize_timesteps(patcher.model)
    sigma_max = float(patcher.model.model_sampling.sigma_max)
    options = {"transformer_options": {"sample_sigmas": torch.tensor([sigma_max, 0.0])}}
    try:
        for kf in hook.hook_keyframe.keyframes:
            t = sigma_max if kf.start_percent == 0 else float(kf.start_t)
            patcher.prepare_hook_patches_current_keyframe(torch.tensor([t]), hooks, options)
            patcher.apply_hooks(hooks)
            assert hook.hook_keyframe._current_keyframe is kf  # the host itself chose this keyframe
            yield kf, hook.strength
    finally:
        patcher.unpatch_hooks()


def weight(comfy, patcher, key):
    return comfy.utils.get_attr(patcher.model, key).detach().clone()


def check_against_merges(comfy, patcher, hooks, boft_file, key_of, base, mode="lycoris", every=1):
    """At every ``every``-th keyframe each layer equals our float64 merge at strength x keyframe."""
    for i, (_, k) in enumerate(walk_keyframes(comfy, patcher, hooks)):
        if i % every:
            continue
        s = float(STRENGTH * k)  # as the host computes it: strength_patch x keyframe strength
        for name, layer in boft_file.layers.items():
            key = key_of[name]
            want = boft_core.merge_weight(base[key].double(), layer, s, mode)
            assert rel(weight(comfy, patcher, key), want, base[key]) < 1e-5, (name, s)


def test_core_create_hook_lora_interpolated_keyframes(comfy, pack, nh, sd15_ckpt, loras_dir):
    """Core's CreateHookLora with a LyCORIS BOFT (rescale, constraint, fp16 file), keyframes
    from CreateHookKeyframesInterpolated (ease in-out) and CreateHookKeyframe; registered as
    sampling registers cond hooks. Every keyframe: our exact merge at 0.8 x keyframe."""
    model = load_model(sd15_ckpt)
    path = loras_dir / "hook_core.safetensors"
    write_boft(path, model.model.diffusion_model, "lora_unet", TARGETS, rescaled=True, constraint=0.01,
               dtype=torch.float16)
    boft_file = boft_core.load(str(path))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_of = {name: key_map[name] for name in boft_file.layers}
    base = {key: weight(comfy, model, key) for key in key_of.values()}

    hooks = nh.CreateHookLora().create_hook(path.name, STRENGTH, 0.0)[0]
    kf = nh.CreateHookKeyframesInterpolated().create_hook_keyframes(1.5, 0.25, "ease_in_out", 0.0, 0.6, 5)[0]
    kf = nh.CreateHookKeyframe().create_hook_keyframe(-0.5, 0.9, prev_hook_kf=kf)[0]
    hooks = nh.SetHookKeyframes().set_hook_keyframes(hooks, kf)[0]
    patcher = model.clone()
    patcher.register_all_hook_patches(hooks, comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model))
    patches = patcher.hook_patches[hooks.hooks[0].hook_ref]
    assert {type(p[1]).__name__ for v in patches.values() for p in v} == {"BOFTAdapter"}
    assert len(patches) == len(boft_file.layers) == 3 * 3
    strengths = [float(k.strength) for k in hooks.hooks[0].hook_keyframe.keyframes]
    assert len(set(strengths)) == 6 and -0.5 in strengths
    check_against_merges(comfy, patcher, hooks, boft_file, key_of, base)
    for key, value in base.items():  # unpatched bit for bit
        assert torch.equal(weight(comfy, patcher, key), value), key


def peft_diffusers_adapter(comfy, model, folder, seed=7):
    """A PEFT BOFT (2 butterfly factors, trained bias) on the tiny UNet, saved by PEFT with the
    diffusers names a diffusers-trained adapter has (``attn1.to_q``, ``ff.net.2``); the PEFT model."""
    from peft import BOFTConfig, get_peft_model

    config = BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, bias="boft_only",
                        target_modules=["to_q", "to_out.0", "ff.net.2", "proj_in"])
    peft_model = get_peft_model(copy.deepcopy(model.model.diffusion_model).float(), config)
    oracles.randomize(peft_model, ("boft_R.default", "boft_s.default"), seed, std=0.1)
    oracles.randomize(peft_model, ("base_layer.bias",), seed + 1, std=0.5)
    saved = folder.parent / (folder.name + "_ldm")
    peft_model.save_pretrained(str(saved))
    renamed = oracles.peft_folder_renamed(saved, folder, tiny_models.diffusers_paths(model))
    assert any(".attn1.to_q.boft_R" in k for k in renamed) and any(k.endswith(".base_layer.bias") for k in renamed)
    return peft_model


def test_peft_names_and_bias_need_create_hook_boft(comfy, pack, nh, sd15_ckpt, loras_dir, peft_factors):
    """A PEFT adapter folder with diffusers names and a trained bias: core's CreateHookLora
    registers nothing of it (core's key map has no ``base_model.model.`` names, silently); our
    Create Hook BOFT applies every layer and every bias, keyframe by keyframe, and at strength 1
    equals PEFT's own merge_and_unload (weights and biases)."""
    model = load_model(sd15_ckpt)
    folder = loras_dir / "hook_peft"
    peft_model = peft_diffusers_adapter(comfy, model, folder)
    name = "hook_peft/adapter_model.safetensors"
    target = comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model)

    core = nh.CreateHookLora().create_hook(name, 1.0, 0.0)[0]
    patcher = model.clone()
    patcher.register_all_hook_patches(core, target)
    assert not patcher.hook_patches.get(core.hooks[0].hook_ref)  # nothing reached the model

    hooks = pack.NODE_CLASS_MAPPINGS["BOFTCreateHook"]().create_hook(name, 1.0, 0.0, "lycoris")[0]
    kf = nh.CreateHookKeyframe().create_hook_keyframe(1.0, 0.0)[0]
    kf = nh.CreateHookKeyframe().create_hook_keyframe(0.5, 0.3, prev_hook_kf=kf)[0]
    kf = nh.CreateHookKeyframe().create_hook_keyframe(2.0, 0.7, prev_hook_kf=kf)[0]
    hooks = nh.SetHookKeyframes().set_hook_keyframes(hooks, kf)[0]
    patcher = model.clone()
    patcher.register_all_hook_patches(hooks, target)
    boft_file = boft_core.load(str(folder))
    patches = patcher.hook_patches[hooks.hooks[0].hook_ref]
    biases = [k for k in patches if k.endswith(".bias")]
    with_bias = [layer for layer in boft_file.layers.values() if layer.bias is not None]
    assert len(with_bias) == 4 * 3 and len(biases) == len(with_bias)  # attn1/attn2 to_out.0, ff.net.2, proj_in
    assert len(patches) == len(boft_file.layers) + len(biases) == 18 + 12

    merged = oracles.peft_merged(peft_model)
    unet = model.model.diffusion_model
    base = {k: v.detach().float().clone() for k, v in unet.state_dict().items()}
    layers = {}  # model key (no prefix) -> layer
    unet_map = comfy.lora.model_lora_keys_unet(model.model, {})
    keymap = sys.modules[pack.__name__ + ".nodes.keymap"]
    for layer_name, layer in boft_file.layers.items():
        layers[keymap.resolve(layer_name, unet_map, {})[1][len("diffusion_model."):]] = layer
    seen = []
    for _, k in walk_keyframes(comfy, patcher, hooks):
        s = float(1.0 * k)
        seen.append(s)
        now = unet.state_dict()
        for key, layer in layers.items():
            want = boft_core.merge_weight(base[key].double(), layer, s, "lycoris")
            assert rel(now[key], want, base[key]) < 1e-5, (key, s)
            if s == 1.0:
                assert rel(now[key], merged[key], base[key]) < 1e-5, key  # PEFT's own merge
            bias = key[: -len("weight")] + "bias"
            if layer.bias is not None:
                want_b = base[bias].double() + s * (layer.bias.double() - base[bias].double())
                assert rel(now[bias], want_b, base[bias]) < 1e-6, (bias, s)
                if s == 1.0:
                    assert torch.allclose(now[bias], merged[bias], rtol=0, atol=1e-6), bias
    assert seen == [1.0, 0.5, 2.0]
    for key, value in base.items():
        assert torch.equal(unet.state_dict()[key].float(), value), key


@pytest.mark.parametrize("block_weights,te_weight", [("", 1.0), ("TE:0.5, IN:0", 0.5), ("BASE:0", 0.0)],
                         ids=["all", "te-half", "te-off"])
def test_create_hook_boft_on_clip_with_set_clip_hooks(comfy, pack, nh, sd15_clip_ckpt, loras_dir, block_weights,
                                                      te_weight):
    """SetClipHooks with Create Hook BOFT on a file holding UNet and text-encoder layers: the
    CLIP gets exactly the text-encoder layers, each our merge at strength_clip x the text
    encoder's block weight (orthogonal mode; at weight 0 no patch at all), the UNet part stays
    for the model; loading the CLIP applies them, unloading restores it."""
    import tiny_models

    model, clip, _ = tiny_models.load_checkpoint(sd15_clip_ckpt, with_vae=False, with_clip=True)
    te_sd = clip.cond_stage_model.state_dict()
    te_key = next(k for k in te_sd if k.endswith("layers.0.self_attn.q_proj.weight"))
    gen = torch.Generator().manual_seed(5)
    unet_key = next(k for k in comfy.lora.model_lora_keys_unet(model.model, {}) if k.endswith("attn1_to_q"))
    te_name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors = {  # kohya names: one text-encoder layer, one UNet layer
        f"{te_name}.oft_blocks": torch.randn(7, 64, 12, 12, generator=gen) * 0.1,
        f"{te_name}.alpha": torch.tensor(0.0),
        f"{unet_key}.oft_blocks": torch.randn(6, 32, 10, 10, generator=gen) * 0.1,
        f"{unet_key}.alpha": torch.tensor(0.0),
    }
    path = loras_dir / "hook_te.safetensors"
    save_file(tensors, str(path))
    layer = boft_core.load(str(path)).layers[te_name]
    hooks = pack.NODE_CLASS_MAPPINGS["BOFTCreateHook"]().create_hook(path.name, 1.0, 0.7, "orthogonal",
                                                                      block_weights=block_weights)[0]
    hooked = nh.SetClipHooks().apply_hooks(clip, schedule_clip=False, apply_to_conds=True, hooks=hooks)[0]
    patches = hooked.patcher.hook_patches.get(hooks.hooks[0].hook_ref, {})
    # only the text-encoder layer (none at weight 0); the UNet one waits for the model
    assert list(patches) == ([te_key] if te_weight else [])
    base = te_sd[te_key].detach().clone()
    comfy.model_management.load_models_gpu([hooked.patcher])  # as CLIPTextEncode does: forced hooks applied
    try:
        got = hooked.cond_stage_model.state_dict()[te_key]  # in the text encoder's dtype
        if te_weight:
            want = boft_core.merge_weight(base.double(), layer, 0.7 * te_weight, "orthogonal")
            assert not torch.equal(got, base) and oracles.within_one_ulp(got, want)
        else:
            assert torch.equal(got, base)
    finally:
        hooked.patcher.unpatch_model(hooked.patcher.offload_device)
        comfy.model_management.unload_all_models()
    assert torch.equal(clip.cond_stage_model.state_dict()[te_key], base)


def test_rotation_cache_stays_bounded_over_200_strengths(comfy, pack, nh, sd15_ckpt, loras_dir, monkeypatch):
    """200 keyframes with 200 distinct strengths (two CreateHookKeyframesInterpolated chained) walked
    by the host: the shared rotation cache (``PatchCache``, keyed by strength among others) keeps
    within its byte budget, evicting least recently used strengths, while every keyframe's
    weights stay exact."""
    adapter_mod = sys.modules[pack.__name__ + ".nodes.adapter"]
    cache = adapter_mod.CACHE
    model = load_model(sd15_ckpt)
    path = loras_dir / "hook_many.safetensors"
    # one layer: preparing a rotation at a new strength costs ~0.1 s per layer on a busy CPU
    write_boft(path, model.model.diffusion_model, "lora_unet", ("input_blocks.1.1.transformer_blocks.0.attn1.to_q",),
               rescaled=True, seed=9)
    boft_file = boft_core.load(str(path))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_of = {name: key_map[name] for name in boft_file.layers}
    base = {key: weight(comfy, model, key) for key in key_of.values()}
    tokens = {layer.token for layer in boft_file.layers.values()}
    assert len(tokens) == 1

    # one strength's worth of this file's prepared layers (all layers, as the host's first keyframe needs)
    cache.clear()
    patcher = model.clone()
    hooks = nh.CreateHookLora().create_hook(path.name, STRENGTH, 0.0)[0]
    patcher.register_all_hook_patches(hooks, comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model))
    patcher.apply_hooks(hooks)
    patcher.unpatch_hooks()
    one_strength = cache.held("cpu")
    assert one_strength > 0
    budget = 10 * one_strength
    monkeypatch.setattr(cache, "host_budget", budget)
    cache.clear()

    kf = nh.CreateHookKeyframesInterpolated().create_hook_keyframes(0.01, 1.0, "linear", 0.0, 0.495, 100)[0]
    kf = nh.CreateHookKeyframesInterpolated().create_hook_keyframes(1.01, 2.0, "ease_in", 0.5, 0.995, 100,
                                                                    prev_hook_kf=kf)[0]
    hooks = nh.SetHookKeyframes().set_hook_keyframes(hooks, kf)[0]
    strengths = {float(k.strength) for k in hooks.hooks[0].hook_keyframe.keyframes}
    assert len(strengths) == 200
    patcher = model.clone()
    patcher.register_all_hook_patches(hooks, comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model))
    evicted = cache.counts["evicted"]
    most = 0
    for i, (_, k) in enumerate(walk_keyframes(comfy, patcher, hooks)):
        held = cache.held("cpu")
        assert held <= budget, (i, held, budget)
        entries = sum(len(cache.entries(token)) for token in tokens)
        most = max(most, entries)
        if i % 40 == 0 or i == 199:
            s = float(STRENGTH * k)
            for name, layer in boft_file.layers.items():
                want = boft_core.merge_weight(base[key_of[name]].double(), layer, s, "lycoris")
                assert rel(weight(comfy, patcher, key_of[name]), want, base[key_of[name]]) < 1e-5, (name, s)
    assert most <= 10 * len(tokens)  # at most the budget's worth of strengths, never 200
    assert cache.counts["evicted"] - evicted >= (200 - 10) * len(tokens)
    assert not patcher.cached_hook_patches or len(patcher.cached_hook_patches) <= 1  # host keeps one set
    cache.clear()


def test_create_hook_boft_bad_input_fails_clearly_and_touches_nothing(comfy, pack, nh, sd15_ckpt, loras_dir):
    """A file for another base model fails when the sampler would register the hook (naming the
    file and the family), a corrupt one when the node runs; the model keeps no hook patch and
    its weights (restored as the sampler restores them after a failed registration)."""
    from importlib import import_module

    error = import_module(pack.__name__ + ".boft_core").BoftError
    model = load_model(sd15_ckpt)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    flux = loras_dir / "hook_flux_named.safetensors"
    save_file({"lycoris_double_blocks_0_img_attn_qkv.oft_blocks": torch.randn(9, 256, 12, 12) * 0.01},
              str(flux))
    node = pack.NODE_CLASS_MAPPINGS["BOFTCreateHook"]()
    hooks = node.create_hook(flux.name, 1.0, 0.0, "lycoris")[0]
    kf = nh.CreateHookKeyframe().create_hook_keyframe(0.5, 0.5)[0]
    hooks = nh.SetHookKeyframes().set_hook_keyframes(hooks, kf)[0]
    patcher = model.clone()
    target = comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model)
    with pytest.raises(error, match=r"hook_flux_named.*another base model.*Flux"):
        patcher.register_all_hook_patches(hooks, target)
    patcher.restore_hook_patches()
    assert not patcher.hook_patches
    truncated = loras_dir / "hook_truncated.safetensors"
    truncated.write_bytes(flux.read_bytes()[:100])
    with pytest.raises(error, match="hook_truncated"):
        node.create_hook(truncated.name, 1.0, 0.0, "lycoris")
    for k, v in model.model.diffusion_model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- block_weights --------------------------------------------------------------------------------
BW_TARGETS = TARGETS + ("time_embed.0",)  # input_blocks.1, output_blocks.0/1 (the tiny UNet has no middle block)
# LoRA Block Weight's 17-value SD1 order (hako-mikan's README, "Weights Setting"): the oracle's own copy
LBW17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06",
         "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")


def named_weight(key: str) -> float:
    """'IN:0.5, OUT01:0, OUT:1.5' read from the model key (a block id wins over its group; the
    README's IN group holds the time embedding too)."""
    for root, w in (("diffusion_model.input_blocks.", 0.5), ("diffusion_model.time_embed.", 0.5),
                    ("diffusion_model.output_blocks.1.", 0.0), ("diffusion_model.output_blocks.", 1.5)):
        if key.startswith(root):
            return w
    return 1.0


VECTOR = {"IN01": 1.75}  # every other entry 0: the tiny UNet's OUT00/OUT01 are not among the 17, they get 0


def vector_weight(key: str) -> float:
    """The 17-value vector below read from the model key: LBW ids from the block numbers; a block
    the vector does not list gets 0, a layer in no block (time_embed) keeps 1."""
    parts = key.split(".")
    if parts[1] == "input_blocks":
        block = f"IN{int(parts[2]):02d}"
    elif parts[1] == "middle_block":
        block = "MID"
    elif parts[1] == "output_blocks":
        block = f"OUT{int(parts[2]):02d}"
    else:
        return 1.0
    return VECTOR.get(block, 0.0) if block in LBW17 else 0.0


@pytest.mark.parametrize("block_weights,weight_of", [
    ("IN:0.5, OUT01:0, OUT:1.5", named_weight),
    (",".join(str(VECTOR.get(b, 0.0)) for b in LBW17), vector_weight),
], ids=["named", "lbw17"])
def test_create_hook_boft_block_weights_at_keyframes(comfy, pack, nh, sd15_ckpt, loras_dir, block_weights, weight_of):
    """Create Hook BOFT with block_weights (the loaders' syntax): at every keyframe each layer is our
    float64 merge at strength x its block's weight x keyframe (orthogonal mode, so a weight of 1.5
    or 1.75 is a larger rotation), a block at weight 0 keeps its weight bit for bit; in the vector
    a layer in no block (time_embed) keeps the node's strength. Block weights read from the model
    keys here."""
    model = load_model(sd15_ckpt)
    path = loras_dir / "hook_blocks.safetensors"
    if not path.exists():
        write_boft(path, model.model.diffusion_model, "lora_unet", BW_TARGETS, rescaled=True, seed=13)
    boft_file = boft_core.load(str(path))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_of = {name: key_map[name] for name in boft_file.layers}
    weights = {name: weight_of(key) for name, key in key_of.items()}
    assert 0.0 in weights.values() and len(set(weights.values())) >= 3, weights
    assert any(key.startswith("diffusion_model.time_embed.") for key in key_of.values())
    base = {key: weight(comfy, model, key) for key in key_of.values()}

    hooks = pack.NODE_CLASS_MAPPINGS["BOFTCreateHook"]().create_hook(
        path.name, STRENGTH, 0.0, "orthogonal", block_weights=block_weights)[0]
    kf = nh.CreateHookKeyframe().create_hook_keyframe(1.0, 0.0)[0]
    kf = nh.CreateHookKeyframe().create_hook_keyframe(-0.6, 0.5, prev_hook_kf=kf)[0]
    hooks = nh.SetHookKeyframes().set_hook_keyframes(hooks, kf)[0]
    patcher = model.clone()
    patcher.register_all_hook_patches(hooks, comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model))
    patches = patcher.hook_patches[hooks.hooks[0].hook_ref]
    assert set(patches) == {key_of[n] for n, w in weights.items() if w != 0}
    seen = []
    for _, k in walk_keyframes(comfy, patcher, hooks):
        seen.append(float(k))
        for name, layer in boft_file.layers.items():
            key, w = key_of[name], weights[name]
            got = weight(comfy, patcher, key)
            if w == 0:
                assert torch.equal(got, base[key]), name
                continue
            want = boft_core.merge_weight(base[key].double(), layer, float(STRENGTH * w * k), "orthogonal")
            assert rel(got, want, base[key]) < 1e-5, (name, w, k)
    assert seen == [1.0, -0.6]
    for key, value in base.items():
        assert torch.equal(weight(comfy, patcher, key), value), key


def test_create_hook_boft_bad_block_weights_fail_clearly(comfy, pack, nh, sd15_ckpt, loras_dir):
    """A block_weights string no family accepts fails when the node runs; one the model's family
    does not accept (Flux's names on an SD1.5 model) fails when the hook is registered, naming the
    file and what SD1.x accepts, before any patch; the weights stay as they are."""
    from importlib import import_module

    error = import_module(pack.__name__ + ".boft_core").BoftError
    model = load_model(sd15_ckpt)
    path = loras_dir / "hook_bad_blocks.safetensors"
    write_boft(path, model.model.diffusion_model, "lora_unet", TARGETS, seed=14)
    node = pack.NODE_CLASS_MAPPINGS["BOFTCreateHook"]()
    with pytest.raises(error, match=r"hook_bad_blocks\.safetensors: block_weights 'IN:abc': 'abc' is not a number"):
        node.create_hook(path.name, 1.0, 0.0, "lycoris", block_weights="IN:abc")
    with pytest.raises(error, match=r"hook_bad_blocks\.safetensors: block_weights '1,1,1': 3 values"):
        node.create_hook(path.name, 1.0, 0.0, "lycoris", block_weights="1,1,1")
    hooks = node.create_hook(path.name, 1.0, 0.0, "lycoris", block_weights="double:1, single:0.5")[0]
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    patcher = model.clone()
    with pytest.raises(error, match=r"hook_bad_blocks\.safetensors: block_weights 'double:1, single:0\.5': "
                                    r"unknown block name 'double'\. For SD1\.x/SD2\.x models it accepts"):
        patcher.register_all_hook_patches(hooks, comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model))
    patcher.restore_hook_patches()
    assert not patcher.hook_patches
    for k, v in model.model.diffusion_model.state_dict().items():
        assert torch.equal(v, before[k]), k
