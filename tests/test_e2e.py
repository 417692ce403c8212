"""End to end: a real ComfyUI over HTTP samples tiny real checkpoints through our loader nodes.

One server for the module. Every adapter is written by the library that defines it (LyCORIS,
PEFT) on ComfyUI's own modules; the oracle is a checkpoint with the weights merged by that
library (or, for LoRA chains, by hand with boft_core), sampled through the plain
CheckpointLoaderSimple. Images must agree within PNG rounding and differ clearly from the
unpatched model. SDXL and Flux key mapping and merges are checked on real ComfyUI models of
those families (Flux in process: its smallest detectable model is 1.5 GB in float32).
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import shutil

import numpy as np
import oracles
import pytest
import tiny_models
import torch
from comfy_host import PACK_NAME, REPO_ROOT, ComfyError, ComfyServer
from lycoris_comfy import CLIP_L_PREFIX, UNET_PREFIX, changed, combine, lycoris_merge, write_boft, write_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file

import boft_core
from boft_core.blocks import parse_block_weights

CKPT = "e2e_sd15.safetensors"
SDXL_COND = "boft_zero_conditioning_sdxl"
SEED = 3
# PNG rounding: the merged checkpoint and the patched model hold the same float32 weights up to
# ~1e-6 relative (LyCORIS/PEFT vs boft_core arithmetic); pixels may then round either way.
MAX_PIXEL_DIFF = 2  # of 255
MEAN_PIXEL_DIFF = 0.05
MIN_CHANGE = 1.0  # mean |difference| (of 255) an adapter must make to count as visible


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory, comfy):
    srv = ComfyServer(tmp_path_factory.mktemp("e2e"))
    srv.start(wait=False)  # boots while this process builds the models
    try:
        tiny_models.make_sd15_checkpoint(srv.models / "checkpoints" / CKPT)
        tiny_models.write_zero_conditioning(srv.output_dir)
        write_sdxl_zero_conditioning(srv.output_dir / SDXL_COND)
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def loras(server, comfy):
    """The server's loras folder, also registered in this process for in-process node calls."""
    import folder_paths

    folder = server.models / "loras"
    folder_paths.add_model_folder_path("loras", str(folder))
    yield folder
    folder_paths.folder_names_and_paths["loras"][0].remove(str(folder))


class Loaded:
    """A checkpoint loaded in this process by ComfyUI (float32 UNet, as the server runs it)."""

    def __init__(self, path, with_clip=False):
        self.path = path
        self.model, self.clip, _ = tiny_models.load_checkpoint(path, with_vae=False, with_clip=with_clip)
        self.unet = self.model.model.diffusion_model
        self.unet_sd = {k: v.detach().float().clone() for k, v in self.unet.state_dict().items()}


@pytest.fixture(scope="module")
def sd15(server):
    return Loaded(server.models / "checkpoints" / CKPT)


def write_sdxl_zero_conditioning(folder):
    """Like tiny_models.write_zero_conditioning, with SDXL's context width and pooled output."""
    folder.mkdir(parents=True, exist_ok=True)
    cond = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    torch.save({"latents": [{"samples": torch.zeros(1, 4, 8, 8)}], "conditioning": [cond]},
               folder / "shard_0000.pkl")


# ------------------------------------------------------------------------------------ workflows
def boft(name, strength, *, node_id="boft", mode="lycoris", constraint=None):
    def patch(model_ref):
        node = {"class_type": "BOFTLoaderModelOnly", "inputs": {
            "model": model_ref, "boft_name": name, "strength_model": strength, "mode": mode}}
        if constraint is not None:
            node["inputs"]["constraint"] = constraint
        return {node_id: node}, [node_id, 0]
    return patch


def lora(name, strength, *, node_id="lora"):
    def patch(model_ref):
        node = {"class_type": "LoraLoaderModelOnly",
                "inputs": {"model": model_ref, "lora_name": name, "strength_model": strength}}
        return {node_id: node}, [node_id, 0]
    return patch


def chain(*patches):
    def patch(model_ref):
        nodes = {}
        for p in patches:
            new, model_ref = p(model_ref)
            nodes.update(new)
        return nodes, model_ref
    return patch


