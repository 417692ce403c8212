"""End to end: BOFT strength scheduled over sampling steps with ComfyUI's hook nodes, over HTTP.

A hook schedule of strength ``a`` for the first two of four euler steps and ``b`` for the last
two (keyframes at 0 % and 40 %: the normal schedule's steps sit at 0, 33, 67, 100 %) must give
the image of two fixed-strength runs chained with KSamplerAdvanced (steps 0-2 with the model
loaded at ``a``, steps 2-4 at ``b``, no new noise). A constant schedule must give the image of
one fixed-strength run. The fixed strengths come from our loader node (its merge is tested
against LyCORIS and PEFT elsewhere). Also: the example hook workflow, loaded by the real front
end and queued as it queues it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tiny_models
from comfy_host import PACK_NAME, REPO_ROOT, ComfyServer
from lycoris_comfy import write_boft
from test_e2e import MEAN_PIXEL_DIFF, SEED, assert_changed, assert_same, front_end_prompt, pixels, run_image
from test_hooks import peft_diffusers_adapter

CKPT = "hooks_sd15.safetensors"
COND = ["cond", 1]  # LoadTrainingDataset's zero conditioning (no CLIP needed)
EXAMPLE = REPO_ROOT / "example_workflows" / "boft_hooks.json"


@pytest.fixture(scope="module")
def server(tmp_path_factory, comfy):
    srv = ComfyServer(tmp_path_factory.mktemp("e2e_hooks"))
    srv.start(wait=False)
    try:
        tiny_models.make_sd15_checkpoint(srv.models / "checkpoints" / CKPT)
        tiny_models.write_zero_conditioning(srv.output_dir)
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def sd15(server):
    return tiny_models.load_checkpoint(server.models / "checkpoints" / CKPT, with_vae=False)[0]


def keyframes(*strength_at) -> dict:
    """CreateHookKeyframe nodes chained: ``(strength, start_percent)`` each; the last is ``kf<n>``."""
    nodes = {}
    for i, (strength, percent) in enumerate(strength_at):
        inputs = {"strength_mult": strength, "start_percent": percent}
        if i:
            inputs["prev_hook_kf"] = [f"kf{i - 1}", 0]
        nodes[f"kf{i}"] = {"class_type": "CreateHookKeyframe", "inputs": inputs}
    return nodes


def base_nodes() -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "cond": {"class_type": "LoadTrainingDataset", "inputs": {"folder_name": tiny_models.ZERO_COND_FOLDER}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "boft_hooks"}},
    }


def sampler(model, positive, latent=("latent", 0), steps=4, **advanced) -> dict:
    inputs = {"model": model, "positive": positive, "negative": positive, "latent_image": list(latent),
              "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal"}
    if not advanced:
        return {"class_type": "KSampler", "inputs": dict(inputs, seed=SEED, denoise=1.0)}
    return {"class_type": "KSamplerAdvanced", "inputs": dict(inputs, noise_seed=SEED, **advanced)}


def hooked(hook: dict, kf_nodes: dict) -> dict:
    """A prompt whose only change to the model is ``hook`` (node ``hook``) on the conditioning,
    with the keyframes ``kf_nodes`` (last one last)."""
    wf = base_nodes()
    wf.update(kf_nodes)
    wf["hook"] = hook
    wf["timed"] = {"class_type": "SetHookKeyframes",
                   "inputs": {"hooks": ["hook", 0], "hook_kf": [list(kf_nodes)[-1], 0]}}
    wf["hcond"] = {"class_type": "ConditioningSetProperties", "inputs": {  # "Cond Set Props"
        "cond_NEW": COND, "strength": 1.0, "set_cond_area": "default", "hooks": ["timed", 0]}}
    wf["sampler"] = sampler(["ckpt", 0], ["hcond", 0])
    return wf


def loaded_at(name: str, strength: float, node_id: str) -> dict:
    return {node_id: {"class_type": "BOFTLoaderModelOnly", "inputs": {
        "model": ["ckpt", 0], "boft_name": name, "strength_model": strength, "mode": "lycoris"}}}


def two_stages(name: str, first: float, second: float) -> dict:
    """Steps 0-2 with the model loaded at ``first``, steps 2-4 at ``second``, as one run."""
    wf = base_nodes()
    wf.update(loaded_at(name, first, "m1"))
    wf.update(loaded_at(name, second, "m2"))
    wf["stage1"] = sampler(["m1", 0], COND, add_noise="enable", start_at_step=0, end_at_step=2,
                           return_with_leftover_noise="enable")
    wf["sampler"] = sampler(["m2", 0], COND, latent=("stage1", 0), add_noise="disable", start_at_step=2,
                            end_at_step=10000, return_with_leftover_noise="disable")
    return wf


def fixed(name: str, strength: float) -> dict:
    wf = base_nodes()
    wf.update(loaded_at(name, strength, "m1"))
    wf["sampler"] = sampler(["m1", 0], COND)
    return wf


def plain() -> dict:
    wf = base_nodes()
    wf["sampler"] = sampler(["ckpt", 0], COND)
    return wf


def assert_schedule_acts(got, first_strength_throughout):
    """The late steps' other strength shows: more than the same-image tolerance (the last two of
    four steps move the image less than the first two, so less than MIN_CHANGE)."""
    change = np.abs(got - first_strength_throughout).mean()
    assert change >= 2 * MEAN_PIXEL_DIFF, f"the schedule changed the image by only {change:.3f} / 255"


def test_core_create_hook_lora_schedule(server, sd15):
    """Core's CreateHookLora with a LyCORIS BOFT (rescale, constraint, fp16): a 1 -> 0.5 schedule
    at strength 0.8 equals fixed 0.8 then fixed 0.4; a constant CreateHookKeyframesInterpolated
    schedule (0.5 at every keyframe) equals fixed 0.4."""
    import torch

    name = "hooks_lycoris.safetensors"
    write_boft(server.models / "loras" / name, sd15.model.diffusion_model, "lora_unet", rescaled=True,
               constraint=0.01, dtype=torch.float16)
    hook = {"class_type": "CreateHookLora", "inputs": {"lora_name": name, "strength_model": 0.8, "strength_clip": 0.0}}
    base = run_image(server, plain())[0]
    got = run_image(server, hooked(hook, keyframes((1.0, 0.0), (0.5, 0.4))))[0]
    want = run_image(server, two_stages(name, 0.8, 0.4))[0]
    assert_same(got, want, "schedule 0.8 -> 0.4")
    assert_changed(got, base, "schedule 0.8 -> 0.4")
    assert_schedule_acts(got, run_image(server, fixed(name, 0.8))[0])

    constant = {"kfi": {"class_type": "CreateHookKeyframesInterpolated", "inputs": {
        "strength_start": 0.5, "strength_end": 0.5, "interpolation": "ease_in_out", "start_percent": 0.0,
        "end_percent": 1.0, "keyframes_count": 5, "print_keyframes": False}}}
    assert_same(run_image(server, hooked(hook, constant))[0], run_image(server, fixed(name, 0.4))[0],
                "constant schedule 0.4")


def test_create_hook_boft_schedule_with_peft_names_and_bias(server, sd15, comfy, peft_factors):
    """A PEFT adapter folder (diffusers names, trained bias): core's CreateHookLora leaves the
    image as it is (its key map has no such names), Create Hook BOFT's 1 -> 2 schedule equals
    fixed 1 then fixed 2, weights and biases."""
    folder = server.models / "loras" / "hooks_peft"
    peft_diffusers_adapter(comfy, sd15, folder, seed=21)
    name = os.path.join("hooks_peft", "adapter_model.safetensors")
    schedule = keyframes((1.0, 0.0), (2.0, 0.4))
    base = run_image(server, plain())[0]
    core = {"class_type": "CreateHookLora", "inputs": {"lora_name": name, "strength_model": 1.0, "strength_clip": 0.0}}
    assert np.array_equal(run_image(server, hooked(core, schedule))[0], base)
    ours = {"class_type": "BOFTCreateHook", "inputs": {"boft_name": name, "strength_model": 1.0,
                                                       "strength_clip": 0.0, "mode": "lycoris"}}
    got = run_image(server, hooked(ours, schedule))[0]
    assert_same(got, run_image(server, two_stages(name, 1.0, 2.0))[0], "schedule 1 -> 2")
    assert_changed(got, base, "schedule 1 -> 2")
    assert_schedule_acts(got, run_image(server, fixed(name, 1.0))[0])


def test_example_hook_workflow_loads_in_the_front_end_and_runs(server, sd15, tmp_path):
    """example_workflows/boft_hooks.json: served as one of the pack's templates; the real front
    end (headless Chromium) loads it and makes the API prompt, which runs on the demo's files
    (a checkpoint with CLIP and a UNet + text-encoder BOFT) and changes the image."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("boft_demo_script", REPO_ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    ckpt = server.models / "checkpoints" / demo.CHECKPOINT
    demo.build_checkpoint(ckpt)
    demo.build_boft(server.models / "loras" / demo.BOFT, ckpt)
    assert "boft_hooks" in server.get("/workflow_templates")[PACK_NAME]
    workflow = server.get(f"/api/workflow_templates/{PACK_NAME}/boft_hooks.json")
    assert workflow == json.loads(EXAMPLE.read_text())

    prompt = front_end_prompt(server, workflow)
    assert prompt == demo.api_prompt(workflow, server.object_info())
    types = {node["class_type"] for node in prompt.values()}
    assert {"BOFTCreateHook", "CreateHookKeyframesInterpolated", "SetHookKeyframes", "SetClipHooks"} <= types
    # smaller and fewer keyframe changes on the CPU: each change re-merges every hooked layer
    # (~25 s for the demo's 51 UNet layers on a busy 2-core machine)
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
        if node["class_type"] == "CreateHookKeyframesInterpolated":
            node["inputs"]["keyframes_count"] = 2
    (png,) = server.image_bytes(server.run(prompt, timeout=900))
    without = json.loads(json.dumps(prompt))
    for node in without.values():
        if node["class_type"] == "BOFTCreateHook":
            node["inputs"].update(strength_model=0.0, strength_clip=0.0)
    assert_changed(pixels(png), run_image(server, without)[0], "the example's hook")
