"""Issue 12: every route of the pack against the attack classes, on the real server.

One ComfyUI server for the module. A table of requests drives ``/boft/info``, ``/boft/check`` and
``/boft/upload`` (every route the pack registers: checked against ``routes.ROUTES``) with path
traversal in its spellings, absolute paths, links in and out of ``loras`` (dangling ones too), long
names, bidi and other invisible characters, malformed and huge headers, bad query parameters, and
concurrent uploads. For every answer: no 500, the status and message the row expects, no server
path in the body, nothing of the canary (a file outside ``loras``, reachable only through links):
neither its bytes nor its size nor its first 8 bytes read as a number. At the end: the file tree
holds exactly what the accepted uploads added (nothing else written, nothing changed), the server
answers and logged no unhandled error.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from comfy_host import REPO_ROOT
from safetensors.torch import save_file

GOOD = "good.safetensors"


def boft_bytes(tmp: Path, seed: int) -> bytes:
    """A small valid LyCORIS BOFT file (random blocks), as bytes."""
    g = torch.Generator().manual_seed(seed)
    path = tmp / f"boft{seed}.safetensors"
    save_file({"lycoris_proj.oft_blocks": torch.randn(2, 4, 4, 4, generator=g) * 0.05,
               "lycoris_proj.alpha": torch.tensor(0.0)}, str(path))
    return path.read_bytes()


def with_header(header: bytes, body: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + body


def request(server, method: str, path: str, query, body: bytes | None = None) -> tuple[int, str]:
    """(status, body text); ``query`` a dict, a list of pairs, or a raw query string."""
    raw = query if isinstance(query, str) else urllib.parse.urlencode(query)
    req = urllib.request.Request(f"{server.url}{path}?{raw}", data=body, method=method,
                                 headers={"Content-Type": "application/octet-stream"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def snapshot(root: Path, skip: set[Path]) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): its kind, size, mtime and link target."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if any(path == s or s in path.parents for s in skip):
                continue
            st = path.lstat()
            plain = not path.is_symlink() and path.is_file()
            seen[str(path.relative_to(root))] = (st.st_mode, st.st_size if plain else None,
                                                 st.st_mtime_ns if plain else None,
                                                 os.readlink(path) if path.is_symlink() else None)
    return seen


@pytest.fixture(scope="module")
def world(sd15_server, tmp_path_factory):
    """The server with files in and out of its loras folders, a canary outside, and the tree's snapshot."""
    server = sd15_server
    w = server.work_dir
    upload = w / "base" / "models" / "loras"  # the first loras folder: where uploads go
    upload.mkdir(parents=True, exist_ok=True)
    loras = server.models / "loras"
    tmp = tmp_path_factory.mktemp("route_files")
    secret = w / "secret"
    secret.mkdir()
    canary = secret / "canary.txt"
    canary.write_bytes(b"CANARY-" + uuid.uuid4().hex.encode() * 32771)  # 1 048 679 bytes
    (secret / "canary.safetensors").write_bytes(canary.read_bytes())
    good = boft_bytes(tmp, 0)
    (loras / GOOD).write_bytes(good)
    (loras / "bidi\u202eevil.safetensors").write_bytes(good)  # a name placed directly: shown as text
    (loras / "link_in.safetensors").symlink_to(loras / GOOD)
    (loras / "link_out.safetensors").symlink_to(canary)
    (loras / "outdir").symlink_to(secret, target_is_directory=True)
    (upload / "dangling.safetensors").symlink_to(w / "nowhere.safetensors")
    (upload / "up_link_out.safetensors").symlink_to(canary)
    world = {"server": server, "upload": upload, "loras": loras, "canary": canary, "good": good,
             "other": boft_bytes(tmp, 1), "third": boft_bytes(tmp, 2), "stored": set()}
    world["skip"] = {server.log_path, w / "user", w / "temp", w / "output"}
    world["before"] = snapshot(w, world["skip"])
    return world


def secrets(world) -> list[str]:
    """What must never appear in a body: server paths and anything of the canary."""
    server, canary = world["server"], world["canary"]
    data = canary.read_bytes()
    paths = {str(server.work_dir), os.path.realpath(server.work_dir), str(REPO_ROOT), str(server.comfy_dir),
             os.path.expanduser("~"), sys.prefix, "/tmp/", ".boft-upload-"}
    return [*sorted(paths), data[:32].decode(), str(len(data)), f"{len(data):,}",
            str(struct.unpack("<Q", data[:8])[0]), "secret/", "nowhere"]


