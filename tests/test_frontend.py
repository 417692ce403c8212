"""The front end for real: ComfyUI's server and web app, our routes, and headless Chromium.

One ComfyUI server and one browser page serve every test here (about a minute on 2 cores).
Chromium is Debian's (/usr/bin/chromium or $BOFT_CHROMIUM), driven by Playwright; run
scripts/setup_browser.sh first. Screenshots of each state go to artifacts/browser/.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import frontend_files
import pytest
import tiny_models
from comfy_host import REPO_ROOT, ComfyServer

CKPT = "tiny_sd15.safetensors"
DEMO = "demo_boft.safetensors"
OTHER = "other_boft.safetensors"
XSS_FILE = "markup_boft.safetensors"
LORA = "plain_lora.safetensors"
ARTIFACTS = REPO_ROOT / "artifacts" / "browser"
UPLOAD_LIMIT_MB = 2  # the server runs with this limit; BIG is larger
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    path = os.environ.get("BOFT_CHROMIUM") or shutil.which("chromium")
    return path if path and os.access(path, os.X_OK) else None


def missing(why: str):
    """Fail, never skip: scripts/setup.sh installs the browser, and a skip would hide a broken install."""
    pytest.fail(f"{why}; run scripts/setup.sh (it calls scripts/setup_browser.sh)")


# ------------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    old = os.environ.get("COMFYUI_BOFT_MAX_UPLOAD_MB")
    os.environ["COMFYUI_BOFT_MAX_UPLOAD_MB"] = str(UPLOAD_LIMIT_MB)
    srv = ComfyServer(tmp_path_factory.mktemp("comfy_frontend"))
    settings = srv.work_dir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))  # no first-run templates dialog
    try:
        srv.start(wait=False)  # boot while this process writes the files
        loras = srv.models / "loras"
        srv.demo = frontend_files.write_demo_boft(loras / DEMO)
        frontend_files.write_demo_boft(loras / OTHER, metadata={"ss_output_name": "other"}, seed=3)
        frontend_files.write_demo_boft(loras / XSS_FILE, metadata=frontend_files.XSS_METADATA, seed=4)
        frontend_files.write_lora(loras / LORA)
        tiny_models.make_sd15_checkpoint(srv.models / "checkpoints" / CKPT, verify=False)
        tiny_models.write_zero_conditioning(srv.output_dir)
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
        if old is None:
            os.environ.pop("COMFYUI_BOFT_MAX_UPLOAD_MB", None)
        else:
            os.environ["COMFYUI_BOFT_MAX_UPLOAD_MB"] = old


def upload_folder(server) -> Path:
    """The first loras folder: ComfyUI's default one under --base-directory, then ours."""
    return server.work_dir / "base" / "models" / "loras"


def call(server, method: str, path: str, query: dict, body: bytes | None = None):
    """(status, JSON) of a request to our routes."""
    url = f"{server.url}{path}?{urllib.parse.urlencode(query)}"
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/octet-stream"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def header_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[: 8 + int.from_bytes(raw[:8], "little")]


# -------------------------------------------------------------------------------- routes
def test_info_route_reports_the_file(server):
    status, info = call(server, "GET", "/boft/info", {"name": DEMO})
    assert status == 200, info
    demo = server.demo
    assert (info["format"], info["family"], info["layers"]) == ("lycoris-boft", "SD1.x/SD2.x", demo["layers"])
    assert (info["parameters"], info["size"], info["dtype"]) == (demo["parameters"], demo["size"], "float16")
    assert info["block_sizes"] == [[10, 19], [12, 1]] and info["depths"] == [[6, 19], [7, 1]]
    assert info["rescaled"] == demo["rescaled"]
    assert info["trigger_words"] == [["wtrclr style", 60], ["mountain", 15], ["forest", 11], ["lake", 9]]
    assert info["trigger_text"] == "wtrclr style, mountain, forest, lake"
    assert info["metadata"]["ss_output_name"] == "wtrclr-boft" and info["peft_config"] is None
    assert [g["section"] for g in info["groups"]] == ["text encoder", "down", "mid", "up"]
    shares = {g["section"]: g["share"] for g in info["groups"]}
    assert shares["up"] > 0.6 > 0.2 > shares["down"], shares  # the demo file acts mostly on 'up'
    assert len(info["layer_stats"]) == demo["layers"] and info["last_run"] is None


