"""Tiny but real checkpoints, built with ComfyUI's own classes, for end-to-end tests.

Every tensor comes from a seeded torch.Generator, so a build is reproducible for a given
ComfyUI version. ComfyUI is imported in this process (CPU only) through import_comfy().
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from comfy_host import comfyui_dir
from safetensors.torch import save_file

# SD1.5 as ComfyUI detects it (comfy.supported_models.SD15 matches context_dim 768,
# model_channels 320, no linear proj, no adm): one level, one res block, one input and
# two output transformers, no middle block (transformer_depth_middle=-2).
SD15_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
    transformer_depth_middle=-2, context_dim=768, num_heads=8, num_head_channels=-1,
    use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False,
    adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
    use_checkpoint=False,
)

# SDXL family; transformer_depth decides the class. Segmind_Vega's [0,0,1,1,2,2] keeps SDXL's
# block indices: attention in input_blocks.4/5/7/8 and output_blocks.0-5 (UNetModel pops
# transformer_depth_output from the end, so output_blocks.0-2 get depth 2).
SDXL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    channel_mult=[1, 1, 1], transformer_depth=[0, 0, 1, 1, 2, 2],
    transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], transformer_depth_middle=-2,
    context_dim=2048, num_heads=-1, num_head_channels=64, use_spatial_transformer=True,
    use_linear_in_transformer=True, legacy=False, adm_in_channels=2816, num_classes="sequential",
    use_temporal_attention=False, use_temporal_resblock=False, use_checkpoint=False,
)

# Flux: hidden_size must stay 3072 (24 heads of 128); the text/vector input widths are read
# from the weights, so they shrink. One double block, no single blocks, no guidance
# (detected as FluxSchnell).
FLUX_DIT = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=64, context_in_dim=64,
    hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=0,
    axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False,
)


def import_comfy():
    """Import ComfyUI's `comfy` package here, forced to the CPU, and return it."""
    path = str(comfyui_dir())
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # must precede the first import of comfy.model_management
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import comfy.utils  # noqa: F401

    return comfy


def _random_state_dict(module: torch.nn.Module, gen: torch.Generator, dtype: torch.dtype,
                       std: float | Callable[[str, torch.Size], float] = 0.02) -> dict[str, torch.Tensor]:
    """Random values for every tensor of `module`: norm scales 1 + N(0, std), others N(0, std)."""
    norms = {name for name, m in module.named_modules()
             if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or type(m).__name__ == "RMSNorm"}
    out = {}
    for key, t in module.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        s = std(key, t.shape) if callable(std) else std
        value = torch.randn(t.shape, generator=gen, dtype=torch.float32) * s
        if owner in norms and leaf in ("weight", "scale"):
            value += 1.0
        out[key] = value.to(dtype).contiguous()
    return out


def _fan_in_std(gain: float) -> Callable[[str, torch.Size], float]:
    """std = gain / sqrt(fan_in) for weights, small for biases: keeps activations alive."""
    def std(key: str, shape: torch.Size) -> float:
        if len(shape) < 2:
            return 0.02
        return gain / math.sqrt(math.prod(shape[1:]))
    return std


def _build(factory: Callable[..., torch.nn.Module]) -> torch.nn.Module:
    """Instantiate without allocating memory (shapes only)."""
    comfy = import_comfy()
    return factory(device="meta", dtype=torch.float32, operations=comfy.ops.disable_weight_init)


