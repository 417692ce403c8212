"""Today's model families: a BOFT file in each naming convention trainers write lands on the model.

Tiny real models built with the host's own classes (``tiny_models.TINY_DITS``: Flux, SD3.5,
Qwen-Image, Wan). Per family and convention, one LyCORIS-layout BOFT file covers every linear
weight that convention names (fresh random blocks); it goes through our loader node in the host,
and every layer must be applied and equal the float64 dense merge (``boft_core.merge_weight``) of
its own weight, with every other weight untouched.

Where a convention's names come from (the oracle side, never our key map):
* ``diffusion_model.<path>`` (ComfyUI's trainer, diffusion-pipe) and ``lora_unet_<path with _>``
  (kohya sd-scripts / musubi-tuner): the model's own state-dict paths;
* ``transformer.<diffusers path>`` (diffusers/PEFT, SimpleTuner) and ``lycoris_<diffusers path with _>``
  (LyCORIS in SimpleTuner, on the diffusers model): the host's own diffusers tables
  (``comfy.utils.flux_to_diffusers`` / ``mmdit_to_diffusers``); Qwen-Image's ComfyUI paths are
  diffusers' own; Wan's come from diffusers' conversion script's rename table (native -> diffusers,
  applied as that script applies it).
"""

import math
from importlib import import_module

import pytest
import torch
from safetensors.torch import save_file
from test_nodes import patched_state, rel

import boft_core

CONVENTIONS = ("diffusion_model", "lora_unet", "transformer", "lycoris")
# diffusers' scripts/convert_wan_to_diffusers.py TRANSFORMER_KEYS_RENAME_DICT (linear layers),
# native -> diffusers, applied in this order with str.replace as the script does.
WAN_TO_DIFFUSERS = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
}


def diffusers_names(comfy, family, model) -> dict:
    """{diffusers layer path: native weight key, or (key, (dim, start, length)) for a slice}."""
    unet_config = model.model.model_config.unet_config
    native = [k for k in model.model.diffusion_model.state_dict() if k.endswith(".weight")]
    if family == "flux":
        table = comfy.utils.flux_to_diffusers(unet_config, output_prefix="")
    elif family == "sd3.5":
        table = comfy.utils.mmdit_to_diffusers(unet_config, output_prefix="")
    elif family == "qwen-image":
        table = {k: k for k in native}
    else:
        table = {}
        for key in native:
            new = key
            for old, diffusers in WAN_TO_DIFFUSERS.items():
                new = new.replace(old, diffusers)
            if new != key or not key.startswith("blocks."):
                table[new] = key
    return {k[: -len(".weight")]: v for k, v in table.items() if k.endswith(".weight")}


def butterfly(n: int):
    """LyCORIS's layout for an n-row layer: the largest even b <= 16 with n / b a power of two."""
    for b in range(16, 1, -2):
        if n % b == 0 and (n // b) & (n // b - 1) == 0:
            return b, n // b, int(math.log2(n // b)) + 1
    return None


def target_weight(weights, target):
    if isinstance(target, tuple):
        key, (dim, start, length) = target
        return weights[key].narrow(dim, start, length)
    return weights[target]


def convention_file(path, comfy, family, model, convention, seed=0) -> dict:
    """A BOFT file naming every fitting linear weight in ``convention``; {layer name: target}."""
    weights = model.model.diffusion_model.state_dict()
    if convention in ("diffusion_model", "lora_unet"):
        paths = {k[: -len(".weight")]: k for k in weights if k.endswith(".weight")}
    else:
        paths = diffusers_names(comfy, family, model)
    root = {"diffusion_model": "diffusion_model.", "lora_unet": "lora_unet_", "transformer": "transformer.",
            "lycoris": "lycoris_"}[convention]
    g = torch.Generator().manual_seed(seed)
    tensors, targets = {}, {}
    for p, target in sorted(paths.items()):
        if (target[0] if isinstance(target, tuple) else target) not in weights:
            continue  # a diffusers name for a part this config does not build (e.g. Flux's control input)
        if isinstance(target, tuple) and (len(target) > 2 or target[1] is None):
            continue  # rows stored in another order (swap_scale_shift): refused, see test_reordered_rows_refused
        weight = target_weight(weights, target)
        fit = butterfly(weight.shape[0]) if weight.ndim == 2 else None
        if fit is None:
            continue
        key = target[0] if isinstance(target, tuple) else target
        taken = {t if isinstance(t, str) else t[0]: isinstance(t, str) for t in targets.values()}
        if str(target) in {str(t) for t in targets.values()} or taken.get(key) or (key in taken and key == target):
            continue  # an alias of rows already named (0.28 knows Flux 1 and Flux 2 diffusers names)
        b, nb, m = fit
        name = root + (p if root.endswith(".") else p.replace(".", "_"))
        tensors[f"{name}.oft_blocks"] = torch.randn(m, nb, b, b, generator=g) * 0.05
        tensors[f"{name}.alpha"] = torch.tensor(0.0)
        targets[name] = target
    save_file(tensors, str(path))
    return targets


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("family", ["flux", "sd3.5", "qwen-image", "wan"])
def test_every_layer_lands_and_merges_exactly(comfy, pack, loras_dir, family, convention):
    import tiny_models

    model = tiny_models.tiny_dit(family)
    base = {k: v.clone().double() for k, v in model.model.diffusion_model.state_dict().items()}
    path = loras_dir / f"{family}_{convention}.safetensors"
    targets = convention_file(path, comfy, family, model, convention)
    assert len(targets) >= 6, targets  # attention, MLP and embedders of a block at least
    adapter = boft_core.load(str(path))
    s = 0.8
    out = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]().load_boft(model, path.name, s, "lycoris")
    report = out["ui"]["boft_report"][0]
    assert f"applied {len(targets)} of {len(targets)} layers" in report, report
    got = patched_state(comfy, out["result"][0])
    touched = set()
    for name, target in targets.items():
        want = boft_core.merge_weight(target_weight(base, target), adapter.layers[name], s, "lycoris")
        assert rel(target_weight(got, target), want, target_weight(base, target)) < 1e-5, (name, target)
        touched.add(target[0] if isinstance(target, tuple) else target)
    for key in set(base) - touched:
        assert torch.equal(got[key].double(), base[key]), key


