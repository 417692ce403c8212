"""The nodes and our weight adapter inside ComfyUI's real ModelPatcher (in-process host).

Oracles: LyCORIS's own merge of its own file; PEFT's own merge; hand-computed compositions.
"""

import copy
import os
import sys

import oracles
import pytest
import torch
from safetensors.torch import load_file, save_file

import boft_core


@pytest.fixture
def lycoris_prefix():
    """LyCORIS's wrapper with kohya's `lora_unet` prefix (the names sd-scripts writes)."""
    from lycoris.wrapper import LycorisNetwork

    old = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lora_unet"
    yield
    LycorisNetwork.LORA_PREFIX = old


def load_model(comfy, ckpt):
    import tiny_models

    model, _, _ = tiny_models.load_checkpoint(ckpt, with_vae=False)
    return model


def patched_state(comfy, patcher):
    """The weights ComfyUI actually computes for a patched model (a full load, as on --cpu)."""
    comfy.model_management.load_models_gpu([patcher])
    sd = {k: v.detach().clone().float() for k, v in patcher.model.diffusion_model.state_dict().items()}
    patcher.unpatch_model(patcher.offload_device)
    comfy.model_management.unload_all_models()
    return sd


def rel(got, want, base):
    d = (want.double() - base.double()).norm()
    return ((got.double() - want.double()).norm() / d).item() if d > 0 else (got - want).abs().max().item()


def unet_adapter(path, comfy, model, algo="boft", **kwargs):
    """A LyCORIS file for the whole tiny UNet, written by LyCORIS's own save code."""
    target = copy.deepcopy(model.model.diffusion_model).float()
    oracles.lycoris_file(str(path), algo, dim=16, model=target, **kwargs)
    return target


@pytest.mark.parametrize("mode", ["lycoris", "linear", "orthogonal"])
def test_loader_matches_lycoris_merge(comfy, pack, sd15_ckpt, loras_dir, lycoris_prefix, mode):
    model = load_model(comfy, sd15_ckpt)
    base = {k: v.clone().float() for k, v in model.model.diffusion_model.state_dict().items()}
    path = loras_dir / f"unet_boft_{mode}.safetensors"
    unet_adapter(path, comfy, model, rescaled=True, constraint=0.001, dtype=torch.float16)
    node = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]()
    adapter = boft_core.load(str(path))
    for s in (1.0, 0.5, -1.0):
        out = node.load_boft(model, path.name, s, mode)
        assert "applied 51 of 51" in out["ui"]["boft_report"][0]
        got = patched_state(comfy, out["result"][0])
        if mode == "lycoris":
            ref = oracles.lycoris_merged(str(path), copy.deepcopy(model.model.diffusion_model).float(), s)
        changed = 0
        for name, layer in adapter.layers.items():
            key = comfy.lora.model_lora_keys_unet(model.model, {})[name][len("diffusion_model."):]
            want = ref[key] if mode == "lycoris" else boft_core.merge_weight(base[key].double(), layer, s, mode)
            assert rel(got[key], want, base[key]) < 1e-4, (name, s)
            changed += 1
        assert changed == 51
    # the input model is never modified: its patches are empty and its weights the originals
    assert not model.patches
    for k, v in model.model.diffusion_model.state_dict().items():
        assert torch.equal(v.float(), base[k])


def test_strength_zero_returns_inputs(comfy, pack, sd15_ckpt, loras_dir, lycoris_prefix):
    model = load_model(comfy, sd15_ckpt)
    path = loras_dir / "zero.safetensors"
    unet_adapter(path, comfy, model)
    out = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]().load_boft(model, path.name, 0.0, "lycoris")
    assert out["result"][0] is model


