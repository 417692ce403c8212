"""The BOFT demo: a real ComfyUI with this pack, a tiny demo model, one workflow before and after.

1. Makes (once) a tiny SD1.5 checkpoint with a full random CLIP-L, built with ComfyUI's own
   classes (tests/tiny_models.py), and a BOFT for its UNet and text encoder written by
   LyCORIS's own code (tests/lycoris_comfy.py), under .demo/ (ignored by git).
2. Boots ComfyUI on a free port with this repository linked as a custom node.
3. Runs example_workflows/boft_demo.json (the UI-format workflow users load in ComfyUI),
   converted to an API prompt, through POST /prompt at BOFT strength 0 (before) and 1 (after).
4. Writes .demo/out/before.png and after.png, prints their paths and the UI's URL, and keeps
   the server running until Ctrl-C (--no-wait: stop and exit right away).

The model is random, so the pictures are abstract; the point is that they differ exactly by
the BOFT. Run it through scripts/demo.sh, which sets up the environment first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:  # the project's model builders and server harness
    sys.path.insert(0, str(REPO / "tests"))

WORKFLOW = REPO / "example_workflows" / "boft_demo.json"
CHECKPOINT = "boft_demo_sd15.safetensors"
BOFT = "boft_demo.safetensors"
# what the demo BOFT adapts: every Linear/Conv of the UNet, q/v projections of the text encoder
TE_TARGETS = ("text_model.encoder.layers.*.self_attn.q_proj", "text_model.encoder.layers.*.self_attn.v_proj")
TAGS = {"demo": {"boft demo": 4, "butterfly": 2}}  # kohya's ss_tag_frequency: the trigger_words output
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[demo {time.monotonic() - STARTED:5.1f}s] {message}", flush=True)


# ------------------------------------------------------------------------------------- models
def build_checkpoint(path: Path) -> None:
    import tiny_models

    tmp = path.with_suffix(".partial")
    tiny_models.make_sd15_checkpoint(tmp, seed=0, with_clip=True, verify=False)
    tmp.replace(path)


def build_boft(path: Path, checkpoint: Path) -> None:
    """A BOFT for the demo checkpoint's UNet (lora_unet_...) and text encoder (lora_te_...)."""
    import tiny_models
    import torch
    from lycoris_comfy import combine, write_boft

    model, clip, _ = tiny_models.load_checkpoint(checkpoint, with_vae=False, with_clip=True)
    with tempfile.TemporaryDirectory() as tmp:
        unet = Path(tmp) / "unet.safetensors"
        te = Path(tmp) / "te.safetensors"
        write_boft(unet, model.model.diffusion_model, "lora_unet", rescaled=True, dtype=torch.float16, seed=1)
        write_boft(te, clip.cond_stage_model.clip_l.transformer, "lora_te", TE_TARGETS, dtype=torch.float16, seed=2)
        partial = path.with_suffix(".partial")
        combine(partial, unet, te, metadata={"ss_tag_frequency": json.dumps(TAGS)})
        partial.replace(path)