@pytest.mark.parametrize("family,label", [("flux", "Flux"), ("sd3.5", "SD3"), ("qwen-image", "Qwen-Image"),
                                          ("wan", "Wan")])
def test_family_guess_from_each_convention(comfy, loras_dir, family, label):
    """The family the names suggest (error messages, the panel), from every convention's names."""
    import tiny_models

    names = import_module("boft_core.names")
    model = tiny_models.tiny_dit(family)
    for convention in CONVENTIONS:
        path = loras_dir / f"guess_{family}_{convention}.safetensors"
        targets = convention_file(path, comfy, family, model, convention)
        if family == "sd3.5" and convention in ("transformer", "lycoris"):
            continue  # diffusers names SD3's and Flux's blocks alike (transformer_blocks.N.attn.*)
        assert names.guess_family(targets).startswith(label), (convention, names.guess_family(targets))


def test_reordered_rows_are_refused(comfy, pack, loras_dir):
    """Flux's diffusers ``norm_out.linear`` is ComfyUI's ``final_layer.adaLN_modulation.1`` with its
    halves swapped (a function in the key map): a rotation of diffusers' rows is no rotation of
    ComfyUI's, so the loader refuses the layer by name instead of merging it wrong."""
    import tiny_models

    model = tiny_models.tiny_dit("flux")
    rows = model.model.diffusion_model.final_layer.adaLN_modulation[1].weight.shape[0]
    b, nb, m = butterfly(rows)
    path = loras_dir / "flux_norm_out.safetensors"
    save_file({"transformer.norm_out.linear.oft_blocks": torch.randn(m, nb, b, b) * 0.05,
               "transformer.norm_out.linear.alpha": torch.tensor(0.0)}, str(path))
    error = import_module(pack.__name__ + ".boft_core").BoftError
    with pytest.raises(error, match=r"transformer\.norm_out\.linear.*final_layer\.adaLN_modulation\.1\.weight"):
        pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]().load_boft(model, path.name, 1.0, "lycoris")
    assert not model.patches


def test_two_layers_on_one_weight_are_refused(comfy, pack, loras_dir):
    """A file naming one weight twice (here its native and its kohya name) is refused, naming both:
    one would otherwise silently replace the other."""
    import tiny_models

    model = tiny_models.tiny_dit("wan")
    rows = model.model.diffusion_model.blocks[0].self_attn.q.weight.shape[0]
    b, nb, m = butterfly(rows)
    path = loras_dir / "wan_twice.safetensors"
    save_file({f"{name}.oft_blocks": torch.randn(m, nb, b, b) * 0.05
               for name in ("diffusion_model.blocks.0.self_attn.q", "lora_unet_blocks_0_self_attn_q")}, str(path))
    error = import_module(pack.__name__ + ".boft_core").BoftError
    with pytest.raises(error, match=r"blocks\.0\.self_attn\.q and lora_unet_blocks_0_self_attn_q both adapt"):
        pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]().load_boft(model, path.name, 1.0, "lycoris")
    assert not model.patches