def test_loaders_output_trigger_words(server):
    info = server.object_info()
    assert info["BOFTLoader"]["output"] == ["MODEL", "CLIP", "STRING"]
    assert info["BOFTLoader"]["output_name"] == ["MODEL", "CLIP", "trigger_words"]
    assert info["BOFTLoaderModelOnly"]["output_name"] == ["MODEL", "trigger_words"]


def test_info_route_only_reads_listed_names(server):
    for name in ("../checkpoints/" + CKPT, str(server.models / "loras" / DEMO), "nope.safetensors", ""):
        status, answer = call(server, "GET", "/boft/info", {"name": name})
        assert status == 404 and "not a file in the loras folder" in answer["error"], name
    status, answer = call(server, "GET", "/boft/info", {"name": LORA})
    assert status == 422 and "LoRA" in answer["error"]


def test_check_route_reads_only_the_header(server):
    def check(path: Path, name: str):
        return call(server, "POST", "/boft/check", {"name": name, "size": path.stat().st_size}, header_bytes(path))

    status, answer = check(server.models / "loras" / DEMO, "x.safetensors")
    assert status == 200 and answer["ok"] and answer["format"] == "lycoris-boft"
    status, answer = check(server.models / "loras" / LORA, "y.safetensors")
    assert status == 200 and not answer["ok"] and "LoRA" in answer["error"] and not answer["workflow"]
    status, answer = call(server, "POST", "/boft/check", {"name": "z.safetensors", "size": 10**6}, b"\x80\x02junk" * 4)
    assert not answer["ok"] and "not a readable safetensors file" in answer["error"]
    # A non-BOFT file with a ComfyUI workflow inside: the page hands it back to ComfyUI's own loader.
    head = json.dumps({"__metadata__": {"workflow": "{}"}, "x": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}})
    raw = len(head).to_bytes(8, "little") + head.encode()
    status, answer = call(server, "POST", "/boft/check", {"name": "w.safetensors", "size": len(raw) + 2}, raw)
    assert not answer["ok"] and answer["workflow"]


def test_upload_route_stores_checks_and_never_overwrites(server, tmp_path):
    folder = upload_folder(server)
    demo = (server.models / "loras" / DEMO).read_bytes()
    status, answer = call(server, "POST", "/boft/upload", {"name": "up.safetensors"}, demo)
    assert status == 200 and answer == {"name": "up.safetensors", "format": "lycoris-boft", "existed": False}
    assert (folder / "up.safetensors").read_bytes() == demo
    assert "up.safetensors" in server.object_info("BOFTLoader")["BOFTLoader"]["input"]["required"]["boft_name"][0]
    status, answer = call(server, "POST", "/boft/upload", {"name": "up.safetensors"}, demo)  # same bytes: fine
    assert status == 200 and answer["existed"]
    other = (server.models / "loras" / OTHER).read_bytes()
    status, answer = call(server, "POST", "/boft/upload", {"name": "up.safetensors"}, other)
    assert status == 409 and "already in the loras folder" in answer["error"]
    status, answer = call(server, "POST", "/boft/upload", {"name": DEMO}, other)  # a name from another loras folder
    assert status == 409
    assert (folder / "up.safetensors").read_bytes() == demo
    lora = (server.models / "loras" / LORA).read_bytes()
    status, answer = call(server, "POST", "/boft/upload", {"name": "lora.safetensors"}, lora)
    assert status == 400 and "LoRA" in answer["error"] and "lora.safetensors:" in answer["error"]
    status, answer = call(server, "POST", "/boft/upload", {"name": "cut.safetensors"}, demo[: len(demo) // 2])
    assert status == 400 and "truncated" in answer["error"]
    for bad in ("../evil.safetensors", "sub/evil.safetensors", "..\\evil.safetensors", ".hidden.safetensors",
                "evil.ckpt", "C:evil.safetensors", ""):
        status, answer = call(server, "POST", "/boft/upload", {"name": bad}, demo)
        assert status == 400, (bad, answer)
    big = tmp_path / "big.safetensors"
    frontend_files.write_demo_boft(big, metadata={"pad": "x" * (UPLOAD_LIMIT_MB * 2**20)})
    status, answer = call(server, "POST", "/boft/check", {"name": big.name, "size": big.stat().st_size},
                          header_bytes(big))
    assert not answer["ok"] and "upload limit" in answer["error"]
    status, answer = call(server, "POST", "/boft/upload", {"name": "big.safetensors"}, big.read_bytes())
    assert status == 413
    assert sorted(p.name for p in folder.iterdir()) == ["up.safetensors"]  # nothing else, no leftovers
    assert not (server.work_dir / "models" / "evil.safetensors").exists()


# ------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def page(server):
    chromium = chromium_path()
    if chromium is None:
        missing("no Chromium (Debian package 'chromium')")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Python Playwright is not installed")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    profile = tempfile.mkdtemp(prefix="boft-chromium-")
    errors = []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900}, permissions=["clipboard-read", "clipboard-write"])
        pg = context.pages[0] if context.pages else context.new_page()
        pg.on("pageerror", lambda e: errors.append(f"{e.message}\n{e.stack}")
              if "boft" in f"{e.message}{e.stack}".lower() else None)
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" and "boft" in m.text.lower() else None)
        pg.goto(server.url)
        pg.wait_for_function("() => window.app?.graph && window.LiteGraph && app.extensions?.some("
                             "(e) => e.name === 'comfyui-boft.panel')", timeout=90_000)
        pg.boft_errors = errors
        yield pg
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