def test_unpatch_restores_every_bit(comfy, pack, sd15_ckpt, loras_dir, lycoris_prefix):
    model = load_model(comfy, sd15_ckpt)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    path = loras_dir / "unpatch.safetensors"
    unet_adapter(path, comfy, model, rescaled=True)
    patched = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]().load_boft(model, path.name, 0.7, "lycoris")["result"][0]
    comfy.model_management.load_models_gpu([patched])
    assert any(not torch.equal(v, before[k]) for k, v in patched.model.state_dict().items())
    patched.unpatch_model(patched.offload_device)
    comfy.model_management.unload_all_models()
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_core_lora_loader_uses_our_exact_merge(comfy, pack, sd15_ckpt, loras_dir, lycoris_prefix):
    """Core's load_lora_for_models (LoraLoader) now merges oft_blocks exactly, at s = 0.5 too."""
    assert any(a.name == "boft_exact" for a in comfy.weight_adapter.adapters)
    model = load_model(comfy, sd15_ckpt)
    path = loras_dir / "core.safetensors"
    unet_adapter(path, comfy, model, rescaled=True, constraint=0.001)
    ref = oracles.lycoris_merged(str(path), copy.deepcopy(model.model.diffusion_model).float(), 0.5)
    base = {k: v.clone().float() for k, v in model.model.diffusion_model.state_dict().items()}
    patched, _ = comfy.sd.load_lora_for_models(model, None, load_file(str(path)), 0.5, 0)
    got = patched_state(comfy, patched)
    for key, want in ref.items():
        if not torch.equal(want, base[key]):
            assert rel(got[key], want, base[key]) < 1e-4, key


def test_peft_file_with_diffusers_names(comfy, pack, sd15_ckpt, loras_dir, peft_factors):
    """A PEFT BOFT on diffusers names (new attention naming) maps through our key map."""
    from peft import BOFTConfig, get_peft_model

    model = load_model(comfy, sd15_ckpt)
    unet = copy.deepcopy(model.model.diffusion_model).float()
    peft_model = get_peft_model(unet, BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2,
                                                 target_modules=["to_q", "to_k", "to_v", "proj_in"]))
    oracles.randomize(peft_model, ("boft_R.default", "boft_s.default"), 5, std=0.1)
    folder = loras_dir / "peft_ldm"
    peft_model.save_pretrained(str(folder))
    merged = {k: v.float() for k, v in copy.deepcopy(peft_model).merge_and_unload().state_dict().items()}
    # rename ldm paths to diffusers paths, as a diffusers-trained PEFT adapter names them
    to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    to_diffusers = {v[: -len(".weight")]: k[: -len(".weight")] for k, v in to_ldm.items() if k.endswith(".weight")}
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    renamed = {}
    for key, value in tensors.items():
        path, suffix = key[len("base_model.model."):].rsplit(".", 1)
        renamed[f"base_model.model.{to_diffusers[path]}.{suffix}"] = value
    assert any(".attn1.to_q." in k for k in renamed)
    out_dir = loras_dir / "peft_diffusers"
    out_dir.mkdir()
    save_file(renamed, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    base = {k: v.clone().float() for k, v in model.model.diffusion_model.state_dict().items()}
    name = os.path.join("peft_diffusers", "adapter_model.safetensors")
    out = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]().load_boft(model, name, 1.0, "lycoris")
    n = len(renamed) // 2
    assert f"applied {n} of {n}" in out["ui"]["boft_report"][0]
    got = patched_state(comfy, out["result"][0])
    for key, want in merged.items():
        if key in got and not torch.equal(want, base[key]):
            assert rel(got[key], want, base[key]) < 1e-5, key


def test_chains_with_lora_in_both_orders(comfy, pack, sd15_ckpt, loras_dir, lycoris_prefix):
    """Patches apply in graph order: BOFT rotates whatever the loaders before it produced."""
    import tiny_models

    model = load_model(comfy, sd15_ckpt)
    lora_path = loras_dir / "chain_lora.safetensors"
    chosen = tiny_models.make_kohya_lora(lora_path, sd15_ckpt, diffusers_names=False)
    boft_path = loras_dir / "chain_boft.safetensors"
    unet_adapter(boft_path, comfy, model, rescaled=True)
    adapter = boft_core.load(str(boft_path))
    lora = load_file(str(lora_path))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    base = {k: v.clone().float() for k, v in model.model.diffusion_model.state_dict().items()}
    s_boft, s_lora = 0.8, 0.6

    def lora_delta(name):
        up, down = lora[f"{name}.lora_up.weight"].float(), lora[f"{name}.lora_down.weight"].float()
        return (float(lora[f"{name}.alpha"]) / down.shape[0]) * (up @ down)

    boft_node = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]()
    lora_node = comfy_nodes_lora()
    first_lora = boft_node.load_boft(lora_node.load_lora_model_only(model, lora_path.name, s_lora)[0],
                                     boft_path.name, s_boft, "lycoris")["result"][0]
    first_boft = lora_node.load_lora_model_only(
        boft_node.load_boft(model, boft_path.name, s_boft, "lycoris")["result"][0], lora_path.name, s_lora)[0]
    got_a, got_b = patched_state(comfy, first_lora), patched_state(comfy, first_boft)
    for name, key in chosen.items():
        k = key[len("diffusion_model."):]
        layer = adapter.layers[name]
        w = base[k].double()
        want_a = boft_core.merge_weight(w + s_lora * lora_delta(name).double(), layer, s_boft)
        want_b = boft_core.merge_weight(w, layer, s_boft) + s_lora * lora_delta(name).double()
        assert rel(got_a[k], want_a, w) < 1e-4 and rel(got_b[k], want_b, w) < 1e-4, name
        assert not torch.allclose(want_a, want_b)
    assert key_map  # the LoRA names came from ComfyUI's own key map


