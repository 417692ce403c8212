"""End to end on ComfyUI 0.28: bypass mode over HTTP (issue 10), on tiny real SD1.5 checkpoints.

* Core's ``LoraLoaderBypass`` / ``LoraLoaderBypassModelOnly`` with a LyCORIS BOFT give
  ``LoraLoader``'s image, with the pack's adapter registered and with it off
  (``COMFYUI_BOFT_CORE_ADAPTER=0``: core's own math on both sides).
* Our loader's ``apply=bypass`` gives ``apply=merge``'s image.
* Quantized models: a float8 UNet (``--fp8_e4m3fn-unet``) and a scaled-fp8 checkpoint (0.28 loads
  it as ``QuantizedTensor``s through its mixed-precision ops). The reference is the float32 model
  with the BOFT merged; bypass must be at least as close to it as merging into the float8 weights.
  The distances are printed (``-s`` shows them).

0.3.75 has no bypass mode: the module is skipped there (test_bypass.py checks that ``apply=bypass``
fails there naming the version, and that ``auto`` merges).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tiny_models
import torch
from comfy_host import ComfyServer
from lycoris_comfy import write_boft
from safetensors.torch import load_file, save_file
from test_e2e import CKPT, SEED, Loaded, assert_changed, assert_same, run_image

NAME = "bypass_boft.safetensors"
SCALED = "bypass_scaled_fp8.safetensors"
HOST_ERROR = 1.0  # mean |diff| (of 255) under which two images count as the same picture


@pytest.fixture(scope="module")
def servers(tmp_path_factory, comfy):
    import comfy.weight_adapter

    if not hasattr(comfy.weight_adapter, "BypassInjectionManager"):
        pytest.skip("this ComfyUI has no bypass mode (added in 0.28)")
    made = {
        "pack": ComfyServer(tmp_path_factory.mktemp("bypass"), boot_timeout=600),
        "core": ComfyServer(tmp_path_factory.mktemp("bypass_core"), env={"COMFYUI_BOFT_CORE_ADAPTER": "0"},
                            boot_timeout=600),
        "fp8": ComfyServer(tmp_path_factory.mktemp("bypass_fp8"), extra_args=("--fp8_e4m3fn-unet",), boot_timeout=600),
    }
    started = []
    try:
        for srv in made.values():
            srv.start(wait=False)  # boot side by side while this process writes the files
            started.append(srv)
        first = made["pack"]
        tiny_models.make_sd15_checkpoint(first.models / "checkpoints" / CKPT)
        sd15 = Loaded(first.models / "checkpoints" / CKPT)
        write_boft(first.models / "loras" / NAME, sd15.unet, "lora_unet", rescaled=True, constraint=0.01,
                   dtype=torch.float16)
        write_scaled_fp8(first.models / "checkpoints" / CKPT, first.models / "checkpoints" / SCALED)
        for srv in made.values():
            tiny_models.write_zero_conditioning(srv.output_dir)
            if srv is not first:
                for folder, name in (("checkpoints", CKPT), ("loras", NAME)):
                    (srv.models / folder / name).symlink_to(first.models / folder / name)
            srv.wait_ready()
        yield made
    finally:
        for srv in started:
            srv.stop()


def write_scaled_fp8(src, dst):
    """The checkpoint with every UNet Linear weight stored as float8 with a per-tensor scale, in the
    "scaled fp8" layout (``<layer>.scale_weight`` + a ``scaled_fp8`` marker) that 0.28 converts to
    its mixed-precision ``QuantizedTensor`` layers."""
    sd = load_file(str(src))
    out = {}
    for key, value in sd.items():
        if key.startswith("model.diffusion_model.") and key.endswith(".weight") and value.ndim == 2:
            w = value.float()
            scale = w.abs().max() / 448.0
            out[key] = (w / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = value
    out["model.diffusion_model.scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(out, str(dst))


def node(class_type, **inputs):
    def patch(model_ref):
        return {"patch": {"class_type": class_type, "inputs": {"model": model_ref, **inputs}}}, ["patch", 0]
    return patch


def ours(strength, apply, mode="lycoris"):
    return node("BOFTLoaderModelOnly", boft_name=NAME, strength_model=strength, mode=mode, apply=apply)


def core(class_type, strength):
    inputs = {"lora_name": NAME, "strength_model": strength}
    if class_type in ("LoraLoader", "LoraLoaderBypass"):
        inputs.update(clip=["ckpt", 1], strength_clip=0.0)
    return node(class_type, **inputs)


def render(srv, patch=None, ckpt=CKPT):
    got, history = run_image(srv, tiny_models.sd15_workflow(ckpt, patch_model=patch, seed=SEED))
    return got, history


def report_of(history) -> str:
    return json.dumps(history.get("outputs", {}).get("patch", {}))


def test_core_bypass_loaders_give_lora_loaders_image(servers):
    """LoraLoaderBypass(ModelOnly) == LoraLoader(ModelOnly) with the pack's adapter, at s = 1 and 0.5;
    and our loader's apply=bypass == apply=merge."""
    srv = servers["pack"]
    base = render(srv)[0]
    for s in (1.0, 0.5):
        want = render(srv, core("LoraLoaderModelOnly", s))[0]
        assert_changed(want, base, f"LoraLoader s={s}")
        for class_type in ("LoraLoaderBypassModelOnly", "LoraLoaderBypass", "LoraLoader"):
            assert_same(render(srv, core(class_type, s))[0], want, f"{class_type} s={s}")
        assert_same(render(srv, ours(s, "bypass"))[0], want, f"BOFTLoaderModelOnly apply=bypass s={s}")
        got, history = render(srv, ours(s, "auto"))
        assert_same(got, want, f"BOFTLoaderModelOnly apply=auto s={s}")
        assert re.search(r", merge[,)]", report_of(history))  # float32 weights: auto merges
    assert "Adapter key not in model" not in srv.log_text()