# ----------------------------------------------------------------------------------- workflow
def api_prompt(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt for a UI-format workflow (what the front end sends on Queue).

    Widget values are matched to the node's inputs in the order /object_info lists them; an
    INT with control_after_generate (a seed) carries one extra value ("fixed", ...) after it.
    Front-end-only nodes (notes) are skipped; muted or bypassed nodes are not supported.
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if info is None:
            if "Note" in node["type"]:
                continue
            raise ValueError(f"node {node['id']}: ComfyUI has no node type {node['type']!r}")
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']} ({node['type']}) is muted or bypassed; unmute it")
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = iter(node.get("widgets_values") or [])
        optional = info["input"].get("optional", {})
        spec = {**info["input"].get("required", {}), **optional}
        inputs = {}
        for name, (kind, *rest) in spec.items():
            options = rest[0] if rest else {}
            widget = isinstance(kind, list) or kind in WIDGET_TYPES
            if widget:
                try:
                    value = next(values)
                except StopIteration:
                    if name not in optional:
                        raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name!r}") from None
                    value = options.get("default", "")  # saved before the input existed: its default
                if options.get("control_after_generate"):
                    next(values, None)
            if name in linked:
                _, source, slot, *_ = linked[name]
                inputs[name] = [str(source), slot]
            elif widget:
                inputs[name] = value
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def queue(server, prompt: dict, workflow: dict) -> str:
    """POST /prompt with the UI workflow in the PNG metadata, so a saved image opens the graph."""
    body = {"prompt": prompt, "client_id": server.client_id, "extra_data": {"extra_pnginfo": {"workflow": workflow}}}
    request = urllib.request.Request(server.url + "/prompt", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["prompt_id"]


def render(server, prompt: dict, workflow: dict, strength: float) -> tuple[bytes, str]:
    from comfy_host import ComfyError

    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        if node["class_type"] in ("BOFTLoader", "BOFTLoaderModelOnly"):
            node["inputs"]["strength_model"] = strength
            if "strength_clip" in node["inputs"]:
                node["inputs"]["strength_clip"] = strength
    entry = server.wait(queue(server, prompt, workflow), timeout=300)
    status = entry.get("status", {})
    if status.get("status_str") != "success":
        errors = [data for event, data in status.get("messages", []) if event == "execution_error"]
        raise ComfyError("the demo workflow failed", errors[0] if errors else status)
    (png,) = server.image_bytes(entry)
    reports = [r for out in entry.get("outputs", {}).values() for r in out.get("boft_report", [])]
    return png, " ".join(reports)


# --------------------------------------------------------------------------------------- main
def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=REPO / ".demo",
                        help="where the demo's models, server files and images go (default: .demo)")
    parser.add_argument("--no-wait", action="store_true", help="stop the server and exit after writing the images")
    parser.add_argument("--rebuild", action="store_true", help="make the demo checkpoint and BOFT again")
    parser.add_argument("--listen", default="127.0.0.1",
                        help="address the server listens on (default 127.0.0.1; 0.0.0.0 for other machines)")
    args = parser.parse_args(argv)
    # Ctrl-C raises KeyboardInterrupt even where the shell started us with SIGINT ignored (a
    # background job), and `kill` (SIGTERM) unwinds too: either way the server is stopped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)

    from comfy_host import ComfyServer

    root = args.dir.resolve()
    server = ComfyServer(root / "server", extra_args=("--listen", args.listen))
    checkpoint = server.models / "checkpoints" / CHECKPOINT
    boft = server.models / "loras" / BOFT
    server.start(wait=False)  # boots while the models are made
    try:
        new_checkpoint = args.rebuild or not checkpoint.exists()
        if new_checkpoint:
            log(f"making the tiny demo checkpoint (SD1.5 layout, random weights, CLIP-L) at {checkpoint}")
            build_checkpoint(checkpoint)
        if new_checkpoint or not boft.exists():
            log(f"writing the demo BOFT with LyCORIS's own code at {boft}")
            build_boft(boft, checkpoint)
        log("waiting for ComfyUI")
        server.wait_ready()
        log(f"ComfyUI is up at {server.url} (port {server.port}; log: {server.log_path})")
        workflow = json.loads(WORKFLOW.read_text())
        prompt = api_prompt(workflow, server.object_info())
        out = root / "out"
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for label, strength in (("before", 0.0), ("after", 1.0)):
            png, report = render(server, prompt, workflow, strength)
            paths[label] = out / f"{label}.png"
            paths[label].write_bytes(png)
            log(f"{label} (BOFT strength {strength:g}): {report}")
        print()
        print(f"before: {paths['before']}")
        print(f"after:  {paths['after']}")
        host = "127.0.0.1" if args.listen in ("0.0.0.0", "::") else args.listen
        print(f"UI:     http://{host}:{server.port}  (Workflow > Browse Templates > comfyui-boft > boft_demo, "
              "or drop after.png on the page)")
        print(f"done in {time.monotonic() - STARTED:.1f} s")
        if args.no_wait:
            return 0
        print("The server keeps running; Ctrl-C stops it.", flush=True)
        while server.proc.poll() is None:
            time.sleep(0.5)
        log(f"ComfyUI exited with {server.proc.returncode}; see {server.log_path}")
        return 1
    except KeyboardInterrupt:
        print()
        return 0
    finally:
        server.stop()
        for partial in (checkpoint.with_suffix(".partial"), boft.with_suffix(".partial")):
            if partial.exists():
                os.remove(partial)


if __name__ == "__main__":
    sys.exit(main())