def shot(page, name: str, clip: dict | None = None) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), clip=clip)
    return path


def fresh_node(page, node_type: str = "BOFTLoader", name: str = DEMO, pos=(160, 170)) -> int:
    """An empty graph with one node of ours, the view reset; returns the node id once its panel is ready."""
    node_id = page.evaluate("""([type, name, pos]) => {
        app.graph.clear();
        app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1;
        const node = LiteGraph.createNode(type); node.pos = pos; app.graph.add(node);
        const w = node.widgets.find((w) => w.name === 'boft_name'); w.value = name; w.callback?.(name);
        app.canvas.setDirty(true, true);
        return node.id; }""", [node_type, name, list(pos)])
    wait_panel(page, node_id, name)
    return node_id


def wait_panel(page, node_id, name=None):
    page.wait_for_function("""([id, name]) => {
        const node = app.graph.getNodeById(id);
        const panel = node?.boftPanel;
        return panel && panel.element.dataset.state === 'ready' && (!name || panel.state.name === name); }""",
                           arg=[node_id, name], timeout=30_000)
    page.wait_for_timeout(150)  # one frame for the DOM widget to be placed


def panel(page, node_id):
    """A locator for the node's own panel (the element its BoftPanel made)."""
    page.evaluate("""(id) => {
        document.querySelectorAll('[data-test-panel]').forEach((e) => e.removeAttribute('data-test-panel'));
        app.graph.getNodeById(id).boftPanel.element.dataset.testPanel = '1'; }""", node_id)
    return page.locator("[data-test-panel]")


def fields(page, node_id) -> dict:
    return page.evaluate("""(id) => Object.fromEntries(Array.from(app.graph.getNodeById(id).boftPanel.element
        .querySelectorAll('[data-field]')).map((e) => [e.dataset.field, e.textContent]))""", node_id)


def node_clip(page, node_id, pad: int = 8, bottom: int = 0) -> dict:
    """The node's rectangle on the page (title bar included, ``bottom`` px more), for a screenshot."""
    return page.evaluate("""([id, pad, bottom]) => {
        app.canvas.deselectAll?.();
        app.canvas.draw(true, true);  // lay the widgets out now, so the size is final
        const n = app.graph.getNodeById(id), r = app.canvasEl.getBoundingClientRect();
        const [x, y] = app.canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]);
        const s = app.canvas.ds.scale;
        return {x: r.left + x - pad, y: r.top + y - pad, width: n.size[0] * s + 2 * pad,
                height: (n.size[1] + LiteGraph.NODE_TITLE_HEIGHT) * s + 2 * pad + bottom}; }""", [node_id, pad, bottom])


def client_point(page, gx: float, gy: float) -> list[float]:
    return page.evaluate("""([gx, gy]) => { const r = app.canvasEl.getBoundingClientRect();
        const [x, y] = app.canvas.ds.convertOffsetToCanvas([gx, gy]); return [r.left + x, r.top + y]; }""", [gx, gy])