def pixels(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG")
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def run_image(server, workflow) -> tuple[np.ndarray, dict]:
    history = server.run(workflow)
    (png,) = server.image_bytes(history)
    return pixels(png), history


def render(server, ckpt, **kwargs) -> np.ndarray:
    kwargs.setdefault("seed", SEED)
    return run_image(server, tiny_models.sd15_workflow(ckpt, **kwargs))[0]


def assert_same(got, want, what):
    diff = np.abs(got - want)
    assert diff.max() <= MAX_PIXEL_DIFF and diff.mean() <= MEAN_PIXEL_DIFF, (
        f"{what}: max |diff| {diff.max()}, mean {diff.mean():.4f} (of 255)")


def assert_changed(got, base, what):
    change = np.abs(got - base).mean()
    assert change >= MIN_CHANGE, f"{what}: the adapter moved pixels by only {change:.3f} / 255 on average"


# ------------------------------------------------------------------------------------ SD1.5
def test_lycoris_boft_equals_lycoris_merged_checkpoint(server, sd15, loras):
    """CheckpointLoaderSimple -> BOFTLoaderModelOnly -> KSampler == LyCORIS's merge_to(s), s = 1, 0.5."""
    name = "e2e_lycoris.safetensors"
    # every Linear/Conv of the UNet (51 layers), fp16 file, rescale and a constraint that clips
    write_boft(loras / name, sd15.unet, "lora_unet", rescaled=True, constraint=0.01, dtype=torch.float16)
    base = render(server, CKPT)
    assert np.array_equal(render(server, CKPT, patch_model=boft(name, 0.0)), base), "strength 0 changed the image"
    for strength in (1.0, 0.5):
        merged = lycoris_merge(loras / name, sd15.unet, "lora_unet", strength)
        ckpt = f"e2e_lycoris_merged_{strength}.safetensors"
        replaced = changed(sd15.unet_sd, merged, UNET_PREFIX)
        assert len(replaced) >= 51
        write_checkpoint(sd15.path, server.models / "checkpoints" / ckpt, replaced)
        got = render(server, CKPT, patch_model=boft(name, strength))
        assert_same(got, render(server, ckpt), f"LyCORIS s={strength}")
        assert_changed(got, base, f"LyCORIS s={strength}")


def test_replacing_a_file_under_the_same_name_re_runs_the_node(server, sd15, loras):
    """The same prompt after the file behind ``boft_name`` was replaced gives the new file's image
    (IS_CHANGED is the file's identity on disk), not ComfyUI's cached output of the old one."""
    name, other = "e2e_replaced.safetensors", "e2e_replacement.safetensors"
    first = write_boft(loras / name, sd15.unet, "lora_unet", constraint=0.01, seed=5)
    # a different rotation: the negated generators (LyCORIS's blocks are free parameters)
    save_file({k: (-v if k.endswith("oft_blocks") else v) for k, v in first.items()}, str(loras / other))
    before = render(server, CKPT, patch_model=boft(name, 1.0))
    want = render(server, CKPT, patch_model=boft(other, 1.0))
    assert_changed(want, before, "the replacement file")
    os.replace(loras / other, loras / name)  # same name, new contents
    assert_same(render(server, CKPT, patch_model=boft(name, 1.0)), want, "after replacing the file")


def test_peft_boft_equals_peft_merged_checkpoint(server, sd15, loras, comfy, tmp_path, peft_factors):
    """A PEFT BOFT (2 butterfly factors, diffusers layer names, as PEFT on a diffusers UNet writes
    them) == PEFT's own merge_and_unload."""
    from peft import BOFTConfig, get_peft_model

    config = BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in"])
    peft_model = get_peft_model(copy.deepcopy(sd15.unet).float(), config)
    oracles.randomize(peft_model, ("boft_R.default", "boft_s.default"), 7, std=0.1)
    saved = tmp_path / "peft_ldm"
    peft_model.save_pretrained(str(saved))
    merged = oracles.peft_merged(peft_model)
    # ComfyUI's UNet has ldm module paths; a diffusers-trained adapter names the same layers
    # by diffusers paths (new attention naming, attn1.to_q): rename with ComfyUI's own table.
    folder = loras / "e2e_peft"
    renamed = oracles.peft_folder_renamed(saved, folder, tiny_models.diffusers_paths(sd15.model))
    assert any(".attn1.to_q.boft_R" in k for k in renamed) and any("ff.net.2" in k for k in renamed)
    assert load_file(str(folder / "adapter_model.safetensors"))[next(iter(renamed))].shape[0] == 2  # factors

    ckpt = "e2e_peft_merged.safetensors"
    replaced = changed(sd15.unet_sd, {k: v for k, v in merged.items() if k in sd15.unet_sd}, UNET_PREFIX)
    assert len(replaced) == len(renamed) // 2
    write_checkpoint(sd15.path, server.models / "checkpoints" / ckpt, replaced)
    got = render(server, CKPT, patch_model=boft("e2e_peft/adapter_model.safetensors", 1.0))
    assert_same(got, render(server, ckpt), "PEFT")
    assert_changed(got, render(server, CKPT), "PEFT")


def test_boft_loader_with_real_clip_and_prompt(server, loras, tmp_path):
    """BOFTLoader on a checkpoint with a real CLIP-L: UNet and text-encoder layers, separate
    strengths, a prompt; == the checkpoint LyCORIS merged (UNet at 0.8, text encoder at 0.5)."""
    ckpt = server.models / "checkpoints" / "e2e_sd15_clip.safetensors"
    tiny_models.make_sd15_checkpoint(ckpt, seed=1, with_clip=True, verify=False)
    loaded = Loaded(ckpt, with_clip=True)
    te = loaded.clip.cond_stage_model.clip_l.transformer  # ComfyUI's CLIPTextModel (has .text_model)
    te_sd = {k: v.detach().float().clone() for k, v in te.state_dict().items()}
    unet_part = tmp_path / "unet.safetensors"
    te_part = tmp_path / "te.safetensors"
    write_boft(unet_part, loaded.unet, "lora_unet", ("*.attn1.to_q", "*.attn1.to_out.0", "*.ff.net.2", "*.proj_out"),
               rescaled=True, dtype=torch.float16)
    te_keys = write_boft(te_part, te, "lora_te", ("text_model.encoder.layers.*.self_attn.q_proj",
                                                   "text_model.encoder.layers.*.self_attn.v_proj",
                                                   "text_model.encoder.layers.*.mlp.fc2"), dtype=torch.float16)
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2.oft_blocks" in te_keys
    name = "e2e_clip_boft.safetensors"
    combine(loras / name, unet_part, te_part)
    s_model, s_clip = 0.8, 0.5
    replaced = changed(loaded.unet_sd, lycoris_merge(loras / name, loaded.unet, "lora_unet", s_model), UNET_PREFIX)
    te_replaced = changed(te_sd, lycoris_merge(loras / name, te, "lora_te", s_clip), CLIP_L_PREFIX)
    assert len(replaced) == 12 and len(te_replaced) == 36
    merged = "e2e_sd15_clip_merged.safetensors"
    write_checkpoint(ckpt, server.models / "checkpoints" / merged, replaced | te_replaced)

    prompt = "a photo of a cat"

    def with_clip(strength_clip):
        def patch(model_ref):
            node = {"class_type": "BOFTLoader", "inputs": {
                "model": model_ref, "clip": ["ckpt", 1], "boft_name": name, "strength_model": s_model,
                "strength_clip": strength_clip, "mode": "lycoris"}}
            return {"boft": node}, ["boft", 0]
        workflow = tiny_models.sd15_workflow(ckpt.name, prompt=prompt, patch_model=patch, seed=SEED)
        workflow["positive"]["inputs"]["clip"] = ["boft", 1]  # outputs: 0 MODEL, 1 CLIP
        return run_image(server, workflow)[0]

    got = with_clip(s_clip)
    assert_same(got, render(server, merged, prompt=prompt), "BOFTLoader with CLIP")
    assert_changed(got, render(server, ckpt.name, prompt=prompt), "BOFTLoader with CLIP")
    assert_changed(got, with_clip(0.0), "text-encoder part")  # so the CLIP merge is what matched


def test_lora_before_and_after_boft(server, sd15, loras, comfy):
    """LoraLoaderModelOnly before / after BOFTLoaderModelOnly == B(W + dW) / B W + dW, by hand."""
    lora_name, boft_name = "e2e_chain_lora.safetensors", "e2e_chain_boft.safetensors"
    lora_layers = tiny_models.make_kohya_lora(loras / lora_name, sd15.path, std=0.25)  # attn1 to_q/to_v
    write_boft(loras / boft_name, sd15.unet, "lora_unet", rescaled=True, dtype=torch.float16)
    adapter = boft_core.load(str(loras / boft_name))
    lora_sd = load_file(str(loras / lora_name))
    key_map = comfy.lora.model_lora_keys_unet(sd15.model.model, {})
    s_lora, s_boft = 0.6, 0.8

    def delta(name):
        up, down = lora_sd[f"{name}.lora_up.weight"].double(), lora_sd[f"{name}.lora_down.weight"].double()
        return s_lora * float(lora_sd[f"{name}.alpha"]) / down.shape[0] * (up @ down)

    deltas = {key_map[name][len("diffusion_model."):]: delta(name) for name in lora_layers}
    layers = {key_map[name][len("diffusion_model."):]: layer for name, layer in adapter.layers.items()}
    assert set(deltas) <= set(layers)
    lora_first, boft_first = {}, {}
    for key, layer in layers.items():
        w = sd15.unet_sd[key].double()
        d = deltas.get(key, torch.zeros_like(w))
        lora_first[UNET_PREFIX + key] = boft_core.merge_weight(w + d, layer, s_boft)
        boft_first[UNET_PREFIX + key] = boft_core.merge_weight(w, layer, s_boft) + d
    write_checkpoint(sd15.path, server.models / "checkpoints" / "e2e_lora_first.safetensors", lora_first)
    write_checkpoint(sd15.path, server.models / "checkpoints" / "e2e_boft_first.safetensors", boft_first)

    got_a = render(server, CKPT, patch_model=chain(lora(lora_name, s_lora), boft(boft_name, s_boft)))
    got_b = render(server, CKPT, patch_model=chain(boft(boft_name, s_boft), lora(lora_name, s_lora)))
    assert_same(got_a, render(server, "e2e_lora_first.safetensors"), "LoRA then BOFT")
    assert_same(got_b, render(server, "e2e_boft_first.safetensors"), "BOFT then LoRA")
    assert_changed(got_a, render(server, CKPT, patch_model=boft(boft_name, s_boft)), "the LoRA in the chain")
    assert_changed(got_a, got_b, "the order of the chain")
    assert "lora key not loaded" not in server.log_text()


def test_block_weights_equal_a_checkpoint_merged_per_block(server, sd15, loras):
    """BOFTLoaderModelOnly with block_weights == the checkpoint where LyCORIS merged each layer at
    strength x its block's weight (a block at weight 0 keeps its weights)."""
    name = "e2e_blocks.safetensors"
    write_boft(loras / name, sd15.unet, "lora_unet", rescaled=True, constraint=0.01, seed=12)
    adapter = boft_core.load(str(loras / name))
    strength, text = 0.8, "IN:0.5, OUT01:0, default:1.25"
    weights = parse_block_weights(text, "sd1")
    merged = {w: lycoris_merge(loras / name, sd15.unet, "lora_unet", strength * w) for w in (0.5, 1.25)}
    replaced, used = {}, set()
    for key in sd15.unet_sd:
        layer = "lora_unet_" + key.rsplit(".", 1)[0].replace(".", "_")
        if key.endswith(".weight") and layer in adapter.layers:
            w = weights.weight(layer)
            used.add(w)
            if w:
                replaced[UNET_PREFIX + key] = merged[w][key]
    assert used == {0.0, 0.5, 1.25}, used
    write_checkpoint(sd15.path, server.models / "checkpoints" / "e2e_blocks_merged.safetensors", replaced)

    def patch(model_ref):
        node = {"class_type": "BOFTLoaderModelOnly", "inputs": {
            "model": model_ref, "boft_name": name, "strength_model": strength, "mode": "lycoris",
            "block_weights": text}}
        return {"boft": node}, ["boft", 0]

    got, history = run_image(server, tiny_models.sd15_workflow(CKPT, seed=SEED, patch_model=patch))
    assert_same(got, render(server, "e2e_blocks_merged.safetensors"), "block_weights")
    assert_changed(got, render(server, CKPT, patch_model=boft(name, strength)), "block_weights")
    with pytest.raises(ComfyError) as info:  # a vector of SDXL's length on an SD1.5 model
        server.run(tiny_models.sd15_workflow(CKPT, seed=SEED, patch_model=lambda ref: (
            {"boft": {"class_type": "BOFTLoaderModelOnly", "inputs": {
                "model": ref, "boft_name": name, "strength_model": 1.0, "mode": "lycoris",
                "block_weights": ",".join(["1"] * 12)}}}, ["boft", 0])))
    message = info.value.data["exception_message"]
    assert "12 values. For SD1.x/SD2.x models it accepts" in message and "17 or 26" in message, message


# The front end's startup registers node types and loads its own workflow after our extension is
# registered: a graph loaded before that has unknown nodes or is replaced (an empty prompt, seen on
# a busy 2-core machine). So load once every type is registered, and take the prompt only when the
# graph still holds exactly the workflow's nodes a second later; else load again.
LOAD_AND_PROMPT = """async (wf) => {
    const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
    const ids = (nodes) => JSON.stringify(nodes.map((n) => `${n.id}:${n.type}`).sort());
    const want = ids(wf.nodes);
    for (let attempt = 0; attempt < 60; attempt++) {
        if (wf.nodes.every((n) => LiteGraph.registered_node_types[n.type])) {
            await app.loadGraphData(wf);
            await sleep(1000);
            if (ids(app.graph.nodes) === want) return (await app.graphToPrompt()).output;
        } else {
            await sleep(1000);
        }
    }
    throw new Error(`the front end did not keep the workflow's nodes: ${ids(app.graph.nodes)}`);
}"""


def front_end_prompt(server, workflow: dict) -> dict:
    """The API prompt the real front end (headless Chromium) queues for a UI-format ``workflow``,
    without the front end's ``_meta`` titles."""
    chromium = shutil.which(os.environ.get("BOFT_CHROMIUM") or "chromium")
    if chromium is None:
        pytest.fail("no Chromium (Debian package 'chromium'); run scripts/setup.sh")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(server.url)
            page.wait_for_function("() => window.app?.graph && app.extensions?.some((e) => e.name.startsWith("
                                   "'comfyui-boft'))", timeout=90_000)
            prompt = page.evaluate(LOAD_AND_PROMPT, workflow)
        finally:
            browser.close()
    return {node_id: {k: v for k, v in node.items() if k != "_meta"} for node_id, node in prompt.items()}


def test_example_workflow_is_served_and_runs_as_the_front_end_would(server):
    """example_workflows/boft_demo.json is a UI-format template ComfyUI serves for this pack; the
    real front end (headless Chromium) loads it and queues exactly the API prompt that the demo's
    converter makes (the demo runs that prompt: tests/test_demo.py)."""
    spec = importlib.util.spec_from_file_location("boft_demo_script", REPO_ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert "boft_demo" in server.get("/workflow_templates")[PACK_NAME]
    workflow = server.get(f"/api/workflow_templates/{PACK_NAME}/boft_demo.json")
    assert workflow == json.loads(demo.WORKFLOW.read_text())
    prompt = demo.api_prompt(workflow, server.object_info())
    assert prompt["2"] == {"class_type": "BOFTLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "boft_name": demo.BOFT, "strength_model": 1.0,
        "strength_clip": 1.0, "mode": "lycoris", "block_weights": "", "apply": "auto", "constraint": "auto"}}
    assert prompt["3"]["inputs"]["clip"] == ["2", 1] and prompt["6"]["inputs"]["model"] == ["2", 0]

    assert front_end_prompt(server, workflow) == prompt


# ------------------------------------------------------------------------------------ bad input
def test_bad_files_fail_with_our_message_and_leave_the_model_alone(server, sd15, loras):
    good = "e2e_good.safetensors"
    write_boft(loras / good, sd15.unet, "lora_unet", ("*.attn1.to_q", "*.attn1.to_v"), seed=11)
    plain_wf = tiny_models.sd15_workflow(CKPT, seed=SEED + 1)
    good_wf = tiny_models.sd15_workflow(CKPT, seed=SEED + 1, patch_model=boft(good, 1.0))
    plain_before, _ = run_image(server, plain_wf)
    good_before, _ = run_image(server, good_wf)
    assert_changed(good_before, plain_before, "the good BOFT")

    flux = "e2e_bad_flux_named.safetensors"
    save_file({"lycoris_double_blocks_0_img_attn_qkv.oft_blocks": torch.randn(2, 2, 4, 4) * 0.01,
               "lycoris_double_blocks_0_img_attn_qkv.alpha": torch.tensor(0.0)}, str(loras / flux))
    truncated = "e2e_bad_truncated.safetensors"
    data = (loras / good).read_bytes()
    (loras / truncated).write_bytes(data[: len(data) // 2])
    plain_lora = "e2e_bad_plain_lora.safetensors"
    tiny_models.make_kohya_lora(loras / plain_lora, sd15.path)
    cases = {
        flux: r"likely belongs to another base model: its layer names suggest Flux",
        truncated: "truncated",
        plain_lora: "is a LoRA (lora_up/lora_down)",
    }
    for name, message in cases.items():
        with pytest.raises(ComfyError) as info:
            server.run(tiny_models.sd15_workflow(CKPT, seed=SEED + 1, patch_model=boft(name, 1.0)))
        error = info.value.data
        assert error.get("node_type") == "BOFTLoaderModelOnly", error
        assert message in error["exception_message"] and name in error["exception_message"], error
        assert "Traceback" not in error["exception_message"]
        assert server.get("/system_stats")["system"]["comfyui_version"]

    # The checkpoint loader's cached MODEL (the bad nodes' input) is unchanged: both pictures
    # come out as before, computed anew (the sampler is not served from ComfyUI's cache).
    for workflow, before in ((plain_wf, plain_before), (good_wf, good_before)):
        after, history = run_image(server, workflow)
        assert np.array_equal(after, before)
        (cached,) = [m["nodes"] for event, m in history["status"]["messages"] if event == "execution_cached"]
        assert "ckpt" in cached and "sampler" not in cached, cached


# ------------------------------------------------------------------------------------ SDXL, Flux
def patched_weights(comfy, patcher, keys=None) -> dict[str, torch.Tensor]:
    """The weights ComfyUI computes for a patched model (a full load, as on --cpu), by key."""
    comfy.model_management.load_models_gpu([patcher])
    try:
        sd = patcher.model.diffusion_model.state_dict()
        return {k: v.detach().float().clone() for k, v in sd.items() if keys is None or k in keys}
    finally:
        patcher.unpatch_model(patcher.offload_device)
        comfy.model_management.unload_all_models()


def rel_error(got, want, base) -> float:
    return ((got.double() - want.double()).norm() / (want.double() - base.double()).norm()).item()


# kohya sd-scripts SDXL names are SGM (ldm) paths; LyCORIS on a diffusers UNet writes diffusers paths.
SDXL_SGM_LAYERS = ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.ff.net.2",
                   "input_blocks.7.1.transformer_blocks.1.attn1.to_out.0", "output_blocks.3.1.proj_out")
SDXL_DIFFUSERS_LAYERS = ("input_blocks.5.1.transformer_blocks.0.attn1.to_k",
                         "output_blocks.1.1.transformer_blocks.1.ff.net.0.proj")


def test_sdxl_sgm_and_diffusers_names(server, loras, comfy, pack, tmp_path):
    """Two LyCORIS BOFT files on a real SDXL-family model (Segmind Vega layout): kohya SGM names
    (lora_unet_input_blocks_4_1_...) and diffusers names (lycoris_down_blocks_1_attentions_1_...).
    In process: exactly those layers change, each as LyCORIS merges it. Over HTTP: the image
    equals the LyCORIS-merged checkpoint's."""
    ckpt = server.models / "checkpoints" / "e2e_sdxl.safetensors"
    tiny_models.make_sdxl_unet_checkpoint(ckpt, verify=False)
    sdxl = Loaded(ckpt)
    assert type(sdxl.model.model.model_config).__name__ == "Segmind_Vega"
    sgm = loras / "e2e_sdxl_sgm.safetensors"
    assert len(write_boft(sgm, sdxl.unet, "lora_unet", SDXL_SGM_LAYERS, rescaled=True)) == 3 * 4
    ldm_named = tmp_path / "sdxl_ldm_named.safetensors"
    write_boft(ldm_named, sdxl.unet, "lycoris", SDXL_DIFFUSERS_LAYERS, seed=4)
    to_diffusers = tiny_models.diffusers_paths(sdxl.model)
    renames = {"lycoris_" + p.replace(".", "_"): "lycoris_" + to_diffusers[p].replace(".", "_")
               for p in SDXL_DIFFUSERS_LAYERS}
    diffusers = loras / "e2e_sdxl_diffusers.safetensors"
    tensors = {}
    for key, value in load_file(str(ldm_named)).items():
        layer, suffix = key.split(".", 1)
        tensors[f"{renames[layer]}.{suffix}"] = value
    assert "lycoris_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_k.oft_blocks" in tensors
    save_file(tensors, str(diffusers))

    strength = 0.5
    merged = changed(sdxl.unet_sd, lycoris_merge(sgm, sdxl.unet, "lora_unet", strength))
    merged_b = changed(sdxl.unet_sd, lycoris_merge(ldm_named, sdxl.unet, "lycoris", strength))
    assert len(merged) == 4 and len(merged_b) == 2 and not merged.keys() & merged_b.keys()
    merged.update(merged_b)

    node = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]()
    first = node.load_boft(sdxl.model, sgm.name, strength, "lycoris")
    second = node.load_boft(first["result"][0], diffusers.name, strength, "lycoris")
    assert "applied 4 of 4" in first["ui"]["boft_report"][0]
    assert "applied 2 of 2" in second["ui"]["boft_report"][0]
    got = patched_weights(comfy, second["result"][0])
    for key, base in sdxl.unet_sd.items():
        if key in merged:
            assert rel_error(got[key], merged[key], base) < 1e-5, key
        else:
            assert torch.equal(got[key], base), f"{key} changed but no layer maps to it"

    write_checkpoint(ckpt, server.models / "checkpoints" / "e2e_sdxl_merged.safetensors",
                     {UNET_PREFIX + k: v for k, v in merged.items()})
    patches = chain(boft(sgm.name, strength, node_id="boft_sgm"), boft(diffusers.name, strength, node_id="boft_diff"))
    image = render(server, ckpt.name, cond_folder=SDXL_COND, patch_model=patches)
    assert_same(image, render(server, "e2e_sdxl_merged.safetensors", cond_folder=SDXL_COND), "SDXL")
    assert_changed(image, render(server, ckpt.name, cond_folder=SDXL_COND), "SDXL")


def module_tree(layers: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """A module whose named_modules() holds each layer at its dotted path (diffusers names)."""
    root = torch.nn.Module()
    for path, layer in layers.items():
        *parents, leaf = path.split(".")
        node = root
        for part in parents:
            if part not in node._modules:
                node.add_module(part, torch.nn.Module())
            node = node._modules[part]
        node.add_module(leaf, layer)
    return root


def linear_from(weight, bias) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], device="meta")
    layer.weight = torch.nn.Parameter(weight.clone())
    layer.bias = torch.nn.Parameter(bias.clone())
    return layer