def comfy_nodes_lora():
    """Core's LoraLoaderModelOnly from ComfyUI's own nodes.py (never this repo's nodes/ package)."""
    import importlib.util

    from comfy_host import comfyui_dir

    path = comfyui_dir() / "nodes.py"
    module = sys.modules.get("nodes")
    if module is None or getattr(module, "__file__", None) != str(path):
        spec = importlib.util.spec_from_file_location("nodes", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["nodes"] = module
        spec.loader.exec_module(module)
    return module.LoraLoaderModelOnly()


def test_wrong_base_model_fails_clearly_and_touches_nothing(comfy, pack, sd15_ckpt, loras_dir):
    from importlib import import_module

    error = import_module(pack.__name__ + ".boft_core").BoftError  # the pack's own copy
    model = load_model(comfy, sd15_ckpt)
    path = loras_dir / "flux_named.safetensors"
    save_file({"lycoris_double_blocks_0_img_attn_qkv.oft_blocks": torch.randn(9, 256, 12, 12) * 0.01},
              str(path))
    with pytest.raises(error, match="another base model.*Flux"):
        pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]().load_boft(model, path.name, 1.0, "lycoris")
    assert not model.patches
    # right names, wrong shapes: a clear error naming key and shapes, nothing patched
    key = next(k for k in comfy.lora.model_lora_keys_unet(model.model, {}) if k.endswith("attn1_to_q"))
    bad = loras_dir / "wrong_shape.safetensors"
    save_file({f"{key}.oft_blocks": torch.randn(5, 16, 8, 8) * 0.01}, str(bad))
    with pytest.raises(error, match=r"\(320, 320\).*128 rows"):
        pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]().load_boft(model, bad.name, 1.0, "lycoris")
    assert not model.patches


def test_file_cache_rereads_changed_files(pack, tmp_path):
    from importlib import import_module

    loader = import_module(pack.__name__ + ".nodes.loader")
    path = tmp_path / "a.safetensors"
    oracles.lycoris_file(str(path), "boft")
    cache = loader.FileCache()
    first = cache.get(str(path))
    assert cache.get(str(path)) is first
    oracles.lycoris_file(str(path), "boft", seed=5)
    os.utime(path, ns=(1, 1))
    assert cache.get(str(path)) is not first