def given_names(query) -> list[str]:
    """The names the client sent (an answer may say them back, as they are or as Python's repr)."""
    if isinstance(query, str):
        return [v for k, v in urllib.parse.parse_qsl(query, errors="replace") if k == "name"]
    pairs = query.items() if isinstance(query, dict) else query
    return [str(v) for k, v in pairs if k == "name"]


def check(world, status: int, body: str, want: tuple[int, ...], needle: str | None, query) -> dict:
    assert status != 500 and status in want, (query, status, body)
    answer = json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    text = json.dumps(answer, ensure_ascii=False)
    if needle is not None:
        assert needle in text, (query, needle, answer)
    for name in sorted(given_names(query), key=len, reverse=True):
        for said in (repr(name), name):
            text = text.replace(json.dumps(said, ensure_ascii=False)[1:-1], "")
    for secret in secrets(world):
        assert secret not in text, (query, secret, answer)
    return answer


LONG = "é" * 140 + ".safetensors"  # 292 bytes in UTF-8, 152 characters
TRAVERSALS = ["../secret/canary.txt", "..%2fsecret%2fcanary.txt", "../../secret/canary.safetensors",
              "..\\secret\\canary.safetensors", "....//secret/canary.safetensors", "/etc/passwd",
              "%2e%2e/x.safetensors", "C:\\x.safetensors", "outdir/../../secret/canary.txt",
              "good.safetensors/../../secret/canary.txt", "\x00good.safetensors", "good.safetensors\x00.txt"]
INVISIBLE = ["bidi\u202egnp.safetensors", "a\u200bb.safetensors", "x\u2066y.safetensors", "x\u061cy.safetensors",
             "x\u2028y.safetensors", "x\x7fy.safetensors", "x\ue000y.safetensors", "\ufeffx.safetensors"]


def info_rows(world):
    canary = str(world["canary"])
    rows = [({"name": GOOD}, (200,), '"lycoris-boft"'),
            ({"name": "link_in.safetensors"}, (200,), '"lycoris-boft"'),
            ({"name": "bidi\u202eevil.safetensors"}, (200,), "bidi\u202eevil.safetensors"),
            ({"name": "link_out.safetensors"}, (422,), "link_out.safetensors: not a safetensors BOFT file."),
            ({"name": "outdir/canary.safetensors"}, (422,), "not a safetensors BOFT file"),
            ({"name": "dangling.safetensors"}, (404, 422), None),  # not listed by ComfyUI
            ({"name": canary}, (404,), None), ({"name": str(world["loras"] / GOOD)}, (404,), None),
            ({}, (404,), None), ({"name": ""}, (404,), None), ({"name": LONG}, (404,), None),
            ([("name", "nope.safetensors"), ("name", GOOD)], (404,), None),
            ({"name": GOOD, "node": "../../" + canary}, (200,), None),
            ({"name": GOOD, "node": "x" * 4000}, (200,), None),
            ({"name": GOOD, "block_weights": "[" * 2000}, (200,), None),
            ({"name": GOOD, "block_weights": "IN:1e999, OUT:nan, TE:" + "9" * 5000}, (200,), None),
            ("name=%ff%fe.safetensors", (404,), None), ("name=%2e%2e%2fsecret%2fcanary.txt", (404,), None)]
    rows += [({"name": n}, (404,), None) for n in TRAVERSALS + INVISIBLE]
    return rows


