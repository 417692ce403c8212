"""The real host works: ComfyUI boots, samples the tiny SD1.5 checkpoint, and applies a LoRA."""

import io

import numpy as np
import pytest
import tiny_models
from comfy_host import ComfyError
from PIL import Image

CKPT = "tiny_sd15.safetensors"
LORA = "tiny_sd15_kohya.safetensors"


@pytest.fixture(scope="module")
def server(sd15_server):
    return sd15_server


def lora_patch(strength):
    def patch(model_ref):
        node = {"class_type": "LoraLoaderModelOnly",
                "inputs": {"model": model_ref, "lora_name": LORA, "strength_model": strength}}
        return {"lora": node}, ["lora", 0]
    return patch


def render(server, **kwargs) -> Image.Image:
    history = server.run(tiny_models.sd15_workflow(CKPT, **kwargs))
    (png,) = server.image_bytes(history)
    assert png.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(png)).convert("RGB")


def test_object_info_lists_core_loaders(server):
    info = server.object_info()
    assert "CheckpointLoaderSimple" in info
    assert "LoraLoader" in info


def test_sd15_workflow_renders_an_image(server):
    image = render(server, seed=1)
    assert image.size == (64, 64)
    lo, hi = zip(*image.getextrema(), strict=True)
    assert max(hi) - min(lo) > 64, "image is flat: the tiny model or VAE lost its signal"


def test_kohya_lora_changes_the_image(server):
    names = tiny_models.make_kohya_lora(server.models / "loras" / LORA, server.models / "checkpoints" / CKPT)
    assert len(names) == 6
    base = render(server, seed=2)
    patched = render(server, seed=2, patch_model=lora_patch(1.0))
    change = np.abs(np.asarray(base, dtype=float) - np.asarray(patched, dtype=float)).mean()
    assert change > 1.0, f"LoRA moved pixels by only {change:.3f} / 255 on average"
    # Strength 0 leaves the model alone: the same picture as without the loader.
    assert render(server, seed=2, patch_model=lora_patch(0.0)).tobytes() == base.tobytes()
    assert "lora key not loaded" not in server.log_text()


def test_prompt_through_the_checkpoint_clip(server):
    name = "tiny_sd15_clip.safetensors"
    tiny_models.make_sd15_checkpoint(server.models / "checkpoints" / name, with_clip=True, verify=False)
    history = server.run(tiny_models.sd15_workflow(name, prompt="a photo of a cat"))
    assert len(server.image_bytes(history)) == 1


def test_invalid_prompt_raises_comfy_error(server):
    with pytest.raises(ComfyError) as info:
        server.run(tiny_models.sd15_workflow("no_such_checkpoint.safetensors"))
    assert "ckpt" in info.value.data["node_errors"]