DROP = """async ([b64, name, x, y]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], name));
    const target = document.elementFromPoint(x, y);
    for (const type of ['dragenter', 'dragover', 'drop']) {
        target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, composed: true,
                                                  clientX: x, clientY: y, dataTransfer: data}));
    }
    return target.tagName + '.' + target.className; }"""


def drop(page, path: Path, name: str, x: float, y: float) -> str:
    """What a person's drag and drop does: dragenter, dragover, drop of a real File at (x, y)."""
    return page.evaluate(DROP, [base64.b64encode(path.read_bytes()).decode(), name, x, y])


def test_nodes_are_in_the_node_library(page):
    shot(page, "00-loaded")
    page.click(".node-library-tab-button")
    search = page.get_by_placeholder("Search Nodes")
    search.fill("BOFT")
    page.get_by_text("Load BOFT (model only)").first.wait_for(timeout=10_000)
    labels = page.locator(".p-tree-node-label").all_inner_texts()
    assert "Load BOFT" in labels and "Load BOFT (model only)" in labels, labels
    shot(page, "01-node-library")
    page.click(".node-library-tab-button")  # close the sidebar again


def test_panel_shows_the_numbers(page, server):
    node_id = fresh_node(page)
    got = fields(page, node_id)
    demo = server.demo
    assert got["format"] == "lycoris-boft" and "SD1.x/SD2.x" in got["family"]
    assert got["layers"] == "20"
    assert got["block-sizes"] == "10 ×19 · 12 ×1" and got["depths"] == "6 ×19 · 7 ×1"
    assert got["constraints"] == "none ×10 · 0.05 ×10" and got["rescaled"] == f"{demo['rescaled']} of 20"
    assert got["dtype"] == "float16"
    assert got["size"] == f"{demo['size'] / 1024:.1f} KiB · {demo['parameters']:,} parameters"
    assert got["meta:ss_network_module"] == "lycoris.kohya" and got["meta:ss_num_train_images"] == "60"
    assert got["meta:ss_output_name"] == "wtrclr-boft"
    chips = panel(page, node_id).locator(".boft-chip").evaluate_all("(cs) => cs.map((c) => c.textContent)")
    assert chips == ["wtrclr style60", "mountain15", "forest11", "lake9"]
    # The panel is not a widget value: saved workflows keep the loader's four values.
    assert page.evaluate("(id) => app.graph.getNodeById(id).serialize().widgets_values", node_id) == [
        DEMO, 1, 1, "lycoris"]
    shot(page, "02-panel", node_clip(page, node_id))
    only = fresh_node(page, "BOFTLoaderModelOnly", OTHER)
    assert fields(page, only)["meta:ss_output_name"] == "other"
    assert page.evaluate("(id) => app.graph.getNodeById(id).outputs.map((o) => o.name)", only) == [
        "MODEL", "trigger_words"]


def test_metadata_is_shown_as_text(page):
    """<script> and <img onerror> in ss_output_name and in a tag are shown as they are, never run."""
    node_id = fresh_node(page, name=XSS_FILE)
    assert fields(page, node_id)["meta:ss_output_name"] == frontend_files.XSS
    words = panel(page, node_id).locator(".boft-chip").evaluate_all("(cs) => cs.map((c) => c.dataset.word)")
    assert frontend_files.XSS in words
    assert frontend_files.XSS in panel(page, node_id).inner_text()
    assert page.evaluate("() => document.querySelectorAll('.boft-panel script, .boft-panel img').length") == 0
    page.wait_for_timeout(300)  # an <img onerror> would have fired by now
    assert page.evaluate("() => window.__boft_xss") is None
    shot(page, "03-markup-as-text", node_clip(page, node_id))


def test_panel_explains_a_file_that_is_not_boft(page):
    node_id = page.evaluate("""(name) => {
        app.graph.clear();
        const node = LiteGraph.createNode('BOFTLoader'); node.pos = [160, 170]; app.graph.add(node);
        const w = node.widgets.find((w) => w.name === 'boft_name'); w.value = name; w.callback?.(name);
        return node.id; }""", LORA)
    page.wait_for_function("(id) => app.graph.getNodeById(id).boftPanel.element.dataset.state === 'error'",
                           arg=node_id, timeout=30_000)
    error = fields(page, node_id)["error"]
    assert "this is a LoRA (lora_up/lora_down)" in error and "Load it with a LoRA loader" in error


