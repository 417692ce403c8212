"""Boot a real ComfyUI server on the CPU and drive it over HTTP (standard library only).

The server runs from the ComfyUI that scripts/setup.sh made (or $BOFT_COMFYUI_DIR) with
everything it writes (output, input, temp, user data, database) inside a work directory, and
this repository linked into its custom_nodes as `comfyui-boft`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui-boft"
MODEL_FOLDERS = ("checkpoints", "loras", "vae_approx", "vae", "diffusion_models", "text_encoders")


def comfyui_dir() -> Path:
    """The ComfyUI checkout: $BOFT_COMFYUI_DIR, else .comfyui/ComfyUI in this repo."""
    path = Path(os.environ.get("BOFT_COMFYUI_DIR") or REPO_ROOT / ".comfyui" / "ComfyUI")
    if not (path / "main.py").is_file():
        raise FileNotFoundError(f"no ComfyUI at {path}: run scripts/setup.sh or set BOFT_COMFYUI_DIR")
    return path.resolve()


def venv_python() -> str:
    """The interpreter that runs ComfyUI: $BOFT_PYTHON, the repo's .venv, or this one."""
    if os.environ.get("BOFT_PYTHON"):
        return os.environ["BOFT_PYTHON"]
    candidate = REPO_ROOT / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


class ComfyError(RuntimeError):
    """ComfyUI refused or failed a prompt; `data` holds ComfyUI's own error JSON."""

    def __init__(self, message: str, data: dict | None = None):
        self.data = data or {}
        super().__init__(f"{message}\n{json.dumps(self.data, indent=1, default=str)[:6000]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server process; use as a context manager or call start()/stop().

    Model files go in `server.models / "checkpoints"` (or "loras", ...): ComfyUI lists
    folders on each request, so files written after start are seen.
    """

    def __init__(self, work_dir: str | os.PathLike, *, link_pack: bool = True,
                 comfy_dir: str | os.PathLike | None = None, python: str | None = None,
                 extra_args: tuple[str, ...] = (), boot_timeout: float = 180.0, env: dict | None = None):
        self.work_dir = Path(work_dir).resolve()
        self.comfy_dir = Path(comfy_dir).resolve() if comfy_dir else comfyui_dir()
        self.python = python or venv_python()
        self.link_pack = link_pack
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})  # extra environment variables for the server
        self.boot_timeout = boot_timeout
        self.models = self.work_dir / "models"
        self.output_dir = self.work_dir / "output"
        self.input_dir = self.work_dir / "input"
        self.log_path = self.work_dir / "comfyui.log"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self.client_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ----------------------------------------------------------------- process
    def _prepare(self) -> Path:
        """Write the folders and extra_model_paths.yaml; return the yaml's path."""
        w = self.work_dir
        for name in MODEL_FOLDERS:
            (self.models / name).mkdir(parents=True, exist_ok=True)
        for name in ("custom_nodes", "output", "input", "temp", "user", "base/custom_nodes"):
            (w / name).mkdir(parents=True, exist_ok=True)
        link = w / "custom_nodes" / PACK_NAME
        if self.link_pack and not link.is_symlink():
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        lines = ["boft_tests:", f"  base_path: {json.dumps(str(w))}", "  custom_nodes: custom_nodes"]
        lines += [f"  {name}: models/{name}" for name in MODEL_FOLDERS]
        yaml_path = w / "extra_model_paths.yaml"
        yaml_path.write_text("\n".join(lines) + "\n")
        return yaml_path

    def start(self, wait: bool = True) -> ComfyServer:
        """Launch the server; with wait=False call wait_ready() before using it."""
        yaml_path = self._prepare()
        self.port = _free_port()
        w = self.work_dir
        cmd = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--extra-model-paths-config", str(yaml_path),
            # Keep every write out of the ComfyUI folder, and skip its own custom_nodes.
            "--base-directory", str(w / "base"),
            "--output-directory", str(self.output_dir),
            "--input-directory", str(self.input_dir),
            "--temp-directory", str(w / "temp"),
            "--user-directory", str(w / "user"),
            "--database-url", "sqlite:///:memory:",
            # No network: no API nodes, no browser.
            "--disable-api-nodes", "--disable-auto-launch",
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **self.env)
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Block until /system_stats answers; on exit or timeout raise with the log tail."""
        deadline = time.monotonic() + self.boot_timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during boot\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"ComfyUI did not answer within {self.boot_timeout} s\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 15 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    # -------------------------------------------------------------------- HTTP
    def _request(self, path: str, data: bytes | None = None, timeout: float = 30):
        headers = {"Content-Type": "application/json"} if data is not None else {}
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def get(self, path: str, timeout: float = 30):
        """GET `path`; parsed JSON if it is JSON, else bytes."""
        body = self._request(path, timeout=timeout)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return body

    def object_info(self, node_class: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{node_class}" if node_class else ""))

    def post_prompt(self, workflow: dict) -> str:
        """Queue an API-format workflow; return its prompt_id. Raise ComfyError on a 400."""
        payload = json.dumps({"prompt": workflow, "client_id": self.client_id}).encode()
        try:
            answer = json.loads(self._request("/prompt", data=payload))
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            try:
                data = json.loads(body)
            except json.JSONDecodeError:
                data = {"body": body}
            raise ComfyError(f"POST /prompt answered {e.code}", data) from None
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Poll /history/<id> until the prompt finished (either way); return its entry."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}\n{self.log_tail()}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry:  # ComfyUI adds the entry once the prompt has finished
                return entry
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not done in {timeout} s\n{self.log_tail()}")
            time.sleep(0.05)

    def run(self, workflow: dict, timeout: float = 120.0) -> dict:
        """Queue, wait, and return the history entry; raise ComfyError if it failed."""
        entry = self.wait(self.post_prompt(workflow), timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            errors = [data for event, data in status.get("messages", []) if event == "execution_error"]
            data = errors[0] if errors else status
            raise ComfyError("ComfyUI failed to execute the prompt", data)
        return entry

    def image_bytes(self, history: dict) -> list[bytes]:
        """The bytes of every output image in a history entry, in node order."""
        images = []
        for node_id in sorted(history.get("outputs", {}), key=str):
            for image in history["outputs"][node_id].get("images", []):
                query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
                images.append(self._request(f"/view?{query}"))
        return images