def test_core_bypass_without_the_pack_adapter_is_cores(servers):
    """COMFYUI_BOFT_CORE_ADAPTER=0: core's own BOFT math in both loaders, at s = 1 (the only strength
    where core's merge is LyCORIS's). Core's bypass rotates the layers' biases, its merge does not:
    the two images are close, not equal (the distance is printed)."""
    srv = servers["core"]
    base = render(srv)[0]
    merged = render(srv, core("LoraLoaderModelOnly", 1.0))[0]
    bypassed = render(srv, core("LoraLoaderBypassModelOnly", 1.0))[0]
    assert_changed(merged, base, "core's LoraLoader")
    assert_changed(bypassed, base, "core's LoraLoaderBypass")
    diff = np.abs(bypassed - merged)
    print(f"\ncore's own math: bypass vs merge mean |diff| {diff.mean():.3f} max {diff.max()} (of 255)")
    assert diff.mean() <= HOST_ERROR, f"core's bypass vs core's merge: mean |diff| {diff.mean():.3f}"


def test_quantized_models_bypass_is_at_least_as_close_as_merge(servers):
    """A float8 UNet (--fp8_e4m3fn-unet) and a scaled-fp8 checkpoint (QuantizedTensor layers):
    distance of bypass and of merge-into-fp8 from the float32 model with the BOFT merged."""
    reference = render(servers["pack"], ours(1.0, "merge"))[0]
    lines = []
    for label, srv, ckpt in (("fp8_e4m3fn-unet", servers["fp8"], CKPT), ("scaled fp8", servers["pack"], SCALED)):
        bypass, history = render(srv, ours(1.0, "auto"), ckpt)
        assert re.search(r", bypass[,)]", report_of(history)), report_of(history)  # auto: quantized -> bypass
        merge = render(srv, ours(1.0, "merge"), ckpt)[0]
        base = render(srv, None, ckpt)[0]
        assert_changed(bypass, base, f"{label}: bypass")
        err_bypass, err_merge = np.abs(bypass - reference).mean(), np.abs(merge - reference).mean()
        lines.append(f"{label}: mean |image - float32 reference| bypass {err_bypass:.3f}, merge {err_merge:.3f}, "
                     f"max bypass {np.abs(bypass - reference).max()}, merge {np.abs(merge - reference).max()}; "
                     f"unpatched quantized vs float32 unpatched {np.abs(base - render(servers['pack'])[0]).mean():.3f}")
        assert err_bypass <= err_merge, lines[-1]
    print("\n" + "\n".join(lines))
