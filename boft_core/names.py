"""Layer names: the one owner of every naming fact the pack uses.

* the prefixes trainers put before a model path (``lycoris_``, ``lora_unet_``, ``base_model.model.``,
  ``transformer.``, ...) and the text-encoder roots (``lora_te_``, ``lora_te1_``, ``lora_te2_``);
* :func:`boft_r_kind`: whether a ``boft_R`` file is PEFT's or kohya's (metadata, then prefix);
* :func:`guess_family`: the model family a file's layer names suggest;
* :func:`candidates`: the names ComfyUI's key maps may know a layer by (``nodes/keymap.py`` looks
  them up), and :func:`is_text_encoder_layer` (a text encoder's layer: Create Hook BOFT splits a
  file between the model and the CLIP with it).

``formats`` (detection), ``stats``/``blocks`` (sections), ``cli`` (matching a checkpoint's keys),
``nodes/keymap.py`` (ComfyUI's key maps) and ``nodes/adapter.py`` import these; none keeps a copy.
Pure Python; never imports ComfyUI.
"""

from __future__ import annotations

import re

PEFT_PREFIX = "base_model.model."  # PEFT's wrapper around the model (adapter name stripped)
TE_ROOTS = ("lora_te_", "lora_te1_", "lora_te2_")  # kohya/LyCORIS: one text encoder, or SDXL's two
UNDERSCORED_ROOTS = ("lycoris_", "lora_transformer_", "lora_unet_")  # roots before a flattened path
# Prefixes before a diffusion model's own path, stripped in this order (a name may carry two, as
# PEFT's ``base_model.model.`` before ``unet.``): SimpleTuner/LyCORIS, kohya (networks.oft: oft_unet_), OneTrainer,
# PEFT, diffusers, ComfyUI checkpoints, ComfyUI's own trainer.
MODEL_PREFIXES = ("base_model.model.", "lycoris_", "lora_unet_", "oft_unet_", "lora_transformer_", "unet.",
                  "model.diffusion_model.", "diffusion_model.", "transformer.")
# Text-encoder names by root: the second encoder (SDXL's CLIP-G), then the first (or only) one.
TE2_PATTERN = re.compile(r"^(lora_te2_|text_encoder_2[._]|clip_g[._]|te2[._])")
TE_PATTERN = re.compile(r"^(lora_te1?_|text_encoders?[._]|text_model[._]|clip_l[._]|te1?[._]|encoder[._]layers[._])")
# Text-encoder prefixes the CLI strips before matching a checkpoint key by suffix.
TE_PREFIXES = (*TE_ROOTS, "text_encoder_2.", "text_encoder.")

# Wan 2.x: diffusers' WanTransformer3DModel path -> the native path ComfyUI's WanModel uses, for
# the linear layers (the inverse of TRANSFORMER_KEYS_RENAME_DICT in diffusers'
# scripts/convert_wan_to_diffusers.py). ComfyUI has no diffusers map for Wan; longest first.
WAN_DIFFUSERS = (
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn2.add_k_proj", "cross_attn.k_img"), ("attn2.add_v_proj", "cross_attn.v_img"),
    ("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"),
    *((f"attn1.to_{x}", f"self_attn.{x}") for x in "qkv"),
    *((f"attn2.to_{x}", f"cross_attn.{x}") for x in "qkv"),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
)

