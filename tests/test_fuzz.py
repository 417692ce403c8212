"""Fuzzing every format the pack reads: no crash, no hang, no non-finite merge (issue 12).

Seeds: a small valid file of each format (LyCORIS BOFT with alpha and rescale, LyCORIS diag-OFT,
a PEFT adapter folder with ``adapter_config.json`` and a trained bias, kohya ``networks.boft``; PEFT
OFTv2 with coft and the pre-0.18 series, kohya ``networks.oft_v2`` with coft, OneTrainer OFT_2 with
``scaled_oft`` and a shared block, kohya ``networks.oft`` with Flux-style parts, ComfyUI-trained
OFT), most with kohya training metadata. Each case applies one to three mutations, drawn from a
generator seeded by the case number: byte flips (mostly in the header), truncation, appended
bytes, header edits (dtype, shape, data_offsets, entries, keys, the whole header; numbers,
strings, NaN, huge integers, deep nesting), tensor edits (dtype, shape, values from 3e38 to NaN,
missing and stray keys), ``__metadata__`` / ``ss_tag_frequency`` edits and ``adapter_config.json``
edits. Then the case is read (``read_header``, ``load``), described as the CLI and the panel do
(``describe``, strict JSON, ``trigger_text``, per-layer statistics), and every layer that loads
is guarded and merged at a drawn strength and mode into float32/float16/bfloat16 weights; every
eighth case also runs the CLI's ``inspect --json`` and ``merge`` in process.

Asserted over all cases: nothing raises but ``BoftError`` (and the CLI exits 0 or 2), no case
runs longer than ``CASE_SECONDS``, and no merge that the guard lets through is non-finite.

``BOFT_FUZZ_CASES=N`` (default 300) sets the number of cases, ``--fuzz-long`` makes it 100 000;
``BOFT_FUZZ_START=K`` starts at case K (to replay one: ``BOFT_FUZZ_START=K BOFT_FUZZ_CASES=1``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import time
import traceback

import pytest
import torch
from safetensors.torch import save

import boft_core
from boft_core.cli import describe, main
from boft_core.stats import layer_stats, trigger_text

DEFAULT_CASES = 500
LONG_CASES = 100_000
CASE_SECONDS = 10.0  # a case is a few milliseconds; this is a hang

TOKENS = [  # JSON texts put where a header value was
    "-1", "0", "1", "7", "18446744073709551616", "9223372036854775807", "1" + "0" * 40, "9" * 5000, "1.5",
    "1e999", "-1e999", "NaN", "Infinity", "-Infinity", '"x"', '"F32"', '"F16"', '"F8_E4M3"', '"F8_E5M2"',
    '"BOOL"', '"C64"', '"F4"', '"I64"', "null", "true", "false", "[]", "{}", "[0]", "[0, 0, 0]", "[1, 0]",
    "[-1, 4]", '["0", "4"]', "[0.0, 4.0]", "[" * 3000 + "]" * 3000, '{"a": ' * 80 + "1" + "}" * 80,
    '"\\ud800"', '"\\u0000"', "[[1]]", "[4, 4]", "[2, 2, 2, 2]", "[1, 1, 4, 4]", "[16, 1]", "[0, 4]",
]
TAG_TEXTS = [  # values for ss_tag_frequency
    '{"1_x": {"sks": 3, "dog": 1}}', '{"a": {"x": 1e999}}', '{"a": {"x": Infinity, "y": 2}}', '{"a": {"x": NaN}}',
    '{"a": {"x": ' + "9" * 5000 + "}}", "[" * 5000, '{"a": [1, 2]}', "5", '"x"', "", "{", '{"a": {"\\ud800": 1}}',
    '{"a": {"x": -3, "y": 1.5, "z": true, "w": null}}', '{"a": ' * 200 + "{}" + "}" * 200,
]
CONFIGS = [  # adapter_config.json contents
    b'{"peft_type": "BOFT", "boft_block_size": 4, "boft_n_butterfly_factor": 2}', b"[]", b"5", b'"x"', b"",
    b"\xff\xfe{", b'{"a":' * 5000, b'{"r": ' + b"9" * 5000 + b"}", b'{"r": NaN}', b'{"r": 1e999}',
    b'{"peft_type": "LORA"}', b'{"peft_type": 5}', b'{"peft_type": {"a": [1]}}', b'\xef\xbb\xbf{"peft_type": "BOFT"}',
    b'{"peft_type": "\\ud800"}', b"null", b'{"peft_type": "boft", "target_modules": ["proj"]}',
    b'{"peft_type": "OFT", "oft_block_size": 4, "r": 0, "use_cayley_neumann": true, "num_cayley_neumann_terms": 5, '
    b'"block_share": false, "coft": true, "eps": 0.1, "peft_version": "0.17.0"}',
    b'{"peft_type": "OFT", "oft_block_size": 4, "r": 0, "use_cayley_neumann": false, "block_share": false, '
    b'"coft": false, "peft_version": "0.21.2"}',
    b'{"peft_type": "OFT", "use_cayley_neumann": true, "num_cayley_neumann_terms": 99, "peft_version": "x"}',
    b'{"peft_type": "OFT", "oft_block_size": 4, "r": 0, "use_cayley_neumann": true, "num_cayley_neumann_terms": 5, '
    b'"block_share": true, "coft": false, "peft_version": "0.13.0"}',
]
OFT_CONFIG = CONFIGS[-4]
VALUES = [3e38, -3e38, 1e38, 1e30, 1e20, 1e10, 65504.0, 1e5, float("inf"), float("-inf"), float("nan"), 1e-45,
          0.0, -0.0, 1.0, -1.0]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
STRENGTHS = [1.0, 0.0, 0.5, -1.0, 2.0, 10.0, -10.0, 1e3, 1e30, -1e30, 1e300, 5e-324, float("nan"), float("inf")]
SUFFIXES = [".oft_blocks", ".alpha", ".rescale", ".boft_R", ".boft_s", ".base_layer.bias", ".lora_up.weight",
            ".hada_w1_a", ".oft_r", "", ".oft_R.weight", ".oft_R.scaled_oft", ".oft_blocks.0", ".oft_blocks.3"]


# ------------------------------------------------------------------------------------- seeds
def _seeds() -> dict:
    """{format: (tensors, metadata, config or None)}: small valid files of every format we read."""
    g = torch.Generator().manual_seed(0)
    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std
    meta = {"ss_network_module": "lycoris.kohya", "ss_tag_frequency": TAG_TEXTS[0], "ss_output_name": "fuzz"}
    lycoris = {"lycoris_a.oft_blocks": r(2, 4, 4, 4), "lycoris_a.alpha": torch.tensor(0.01),
               "lycoris_a.rescale": 1 + r(16, 1, std=0.05),
               "lycoris_b.oft_blocks": r(1, 2, 4, 4), "lycoris_b.alpha": torch.tensor(0.0)}
    diag = {"lycoris_c.oft_blocks": r(4, 4, 4), "lycoris_c.alpha": torch.tensor(0.0),
            "lycoris_c.rescale": 1 + r(16, 1, std=0.05)}
    peft = {"base_model.model.a.boft_R": r(2, 4, 4, 4), "base_model.model.a.boft_s": 1 + r(12, 1, std=0.05),
            "base_model.model.a.base_layer.bias": r(12), "base_model.model.b.boft_R": r(1, 2, 4, 4),
            "base_model.model.b.boft_s": 1 + r(1, 8, std=0.05)}
    kohya = {"lora_unet_a.boft_R": r(1, 4, 4, 4), "lora_unet_a.boft_s": 1 + r(12, 1, std=0.05)}
    peft_oft = {"base_model.model.a.oft_R.weight": r(4, 6), "base_model.model.a.base_layer.bias": r(12),
                "base_model.model.b.oft_R.weight": r(2, 28)}
    oft_v2 = {"lora_unet_a.oft_R.weight": r(4, 6), "lora_unet_b.oft_R.weight": r(1, 6)}
    onetrainer = {"diffusion_model.a.oft_R.weight": r(2, 28), "diffusion_model.a.oft_R.scaled_oft": torch.tensor(1.0),
                  "diffusion_model.b.oft_R.weight": r(1, 6)}
    kohya_oft = {"oft_unet_a.oft_blocks": r(4, 4, 4), "oft_unet_a.alpha": torch.tensor(0.01),
                 "oft_unet_c.oft_blocks.0": r(2, 4, 4), "oft_unet_c.oft_blocks.1": r(2, 4, 4),
                 "oft_unet_c.alpha": torch.tensor(0.01)}
    comfyui = {"diffusion_model.c.oft_blocks": r(4, 4, 4), "diffusion_model.c.alpha": torch.tensor(1.0),
               "diffusion_model.a.oft_blocks": r(2, 8, 8), "diffusion_model.a.alpha": torch.tensor(1.0)}
    v2_meta = dict(meta, ss_network_module="networks.oft_v2",
                   ss_network_args=json.dumps({"coft": "True", "coft_eps": "0.1"}))
    return {"lycoris-boft": (lycoris, meta, None), "lycoris-diag-oft": (diag, meta, None),
            "peft-boft": (peft, {}, CONFIGS[0]),
            "kohya-boft": (kohya, dict(meta, ss_network_module="networks.boft"), None),
            "peft-oft": (peft_oft, {}, OFT_CONFIG), "kohya-oft-v2": (oft_v2, v2_meta, None),
            "onetrainer-oft": (onetrainer, {}, None),
            "kohya-oft": (kohya_oft, dict(meta, ss_network_module="networks.oft"), None),
            "comfyui-oft": (comfyui, {}, None)}


SEEDS = _seeds()
BASE = {"a.weight": (16, 5), "b.weight": (8, 3), "c.weight": (16, 2)}  # the CLI merge's checkpoint (out side)


# ----------------------------------------------------------------------------------- mutation
def _split(data: bytes) -> tuple[dict | None, bytes]:
    try:
        n = int.from_bytes(data[:8], "little")
        return json.loads(data[8:8 + n]), data[8 + n:]
    except (ValueError, RecursionError):  # an earlier mutation's header: leave it as it is
        return None, data


def _join(header_text: str, body: bytes, rng: random.Random) -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    n = len(raw) if rng.random() < 0.9 else rng.choice([0, 1, len(raw) - 1, len(raw) + 1, 2**63, 100_000_001])
    return int(n).to_bytes(8, "little") + raw + body


def _with_token(value, path: list, token: str) -> str:
    """JSON of ``value`` with the item at ``path`` replaced by the raw JSON text ``token``."""
    marker = "\u0001FUZZ\u0001"
    target = value
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = marker
    return json.dumps(value).replace(json.dumps(marker), token)


def mutate_header(data: bytes, rng: random.Random) -> bytes:
    header, body = _split(data)
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        return data
    keys = [k for k in header if k != "__metadata__"]
    what = rng.random()
    if what < 0.45 and keys:  # one field of one entry
        key = rng.choice(keys)
        field = rng.choice(["dtype", "shape", "data_offsets", "extra"])
        if rng.random() < 0.2:
            header[key].pop(field, None)
            return _join(json.dumps(header), body, rng)
        return _join(_with_token(header, [key, field], rng.choice(TOKENS)), body, rng)
    if what < 0.6 and keys:  # one element of shape / data_offsets
        key = rng.choice(keys)
        field = rng.choice(["shape", "data_offsets"])
        items = header[key].get(field)
        if not isinstance(items, list) or not items:
            return _join(_with_token(header, [key, field], rng.choice(TOKENS)), body, rng)
        return _join(_with_token(header, [key, field, rng.randrange(len(items))], rng.choice(TOKENS)), body, rng)
    if what < 0.75:  # __metadata__
        if rng.random() < 0.5:
            old = header.get("__metadata__")
            header["__metadata__"] = dict(old) if isinstance(old, dict) else {}
            name = rng.choice(["ss_tag_frequency", "ss_network_module", "ss_x", "workflow"])
            if rng.random() < 0.6:
                header["__metadata__"][name] = rng.choice(TAG_TEXTS + ["networks.boft", "lycoris.kohya"])
                return _join(json.dumps(header), body, rng)
            return _join(_with_token(header, ["__metadata__", name], rng.choice(TOKENS)), body, rng)
        return _join(_with_token(header, ["__metadata__"], rng.choice(TOKENS)), body, rng)
    if what < 0.9 and keys:  # rename or remove an entry, or an entry that is no object
        key = rng.choice(keys)
        entry = header.pop(key)
        if rng.random() < 0.4:
            header[key] = "\u0001"
            return _join(_with_token(header, [key], rng.choice(TOKENS)), body, rng)
        if rng.random() < 0.7:
            header[key.rsplit(".", 1)[0] + rng.choice(SUFFIXES)] = entry
        return _join(json.dumps(header), body, rng)
    return _join(rng.choice(TOKENS), body, rng)  # the whole header


def mutate_tensors(tensors: dict, metadata: dict, rng: random.Random, values_only: bool = False) -> None:
    key = rng.choice(sorted(tensors))
    what = rng.random() * 0.3 if values_only else rng.random()
    value = tensors[key]
    if what < 0.3:  # values
        flat = value.to(torch.float64).reshape(-1).clone()
        if flat.numel() and rng.random() < 0.5:
            for _ in range(rng.randint(1, 3)):
                flat[rng.randrange(flat.numel())] = rng.choice(VALUES)
        else:  # the whole tensor larger (up to overflow), or smaller
            flat = flat * 10.0 ** rng.uniform(-3, 39)
        tensors[key] = flat.reshape(value.shape).to(value.dtype)
    elif what < 0.5:  # dtype
        dtype = rng.choice(DTYPES)
        tensors[key] = (value.to(dtype) if not value.is_complex() else value.real.to(dtype)).contiguous()
    elif what < 0.7:  # shape
        shape = [rng.choice([0, 1, 1, 2, 3, 4, 4, 8, 9, 16]) for _ in range(rng.randint(0, 5))]
        tensors[key] = torch.randn(shape, generator=torch.Generator().manual_seed(rng.randrange(2**31))) * 0.1
    elif what < 0.8:  # a missing key
        del tensors[key]
        if not tensors:
            tensors["x.alpha"] = torch.tensor(1.0)
    elif what < 0.9:  # a stray key
        tensors[key.split(".", 1)[0] + rng.choice(SUFFIXES)] = torch.randn(4, 4) * 0.1
    else:  # metadata
        metadata["ss_tag_frequency"] = rng.choice(TAG_TEXTS)
        if rng.random() < 0.3:
            metadata["ss_network_module"] = rng.choice(["networks.boft", "networks.oft", "networks.oft_v2", "x"])
            if rng.random() < 0.5:
                metadata["ss_network_args"] = rng.choice(['{"coft": "True"}', '{"coft": "1", "coft_eps": "-1"}',
                                                          '{"coft": "True", "coft_eps": "nan"}', "[", "5"])


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    what = rng.random()
    if what < 0.6 and data:  # byte flips, mostly in the header
        n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
        span = min(len(data), 8 + n) if rng.random() < 0.7 and n < len(data) else len(data)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(span)] = rng.randrange(256)
    elif what < 0.85:  # truncation
        del data[rng.randrange(len(data) + 1):]
    else:  # appended bytes
        data += bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 4, 8, 100])))
    return bytes(data)


def make_case(index: int, folder) -> tuple[str, str, list[str]]:
    """Write case ``index`` under ``folder``: (path to load, its format seed, the mutations)."""
    rng = random.Random(f"boft-fuzz:{index}")
    fmt = rng.choice(sorted(SEEDS))
    tensors, metadata, config = SEEDS[fmt]
    tensors = {k: v.clone() for k, v in tensors.items()}
    metadata = dict(metadata)
    kinds = ["values"] * 6 + ["tensors"] * 3 + ["header"] * 4 + ["metadata"] * 2 + ["bytes"] * 3
    kinds += ["config"] * 3 if config else []
    steps = [rng.choice(kinds) for _ in range(rng.choice([1, 1, 2, 3]))]
    for step in steps:
        if step in ("tensors", "values"):
            mutate_tensors(tensors, metadata, rng, values_only=step == "values")
        elif step == "metadata":
            metadata["ss_tag_frequency"] = rng.choice(TAG_TEXTS)
            if rng.random() < 0.3:
                metadata[rng.choice(["ss_network_module", "ss_x"])] = rng.choice(["networks.boft", "x", "\u202e"])
    data = save(tensors, metadata)
    for step in steps:
        if step == "header":
            data = mutate_header(data, rng)
        elif step == "bytes":
            data = mutate_bytes(data, rng)
        elif step == "config":
            config = rng.choice(CONFIGS) if rng.random() < 0.8 else mutate_bytes(config, rng)
    if fmt in ("peft-boft", "peft-oft"):
        target = os.path.join(folder, "peft")
        os.makedirs(target, exist_ok=True)
        cfg = os.path.join(target, "adapter_config.json")
        if config is None or rng.random() < 0.1:
            if os.path.exists(cfg):
                os.remove(cfg)
        else:
            with open(cfg, "wb") as f:
                f.write(config)
        with open(os.path.join(target, "adapter_model.safetensors"), "wb") as f:
            f.write(data)
        return (target if rng.random() < 0.7 else os.path.join(target, "adapter_model.safetensors")), fmt, steps
    path = os.path.join(folder, "case.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    return path, fmt, steps


# ------------------------------------------------------------------------------------- checks
class Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise Hang(f"over {CASE_SECONDS} s")


def _weight_for(layer, rng: random.Random) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    if layer.side == "out":
        shape = (layer.dim, rng.choice([1, 3, 5]))
    else:
        shape = (layer.scale.numel() if layer.scale is not None else 4, layer.dim)
    dtype = rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16])
    return (torch.randn(shape, generator=g) * rng.choice([0.02, 0.5, 3.0])).to(dtype)


def check_case(path: str, folder, index: int, rng: random.Random, stats: dict) -> None:
    """Run everything a user can run on ``path``; raise on a crash or a non-finite merge."""
    file = os.path.join(path, "adapter_model.safetensors") if os.path.isdir(path) else path
    with contextlib.suppress(boft_core.BoftError):
        boft_core.read_header(file)
    try:
        adapter = boft_core.load(path)
    except boft_core.BoftError:
        stats["refused"] += 1
        adapter = None
    if adapter is not None:
        stats["loaded"] += 1
        json.dumps(describe(adapter), allow_nan=False)  # what `inspect --json` and the panel send
        trigger_text(adapter.metadata)
        if index % 4 == 0:
            for row in layer_stats(adapter, probes=4):
                assert row["distance"] == row["distance"] and row["distance"] < 10, row
        for layer in adapter.layers.values():
            weight = _weight_for(layer, rng)
            strength, mode = rng.choice(STRENGTHS), rng.choice(boft_core.MODES)
            try:
                boft_core.check_merge(layer, strength, mode, weight)
            except boft_core.BoftError:
                stats["merges refused"] += 1
                continue
            merged = boft_core.merge_weight(weight, layer, strength, mode)
            stats["merges"] += 1
            if not torch.isfinite(merged).all():
                raise AssertionError(f"non-finite merge: layer {layer.name}, strength {strength}, mode {mode}, "
                                     f"weight {weight.dtype} {tuple(weight.shape)}")
    if index % 8 == 0:
        check_cli(path, folder, rng, stats)


def check_cli(path: str, folder, rng: random.Random, stats: dict) -> None:
    def run(*args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
        assert code in (0, 2) and not err.getvalue().startswith("error: unexpected "), (args, code, err.getvalue())
        return code, out.getvalue()

    code, text = run("inspect", path, "--json")
    if code == 0:
        json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in inspect --json"))
    base = os.path.join(folder, "base.safetensors")
    out = os.path.join(folder, "merged.safetensors")
    if os.path.exists(out):
        os.remove(out)
    strength = rng.choice(STRENGTHS[:8])
    code, _ = run("merge", base, path, "--out", out, f"--strength={strength}", "--mode", rng.choice(boft_core.MODES))
    stats["cli runs"] += 2
    if code == 0:
        from safetensors.torch import load_file

        for key, value in load_file(out).items():
            assert torch.isfinite(value).all(), f"CLI merge wrote a non-finite {key}"


def fuzz_cases(request) -> tuple[int, int]:
    default = LONG_CASES if request.config.getoption("--fuzz-long") else DEFAULT_CASES
    count = int(os.environ.get("BOFT_FUZZ_CASES", default))
    return int(os.environ.get("BOFT_FUZZ_START", "0")), count


def test_fuzz_every_format(tmp_path, request):
    from safetensors.torch import save_file

    start, count = fuzz_cases(request)
    g = torch.Generator().manual_seed(1)
    save_file({k: torch.randn(*shape, generator=g) * 0.5 for k, shape in BASE.items()},
              str(tmp_path / "base.safetensors"))
    stats = dict.fromkeys(["refused", "loaded", "merges", "merges refused", "cli runs"], 0)
    failures, slowest = [], (0.0, None)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    began = time.perf_counter()
    try:
        for index in range(start, start + count):
            path, fmt, steps = make_case(index, tmp_path)
            rng = random.Random(f"boft-fuzz-run:{index}")
            t = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                check_case(path, tmp_path, index, rng, stats)
            except Exception as e:  # a crash, a hang, a non-finite merge: all recorded, all fatal
                failures.append(f"case {index} ({fmt}, {'+'.join(steps)}): {type(e).__name__}: {e}"[:400]
                                + "\n" + "".join(traceback.format_tb(e.__traceback__)[-2:]))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            slowest = max(slowest, (time.perf_counter() - t, index), key=lambda x: x[0])
    finally:
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - began
    summary = (f"{count} cases from {start} in {elapsed:.1f} s ({1000 * elapsed / max(count, 1):.1f} ms each; "
               f"slowest {slowest[0]:.2f} s, case {slowest[1]}): {stats}; {len(failures)} failures")
    print(summary)
    assert not failures, summary + "\n" + "\n".join(failures[:10])
    assert stats["loaded"] and stats["refused"] and stats["merges"] and stats["merges refused"], summary