def _unet_state_dict(config: dict, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    import_comfy()
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = _build(lambda **kw: UNetModel(**config, **kw))
    # std 1/sqrt(fan_in) (0.019 for a 320-channel 3x3 conv, 0.056 for a 320-wide Linear):
    # every layer keeps its input's scale, so attention and adapters visibly change the output.
    sd = _random_state_dict(unet, gen, dtype, _fan_in_std(1.0))
    return {f"model.diffusion_model.{k}": v for k, v in sd.items()}


def _taesd_state_dict(gen: torch.Generator, dtype: torch.dtype, prefix: str,
                      latent_channels: int = 4) -> dict[str, torch.Tensor]:
    """A TAESD-shaped VAE (ComfyUI detects `taesd_decoder.1.weight`) that gives real images.

    The random UNet leaves latents of std ~10-100: vae_scale brings them into the decoder's
    tanh range, and the last conv is calibrated on a random latent so each colour channel
    comes out centred on grey with std 0.2 (neither saturated nor flat).
    """
    import_comfy()
    from comfy.taesd.taesd import TAESD

    vae = TAESD(latent_channels=latent_channels)
    sd = _random_state_dict(vae, gen, torch.float32, _fan_in_std(1.0))
    sd["vae_scale"] = torch.tensor(0.015)
    sd["vae_shift"] = torch.tensor(0.0)
    vae.load_state_dict(sd)
    decoder = vae.taesd_decoder
    with torch.no_grad():
        features = torch.randn(4, latent_channels, 8, 8, generator=gen)
        for layer in list(decoder)[:-1]:  # not decoder[:-1]: 0.28's Decoder can't be rebuilt by slicing
            features = layer(features)
        out = decoder[-1](features)
    i = len(decoder) - 1
    weight, bias = sd[f"taesd_decoder.{i}.weight"], sd[f"taesd_decoder.{i}.bias"]
    scale = 0.2 / out.std(dim=(0, 2, 3))
    sd[f"taesd_decoder.{i}.weight"] = weight * scale[:, None, None, None]
    sd[f"taesd_decoder.{i}.bias"] = 0.5 + (bias - out.mean(dim=(0, 2, 3))) * scale
    return {prefix + k: v.to(dtype) for k, v in sd.items()}


def _clip_l_state_dict(gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A full-size random CLIP-L text encoder under SD1 checkpoint keys (123 M params)."""
    import_comfy()
    from comfy.clip_model import CLIPTextModel

    config = json.loads((comfyui_dir() / "comfy" / "sd1_clip_config.json").read_text())
    model = _build(lambda **kw: CLIPTextModel(config, **kw))
    sd = _random_state_dict(model, gen, dtype)
    sd.pop("text_projection.weight", None)  # SD1 checkpoints have none
    return {f"cond_stage_model.transformer.{k}": v for k, v in sd.items()}


def _save(sd: dict[str, torch.Tensor], path: str | os.PathLike, kind: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"boft_tiny_model": kind})  # one key: byte-reproducible
    return path


def load_checkpoint(path: str | os.PathLike, with_vae: bool = True, with_clip: bool = False):
    """ComfyUI's own loader (what CheckpointLoaderSimple calls): (ModelPatcher, CLIP, VAE)."""
    comfy = import_comfy()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=with_vae, output_clip=with_clip, embedding_directory=None)
    return model, clip, vae


def verify_checkpoint(path: str | os.PathLike, expected_class: str, prefix: str = "model.diffusion_model.") -> None:
    """Assert ComfyUI detects `expected_class`, every UNet key loads exactly as stored
    (no missing, no unexpected), and, if the file has a text encoder, all of it loads."""
    from safetensors.torch import load_file

    comfy = import_comfy()
    stored_all = load_file(str(path))
    model, _, _ = load_checkpoint(path, with_vae=False)
    config = model.model.model_config
    if type(config).__name__ != expected_class:
        raise AssertionError(f"{path}: ComfyUI detected {type(config).__name__}, expected {expected_class}")
    stored = {k[len(prefix):]: v for k, v in stored_all.items() if k.startswith(prefix)}
    loaded = model.model.diffusion_model.state_dict()
    missing, unexpected = sorted(set(loaded) - set(stored)), sorted(set(stored) - set(loaded))
    if missing or unexpected:
        raise AssertionError(f"{path}: UNet missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in stored.items():
        if not torch.equal(loaded[k].to(v.dtype), v):
            raise AssertionError(f"{path}: {k} did not load as stored")
    clip_sd = config.process_clip_state_dict(dict(stored_all))
    if clip_sd:
        clip = comfy.sd.CLIP(config.clip_target(state_dict=stored_all), tokenizer_data=clip_sd)
        missing, _ = clip.load_sd(clip_sd, full_model=True)
        missing = [k for k in missing if not k.endswith((".logit_scale", ".text_projection.weight"))]
        if missing:
            raise AssertionError(f"{path}: text encoder missing {missing[:5]}")


def make_sd15_checkpoint(path: str | os.PathLike, seed: int = 0, with_clip: bool = False,
                         verify: bool = True) -> Path:
    """Tiny SD1.5 checkpoint: 18.7 M-param UNet + TAESD VAE (+ full random CLIP-L), fp16.

    40 MiB, builds and verifies in ~0.3 s; with CLIP 275 MiB, ~1-6 s. Load with
    CheckpointLoaderSimple. verify=True loads it back through ComfyUI (see verify_checkpoint).
    """
    gen = torch.Generator().manual_seed(seed)
    sd = _unet_state_dict(SD15_UNET, gen, torch.float16)
    sd.update(_taesd_state_dict(gen, torch.float16, "first_stage_model."))
    if with_clip:
        sd.update(_clip_l_state_dict(gen, torch.float16))
    path = _save(sd, path, "sd15")
    if verify:
        verify_checkpoint(path, "SD15")
    return path


def diffusers_paths(model) -> dict[str, str]:
    """``{ComfyUI's (LDM/SGM) module path: its diffusers path}`` for a loaded SD-family ``model`` (a
    ModelPatcher), from ComfyUI's own table (``comfy.utils.unet_to_diffusers``): how a
    diffusers-trained adapter names the same layers (new attention naming, ``attn1.to_q``)."""
    import comfy.utils

    to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {v[: -len(".weight")]: k[: -len(".weight")] for k, v in to_ldm.items() if k.endswith(".weight")}


def make_sdxl_unet_checkpoint(path: str | os.PathLike, seed: int = 0, verify: bool = True) -> Path:
    """Small SDXL-family checkpoint (detected as Segmind_Vega): 104 M-param UNet + TAESD, fp16.

    204 MiB, ~1 s; no text encoders. Keys as a full checkpoint (`model.diffusion_model.`),
    so CheckpointLoaderSimple and load_checkpoint() take it.
    """
    gen = torch.Generator().manual_seed(seed)
    sd = _unet_state_dict(SDXL_UNET, gen, torch.float16)
    sd.update(_taesd_state_dict(gen, torch.float16, "first_stage_model."))
    path = _save(sd, path, "sdxl")
    if verify:
        verify_checkpoint(path, "Segmind_Vega")
    return path


def make_flux_checkpoint(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float8_e4m3fn,
                         verify: bool = True) -> Path:
    """Smallest Flux ComfyUI detects (FluxSchnell, 1 double block), diffusion-model keys only.

    379 M params: 362 MiB in fp8 (default), 723 MiB in bf16; ~5-8 s with verify and ~4 GB
    peak RSS. Load with UNETLoader (models/diffusion_models) or comfy.sd.load_diffusion_model.
    """
    import dataclasses

    import_comfy()
    from comfy.ldm.flux.model import Flux, FluxParams

    config = dict(FLUX_DIT)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
        config["txt_ids_dims"] = []  # 0.28: what its model detection sets for plain Flux
    gen = torch.Generator().manual_seed(seed)
    model = _build(lambda **kw: Flux(**config, **kw))
    sd = _random_state_dict(model, gen, dtype)
    path = _save(sd, path, "flux")
    if verify:
        comfy = import_comfy()
        patcher = comfy.sd.load_diffusion_model(str(path))
        found = type(patcher.model.model_config).__name__
        loaded = patcher.model.diffusion_model.state_dict()
        if found != "FluxSchnell" or set(loaded) != set(sd):
            raise AssertionError(f"{path}: detected {found}, key sets differ: {set(loaded) ^ set(sd)}")
    return path


# Today's DiT families, tiny, as ComfyUI builds them: the supported_models config its detection
# picks for a real checkpoint -> model_base -> the ldm module, all the host's own classes, with
# widths shrunk (heads of 32-64 channels, one or two blocks). {family: (config class, unet_config)}.
TINY_DITS = {
    "flux": ("Flux", dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                          hidden_size=128, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1,
                          axes_dim=[16, 24, 24], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False)),
    "sd3.5": ("SD3", dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=64,
                          context_embedder_config={"target": "torch.nn.Linear",
                                                   "params": {"in_features": 64, "out_features": 128}},
                          num_patches=64, pos_embed_max_size=8, pos_embed_scaling_factor=None, qk_norm="rms",
                          x_block_self_attn_layers=[])),  # SD3.5 Large: RMS q/k norms; depth 2 = 128 wide
    "qwen-image": ("QwenImage", dict(image_model="qwen_image", in_channels=16, out_channels=16, num_layers=1,
                                     attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64)),
    "wan": ("WAN21_T2V", dict(image_model="wan2.1", model_type="t2v", dim=64, out_dim=16, num_heads=2, ffn_dim=128,
                              num_layers=1, patch_size=(1, 2, 2), freq_dim=32, window_size=(-1, -1), qk_norm=True,
                              cross_attn_norm=True, eps=1e-6, in_dim=16, text_dim=32)),
}