def test_picture_shows_where_the_adapter_acts(page):
    node_id = fresh_node(page)
    colors = page.evaluate("""(id) => {
        const c = app.graph.getNodeById(id).boftPanel.element.querySelector('canvas.boft-picture');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const count = {down: 0, up: 0, drawn: 0};
        for (let i = 0; i < d.length; i += 4) {
            if (d[i + 3] < 200) continue;
            count.drawn++;
            if (d[i] === 0x4f && d[i + 1] === 0x9b && d[i + 2] === 0xe8) count.down++;
            if (d[i] === 0xe8 && d[i + 1] === 0x66 && d[i + 2] === 0x4f) count.up++;
        }
        return {...count, width: c.width, height: c.height, title: c.title}; }""", node_id)
    assert colors["width"] > 200 and colors["height"] > 60
    assert colors["down"] > 0 and colors["up"] > 5 * colors["down"], colors  # the 'up' bars dominate
    # Hovering a bar names the layer (as a title: text only).
    picture = panel(page, node_id).locator("canvas.boft-picture")
    box = picture.bounding_box()
    page.mouse.move(box["x"] + box["width"] - 6, box["y"] + box["height"] - 32)
    title = picture.get_attribute("title")
    assert title.startswith("lora_unet_output_blocks_1_1_") and "up: ‖B−I‖/√n" in title, title
    shot(page, "04-picture", node_clip(page, node_id))


def test_trigger_words_copy_on_click(page, server):
    node_id = fresh_node(page)
    page.evaluate("() => navigator.clipboard.writeText('')")
    panel(page, node_id).locator(".boft-chip", has_text="mountain").click()
    page.wait_for_function("async () => (await navigator.clipboard.readText()) === 'mountain'", timeout=5000)
    panel(page, node_id).locator("[data-field=copy-all]").click()
    _, info = call(server, "GET", "/boft/info", {"name": DEMO})
    page.wait_for_function("async (want) => (await navigator.clipboard.readText()) === want", arg=info["trigger_text"],
                           timeout=5000)
    shot(page, "05-copied")


def test_open_larger_shows_everything(page):
    node_id = fresh_node(page)
    panel(page, node_id).locator(".boft-open").click()
    dialog = page.locator("dialog.boft-dialog")
    dialog.wait_for(state="visible")
    page.wait_for_timeout(200)
    text = dialog.inner_text()
    assert DEMO in text and "ss_network_args" in text and "ss_learning_rate" in text
    assert dialog.locator("canvas.boft-picture").bounding_box()["height"] > 150
    shot(page, "06-dialog", dialog.bounding_box())
    dialog.locator("button", has_text="Close").click()
    dialog.wait_for(state="detached")
    assert page.evaluate("(id) => app.graph.getNodeById(id).boftPanel.dialog", node_id) is None