def kohya_boft(names_and_dims, seed, block=8, factors=2):
    """sd-scripts networks.boft tensors for {name: (out, in)} (its spec: boft_s is (out, 1))."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_dim, in_dim) in names_and_dims.items():
        tensors[f"{name}.boft_R"] = torch.randn(factors, in_dim // block, block, block, generator=g) * 0.1
        tensors[f"{name}.boft_s"] = 1 + 0.05 * torch.randn(out_dim, 1, generator=g)
    return tensors


def test_text_encoder_names_and_core_loader_with_kohya_boft(comfy, pack, sd15_clip_ckpt, loras_dir):
    """transformers-5 TE names (no text_model), PEFT TE names and kohya UNet names all map;
    core's LoraLoader path takes kohya boft_R files through our adapter."""
    import tiny_models

    model, clip, _ = tiny_models.load_checkpoint(sd15_clip_ckpt, with_vae=False, with_clip=True)
    te_sd = clip.cond_stage_model.state_dict()
    q_key = next(k for k in te_sd if k.endswith("encoder.layers.0.self_attn.q_proj.weight"))
    fc_key = next(k for k in te_sd if k.endswith("encoder.layers.1.mlp.fc1.weight"))
    names = {"lora_te_encoder_layers_0_self_attn_q_proj": tuple(te_sd[q_key].shape),
             "lora_te_encoder_layers_1_mlp_fc1": tuple(te_sd[fc_key].shape)}
    unet_map = comfy.lora.model_lora_keys_unet(model.model, {})
    to_q = next(k for k in unet_map if k.startswith("lora_unet_") and k.endswith("attn1_to_q"))
    unet_key = unet_map[to_q]
    names[to_q] = tuple(model.model.state_dict()[unet_key].shape)
    tensors = kohya_boft(names, seed=21)
    path = loras_dir / "kohya_te.safetensors"
    save_file(tensors, str(path), {"ss_network_module": "networks.boft"})
    adapter = boft_core.load(str(path))
    assert adapter.format == "kohya-boft"

    node = pack.NODE_CLASS_MAPPINGS["BOFTLoader"]()
    out = node.load_boft(model, clip, path.name, 1.0, 0.5, "lycoris")
    assert "applied 3 of 3 layers (model 1, clip 2)" in out["ui"]["boft_report"][0]
    new_clip = out["result"][1]
    comfy.model_management.load_models_gpu([new_clip.patcher])
    got_te = new_clip.cond_stage_model.state_dict()
    for name, key in (("lora_te_encoder_layers_0_self_attn_q_proj", q_key),
                      ("lora_te_encoder_layers_1_mlp_fc1", fc_key)):
        want = boft_core.merge_weight(te_sd[key].double(), adapter.layers[name], 0.5)
        assert got_te[key].dtype == te_sd[key].dtype == torch.float16  # ComfyUI keeps the TE in fp16
        assert torch.allclose(got_te[key].float(), want.half().float(), rtol=2e-3, atol=1e-6), name  # 1 ulp
        assert rel(got_te[key].float(), want, te_sd[key]) < 5e-3, name
    new_clip.patcher.unpatch_model(new_clip.patcher.offload_device)
    comfy.model_management.unload_all_models()

    # core's own loader (LoraLoader's code path) with the same file: our adapter handles boft_R
    patched, _ = comfy.sd.load_lora_for_models(model, None, load_file(str(path)), 0.7, 0)
    got = patched_state(comfy, patched)
    k = unet_key[len("diffusion_model."):]
    w = model.model.diffusion_model.state_dict()[k].double()
    assert rel(got[k], boft_core.merge_weight(w, adapter.layers[to_q], 0.7), w) < 1e-4

    # PEFT-named text-encoder layers map as well
    peft_names = {"base_model.model.text_model.encoder.layers.0.self_attn.q_proj": names[
        "lora_te_encoder_layers_0_self_attn_q_proj"]}
    peft_tensors = kohya_boft(peft_names, seed=22)
    peft_path = loras_dir / "peft_te" / "adapter_model.safetensors"
    peft_path.parent.mkdir()
    peft_tensors = {k: (v.t().contiguous() if k.endswith("boft_s") else v) for k, v in peft_tensors.items()}
    save_file({k: v for k, v in peft_tensors.items()}, str(peft_path))
    out = node.load_boft(model, clip, "peft_te/adapter_model.safetensors", 0.0, 1.0, "lycoris")
    assert "applied 1 of 1 layers (model 0, clip 1)" in out["ui"]["boft_report"][0]


def test_adapter_in_place_and_with_a_function(comfy, pack):
    """ComfyUI passes `lambda a: a` when a patch has no function: the adapter then merges into the
    float32 copy in place. Any other function gets `weight + function(W' - weight)`."""
    adapter_mod = sys.modules[pack.__name__ + ".nodes.adapter"]
    gen = torch.Generator().manual_seed(21)
    layer = boft_core.BoftLayer("x", "lycoris-boft", torch.randn(4, 16, 10, 10, generator=gen) * 0.1,
                                scale=1 + 0.1 * torch.randn(160, generator=gen))
    adapter = adapter_mod.BOFTAdapter.from_layer(layer, "orthogonal")
    weight = torch.randn(160, 40, generator=gen)
    want = boft_core.merge_weight(weight.double(), layer, 0.7, "orthogonal")

    def run(function, w, dtype=torch.float32):
        return adapter.calculate_weight(w, "k", 0.7, 1.0, None, function, intermediate_dtype=dtype)

    assert adapter_mod.is_identity(lambda a: a) and not adapter_mod.is_identity(lambda a: a * 0.5)
    copy_ = weight.clone()
    got = run(lambda a: a, copy_)
    assert got is copy_ and rel(got, want, weight) < 1e-6
    half = run(lambda a: a * 0.5, weight.clone())
    assert rel(half, weight.double() + 0.5 * (want - weight.double()), weight) < 1e-6
    low = run(lambda a: a, weight.half(), torch.float16)
    assert low.dtype == torch.float16 and rel(low, want, weight) < 2e-3