def tiny_dit(family: str, seed: int = 0):
    """A ModelPatcher around a tiny ``TINY_DITS[family]`` model with seeded random float32 weights
    (CPU). Built in process in ~0.1 s; ComfyUI's key maps see the real model_base class."""
    import_comfy()
    import comfy.model_patcher
    import comfy.supported_models

    name, unet_config = TINY_DITS[family]
    unet_config = dict(unet_config)
    if family == "flux":
        import dataclasses

        from comfy.ldm.flux.model import FluxParams

        if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
            unet_config["txt_ids_dims"] = []  # 0.28: what its model detection sets for plain Flux
    config = getattr(comfy.supported_models, name)(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    sd = _random_state_dict(model.diffusion_model, torch.Generator().manual_seed(seed), torch.float32,
                            _fan_in_std(1.0))
    model.diffusion_model.load_state_dict(sd, strict=True)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def make_kohya_lora(path: str | os.PathLike, ckpt_path: str | os.PathLike,
                    targets: tuple[str, ...] = ("attn1_to_q", "attn1_to_v"), *, diffusers_names: bool = True,
                    rank: int = 4, alpha: float = 2.0, seed: int = 0, std: float = 0.1) -> dict[str, str]:
    """A kohya-style LoRA (`<name>.lora_up.weight`, `.lora_down.weight`, `.alpha`, fp16).

    Names come from ComfyUI's own key map for `ckpt_path`: every `lora_unet_*` name ending
    with one of `targets` (Linear layers), diffusers-style (`lora_unet_down_blocks_0_...`,
    what kohya's sd-scripts writes for SD1.5) or ldm-style (`lora_unet_input_blocks_1_1_...`).
    Returns {lora name: model state-dict key}. Under zero conditioning the cross-attention
    k/v layers (attn2_to_k/_v) see a zero context, so patches there change nothing.
    """
    comfy = import_comfy()
    model, _, _ = load_checkpoint(ckpt_path, with_vae=False)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    ldm = ("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks")
    chosen = {name: key for name, key in sorted(key_map.items())
              if name.startswith("lora_unet_") and name.endswith(targets) and name.startswith(ldm) != diffusers_names}
    if not chosen:
        raise ValueError(f"no lora_unet_ names end with {targets} in the key map of {ckpt_path}")
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, key in chosen.items():
        out_dim, in_dim = weights[key].shape
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, in_dim, generator=gen) * std).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn(out_dim, rank, generator=gen) * std).half()
        sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    _save(sd, path, "kohya_lora")
    return chosen


