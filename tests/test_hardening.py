"""Issue 12: no input crashes the CLI or a prompt, and nothing non-finite is ever merged.

Each defect class the hardening campaign found has a regression test here: in the CLI (the real
``python -m boft_core`` process where the class surfaced there), in boft_core's API, and in the
real host (one ComfyUI server for the module: a NaN strength and a huge-value file each fail the
prompt with our message; the next good prompt renders the identical image).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_errors_and_cli import assert_clean_failure, cli, cli_process

import boft_core
from boft_core import guard
from boft_core.formats import MAX_HEADER, BoftLayer, parse_header, parse_json


# ------------------------------------------------------------------------------------- helpers
def lycoris_tensors(seed=0, dtype=torch.float32, rescale=True) -> dict[str, torch.Tensor]:
    """A small LyCORIS BOFT layer for a (64, 32) weight named ``proj``: 4 stages of 8 blocks of 8."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"lycoris_proj.oft_blocks": (torch.randn(4, 8, 8, 8, generator=g) * 0.05).to(dtype),
               "lycoris_proj.alpha": torch.tensor(0.0)}
    if rescale:
        tensors["lycoris_proj.rescale"] = (1 + torch.randn(64, 1, generator=g) * 0.05).to(dtype)
    return tensors


def write(path, tensors, metadata=None) -> str:
    save_file(tensors, str(path), metadata)
    return str(path)


