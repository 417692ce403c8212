"""BOFT files with known contents for the front-end tests (and the README screenshots)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

XSS = '<script>window.__boft_xss = 1</script><img src=x onerror="window.__boft_xss = 2">'

# The tiny SD1.5 model (tests/tiny_models.py) has transformers in input_blocks.1 (down, level 0)
# and output_blocks.0/1 (up, level 0), no middle block and no text encoder in the tests' graph.
TRANSFORMER_LAYERS = ("proj_in", "transformer_blocks_0_attn1_to_q", "transformer_blocks_0_attn1_to_k",
                      "transformer_blocks_0_attn1_to_v", "transformer_blocks_0_attn1_to_out_0",
                      "transformer_blocks_0_ff_net_2")
BLOCKS = {"input_blocks_1_1": 0.004, "output_blocks_0_1": 0.03, "output_blocks_1_1": 0.02}
ABSENT = {"middle_block_1_proj_in": 0.01}  # SD1.5 has it, the tiny model does not
CONSTRAINT = 0.05  # on every other layer; large enough to leave these blocks as they are
TE_LAYER = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # 768 wide; no CLIP in the graph

TAGS = {"10_wtrclr": {"wtrclr style": 40, "mountain": 12, "lake": 9},
        "5_wtrclr": {"wtrclr style": 20, "forest": 11, "mountain": 3}}
METADATA = {  # what kohya sd-scripts writes, abridged
    "ss_output_name": "wtrclr-boft",
    "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
    "ss_base_model_version": "sd_v1",
    "ss_network_module": "lycoris.kohya",
    "ss_network_dim": "16",
    "ss_network_alpha": "1",
    "ss_network_args": json.dumps({"algo": "boft", "constraint": "0.05", "rescaled": "True"}),
    "ss_num_train_images": "60",
    "ss_num_epochs": "10",
    "ss_learning_rate": "0.0001",
    "ss_resolution": "(512, 512)",
    "ss_tag_frequency": json.dumps(TAGS),
}
# The same with markup in a metadata field and in a tag: the panel must show it as text.
XSS_METADATA = dict(METADATA, ss_output_name=XSS,
                    ss_tag_frequency=json.dumps({"a": {**TAGS["10_wtrclr"], XSS: 1}, "b": TAGS["5_wtrclr"]}))


def _lycoris(gen, n: int, std: float, *, rescaled: bool, alpha: float) -> dict[str, torch.Tensor]:
    """One LyCORIS BOFT layer for n output channels, block size 10 (n=320) or 12 (n=768)."""
    b = 10 if n % 10 == 0 else 12
    nb = n // b
    m = nb.bit_length()  # log2(nb) + 1 stages
    parts = {"oft_blocks": (torch.randn(m, nb, b, b, generator=gen) * std).half(),
             "alpha": torch.tensor(alpha, dtype=torch.float16)}
    if rescaled:
        parts["rescale"] = (1 + 0.01 * torch.randn(n, 1, generator=gen)).half()
    return parts


def write_demo_boft(path: str | Path, metadata: dict | None = None, seed: int = 0) -> dict:
    """A kohya-named LyCORIS BOFT file for the tiny SD1.5 model; returns what the panel must show.

    20 layers: 18 in the model (6 per transformer; 'down' acts little, 'up' most), one middle-block
    layer and one text-encoder layer that a MODEL-only graph cannot apply.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    names = []
    layers = [(f"lora_unet_{block}_{leaf}", std) for block, std in BLOCKS.items() for leaf in TRANSFORMER_LAYERS]
    layers += [(f"lora_unet_{block}", std) for block, std in ABSENT.items()]
    layers += [(TE_LAYER, 0.01)]
    for i, (name, std) in enumerate(layers):
        n = 768 if name == TE_LAYER else 320
        parts = _lycoris(gen, n, std, rescaled=i % 3 == 0, alpha=CONSTRAINT if i % 2 else 0.0)
        tensors.update({f"{name}.{suffix}": t for suffix, t in parts.items()})
        names.append(name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=METADATA if metadata is None else metadata)
    params = sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha"))
    return {"names": names, "layers": len(names), "parameters": params, "size": path.stat().st_size,
            "not_applied": [f"lora_unet_{block}" for block in ABSENT] + [TE_LAYER],
            "rescaled": sum(1 for i in range(len(names)) if i % 3 == 0)}


def write_lora(path: str | Path) -> Path:
    """A plain LoRA (lora_up/lora_down): not a BOFT file."""
    gen = torch.Generator().manual_seed(1)
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.randn(4, 320, generator=gen).half(),
               f"{name}.lora_up.weight": torch.randn(320, 4, generator=gen).half(),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    return Path(path)