# ------------------------------------------------------------------------------- workflows
ModelPatch = Callable[[list], tuple[dict, list]]
ZERO_COND_FOLDER = "boft_zero_conditioning"


def write_zero_conditioning(output_dir: str | os.PathLike, folder: str = ZERO_COND_FOLDER,
                            context_dim: int = 768, tokens: int = 77) -> Path:
    """Zero text conditioning where core's LoadTrainingDataset finds it (no CLIP needed).

    ComfyUI 0.3.75 has no core node that makes SD1.5 conditioning without a text encoder;
    LoadTrainingDataset reads `<output dir>/<folder>/shard_*.pkl`, so one shard holding a
    zero [1, tokens, context_dim] conditioning stands in for an empty prompt. (Cross-attention
    then sees a zero context: attn2 to_k/to_v patches have no effect on the image.)
    """
    shard = Path(output_dir) / folder / "shard_0000.pkl"
    shard.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"latents": [{"samples": torch.zeros(1, 4, 8, 8)}],
                "conditioning": [[[torch.zeros(1, tokens, context_dim), {}]]]}, shard)
    return shard


def sd15_workflow(ckpt_name: str, *, prompt: str | None = None, cond_folder: str = ZERO_COND_FOLDER,
                  patch_model: ModelPatch | None = None, seed: int = 0, steps: int = 2,
                  width: int = 64, height: int = 64, cfg: float = 1.0, sampler: str = "euler",
                  scheduler: str = "normal", filename_prefix: str = "boft_test") -> dict:
    """API-format workflow: CheckpointLoaderSimple -> [patch] -> KSampler -> VAEDecode -> SaveImage.

    Conditioning: with `prompt`, CLIPTextEncode (the checkpoint needs CLIP) and its
    ConditioningZeroOut as negative; without, the zero conditioning that
    write_zero_conditioning() put in the server's output dir (positive and negative).
    patch_model(model_ref) returns ({node_id: node}, new_model_ref) to insert model patches;
    the ids used here are "ckpt", "latent", "positive", "negative", "sampler", "decode", "save".
    """
    wf = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
    }
    if prompt is None:
        wf["positive"] = {"class_type": "LoadTrainingDataset", "inputs": {"folder_name": cond_folder}}
        positive = negative = ["positive", 1]
    else:
        wf["positive"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": prompt}}
        wf["negative"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["positive", 0]}}
        positive, negative = ["positive", 0], ["negative", 0]
    model_ref = ["ckpt", 0]
    if patch_model is not None:
        nodes, model_ref = patch_model(model_ref)
        wf.update(nodes)
    wf["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": model_ref, "positive": positive, "negative": negative, "latent_image": ["latent", 0],
        "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
        "denoise": 1.0}}
    wf["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}}
    wf["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": filename_prefix}}
    return wf