def split(path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and the bytes after it."""
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(path, header, body=b"") -> str:
    """A file with ``header`` (a dict, or the JSON bytes as they are) and ``body`` after it."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + body)
    return str(path)


@pytest.fixture
def good(tmp_path):
    return write(tmp_path / "good.safetensors", lycoris_tensors(),
                 {"ss_tag_frequency": json.dumps({"1_x": {"sks": 3, "dog": 1}})})


@pytest.fixture
def base(tmp_path):
    g = torch.Generator().manual_seed(7)
    return write(tmp_path / "base.safetensors", {"proj.weight": torch.randn(64, 32, generator=g) * 0.5})


def strict_json(text: str):
    """JSON as a browser's JSON.parse reads it: NaN and Infinity are errors."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON output"))


# ------------------------------------------------------------------------- 1. untrusted JSON
@pytest.mark.parametrize("text,needle", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a":' * 65 + "1" + "}" * 65, "nested too deeply"),
    ("[" + "9" * 5000 + "]", "5000 digits"),
    ("[1e999]", "too large"),
    ("[NaN]", "NaN"),
    ("[-Infinity]", "-Infinity"),
    ('["\\ud800"]', "surrogate"),
    (b"[\"\xff\"]", "not UTF-8"),
    ("[1, ", "invalid JSON"),
])
def test_parse_json_refuses_with_a_boft_error(text, needle):
    with pytest.raises(boft_core.BoftError) as info:
        parse_json(text, "f.safetensors: key")
    assert str(info.value).startswith("f.safetensors: key: ") and needle in str(info.value)


def test_parse_json_reads_what_it_should():
    assert parse_json('{"a": [1, 2.5, "x", null, true], "b": {"c": "\\ud83d\\ude00"}}', "w") == {
        "a": [1, 2.5, "x", None, True], "b": {"c": "\U0001F600"}}
    assert parse_json('{"a":' * 63 + "1" + "}" * 63, "w")  # 63 levels: fine


def header_cases(hdr: dict) -> dict:
    """Malformed safetensors headers (name -> (header, what the error must say))."""
    alpha = hdr["lycoris_proj.alpha"]
    def entry(**change):
        return dict(hdr, **{"lycoris_proj.alpha": dict(alpha, **change)})
    return {
        "deep": (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        "huge int": (json.dumps(hdr)[:-1].encode() + b', "x": {"dtype": "F32", "shape": [' + b"9" * 5000
                     + b'], "data_offsets": [0, 4]}}', "digits"),
        "text offsets": (entry(data_offsets=["0", "4"]), "'lycoris_proj.alpha'"),
        "float offsets": (entry(data_offsets=[0.0, 4.0]), "data_offsets"),
        "three offsets": (entry(data_offsets=[0, 4, 8]), "data_offsets"),
        "negative shape": (entry(shape=[-1]), "non-negative"),
        "bool shape": (entry(shape=[True]), "non-negative"),
        "unknown dtype": (entry(dtype="F128"), "unknown dtype"),
        "dtype not text": (entry(dtype=["F32"]), "unknown dtype"),
        "entry not object": (dict(hdr, **{"lycoris_proj.alpha": [1, 2]}), "not an object"),
        "size mismatch": (entry(dtype="F64"), "bytes for a F64 tensor"),
        "metadata list": (dict(hdr, __metadata__=[1, 2]), "__metadata__ is not an object"),
        "metadata text": (dict(hdr, __metadata__="x"), "__metadata__ is not an object"),
        "metadata number": (dict(hdr, __metadata__={"a": 5}), "values are not all strings"),
        "not an object": ([1, 2], "does not start with"),
        "infinity": (json.dumps(hdr)[:-1].encode() + b', "z": Infinity}', "Infinity"),
    }


@pytest.mark.parametrize("case", list(header_cases({"lycoris_proj.alpha": {}})))
def test_malformed_headers_are_clean_cli_errors(tmp_path, good, case):
    hdr, body = split(good)
    header, needle = header_cases(hdr)[case]
    path = write_raw(tmp_path / "bad.safetensors", header, body)
    assert_clean_failure(cli("inspect", path), path, needle)
    with pytest.raises(boft_core.BoftError):
        boft_core.read_header(path)


def test_offsets_must_tile_the_data(tmp_path, good):
    hdr, body = split(good)
    path = write_raw(tmp_path / "gap.safetensors", hdr, body + b"\0" * 4)
    assert_clean_failure(cli("inspect", path), "after the last tensor")
    shifted = {k: (dict(v, data_offsets=[v["data_offsets"][0] + 4, v["data_offsets"][1] + 4])
                   if k != "__metadata__" else v) for k, v in hdr.items()}
    path = write_raw(tmp_path / "shifted.safetensors", shifted, b"\0" * 4 + body)
    assert_clean_failure(cli("inspect", path), "starts at byte 4, expected 0")


def test_one_header_limit_safetensors_own():
    """The reader's limit is safetensors' own, and the page's drop check sends up to the same."""
    assert MAX_HEADER == 100_000_000
    js = (Path(__file__).resolve().parent.parent / "web" / "js" / "boft_common.js").read_text()
    (limit,) = re.findall(r"const HEADER_LIMIT = ([\d_]+);", js)
    assert int(limit.replace("_", "")) == MAX_HEADER
    head = struct.pack("<Q", MAX_HEADER + 1) + b"{"
    with pytest.raises(boft_core.BoftError, match="at most 100,000,000 bytes"):
        parse_header(head, 2 * MAX_HEADER, "big.safetensors")


@pytest.mark.parametrize("tags", ['{"a": {"x": 1e999, "y": 2}}', '{"a": {"x": Infinity}}', '{"a": {"x": NaN}}',
                                  "[" * 50_000, '{"a": {"x": ' + "9" * 5000 + "}}", "[1, 2]", '{"a": 5}'])
def test_malformed_tag_frequency_gives_no_tags_and_no_error(tmp_path, tags):
    path = write(tmp_path / "tags.safetensors", lycoris_tensors(), {"ss_tag_frequency": tags})
    result = cli("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    assert strict_json(result.stdout)["trigger_words"] == []
    assert boft_core.trigger_words({"ss_tag_frequency": tags}) == []


def test_tag_counts_that_are_not_numbers_are_skipped():
    tags = json.dumps({"a": {"x": 2, "y": "3", "z": True, "w": None, "v": 1.5}, "b": [1]})
    assert boft_core.trigger_words({"ss_tag_frequency": tags}) == [("x", 2), ("v", 1)]


def peft_folder(folder, config: bytes | None) -> str:
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    write(os.path.join(folder, "adapter_model.safetensors"),
          {"base_model.model.proj.boft_R": torch.randn(1, 4, 8, 8, generator=g) * 0.05,
           "base_model.model.proj.boft_s": torch.ones(64, 1)})
    if config is not None:
        with open(os.path.join(folder, "adapter_config.json"), "wb") as f:
            f.write(config)
    return str(folder)


@pytest.mark.parametrize("config,needle", [
    (b"[]", "expected an object"), (b"5", "expected an object"), (b'"x"', "expected an object"),
    (b'{"peft_type": "\xff"}', "not UTF-8"), (b'{"a":' * 100_000, "nested too deeply"),
    (b'{"r": ' + b"9" * 5000 + b"}", "digits"), (b'{"r": NaN}', "NaN"), (b"", "invalid JSON"),
])
def test_malformed_peft_configs_are_clean_errors(tmp_path, config, needle):
    folder = peft_folder(tmp_path / "peft", config)
    assert_clean_failure(cli("inspect", folder), "adapter_config.json", needle)


def test_peft_config_with_a_byte_order_mark_reads(tmp_path):
    folder = peft_folder(tmp_path / "peft", b'\xef\xbb\xbf{"peft_type": "BOFT"}')
    assert strict_json(cli("inspect", folder, "--json").stdout)["peft_config"] == {"peft_type": "BOFT"}


# ------------------------------------------------------------------------------- 2. float8
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_files_load_and_merge(tmp_path, base, dtype):
    path = write(tmp_path / "f8.safetensors", lycoris_tensors(dtype=dtype))
    assert boft_core.load(path).layers["lycoris_proj"].blocks.dtype == dtype
    out = tmp_path / "out.safetensors"
    result = cli("merge", base, path, "--out", str(out))
    assert result.returncode == 0, result.stderr
    broken = lycoris_tensors(dtype=torch.float32)
    broken["lycoris_proj.oft_blocks"][0, 0, 0, 1] = float("nan")
    broken["lycoris_proj.oft_blocks"] = broken["lycoris_proj.oft_blocks"].to(dtype)
    path = write(tmp_path / "f8nan.safetensors", broken)
    assert_clean_failure(cli("inspect", path), "lycoris_proj", "NaN")


# ------------------------------------------------------------------ 3. huge values, 4. strength
def huge_cases() -> dict:
    """Files whose values are finite but make a merged weight non-finite (or no rotation at all)."""
    sign = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(1)).sign()
    def lyco(**change):
        tensors = lycoris_tensors()
        tensors.update({f"lycoris_proj.{k}": v for k, v in change.items()})
        return tensors
    return {
        "blocks 3e38": (lyco(oft_blocks=sign * 3e38), "not finite"),
        "blocks 1e20": (lyco(oft_blocks=sign * 1e20), "rotation"),  # a singular solve, or garbage
        "rescale 3e38": (lyco(rescale=torch.full((64, 1), 3e38)), "not finite"),
        "boft_s 3e38": ({"lora_unet_proj.boft_R": torch.randn(1, 4, 8, 8) * 0.05,
                         "lora_unet_proj.boft_s": torch.full((64, 1), 3e38)}, "not finite"),
    }


@pytest.mark.parametrize("case", list(huge_cases()))
def test_huge_values_are_refused_before_writing(tmp_path, base, case):
    tensors, needle = huge_cases()[case]
    path = write(tmp_path / "huge.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    for mode in boft_core.MODES:
        assert_clean_failure(cli("merge", base, path, "--out", str(out), "--mode", mode), path, "proj", needle)
        assert not out.exists()


def test_a_non_finite_merge_found_while_writing_leaves_out_as_it_was(tmp_path, base, monkeypatch):
    """The exact check of each merged weight, behind check_merge's bound (here switched off): the
    half-written file beside --out is removed and an existing --out is left as it was."""
    path = write(tmp_path / "huge.safetensors", huge_cases()["rescale 3e38"][0])
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the old output")
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(guard, "check_merge", lambda *args, **kwargs: 1.0)
    assert_clean_failure(cli("merge", base, path, "--out", str(out)), path, "proj.weight", "not finite")
    assert out.read_bytes() == b"the old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                   getattr(torch, "float8_e5m2", torch.float16)])
def test_all_finite_equals_isfinite(dtype):
    """formats.all_finite (one aminmax pass) against torch.isfinite(...).all() in float64."""
    from boft_core.formats import all_finite

    g = torch.Generator().manual_seed(3)
    for n in (0, 1, 7, 64, 1000, 70001):
        for bad in (None, math.nan, math.inf, -math.inf):
            x = torch.randn(n, generator=g, dtype=torch.float64)
            if bad is not None and n:
                x[int(torch.randint(n, (1,), generator=g))] = bad
            x = x.to(dtype)
            expected = bool(torch.isfinite(x.double()).all())
            assert all_finite(x) == expected, (dtype, n, bad)
            if n > 2:  # a strided view too
                assert all_finite(x[::2]) == bool(torch.isfinite(x[::2].double()).all()), (dtype, n, bad)


@pytest.mark.parametrize("strength", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_strength_is_refused(tmp_path, base, good, strength):
    out = tmp_path / "out.safetensors"
    assert_clean_failure(cli("merge", base, good, "--out", str(out), f"--strength={strength}"),
                         "--strength must be a finite number")
    assert not out.exists()
    with pytest.raises(boft_core.BoftError, match="finite"):
        boft_core.check_merge(boft_core.load(good).layers["lycoris_proj"], float(strength), "lycoris",
                              torch.ones(64, 32))


def test_a_strength_too_large_for_float16_is_refused_with_the_exact_peak(good):
    """lycoris at s = 10 with rotations by nearly pi: each stage's blend has norm ~19; the guard
    computes the merge itself once its bound cannot rule the overflow out."""
    layer = boft_core.load(good).layers["lycoris_proj"]
    wild = BoftLayer(name="wild", kind=layer.kind, blocks=layer.blocks.sign() * 1e3)
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).half()
    with pytest.raises(boft_core.BoftError, match=r"wild: at strength 10 \(lycoris\) its merged weight reaches"):
        boft_core.check_merge(wild, 10.0, "lycoris", weight)
    boft_core.check_merge(wild, 10.0, "lycoris", weight.float())  # float32 holds it
    assert torch.isfinite(boft_core.merge_weight(weight.float(), wild, 10.0, "lycoris")).all()


def test_weights_without_values_are_judged_by_the_gain(good):
    """A weight on the meta device (a model not materialized) cannot be read: the gain decides."""
    layer = boft_core.load(good).layers["lycoris_proj"]
    boft_core.check_merge(layer, 1.0, "lycoris", torch.empty(64, 32, device="meta", dtype=torch.float16))
    wild = BoftLayer(name="wild", kind=layer.kind, blocks=layer.blocks.sign() * 1e3)
    with pytest.raises(boft_core.BoftError, match="times the layer's own"):
        boft_core.check_merge(wild, 10.0, "lycoris", torch.empty(64, 32, device="meta", dtype=torch.float16))


def test_normal_files_are_never_refused_and_the_bound_holds():
    """Trained-like layers of every kind at strengths -10..10 in every mode, float16/float32
    weights: the guard passes and the merge is finite. Layers with wild generators (the path that
    measures the prepared rotation) too, where a refusal must be a real overflow. Everywhere
    ``|W'| <= gain * line norm``."""
    g = torch.Generator().manual_seed(5)
    layers = []
    for kind, shape, std in (("lycoris-boft", (4, 8, 8, 8), 0.05), ("lycoris-diag-oft", (1, 8, 8, 8), 0.1),
                             ("peft-boft", (2, 8, 8, 8), 0.2), ("kohya-boft", (1, 16, 4, 4), 0.05),
                             ("lycoris-boft", (4, 8, 8, 8), 30.0), ("peft-boft", (2, 8, 8, 8), 80.0)):
        blocks = torch.randn(*shape, generator=g) * std
        scale = 1 + torch.randn(64, generator=g) * 0.05
        layers.append(BoftLayer(name=f"{kind}:{std}", kind=kind, blocks=blocks, scale=scale))
    for layer in layers:
        trained_like = layer.blocks.abs().max() < 2
        rows, cols = (64, 24) if layer.side == "out" else (64, 64)
        weight = torch.randn(rows, cols, generator=g) * 0.3
        lines = torch.linalg.vector_norm(weight, dim=0 if layer.side == "out" else 1).max()
        for strength in (-10.0, -1.0, 0.0, 0.3, 1.0, 2.5, 10.0):
            for mode in boft_core.MODES:
                exact = boft_core.merge_weight(weight.double(), layer, strength, mode)
                assert exact.abs().max() <= guard.gain(layer, strength, mode) * lines * (1 + 1e-6), (
                    layer.name, strength, mode)
                for dtype in (torch.float16, torch.float32):
                    try:
                        boft_core.check_merge(layer, strength, mode, weight.to(dtype))
                    except boft_core.BoftError:
                        assert not trained_like, (layer.name, strength, mode, dtype)
                        assert exact.abs().max() > torch.finfo(dtype).max * 0.99, (layer.name, strength, mode)
                        continue
                    assert torch.isfinite(boft_core.merge_weight(weight.to(dtype), layer, strength, mode)).all()


def test_block_norm_bound_is_an_upper_bound_and_tight_for_rotations():
    g = torch.Generator().manual_seed(2)
    sizes = torch.logspace(-3, 3, 50, dtype=torch.float64)[:, None, None]
    blocks = torch.randn(50, 6, 6, generator=g, dtype=torch.float64) * sizes
    exact = torch.linalg.matrix_norm(blocks, ord=2)
    bound = guard.block_norm_bound(blocks)
    assert (bound >= exact).all() and (bound <= exact * 6 ** (1 / 32) * 1.001).all()
    q = torch.randn(10, 8, 8, generator=g, dtype=torch.float64)
    from boft_core.butterfly import cayley
    rotations = guard.block_norm_bound(cayley(q - q.mT))
    assert (rotations >= 1 - 1e-9).all() and (rotations <= 8 ** (1 / 32) + 1e-6).all()


# --------------------------------------------------------------------- 6. the CLI as a process
def test_cli_process_regressions(tmp_path, good, base):
    """The real entry point on one example of each class: one error line, exit 2, no traceback."""
    hdr, body = split(good)
    deep = write_raw(tmp_path / "deep.safetensors", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", body)
    assert_clean_failure(cli_process("inspect", deep), deep, "nested too deeply")
    offsets = write_raw(tmp_path / "offsets.safetensors", dict(hdr, **{"lycoris_proj.alpha": dict(
        hdr["lycoris_proj.alpha"], data_offsets=["a", "b"])}), body)
    assert_clean_failure(cli_process("inspect", offsets), "lycoris_proj.alpha", "data_offsets")
    config = peft_folder(tmp_path / "peft", b"[]")
    assert_clean_failure(cli_process("inspect", config), "adapter_config.json")
    huge = write(tmp_path / "huge.safetensors", huge_cases()["rescale 3e38"][0])
    out = tmp_path / "out.safetensors"
    assert_clean_failure(cli_process("merge", base, huge, "--out", str(out)), "lycoris_proj", "not finite")
    assert_clean_failure(cli_process("merge", base, good, "--out", str(out), "--strength", "nan"), "finite")
    assert not out.exists()
    f8 = write(tmp_path / "f8.safetensors", lycoris_tensors(dtype=torch.float8_e4m3fn))
    assert cli_process("merge", base, f8, "--out", str(out)).returncode == 0


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    """``python -m boft_core inspect FILE | head -1`` (a file with 3000 layers, ~200 KB of text)."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"lycoris_layer_{i}.oft_blocks": torch.randn(1, 2, 2, 2, generator=g) * 0.05 for i in range(3000)}
    path = write(tmp_path / "many.safetensors", tensors)
    script = (f"{sys.executable} -m boft_core inspect {path} | head -1; "
              f"{sys.executable} -m boft_core inspect {path} --json | head -c 100 >/dev/null")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert result.stdout.strip() == path
    assert result.stderr == "", result.stderr


# ------------------------------------------------------------------- the prompt path, end to end
CKPT = "hardening_sd15.safetensors"


@pytest.fixture(scope="module")
def server(sd15_server, comfy):
    return sd15_server


def boft_for_checkpoint(ckpt, suffixes=("attn1.to_q.weight", "attn1.to_v.weight"), seed=0) -> dict:
    """LyCORIS BOFT tensors (one stage of 4x4 blocks) for the checkpoint's UNet weights whose
    names end in ``suffixes``, under the kohya names ComfyUI maps (``lora_unet_<LDM path>``)."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(ckpt), framework="pt") as f:
        for key in f.keys():
            if key.startswith("model.diffusion_model.") and key.endswith(suffixes):
                out = f.get_slice(key).get_shape()[0]
                name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
                tensors[f"{name}.oft_blocks"] = torch.randn(1, out // 4, 4, 4, generator=g) * 0.3
                tensors[f"{name}.alpha"] = torch.tensor(0.0)
    assert tensors
    return tensors


def test_prompt_path_nan_strength_and_huge_values(server):
    import tiny_models
    from comfy_host import ComfyError
    from PIL import Image

    loras = server.models / "loras"
    tensors = boft_for_checkpoint(server.models / "checkpoints" / CKPT)
    write(loras / "hard_good.safetensors", tensors)
    first = next(k for k in tensors if k.endswith(".oft_blocks"))
    out = tensors[first].shape[1] * 4
    huge = dict(tensors, **{first.replace("oft_blocks", "rescale"): torch.full((out, 1), 3e38)})
    write(loras / "hard_huge.safetensors", huge)
    write(loras / "hard_blocks.safetensors", dict(tensors, **{first: tensors[first].sign() * 3e38}))
    _, body = split(loras / "hard_good.safetensors")
    write_raw(loras / "hard_deep.safetensors", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", body)

    def workflow(name, strength):
        def patch(model_ref):
            return {"boft": {"class_type": "BOFTLoaderModelOnly", "inputs": {
                "model": model_ref, "boft_name": name, "strength_model": strength, "mode": "lycoris"}}}, ["boft", 0]
        return tiny_models.sd15_workflow(CKPT, seed=4, patch_model=patch)

    def image(name, strength):
        (png,) = server.image_bytes(server.run(workflow(name, strength)))
        import io
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)

    plain = image("hard_good.safetensors", 0.0)
    before = image("hard_good.safetensors", 1.0)
    assert np.abs(before - plain).mean() > 1.0, "the good BOFT must change the image"
    cases = [("hard_good.safetensors", math.nan, "strength_model must be a finite number"),
             ("hard_huge.safetensors", 1.0, "its merged weight"),
             ("hard_blocks.safetensors", 1.0, "its rotation"),
             ("hard_deep.safetensors", 1.0, "nested too deeply")]
    for name, strength, message in cases:
        with pytest.raises(ComfyError) as info:
            server.run(workflow(name, strength))
            pytest.fail(f"{name} at strength {strength}: the prompt succeeded")
        error = info.value.data
        assert error.get("node_type") == "BOFTLoaderModelOnly", error
        text = error["exception_message"]
        assert message in text and name in text and "Traceback" not in text, text
        assert error.get("exception_type", "").endswith("BoftError"), error
    assert np.array_equal(image("hard_good.safetensors", 1.0), before)
    assert np.array_equal(image("hard_good.safetensors", 0.0), plain)
    # The info panel's route on the same files: our message or finite numbers, never NaN in JSON.
    for name, _, message in cases[1:]:
        status, body = http_get(server, "/boft/info?" + urllib.parse.urlencode({"name": name}))
        answer = strict_json(body)
        assert status == 200 or (status == 422 and message in answer["error"]), (name, status, answer)


def http_get(server, path) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_core_lora_loader_refuses_huge_values_and_nan_strength(server):
    """Core's LoraLoaderModelOnly goes through our adapter (registered in core's adapter list): a
    huge-value file and a NaN strength fail the prompt with our message naming the layer; the
    model is left as it was (the next good prompts render the identical images)."""
    import io

    import tiny_models
    from comfy_host import ComfyError
    from PIL import Image

    loras = server.models / "loras"
    tensors = boft_for_checkpoint(server.models / "checkpoints" / CKPT, seed=1)
    write(loras / "core_good.safetensors", tensors)
    # the last layer ComfyUI patches, so layers before it are already written when the guard refuses
    last = sorted(k for k in tensors if k.endswith(".oft_blocks"))[-1]
    layer = last[:-len(".oft_blocks")]
    out = tensors[last].shape[1] * 4
    write(loras / "core_huge.safetensors", dict(tensors, **{f"{layer}.rescale": torch.full((out, 1), 3e38)}))
    write(loras / "core_blocks.safetensors", dict(tensors, **{last: tensors[last].sign() * 3e38}))

    def workflow(name, strength):
        def patch(model_ref):
            return {"lora": {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": model_ref, "lora_name": name, "strength_model": strength}}}, ["lora", 0]
        return tiny_models.sd15_workflow(CKPT, seed=6, patch_model=patch)

    def image(name, strength):
        history = server.run(workflow(name, strength))
        cached = [n for event, m in history["status"]["messages"] if event == "execution_cached" for n in m["nodes"]]
        assert "sampler" not in cached, cached  # computed anew, not ComfyUI's cached output
        (png,) = server.image_bytes(history)
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)

    plain = image("core_good.safetensors", 0.0)
    before = image("core_good.safetensors", 1.0)
    assert np.abs(before - plain).mean() > 1.0, "the good BOFT must change the image"
    cases = [("core_huge.safetensors", 1.0, "KSampler", ["its merged weight", layer]),
             ("core_good.safetensors", math.nan, "KSampler", ["strength must be a finite number"]),
             ("core_blocks.safetensors", 1.0, "LoraLoaderModelOnly", ["its rotation", layer])]
    for name, strength, node, needles in cases:
        with pytest.raises(ComfyError) as info:
            server.run(workflow(name, strength))
            pytest.fail(f"{name} at strength {strength}: the prompt succeeded")
        error = info.value.data
        text = error["exception_message"]
        assert error.get("node_type") == node, error
        assert all(n in text for n in needles) and "Traceback" not in text, text
        assert error.get("exception_type", "").endswith("BoftError"), error
    assert np.array_equal(image("core_good.safetensors", 1.0), before)
    assert np.array_equal(image("core_good.safetensors", 0.0), plain)