def check_rows(world):
    good = world["good"]
    head = good[:8 + struct.unpack("<Q", good[:8])[0]]
    n = len(good)
    deep = with_header(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    huge_int = with_header(b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}')
    text_offsets = with_header(b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}')
    return [({"name": "x.safetensors", "size": n}, head, (200,), '"ok": true'),
            ({"name": "x.safetensors", "size": len(deep)}, deep, (200,), "nested too deeply"),
            ({"name": "x.safetensors", "size": 2 * 10**8}, with_header(b"{", length=100_000_001), (200,),
             "at most 100,000,000 bytes"),
            ({"name": "x.safetensors", "size": len(huge_int) + 4}, huge_int, (200,), "digits"),
            ({"name": "x.safetensors", "size": len(text_offsets) + 4}, text_offsets, (200,), "'x'"),
            ({"name": "x.safetensors", "size": n}, b"", (200,), '"ok": false'),
            ({"name": "x.safetensors", "size": -5}, head, (200,), '"ok": false'),
            ({"name": "x.safetensors", "size": "1e999"}, head, (400,), "size=<bytes>"),
            ({"name": "x.safetensors", "size": "9" * 5000}, head, (400,), "size=<bytes>"),
            ({"name": "x.safetensors"}, head, (400,), "size=<bytes>"),
            ({"name": LONG, "size": n}, head, (400,), "292 bytes long"),
            ({"name": "link_out.safetensors", "size": n}, head, (200,), '"ok": true'),  # reads only the body
            *[({"name": t, "size": n}, head, (400,), None) for t in TRAVERSALS],
            *[({"name": t, "size": n}, head, (400,), "character U+") for t in INVISIBLE]]


def upload_rows(world):
    good, other = world["good"], world["other"]
    deep = with_header(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    return [({"name": "dangling.safetensors"}, good, (409,), "already in the loras folder", None),
            ({"name": "up_link_out.safetensors"}, good, (409,), "already in the loras folder", None),
            ({"name": "link_in.safetensors"}, good, (409,), "already in the loras folder", None),
            ({"name": LONG}, good, (400,), "292 bytes long", None),
            ({"name": "deep.safetensors"}, deep, (400,), "nested too deeply", None),
            ({"name": "huge.safetensors"}, with_header(b"{", b"\0" * 64, length=100_000_001), (400,),
             "at most 100,000,000 bytes", None),
            ({"name": "junk.safetensors"}, b"\x80\x02junk" * 16, (400,), "not a readable safetensors file", None),
            ({"name": "stored.safetensors"}, good, (200,), '"existed": false', "stored.safetensors"),
            ({"name": "stored.safetensors"}, good, (200,), '"existed": true', None),
            ({"name": "stored.safetensors"}, other, (409,), "already in the loras folder", None),
            ({}, good, (400,), "1 to 200 characters", None),
            *[({"name": t}, good, (400,), None, None) for t in TRAVERSALS],
            *[({"name": t}, good, (400,), "character U+", None) for t in INVISIBLE]]


def test_every_registered_route_is_attacked(pack):
    routes = sys.modules[pack.__name__ + ".nodes.routes"]
    assert {path for _, path, _ in routes.ROUTES} == {"/boft/info", "/boft/check", "/boft/upload"}


def test_info_route_attacks(world):
    for query, want, needle in info_rows(world):
        status, body = request(world["server"], "GET", "/boft/info", query)
        check(world, status, body, want, needle, query)


def test_check_route_attacks(world):
    for query, body, want, needle in check_rows(world):
        status, text = request(world["server"], "POST", "/boft/check", query, body)
        check(world, status, text, want, needle, query)


def test_upload_route_attacks(world):
    for query, body, want, needle, stored in upload_rows(world):
        status, text = request(world["server"], "POST", "/boft/upload", query, body)
        check(world, status, text, want, needle, query)
        if stored:
            world["stored"].add(stored)
            assert (world["upload"] / stored).read_bytes() == body
    nowhere = world["server"].work_dir / "nowhere.safetensors"
    assert os.readlink(world["upload"] / "dangling.safetensors") == str(nowhere) and not nowhere.exists()


def test_concurrent_uploads_of_one_name(world):
    """Eight uploads of one new name at once, of two different files: one file wins, intact; the
    same bytes as the winner are accepted as existing, the others refused."""
    bodies = [world["good"], world["third"]] * 4
    answers = [None] * len(bodies)

    def send(i):
        answers[i] = request(world["server"], "POST", "/boft/upload", {"name": "race.safetensors"}, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for status, text in answers:
        check(world, status, text, (200, 409), None, {"name": "race.safetensors"})
    stored = (world["upload"] / "race.safetensors").read_bytes()
    assert stored in (world["good"], world["third"])
    world["stored"].add("race.safetensors")
    for body, (status, text) in zip(bodies, answers, strict=True):
        assert status == (200 if body == stored else 409), (status, text)
    assert sum(json.loads(text).get("existed") is False for _, text in answers) == 1


def test_nothing_else_written_and_the_server_is_up(world):
    """Runs last in the module: the tree holds exactly what the accepted uploads added."""
    server = world["server"]
    after = snapshot(server.work_dir, world["skip"])
    upload = str(world["upload"].relative_to(server.work_dir))
    added = {k for k in after if k not in world["before"]}
    assert added == {f"{upload}/{name}" for name in world["stored"]}, added
    assert {k: v for k, v in after.items() if k not in added} == world["before"]
    assert server.get("/system_stats")["system"]
    log = server.log_text()
    for marker in ("Error handling request", "RecursionError", "routes.py"):
        assert marker not in log, server.log_tail()