# Keys of the adapter kinds ComfyUI's own adapters read, by suffix: (suffix, kind, what a file
# of only these is). A file that mixes them with BOFT layers hands them to the host's adapters.
OTHER_SUFFIXES = (
    (".lora_up.weight", "lora", "a LoRA (lora_up/lora_down)"),
    (".lora_down.weight", "lora", "a LoRA (lora_up/lora_down)"),
    (".lora_mid.weight", "lora", "a LoRA (lora_up/lora_down)"),
    (".lora_A.weight", "lora", "a PEFT LoRA (lora_A/lora_B)"),
    (".lora_B.weight", "lora", "a PEFT LoRA (lora_A/lora_B)"),
    *((f".hada_{p}", "loha", "a LyCORIS LoHa") for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
    *((f".lokr_{p}", "lokr", "a LyCORIS LoKr") for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")),
    (".w_norm", "norm", "a LyCORIS norm adapter"),
    (".b_norm", "norm", "a LyCORIS norm adapter"),
    (".diff", "full", "a LyCORIS full-weight diff"),
    (".diff_b", "full", "a LyCORIS full-weight diff"),
    (".set_weight", "set", "a weight replacement (set_weight)"),
)
SHARED_SUFFIXES = (".alpha", ".dora_scale")  # beside the main keys of any adapter kind

# (pattern over the names joined by spaces, family), most specific first; the label before any
# " (" is what ``blocks.family_of`` reads.
FAMILIES = (
    (r"distilled_guidance_layer", "Chroma"),
    (r"double_stream_blocks|single_stream_blocks", "HiDream"),
    (r"noise_refiner|context_refiner|layers[._]\d+[._](attention[._](qkv|out|to_[qkv])|feed_forward)",
     "Z-Image (or Lumina 2)"),
    (r"transformer_blocks[._]\d+[._](img|txt)_(mod|mlp)", "Qwen-Image"),
    (r"(^|[ ._])blocks[._]\d+[._](self_attn|cross_attn|ffn)[._]", "Wan"),
    (r"single_blocks|double_blocks|single_transformer_blocks|img_attn|txt_attn", "Flux (or Chroma)"),
    (r"joint_blocks|context_block", "SD3"),
    (r"lora_te2_|text_encoder_2|input_blocks_[4578]_1_transformer_blocks_[1-9]|"
     r"down_blocks_[12]_attentions_\d_transformer_blocks_[1-9]|add_embedding|label_emb", "SDXL"),
    (r"input_blocks|output_blocks|down_blocks|up_blocks|middle_block|mid_block", "SD1.x/SD2.x"),
    (r"text_model|encoder_layers|lora_te", "a text encoder only"),
)


def candidates(name: str):
    """Names ComfyUI's key maps may know this layer by, most specific first.

    Adds what the core maps miss: kohya OFT's ``oft_unet_`` names, PEFT ``base_model.model.`` and
    diffusers ``unet.`` names with the new attention naming (``attn1.to_q``, ``to_out.0``), PEFT text-encoder names,
    transformers-5 text-encoder names without ``text_model`` (``lora_te_encoder_layers_...``),
    the model's native paths under any trainer's prefix (``transformer.``, ``lycoris_``,
    ``lora_transformer_``: ComfyUI maps ``diffusion_model.<path>`` and ``lora_unet_<path>`` for every
    model), and Wan in diffusers' naming (``blocks.0.attn1.to_q`` is ``blocks.0.self_attn.q``).
    """
    yield name
    if name.startswith("oft_unet_"):  # kohya sd-scripts networks.oft: its lora_unet_ names, renamed
        yield "lora_unet_" + name[len("oft_unet_"):]
        return
    path = name
    for prefix in (PEFT_PREFIX, "unet.", "transformer."):
        if path.startswith(prefix):
            path = path[len(prefix):]
            yield path
    flat = path.replace(".", "_")
    if path.startswith(("text_model.", "encoder.layers.")):
        te = flat if flat.startswith("text_model_") else "text_model_" + flat
        yield "lora_te_" + te
        yield "lora_te1_" + te
        return
    for prefix in ("text_encoder.", "text_encoder_2."):
        if path.startswith(prefix):
            rest = path[len(prefix):].replace(".", "_")
            rest = rest if rest.startswith("text_model_") else "text_model_" + rest
            yield ("lora_te2_" if prefix == "text_encoder_2." else "lora_te_") + rest
            yield "lora_te1_" + rest
            return
    for prefix in TE_ROOTS:
        if flat.startswith(prefix + "encoder_"):
            yield prefix + "text_model_" + flat[len(prefix):]
            return
    if "." in name:  # a dotted name (after any prefix the path may be one word: transformer.proj_out)
        yield "lora_unet_" + flat  # diffusers path; ComfyUI maps its underscored form
        yield "lycoris_" + flat
        yield "diffusion_model." + path  # a native path under another prefix (0.3.75: also Z-Image's diffusers map)
        if wan_native(path) != path:
            yield "diffusion_model." + wan_native(path)  # Wan in diffusers' naming: ComfyUI maps none
        return
    for prefix in UNDERSCORED_ROOTS:  # a flattened native (or Wan diffusers) path: ComfyUI maps lora_unet_<it>
        if name.startswith(prefix):
            rest = name[len(prefix):]
            yield "lora_unet_" + rest
            if wan_native(rest, "_") != rest:
                yield "lora_unet_" + wan_native(rest, "_")
            return


def is_text_encoder_layer(name: str) -> bool:
    """Whether a layer name is a text encoder's: one of the names ComfyUI's key maps may know it by
    (:func:`candidates`) has a text-encoder root (what ComfyUI's CLIP key map holds)."""
    return any(c.startswith(TE_ROOTS) for c in candidates(name))


def strip_prefix(name: str, text_encoders: bool = False) -> str:
    """``name`` without the trainers' model prefixes (``lycoris_``, ``lora_unet_``, ``base_model.model.``,
    ...), applied in :data:`MODEL_PREFIXES` order; with ``text_encoders`` also without a text-encoder
    root (``lora_te1_``, ``text_encoder.``)."""
    stem = name
    for prefix in MODEL_PREFIXES + (TE_PREFIXES if text_encoders else ()):
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
    return stem


def without_peft_prefix(name: str) -> str:
    """A PEFT key's layer path without ``base_model.model.``."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def boft_r_kind(name: str, metadata: dict | None = None) -> str:
    """``"kohya-boft"`` or ``"peft-boft"`` for a ``boft_R`` layer: kohya's ``ss_network_module``
    decides when present (kohya also reads PEFT-named keys), else PEFT's ``base_model.model.``."""
    if (metadata or {}).get("ss_network_module") == "networks.boft" or not name.startswith(PEFT_PREFIX):
        return "kohya-boft"
    return "peft-boft"


def guess_family(names) -> str:
    """The model family the adapter's layer names suggest, for messages and the info panel."""
    text = " ".join(names)
    for pattern, family in FAMILIES:
        if re.search(pattern, text):
            return family
    return "an unknown family"


def other_layers(keys) -> dict[str, str]:
    """{layer name: adapter kind} for keys of other adapter kinds (:data:`OTHER_SUFFIXES`); a
    layer of keys with no known suffix is ``"unknown"`` (named by the key without its last part)."""
    layers: dict[str, str] = {}
    shared = []
    for key in keys:
        hit = next(((suffix, kind) for suffix, kind, _ in OTHER_SUFFIXES if key.endswith(suffix)), None)
        if hit is not None:
            layers[key[: -len(hit[0])]] = hit[1]
        elif key.endswith(SHARED_SUFFIXES):
            shared.append(key.rsplit(".", 1)[0])
        else:
            layers.setdefault(key.rsplit(".", 1)[0] if "." in key else key, "unknown")
    for name in shared:
        layers.setdefault(name, "unknown")
    return layers


def wan_native(path: str, sep: str = ".") -> str:
    """A Wan layer path in diffusers' naming turned into the native one (``blocks.0.attn1.to_q`` ->
    ``blocks.0.self_attn.q``); ``sep="_"`` for flattened names (``lycoris_blocks_0_attn1_to_q``).
    Fragments are replaced whole (between separators); other paths come back unchanged."""
    for diffusers, native in WAN_DIFFUSERS:
        s = re.escape(sep)
        pattern = rf"(?<![^{s}]){re.escape(diffusers.replace('.', sep))}(?![^{s}])"
        path = re.sub(pattern, native.replace(".", sep), path)
    return path