def test_flux_diffusers_names_patch_row_slices_of_fused_qkv(comfy, pack, loras, tmp_path, peft_factors):
    """Flux fuses q, k, v into one qkv weight; ComfyUI maps diffusers names to row slices of it
    (offset patches). A LyCORIS file (lycoris_transformer_blocks_0_attn_to_q, add_k_proj) and a
    kohya-style boft_R file (transformer.transformer_blocks.0.attn.to_v): exactly those rows
    change, as LyCORIS / PEFT merge them and as boft_core.merge_weight does on the slice;
    every other row and the biases stay bit-identical."""
    from peft import BOFTConfig, get_peft_model

    path = tiny_models.make_flux_checkpoint(tmp_path / "flux.safetensors", verify=False)
    patcher = comfy.sd.load_diffusion_model(str(path))
    img_key, txt_key = (f"double_blocks.0.{part}.qkv.weight" for part in ("img_attn", "txt_attn"))
    sd = patcher.model.diffusion_model.state_dict()
    base = {k: sd[k].detach().float().clone() for k in (img_key, txt_key)}
    bias = {k: sd[k.replace("weight", "bias")].detach().float().clone() for k in base}
    n = 3072
    rows = {"q": slice(0, n), "k": slice(n, 2 * n), "v": slice(2 * n, 3 * n)}

    def stand_in(key, part):
        return linear_from(base[key][rows[part]], bias[key][rows[part]])

    lycoris_tree = module_tree({"transformer_blocks.0.attn.to_q": stand_in(img_key, "q"),
                                "transformer_blocks.0.attn.add_k_proj": stand_in(txt_key, "k")})
    lyco = loras / "e2e_flux_lycoris.safetensors"
    assert len(write_boft(lyco, lycoris_tree, "lycoris", dtype=torch.bfloat16)) == 2 * 2
    s_lyco = 0.5
    lyco_merged = lycoris_merge(lyco, lycoris_tree, "lycoris", s_lyco)

    peft_model = get_peft_model(module_tree({"transformer.transformer_blocks.0.attn.to_v": stand_in(img_key, "v")}),
                                BOFTConfig(boft_block_size=12, boft_n_butterfly_factor=2, target_modules=["to_v"]))
    oracles.randomize(peft_model, ("boft_R.default", "boft_s.default"), 9, std=0.1)
    peft_merged = oracles.peft_merged(peft_model)["transformer.transformer_blocks.0.attn.to_v.weight"]
    peft_model.save_pretrained(str(tmp_path / "peft"))
    kohya = loras / "e2e_flux_kohya.safetensors"
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    save_file({k[len("base_model.model."):]: v for k, v in tensors.items()}, str(kohya),
              {"ss_network_module": "networks.boft"})
    assert "transformer.transformer_blocks.0.attn.to_v.boft_R" in load_file(str(kohya))

    node = pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]()
    first = node.load_boft(patcher, lyco.name, s_lyco, "lycoris")
    second = node.load_boft(first["result"][0], kohya.name, 1.0, "lycoris")
    assert "applied 2 of 2" in first["ui"]["boft_report"][0]
    assert "(kohya-boft, lycoris, merge): applied 1 of 1" in second["ui"]["boft_report"][0]
    patched = second["result"][0]
    assert set(patched.patches) == {"diffusion_model." + img_key, "diffusion_model." + txt_key}
    got = patched_weights(comfy, patched, {*base, *(k.replace("weight", "bias") for k in base)})

    adapters = {**boft_core.load(str(lyco)).layers, **boft_core.load(str(kohya)).layers}
    expected = {  # (weight key, rows): (the library's merge of the slice, the file's layer, strength)
        (img_key, "q"): (lyco_merged["transformer_blocks.0.attn.to_q.weight"],
                         adapters["lycoris_transformer_blocks_0_attn_to_q"], s_lyco),
        (txt_key, "k"): (lyco_merged["transformer_blocks.0.attn.add_k_proj.weight"],
                         adapters["lycoris_transformer_blocks_0_attn_add_k_proj"], s_lyco),
        (img_key, "v"): (peft_merged, adapters["transformer.transformer_blocks.0.attn.to_v"], 1.0),
    }
    for key in base:
        for part, sl in rows.items():
            old, new = base[key][sl], got[key][sl]
            if (key, part) in expected:
                oracle, layer, strength = expected[key, part]
                assert rel_error(new, oracle, old) < 1e-5, (key, part)
                assert rel_error(new, boft_core.merge_weight(old, layer, strength), old) < 1e-6, (key, part)
            else:
                assert torch.equal(new, old), f"{key} rows {part} changed"
        assert torch.equal(got[key.replace("weight", "bias")], bias[key])