def test_drop_creates_a_working_node(page, server):
    wf = tiny_models.sd15_workflow(CKPT, filename_prefix="boft_browser")
    wf["preview"] = {"class_type": "PreviewAny", "inputs": {"source": ["ckpt", 0]}}
    ids = {key: str(i + 1) for i, key in enumerate(wf)}
    api = {ids[k]: {"class_type": n["class_type"],
                    "inputs": {a: [ids[v[0]], v[1]] if isinstance(v, list) else v for a, v in n["inputs"].items()}}
           for k, n in wf.items()}
    page.evaluate("(wf) => { app.graph.clear(); app.loadApiJson(wf, 'boft-drop-test'); }", api)
    # Drop onto empty canvas right of everything.
    right = page.evaluate("() => Math.max(...app.graph.nodes.map((n) => n.pos[0] + n.size[0]))")
    page.evaluate("(right) => { app.canvas.ds.scale = 1; app.canvas.ds.offset = [-right - 40, 60]; "
                  "app.canvas.setDirty(true, true); }", right)
    x, y = client_point(page, right + 160, 260)
    assert drop(page, server.models / "loras" / DEMO, "dropped_boft.safetensors", x, y).startswith("CANVAS")
    node_id = page.wait_for_function("() => app.graph.nodes.find((n) => n.comfyClass === 'BOFTLoader')?.id",
                                     timeout=20_000).json_value()
    wait_panel(page, node_id, "dropped_boft.safetensors")
    stored = upload_folder(server) / "dropped_boft.safetensors"
    assert stored.read_bytes() == (server.models / "loras" / DEMO).read_bytes()
    page.get_by_text("BOFT file added").first.wait_for(timeout=5000)
    # Wire it in: checkpoint -> Load BOFT -> KSampler, trigger_words -> Preview Any; run it from the page.
    page.evaluate("""(id) => {
        const by = (t) => app.graph.nodes.find((n) => n.comfyClass === t), boft = app.graph.getNodeById(id);
        by('CheckpointLoaderSimple').connect(0, boft, 0); by('CheckpointLoaderSimple').connect(1, boft, 1);
        boft.connect(0, by('KSampler'), 0); boft.connect(2, by('PreviewAny'), 0); }""", node_id)
    page.evaluate("() => app.queuePrompt(0, 1)")
    page.wait_for_function("(id) => app.graph.getNodeById(id).boftPanel.state.lastRun", arg=node_id, timeout=90_000)
    page.wait_for_timeout(200)
    got = fields(page, node_id)
    assert got["layers"] == "20 · last run applied 18 of 20"
    assert got["not-applied"] == ", ".join(sorted(server.demo["not_applied"]))
    # The panel learns of the run when our node has executed; the prompt's history entry comes at its end.
    deadline = time.monotonic() + 90
    while not (entries := [e for e in server.get("/history").values() if "boft_browser" in json.dumps(e["outputs"])]):
        assert time.monotonic() < deadline, "the prompt queued from the page never finished"
        time.sleep(0.1)
    (entry,) = entries
    assert entry["status"]["status_str"] == "success"
    texts = [o["text"][0] for o in entry["outputs"].values() if "text" in o]
    _, info = call(server, "GET", "/boft/info", {"name": "dropped_boft.safetensors"})
    assert texts == [info["trigger_text"]]
    assert page.evaluate("() => window.__boft_xss") is None
    shot(page, "07-dropped-and-run")
    page.evaluate("""(id) => { const n = app.graph.getNodeById(id);
        app.canvas.ds.offset = [300 - n.pos[0], 170 - n.pos[1]]; app.canvas.setDirty(true, true); }""", node_id)
    page.wait_for_timeout(200)
    shot(page, "08-panel-after-run", node_clip(page, node_id, bottom=70))


def test_drop_on_a_boft_node_switches_its_file(page, server):
    node_id = fresh_node(page)
    title = client_point(page, 200, 170 - 15)  # the node's title bar, drawn on the canvas
    drop(page, server.models / "loras" / OTHER, OTHER, *title)
    wait_panel(page, node_id, OTHER)
    assert fields(page, node_id)["meta:ss_output_name"] == "other"
    assert page.evaluate("() => app.graph.nodes.length") == 1
    # Dropped on the panel (a DOM element over the canvas), it does the same.
    box = panel(page, node_id).locator(".boft-body").bounding_box()
    drop(page, server.models / "loras" / DEMO, DEMO, box["x"] + 40, box["y"] + 40)
    wait_panel(page, node_id, DEMO)
    assert page.evaluate("() => app.graph.nodes.length") == 1
    shot(page, "09-switched", node_clip(page, node_id))


def test_drop_of_a_non_boft_file_is_refused(page, server):
    page.evaluate("() => { app.graph.clear(); app.canvas.setDirty(true, true); }")
    x, y = client_point(page, 400, 300)
    drop(page, server.models / "loras" / LORA, "not_a_boft.safetensors", x, y)
    message = page.locator(".p-toast-message", has_text="Not added: not_a_boft.safetensors").first
    message.wait_for(timeout=10_000)
    text = message.inner_text()
    assert "LoRA" in text and "Nothing was written" in text, text
    assert page.evaluate("() => app.graph.nodes.length") == 0
    assert not (upload_folder(server) / "not_a_boft.safetensors").exists()
    assert not list(upload_folder(server).glob(".boft-upload-*"))
    page.wait_for_timeout(500)  # the toast's fade-in
    shot(page, "10-refused")


def test_no_errors_in_the_page(page):
    assert page.boft_errors == []
    assert page.evaluate("() => window.__boft_xss") is None