def test_upload_store_without_hard_links_never_overwrites(pack, tmp_path, monkeypatch):
    """On a file system without hard links the upload is copied to a name created exclusively:
    stored once, and a different file that took the name meanwhile is never replaced."""
    routes = sys.modules[pack.__name__ + ".nodes.routes"]

    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(routes.os, "link", no_links)
    blocks = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    upload = tmp_path / "upload.partial"
    save_file({"lycoris_x.oft_blocks": blocks, "lycoris_x.alpha": torch.tensor(0.0)}, str(upload))
    folder = tmp_path / "loras"
    folder.mkdir()
    stored = routes.store_upload(str(upload), "mine.safetensors", str(folder))
    assert stored == {"name": "mine.safetensors", "format": "lycoris-boft", "existed": False}
    assert (folder / "mine.safetensors").read_bytes() == upload.read_bytes()
    real_open, raced = open, []

    def racing_open(path, mode="r", *args, **kwargs):  # another writer takes the name first
        if mode == "xb" and not raced:
            raced.append(path)
            with real_open(path, "wb") as f:
                f.write(b"someone else's file")
            raise FileExistsError(path)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(routes, "open", racing_open, raising=False)
    with pytest.raises(FileExistsError, match="already in the loras folder"):
        routes.store_upload(str(upload), "other.safetensors", str(folder))
    assert raced and (folder / "other.safetensors").read_bytes() == b"someone else's file"


def test_adapters_prepared_together_patch_like_one_by_one(comfy, pack):
    """BOFTAdapter.prepare_all (what the loaders do for a CUDA load device) fills the caches that
    calculate_weight then uses, with the same result as preparing each layer on first use."""
    adapter_mod = sys.modules[pack.__name__ + ".nodes.adapter"]
    gen = torch.Generator().manual_seed(23)
    layers = [boft_core.BoftLayer(f"l{i}", "lycoris-boft", torch.randn(4, 16, 10, 10, generator=gen) * 0.1)
              for i in range(3)]
    together = [adapter_mod.BOFTAdapter.from_layer(layer, "orthogonal") for layer in layers]
    alone = [adapter_mod.BOFTAdapter.from_layer(layer, "orthogonal") for layer in layers]
    adapter_mod.BOFTAdapter.prepare_all(together, 0.6, torch.device("cpu"))
    assert all(len(a._patches) == 1 for a in together)
    for a, b in zip(together, alone, strict=True):
        weight = torch.randn(160, 30, generator=gen)
        got = a.calculate_weight(weight.clone(), "k", 0.6, 1.0, None, lambda x: x)
        want = b.calculate_weight(weight.clone(), "k", 0.6, 1.0, None, lambda x: x)
        assert torch.allclose(got, want, atol=1e-5) and len(a._patches) == 1


def test_loader_prepares_all_layers_at_once_for_a_cuda_load_device(comfy, pack, sd15_ckpt, loras_dir,
                                                                   lycoris_prefix, monkeypatch):
    """With a CUDA load device and Triton, the loader hands every model adapter to prepare_all
    (one batched setup) with the node's strength and that device; elsewhere it does not."""
    loader_mod = sys.modules[pack.__name__ + ".nodes.loader"]
    model = load_model(comfy, sd15_ckpt)
    path = loras_dir / "prepare_all.safetensors"
    unet_adapter(path, comfy, model)
    calls = []
    monkeypatch.setattr(loader_mod.BOFTAdapter, "prepare_all",
                        staticmethod(lambda adapters, strength, device: calls.append((adapters, strength, device))))
    node = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]()
    node.load_boft(model, path.name, 0.6, "orthogonal")
    assert calls == []  # a CPU load device
    monkeypatch.setattr(loader_mod.fused, "available", lambda: True)
    monkeypatch.setattr(model, "load_device", torch.device("cuda", 0))
    out = node.load_boft(model, path.name, 0.6, "orthogonal")
    (adapters, strength, device), = calls
    patched = out["result"][0]
    assert strength == 0.6 and device == torch.device("cuda", 0)
    assert {id(a) for a in adapters} == {id(p[1]) for p in (v[-1] for v in patched.patches.values())}