# ------------------------------------------------------------------------ the OFT family (issue 11)
def test_peft_oftv2_equals_peft_merged_checkpoint(server, sd15, loras, comfy, tmp_path):
    """A PEFT >= 0.16 OFTv2 folder (oft_R, Cayley-Neumann; attention Linears and the 1x1 Conv2d
    proj_in, diffusers names) through BOFTLoaderModelOnly == PEFT's own merge_and_unload."""
    from peft import OFTConfig, get_peft_model

    config = OFTConfig(oft_block_size=8, r=0, target_modules=["to_q", "to_v", "to_out.0", "ff.net.2", "proj_in"])
    peft_model = get_peft_model(copy.deepcopy(sd15.unet).float(), config)
    oracles.randomize(peft_model, ("oft_R.default.weight",), 11, std=0.1)
    saved = tmp_path / "peft_oft"
    peft_model.save_pretrained(str(saved))
    merged = oracles.peft_merged(peft_model)
    renamed = oracles.peft_folder_renamed(saved, loras / "e2e_peft_oft", tiny_models.diffusers_paths(sd15.model))
    assert any(".attn1.to_q.oft_R.weight" in k for k in renamed) and any("proj_in.oft_R" in k for k in renamed)

    ckpt = "e2e_peft_oft_merged.safetensors"
    replaced = changed(sd15.unet_sd, {k: v for k, v in merged.items() if k in sd15.unet_sd}, UNET_PREFIX)
    assert len(replaced) == len(renamed)
    write_checkpoint(sd15.path, server.models / "checkpoints" / ckpt, replaced)
    got, history = run_image(server, tiny_models.sd15_workflow(
        CKPT, seed=SEED, patch_model=boft("e2e_peft_oft/adapter_model.safetensors", 1.0)))
    assert_same(got, render(server, ckpt), "PEFT OFTv2")
    assert_changed(got, render(server, CKPT), "PEFT OFTv2")


