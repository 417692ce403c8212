"""HTTP routes for the pack's front end (web/js): file info for the panel, drag-and-drop upload.

* ``GET  /boft/info?name=N[&node=ID...][&block_weights=S]``: what the info panel shows for a file of
  the ``loras`` list (format, family, counts, metadata, trigger words, per-layer rotation distance
  by block), the latest run on that file of the loader node that runs under execution id ``ID`` (one
  per instance of a subgraph the node is in, e.g. ``node=11:10&node=12:10``), and what the node's
  ``block_weights`` string ``S`` gives each layer and block, with the presets for the file's family.
* ``POST /boft/check?name=N&size=S``: body = the file's first bytes (length + JSON header).
  Says whether it is a BOFT file before anything is uploaded.
* ``POST /boft/upload?name=N``: body = the whole file. Checks the header again, enforces the
  size limit, never replaces a different file, and moves it into the first ``loras`` folder
  atomically. Answers with the stored name.

Only names listed in the ``loras`` folders are read; uploaded names must be plain file names
(no folders, no control, format or bidi characters, short enough in bytes for the file system).
Error bodies name files as the client did, or relative to ``loras``, never by server path; a
listed file that links outside the ``loras`` folders gets one generic error, never its size or
bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import threading
import unicodedata
import uuid

import folder_paths
from aiohttp import web

from ..boft_core import BoftError, read_header
from ..boft_core.blocks import EXAMPLES, PRESETS, accepted, describe_weights, family_of, parse_block_weights
from ..boft_core.cli import describe
from ..boft_core.formats import MAX_HEADER, detect_format, parse_header
from ..boft_core.names import guess_family
from ..boft_core.stats import group_stats, layer_stats, summary, trigger_text
from .loader import last_run, parsed_file

log = logging.getLogger("comfyui-boft")

MAX_UPLOAD_ENV = "COMFYUI_BOFT_MAX_UPLOAD_MB"
BAD_CHARS = set('/\\:*?"<>|')


def max_upload() -> int:
    """Largest accepted upload in bytes: $COMFYUI_BOFT_MAX_UPLOAD_MB, default 2 GiB."""
    try:
        return int(float(os.environ.get(MAX_UPLOAD_ENV, "2048")) * 1024 * 1024)
    except ValueError:
        return 2048 * 1024 * 1024


def name_limit(folder: str) -> int:
    """The longest file name in bytes that ``folder``'s file system takes (255 where unknown)."""
    try:
        return min(255, os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def bad_name(name: str, folder: str | None = None) -> str | None:
    """Why ``name`` cannot be stored in the loras folder ``folder``, or None for a plain
    ``*.safetensors`` name. Control, format (bidi overrides like U+202E, zero-width characters),
    surrogate, private-use, unassigned and line/paragraph separator characters are refused: a
    name must read as what it is."""
    if not name or len(name) > 200:
        return "give a file name of 1 to 200 characters."
    odd = next((c for c in name if unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp")),
               None)
    if odd is not None:
        return (f"{name!r} contains the invisible or control character U+{ord(odd):04X} "
                f"({unicodedata.name(odd, unicodedata.category(odd))}); rename the file.")
    if name in (".", "..") or name.startswith(".") or any(c in BAD_CHARS for c in name):
        return f"{name!r} is not a plain file name (no folders, no leading dot, none of / \\ : * ? \" < > |)."
    if not name.lower().endswith(".safetensors"):
        return f"{name!r}: only .safetensors files can be added."
    limit = name_limit(folder) if folder else 255
    if len(name.encode("utf-8")) > limit:
        return f"{name!r} is {len(name.encode('utf-8'))} bytes long in UTF-8; the loras folder takes at most {limit}."
    return None


def lora_path(name: str) -> str | None:
    """The full path of ``name`` if it is listed in the loras folders, else None."""
    if not name or name not in folder_paths.get_filename_list("loras"):
        return None
    return folder_paths.get_full_path("loras", name)


class StatsCache:
    """Per-layer statistics of each parsed file; recomputed when FileCache parses the file anew."""

    def __init__(self, limit: int = 16):
        self._lock = threading.Lock()
        self._stats: dict[str, tuple[object, list[dict]]] = {}
        self._limit = limit

    def get(self, path: str, boft_file) -> list[dict]:
        with self._lock:
            hit = self._stats.get(path)
        if hit is not None and hit[0] is boft_file:
            return hit[1]
        rows = layer_stats(boft_file)
        with self._lock:
            self._stats.pop(path, None)
            self._stats[path] = (boft_file, rows)
            while len(self._stats) > self._limit:
                del self._stats[next(iter(self._stats))]
        return rows


STATS = StatsCache()


def block_weights_info(boft_file, text: str) -> dict:
    """The panel's view of a ``block_weights`` string: each layer's and block's weight for the family
    the file's names suggest (the node uses its model's), the presets, or the parse error."""
    family = family_of(guess_family(boft_file.layers))
    info = {"family": family, "presets": PRESETS.get(family, {}), "example": EXAMPLES[family],
            "accepts": accepted(family), "text": text}
    try:
        info.update(describe_weights(parse_block_weights(text, family), boft_file.layers), error=None)
    except BoftError as e:
        info["error"] = str(e)
    return info


def file_info(name: str, path: str, block_weights: str = "") -> dict:
    """The info panel's data for one file (BoftError if it is not a readable BOFT file)."""
    boft_file = parsed_file(path)
    info = describe(boft_file)
    modules = {m["name"]: m for m in info.pop("modules")}
    info.pop("path")
    rows = [dict(row, block_size=modules[row["name"]]["block_size"], m=modules[row["name"]]["m"])
            for row in STATS.get(path, boft_file)]
    info.update(summary(boft_file))
    info.update(name=name, size=os.path.getsize(path), family=guess_family(boft_file.layers),
                trigger_text=trigger_text(boft_file.metadata), layer_stats=rows, groups=group_stats(rows),
                block_weights=block_weights_info(boft_file, block_weights))
    return info


def header_from_bytes(name: str, raw: bytes, size: int) -> tuple[list[str], dict[str, str]]:
    """Tensor keys and metadata from a file's first bytes, checked as ``read_header`` checks a file
    (the one header reader: ``boft_core.formats.parse_header``)."""
    header, metadata = parse_header(raw, size, name)
    return list(header), metadata


def _same_content(a: str, b: str) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                return False
            if not ca:
                return True


def store_upload(tmp: str, name: str, folder: str) -> dict:
    """Check the uploaded temp file's header and move it to ``folder/name``; never replaces a file,
    and never reads through a link (a link of that name, dangling or not, is a different file)."""
    try:
        header, metadata = read_header(tmp)
        fmt = detect_format(name, list(header), metadata, None)
    except BoftError as e:
        raise BoftError(str(e).replace(tmp, name)) from None
    target = os.path.join(folder, name)
    taken = FileExistsError(f"a different file named {name} is already in the loras folder; "
                            "rename the file you dropped, or remove the other one first.")
    for _ in range(2):  # a second look when the name was taken between the check and the link
        for existing in (folder_paths.get_full_path("loras", name), target):
            if existing and os.path.islink(existing):
                raise taken  # dangling, or pointing anywhere: not ours to read or compare
            if existing and os.path.lexists(existing):
                if os.path.isfile(existing) and _same_content(existing, tmp):
                    return {"name": name, "format": fmt, "existed": True}
                raise taken
        try:
            os.link(tmp, target)  # atomic, and fails instead of replacing a file that appeared meanwhile
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links: create exclusively, then copy
            try:
                out = open(target, "xb")  # fails if the name was taken meanwhile; closed below
            except FileExistsError:
                continue
            try:
                with out, open(tmp, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            except BaseException:
                os.unlink(target)
                raise
        return {"name": name, "format": fmt, "existed": False}
    raise taken


def loras_folders() -> list[str]:
    return folder_paths.get_folder_paths("loras")


def public(text: str, name: str = "", path: str = "") -> str:
    """``text`` without server paths: ``path`` becomes the client's ``name``, a path inside a
    ``loras`` folder becomes relative to it, the folder itself ``loras``."""
    if path and name:
        text = text.replace(path, name)
    folders = {f for d in loras_folders() for f in (os.path.abspath(d), os.path.realpath(d))}
    for folder in sorted(folders, key=len, reverse=True):
        text = text.replace(folder.rstrip(os.sep) + os.sep, "").replace(folder, "loras")
    return text


def outside_loras(path: str) -> bool:
    """Whether ``path`` (a listed file) really lies outside every ``loras`` folder (a link out)."""
    real = os.path.realpath(path)
    return not any(real.startswith(os.path.realpath(d).rstrip(os.sep) + os.sep) for d in loras_folders())


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": public(message)}, status=status)


async def info_route(request: web.Request) -> web.Response:
    name = request.query.get("name", "")
    path = lora_path(name)
    if path is None:
        return _error(404, f"{name!r} is not a file in the loras folder.")
    try:
        info = await asyncio.to_thread(file_info, name, path, request.query.get("block_weights", ""))
    except (BoftError, OSError) as e:
        if outside_loras(path):  # a link out of loras: nothing about the file it points to
            log.warning("[comfyui-boft] /boft/info %r: %s", name, e)
            return _error(422, f"{name}: not a safetensors BOFT file.")
        return _error(422, public(str(e), name, path))
    # A node inside a subgraph runs under its execution id ("11:10"), once per instance of the
    # subgraph: the panel sends all of them and shows the latest run on this file.
    info["last_run"] = last_run(request.query.getall("node", []), name)
    return web.json_response(info)


async def check_route(request: web.Request) -> web.Response:
    name = request.query.get("name", "")
    folders = loras_folders()
    why = bad_name(name, folders[0] if folders else None)
    if why:
        return _error(400, why)
    try:
        size = int(request.query.get("size", ""))
    except ValueError:
        return _error(400, "give the file size as size=<bytes>.")
    if (request.content_length or 0) > MAX_HEADER + 8:
        return _error(413, f"send at most the first {MAX_HEADER + 8} bytes of the file.")
    raw = await request.read()
    answer = {"name": name, "max_upload": max_upload()}
    try:
        keys, metadata = header_from_bytes(name, raw, size)
        answer["workflow"] = "workflow" in metadata or "prompt" in metadata
        answer["format"] = detect_format(name, keys, metadata, None)
        if size > answer["max_upload"]:
            raise BoftError(f"{name}: {size / 2**20:.0f} MiB is more than the upload limit of "
                            f"{answer['max_upload'] / 2**20:.0f} MiB ({MAX_UPLOAD_ENV}).")
    except BoftError as e:
        answer.update(ok=False, error=str(e))
        return web.json_response(answer)
    answer["ok"] = True
    return web.json_response(answer)


async def upload_route(request: web.Request) -> web.Response:
    name = request.query.get("name", "")
    folders = loras_folders()
    if not folders:
        return _error(500, "ComfyUI has no loras folder.")
    folder = folders[0]
    why = bad_name(name, folder)
    if why:
        return _error(400, why)
    limit = max_upload()
    if request.content_length is not None and request.content_length > limit:
        return _error(413, f"{name}: larger than the upload limit of {limit / 2**20:.0f} MiB ({MAX_UPLOAD_ENV}).")
    tmp = os.path.join(folder, f".boft-upload-{uuid.uuid4().hex}.partial")  # not listed by ComfyUI
    try:
        os.makedirs(folder, exist_ok=True)
        size = 0
        with open(tmp, "wb") as f:
            async for chunk in request.content.iter_chunked(1 << 20):
                size += len(chunk)
                if size > limit:
                    return _error(413, f"{name}: larger than the upload limit of {limit / 2**20:.0f} MiB.")
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        try:
            stored = await asyncio.to_thread(store_upload, tmp, name, folder)
        except BoftError as e:
            return _error(400, str(e))
        except FileExistsError as e:
            return _error(409, str(e))
    except OSError as e:  # an unwritable or full loras folder: the server's fault, not the request's
        log.error("[comfyui-boft] cannot store %r in %s: %s", name, folder, e)
        return _error(500, f"{name}: cannot write to the loras folder: {e.strerror or type(e).__name__}.")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("[comfyui-boft] %s %s (%s) in %s", "kept existing" if stored["existed"] else "stored",
             name, stored["format"], folder)
    return web.json_response(stored)


ROUTES = (("GET", "/boft/info", info_route), ("POST", "/boft/check", check_route),
          ("POST", "/boft/upload", upload_route))


def register() -> bool:
    """Add the routes to ComfyUI's running server, once; False when there is none (unit tests)."""
    server = sys.modules.get("server")  # ComfyUI's server.py, imported by main.py before custom nodes
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    table = instance.routes
    if any(getattr(route, "path", None) == "/boft/info" for route in table):
        return True
    for method, path, handler in ROUTES:
        table.route(method, path)(handler)
    return True


register()