def test_comfyui_trained_oft_constraint_rule(server, sd15, loras, tmp_path):
    """A ComfyUI-trained OFT file (diffusion_model.<path>.oft_blocks + alpha 1.0, no metadata):
    constraint auto == a checkpoint merged by a float64 reference of ComfyUI's rule (‖Q‖ <= alpha);
    constraint lycoris (‖Q‖ <= alpha·out_dim) gives another picture."""
    from test_oft import clamp, exact_cayley, output_side_transposed

    g = torch.Generator().manual_seed(12)
    targets = [k[: -len(".weight")] for k in sd15.unet_sd
               if k.endswith((".attn1.to_q.weight", ".attn2.to_out.0.weight", ".ff.net.2.weight"))]
    tensors, replaced = {}, {}
    for path in targets:
        w = sd15.unet_sd[f"{path}.weight"]
        blocks = torch.randn(w.shape[0] // 16, 16, 16, generator=g) * 0.3
        tensors[f"diffusion_model.{path}.oft_blocks"] = blocks
        tensors[f"diffusion_model.{path}.alpha"] = torch.tensor(1.0)
        q = blocks.double() - blocks.double().transpose(1, 2)
        assert q.norm() > 1  # the rules differ
        replaced[f"{UNET_PREFIX}{path}.weight"] = output_side_transposed(w, exact_cayley(clamp(q, 1.0))).float()
    name = "e2e_comfyui_oft.safetensors"
    save_file(tensors, str(loras / name))
    ckpt = "e2e_comfyui_oft_merged.safetensors"
    write_checkpoint(sd15.path, server.models / "checkpoints" / ckpt, replaced)
    got, history = run_image(server, tiny_models.sd15_workflow(CKPT, seed=SEED, patch_model=boft(name, 1.0)))
    assert_same(got, render(server, ckpt), "ComfyUI-trained OFT, constraint auto")
    assert_changed(got, render(server, CKPT), "ComfyUI-trained OFT")
    report = json.dumps(history)
    assert "comfyui-oft" in report and "constraint rule comfyui" in report
    forced = render(server, CKPT, patch_model=boft(name, 1.0, constraint="lycoris"))
    assert_changed(forced, got, "constraint lycoris vs comfyui")
