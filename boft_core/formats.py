"""Reading BOFT files: format detection, parsing and validation.

Formats (``../shared/docs/boft-formats.md``):

* ``lycoris-boft``: ``<name>.oft_blocks`` (m, nb, b, b), ``<name>.alpha`` (raw constraint,
  missing in LyCORIS 2.1.x files: 0), optional ``<name>.rescale`` (out, 1, ...). Rotates outputs.
* ``lycoris-diag-oft``: ``<name>.oft_blocks`` (nb, b, b): one stage of contiguous blocks, applied
  transposed. Rotates outputs.
* ``peft-boft``: ``base_model.model.<path>.boft_R`` (m, nb, b, b) + ``.boft_s`` ((out, 1) linear,
  (1, out) conv) [+ ``.base_layer.bias``], with ``adapter_config.json`` beside. Rotates inputs.
* ``kohya-boft``: sd-scripts ``networks.boft``: ``lora_unet_...``/``lora_te..._`` + ``boft_R`` /
  ``boft_s`` (out, 1). PEFT's math. Rotates inputs.

The rest of the orthogonal family (doc §6): one stage of contiguous blocks.

* ``peft-oft``: PEFT >= 0.16 OFTv2, ``base_model.model.<path>.oft_R.weight`` (rows, b(b-1)/2), the
  packed upper triangle of each block; ``adapter_config.json`` says Neumann (terms, and the series
  by ``peft_version``) or exact Cayley, ``coft``/``eps`` and ``block_share``. Rotates inputs.
* ``kohya-oft-v2`` (sd-scripts ``networks.oft_v2``) and ``onetrainer-oft`` (OneTrainer OFT_2, with
  an optional ``.oft_R.scaled_oft``): the same packed blocks, 5 Neumann terms, convs untransposed.
* ``kohya-oft``: sd-scripts legacy ``networks.oft``, ``oft_unet_<path>.oft_blocks`` (k, b, b) +
  ``.alpha``; Flux's fused layers as ``.oft_blocks.0..N`` (row slices). diag-OFT's math.
* ``comfyui-oft``: ComfyUI 0.28's trainer, ``diffusion_model.<path>.oft_blocks`` (k, b, b) +
  ``.alpha`` (1.0), no metadata; its trainer clamps ‖Q‖_F to ``alpha``, not ``alpha * out_dim``.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import struct
import uuid
from dataclasses import dataclass, field, replace

import torch

from .butterfly import CONCATENATED, INTERLEAVED, check_butterfly_shape
from .modes import CONSTRAINTS
from .names import OTHER_SUFFIXES, PEFT_PREFIX, boft_r_kind, without_peft_prefix

FORMATS = ("lycoris-boft", "lycoris-diag-oft", "peft-boft", "kohya-boft", "peft-oft", "kohya-oft-v2",
           "onetrainer-oft", "kohya-oft", "comfyui-oft")
INPUT_SIDE = ("peft-boft", "kohya-boft", "peft-oft", "kohya-oft-v2", "onetrainer-oft")  # W' = W Bᵀ
PACKED = ("peft-oft", "kohya-oft-v2", "onetrainer-oft")  # oft_R.weight: packed upper triangles
TRANSPOSED = ("lycoris-diag-oft", "kohya-oft", "comfyui-oft")  # W'_k = R_kᵀ W_k, contiguous blocks
# How an ``.alpha`` constraint is read: "lycoris" (and kohya) clamp ‖Q‖_F to alpha * out_dim,
# ComfyUI's trainer to alpha; "auto" takes "comfyui" for files its trainer wrote, else "lycoris".
ONETRAINER_TERMS = KOHYA_TERMS = 5  # OneTrainer OFT_2 and sd-scripts oft_v2: 5 Neumann terms, always
MAX_HEADER = 100_000_000  # bytes of a safetensors JSON header: safetensors' own limit (and ours for any JSON)
MAX_JSON_DEPTH = 64  # nesting; a safetensors header is 3 deep, PEFT configs and ss_tag_frequency a few more
MAX_INT_DIGITS = 32  # an offset, a shape or a tag count never needs more (uint64 has 20)
# safetensors dtype names and their bits per element (safetensors' Dtype enum)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8,
              "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


class BoftError(ValueError):
    """A user-facing problem with a BOFT file or its use; the message says what and where."""


@dataclass
class BoftLayer:
    """One adapted layer, in the file's own convention. Tensors keep the stored dtype."""

    name: str  # layer name as written, without the key suffix (and without PEFT's prefix)
    kind: str  # one of FORMATS
    blocks: torch.Tensor  # (m, nb, b, b) raw parameters; diag-OFT gets m = 1
    alpha: float = 0.0  # raw LyCORIS constraint; threshold = alpha * out_dim; 0 = off
    scale: torch.Tensor | None = None  # (out,): LyCORIS rescale or PEFT/kohya boft_s
    bias: torch.Tensor | None = None  # PEFT bias trained with bias="boft_only"/"all"
    keys: tuple[str, ...] = ()  # the file's keys this layer consumed
    constraint: str = "lycoris"  # threshold = alpha * out_dim ("lycoris", kohya too) or alpha ("comfyui")
    neumann: int = 0  # OFTv2: R by this many Cayley-Neumann terms (butterfly.neumann); 0: exact Cayley
    neumann_legacy: bool = False  # PEFT 0.16-0.17's Neumann series (last term doubled)
    coft_norm: float = 0.0  # OFTv2 coft: each block's ‖Q‖_F clamped to this (eps / sqrt(stored rows)); 0: off
    q_scale: float = 1.0  # OneTrainer scaled_oft: Q = (A - Aᵀ) * q_scale, q_scale = 1 / (2 sqrt(b - 1))
    shared: bool = False  # OFTv2 block_share: blocks (1, 1, b, b) stand for every block (merge.fit expands)
    conv_untransposed: bool = False  # kohya oft_v2 / OneTrainer: a conv gets W BD(R), not W BD(R)ᵀ (merge.fit)
    rows: tuple[int, int] | None = None  # (start, count): rows of the target it acts on (kohya Flux parts)
    # A key for this layer's data (blocks, scale, alpha, kind), for boft_core.cache: new for every
    # layer read. dataclasses.replace copies it: a copy with other data needs a new one.
    token: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False, repr=False)

    @property
    def side(self) -> str:
        """``"out"``: W' = scale * B W; ``"in"``: W' = scale * W Bᵀ (W flattened to 2-D)."""
        return "in" if self.kind in INPUT_SIDE else "out"

    @property
    def layout(self) -> str:
        return INTERLEAVED if self.kind == "lycoris-boft" else CONCATENATED

    @property
    def m(self) -> int:
        return self.blocks.shape[0]

    @property
    def block_num(self) -> int:
        return self.blocks.shape[1]

    @property
    def block_size(self) -> int:
        return self.blocks.shape[2]

    @property
    def dim(self) -> int:
        """Rows the butterfly acts on: out_dim (output side) or flattened in_dim (input side)."""
        return self.block_num * self.block_size


@dataclass
class BoftFile:
    path: str
    format: str
    layers: dict[str, BoftLayer]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None  # PEFT adapter_config.json
    # Keys of no BOFT layer (other adapter kinds in a mixed file): the host's own adapters take them.
    others: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def dtype(self) -> str:
        names = sorted({str(layer.blocks.dtype).replace("torch.", "") for layer in self.layers.values()})
        return "/".join(names)

    @property
    def parameter_count(self) -> int:
        total = 0
        for layer in self.layers.values():
            total += layer.blocks.numel()
            total += layer.scale.numel() if layer.scale is not None else 0
            total += layer.bias.numel() if layer.bias is not None else 0
        return total

    def trigger_words(self) -> list[tuple[str, int]]:
        return trigger_words(self.metadata)


def trigger_words(metadata: dict[str, str]) -> list[tuple[str, int]]:
    """Tags from kohya's ``ss_tag_frequency`` summed over datasets, most frequent first.

    Informational: a malformed ``ss_tag_frequency`` (not JSON, too deep, non-finite or huge
    numbers) gives no tags rather than failing the file; counts that are not numbers are skipped.
    """
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return []
    try:
        datasets = parse_json(raw, "ss_tag_frequency")
    except BoftError:
        return []
    counts: dict[str, int] = {}
    if not isinstance(datasets, dict):
        return []
    for tags in datasets.values():
        if not isinstance(tags, dict):
            continue
        for tag, count in tags.items():
            tag = tag.strip()
            if tag and isinstance(count, (int, float)) and not isinstance(count, bool):
                counts[tag] = counts.get(tag, 0) + int(count)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


# --- untrusted JSON ----------------------------------------------------------------------------


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def parse_json(raw: str | bytes, where: str):
    """JSON from a file, guarded: the one parser for every untrusted JSON text the pack reads.

    ``raw``: text, or bytes that must be UTF-8. Refused with a BoftError that starts with
    ``where`` (the file and the key): invalid JSON or UTF-8, nesting deeper than
    ``MAX_JSON_DEPTH``, integers of more than ``MAX_INT_DIGITS`` digits, numbers that are not
    finite (``NaN``, ``Infinity``, ``1e999``), and strings that are not valid Unicode (lone
    surrogates, which safetensors refuses too). Never raises anything else.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                           parse_constant=_refuse_constant)
    except RecursionError:
        raise BoftError(f"{where}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels).") from None
    except UnicodeError as e:
        raise BoftError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
    except ValueError as e:  # JSONDecodeError, and what the hooks above raise
        raise BoftError(f"{where}: invalid JSON: {e}.") from None
    _check_json_tree(value, where)
    return value


def _check_json_tree(value, where: str) -> None:
    """Depth and string checks over a parsed JSON value, without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise BoftError(f"{where}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels).")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key, where)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BoftError(f"{where}: a string with an unpaired UTF-16 surrogate ({text[:40]!r}).") from None


# --- files -------------------------------------------------------------------------------------


def resolve_path(path: str) -> tuple[str, str | None]:
    """The safetensors file and the PEFT ``adapter_config.json`` beside it (if any)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, "adapter_model.safetensors")
        if not os.path.isfile(candidate):
            raise BoftError(
                f"{path}: is a folder without adapter_model.safetensors; give a BOFT .safetensors "
                "file or a PEFT adapter folder."
            )
        path = candidate
    elif not os.path.isfile(path):
        raise BoftError(f"{path}: no such file.")
    config = os.path.join(os.path.dirname(path), "adapter_config.json")
    return path, config if os.path.isfile(config) else None


def read_header(path: str) -> tuple[dict, dict[str, str]]:
    """The safetensors header (tensor entries) and its ``__metadata__``, checked against the file size.

    Reads only the header, so it is cheap enough for file pickers and upload checks. Checked as
    :func:`parse_header` says.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) == 8 and 2 <= struct.unpack("<Q", head)[0] <= MAX_HEADER:
                head += f.read(struct.unpack("<Q", head)[0])
    except OSError as e:
        raise BoftError(f"{path}: cannot read: {e.strerror or e}.") from None
    return parse_header(head, size, path)


def parse_header(head: bytes, size: int, where: str) -> tuple[dict, dict[str, str]]:
    """The tensor entries and ``__metadata__`` of a safetensors file, from its first bytes.

    ``head``: the file's first ``8 + N`` bytes (N, the header length, is the first 8 bytes,
    little endian; more is ignored), ``size``: the whole file's size, ``where``: the name errors
    start with. Checked as safetensors checks before reading any tensor, so a file that passes
    here is one safetensors reads: ``2 <= N <= MAX_HEADER``; a UTF-8 JSON object (parsed by
    :func:`parse_json`); ``__metadata__`` absent, null or an object of strings; every other entry
    an object with ``dtype`` one of ``DTYPE_BITS``, ``shape`` a list of non-negative integers and
    ``data_offsets`` two integers ``[begin, end]``; the entries' byte ranges, in order, tile the
    data after the header exactly, each as long as its dtype and shape say.
    """
    if len(head) < 8 or size < 8:
        raise BoftError(f"{where}: not a safetensors file (only {size} bytes).")
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > MAX_HEADER or 8 + n > size:
        hint = " (a pickled .ckpt/.pt/.bin file?)" if head[:2] in (b"PK", b"\x80\x02") else ""
        raise BoftError(
            f"{where}: not a readable safetensors file{hint}: header length {n} does not fit "
            f"the file size {size} (at most {MAX_HEADER:,} bytes). Only .safetensors BOFT files "
            "are supported; the file may also be truncated."
        )
    if len(head) < 8 + n:
        raise BoftError(f"{where}: only {len(head) - 8} bytes of its {n}-byte header.")
    raw = head[8:8 + n]
    if not raw.startswith(b"{"):
        raise BoftError(f"{where}: corrupt safetensors header (does not start with '{{').")
    header = parse_json(raw, f"{where}: safetensors header")
    if not isinstance(header, dict):
        raise BoftError(f"{where}: corrupt safetensors header (not a JSON object).")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        bad = "not an object" if not isinstance(metadata, dict) else "an object whose values are not all strings"
        raise BoftError(f"{where}: corrupt safetensors header: __metadata__ is {bad}.")
    spans = []
    for key, entry in header.items():
        spans.append((*_tensor_span(where, key, entry), key))
    data = size - 8 - n
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise BoftError(f"{where}: corrupt safetensors header: the data of {key!r} starts at "
                            f"byte {begin}, expected {end} (tensors must tile the data in order).")
        end = stop
    if end != data:
        if end > data:
            raise BoftError(f"{where}: truncated: the header promises {8 + n + end} bytes, the file has {size}.")
        raise BoftError(f"{where}: corrupt safetensors file: {data - end} bytes after the last tensor's data.")
    return header, metadata


def _tensor_span(where: str, key: str, entry) -> tuple[int, int]:
    """(begin, end) of one header entry's bytes; BoftError naming the key unless well formed."""
    def bad(why: str):
        return BoftError(f"{where}: corrupt safetensors header entry for key {key!r}: {why}.")

    if not isinstance(entry, dict):
        raise bad("not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise bad(f"unknown dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape {str(shape)[:60]} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {str(offsets)[:60]} are not two integers 0 <= begin <= end")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise bad(f"{offsets[1] - offsets[0]} bytes for a {dtype} tensor of shape {shape}")
    return offsets[0], offsets[1]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_config(path: str) -> dict:
    """A PEFT ``adapter_config.json``: a JSON object (parsed by :func:`parse_json`), else BoftError."""
    try:
        if os.path.getsize(path) > MAX_HEADER:
            raise BoftError(f"{path}: larger than {MAX_HEADER:,} bytes; not a PEFT adapter config.")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BoftError(f"{path}: cannot read the PEFT config: {e.strerror or e}.") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as some editors write
        raw = raw[3:]
    config = parse_json(raw, f"{path} (the PEFT config)")
    if not isinstance(config, dict):
        raise BoftError(f"{path} (the PEFT config): a JSON {type(config).__name__}, expected an object.")
    return config


# The safetensors dtype names that torch has (this torch; the float8 and unsigned ones are newer):
# what map_tensors reads and write_tensors writes.
TORCH_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu")) if hasattr(torch, attr)}


def map_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Every tensor of a safetensors file, and its metadata, without reading the data: views of a
    private copy-on-write map of the file (pages are read when touched; writing to a tensor
    changes memory, never the file). Checked as :func:`read_header` checks. None if a tensor's
    dtype has no torch equivalent here (then read it with safetensors)."""
    header, metadata = read_header(path)
    if any(entry["dtype"] not in TORCH_DTYPES for entry in header.values()):
        return None
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:
        raise BoftError(f"{path}: cannot read: {e}.") from None
    tensors = {}
    for key, entry in header.items():
        dtype, shape = TORCH_DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        if end == begin:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=8 + n + begin)
        tensors[key] = flat.view(dtype).view(shape)
    return tensors, metadata


def tensor_layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                  ) -> tuple[bytes, dict[str, int]]:
    """The start of a safetensors file of ``tensors`` (dtypes in :data:`TORCH_DTYPES`; only their
    dtypes and shapes are read) and ``metadata``: the length prefix and header, padded to 8 bytes,
    and every tensor's byte offset in the file. Laid out as safetensors does: larger elements
    first, then by name."""
    names = {dtype: name for name, dtype in TORCH_DTYPES.items()}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {}, 0
    for key in order:
        t = tensors[key]
        size = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header = {"__metadata__": metadata, **header}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {key: start + header[key]["data_offsets"][0] for key in order}


def write_at(fd: int, data, offset: int) -> None:
    """``data`` (bytes, or a CPU tensor's bytes) written at ``offset`` of the open file ``fd``
    (``os.pwrite``: threads may write different parts of one file at once)."""
    if isinstance(data, torch.Tensor):
        if not data.numel():
            return
        data = data.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    view = memoryview(data)
    while len(view):
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def write_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of ``tensors`` (CPU, dtypes in :data:`TORCH_DTYPES`) and ``metadata``
    (:func:`tensor_layout`), each tensor's bytes written straight from its memory. Written beside
    ``path`` and renamed over it, so a failed write leaves no partial file (and ``path`` may be a
    mapped input)."""
    head, offsets = tensor_layout(tensors, metadata)
    with replacing(path) as fd:
        write_at(fd, head, 0)
        for key, offset in offsets.items():
            write_at(fd, tensors[key], offset)


@contextlib.contextmanager
def replacing(path: str):
    """``with replacing(path) as fd``: a new file beside ``path``, open for writing, renamed over
    ``path`` when the block ends without an error and removed when it does not."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        try:
            yield fd
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error types; the user needs the file name
        raise BoftError(f"{path}: cannot read tensors: {e}") from None


def read_file(path: str) -> BoftFile:
    """Read a BOFT file (or PEFT adapter folder), detect its format and validate every layer's
    shapes and values. :func:`boft_core.load` (``guard.load``) also checks that every layer's
    rotation can be computed; use that."""
    path, config_path = resolve_path(path)
    lowered = path.lower()
    if not lowered.endswith(".safetensors"):
        raise BoftError(
            f"{path}: only .safetensors files are supported (pickled .ckpt/.pt/.bin files can run "
            "code when loaded); convert it to safetensors first."
        )
    header, metadata = read_header(path)
    config = read_config(config_path) if config_path is not None else None
    fmt = detect_format(path, list(header), metadata, config)
    tensors = load_tensors(path)
    if fmt in PACKED:
        layers = parse_packed(path, tensors, fmt, packed_rule(path, fmt, config, metadata))
    else:
        layers = PARSERS[fmt](path, tensors)
    if not layers:
        raise BoftError(f"{path}: no BOFT layers found.")
    if fmt == "lycoris-boft" and comfyui_trained(layers, metadata):
        layers = {name: replace(layer, kind="comfyui-oft", constraint="comfyui") for name, layer in layers.items()}
    kinds = {layer.kind for layer in layers.values()}
    fmt = kinds.pop() if len(kinds) == 1 else fmt  # a LyCORIS file of only 3-D blocks is diag-OFT
    consumed = {key for layer in layers.values() for key in layer.keys}
    others = {key: value for key, value in tensors.items() if key not in consumed}
    for key, value in others.items():
        if value.is_floating_point() and not all_finite(value):
            raise BoftError(f"{path}: {key} (shape {tuple(value.shape)}) contains NaN or infinite values; "
                            "the file is broken.")
    return BoftFile(path=path, format=fmt, layers=layers, metadata=metadata, config=config, others=others)


def comfyui_trained(layers: dict[str, BoftLayer], metadata: dict) -> bool:
    """Whether a file of ``oft_blocks`` is what ComfyUI 0.28's training node writes: every layer
    ``diffusion_model.<path>`` with 3-D blocks and a stored ``.alpha`` of 1.0, and no metadata."""
    return not metadata and all(
        layer.kind == "lycoris-diag-oft" and layer.name.startswith("diffusion_model.") and layer.alpha == 1.0
        and f"{layer.name}.alpha" in layer.keys for layer in layers.values())


def with_constraint(boft_file: BoftFile, choice: str) -> BoftFile:
    """``boft_file`` with every ``.alpha`` constraint read by rule ``choice`` (one of CONSTRAINTS):
    ``auto`` keeps what was detected (``comfyui`` for ComfyUI-trained files, else ``lycoris``)."""
    if choice not in CONSTRAINTS:
        raise BoftError(f"unknown constraint rule {choice!r}; expected one of {', '.join(CONSTRAINTS)}.")
    if choice == "auto":
        return boft_file
    layers = {name: layer if layer.constraint == choice or layer.kind in PACKED
              else replace(layer, constraint=choice, token=f"{layer.token}:{choice}")
              for name, layer in boft_file.layers.items()}
    return replace(boft_file, layers=layers)


def constraint_rule(boft_file: BoftFile) -> str:
    """Which constraint rule the file's layers use, for the panel and the report: ``lycoris``
    (alpha x out_dim), ``comfyui`` (alpha), ``none`` (no layer has a constraint)."""
    rules = sorted({layer.constraint for layer in boft_file.layers.values() if layer.alpha > 0})
    return "/".join(rules) or "none"


# --- detection ---------------------------------------------------------------------------------

OTHER_FORMATS = tuple((suffix, what) for suffix, _, what in OTHER_SUFFIXES)  # detection's view


def detect_format(path: str, keys: list[str], metadata: dict, config: dict | None) -> str:
    """Exactly one of FORMATS (``lycoris-boft`` stands for every ``oft_blocks`` file but kohya's:
    diag-OFT and ComfyUI-trained files are told apart after parsing), or a BoftError saying what
    the file is instead."""
    oft = [k for k in keys if k.endswith(".oft_blocks") or _PART.search(k)]
    boft_r = [k for k in keys if k.endswith(".boft_R")]
    packed = [k for k in keys if k.endswith(".oft_R.weight")]
    old_oft = next((k for k in keys if k.endswith(".oft_r")), None)
    peft_type = str(config.get("peft_type", "")).upper() if config is not None else ""
    if peft_type not in ("", "BOFT", "OFT"):
        raise BoftError(
            f"{path}: the adapter_config.json beside it says peft_type {config.get('peft_type')!r}; "
            "only BOFT and OFT adapters are supported."
        )
    if old_oft is not None:
        version = config.get("peft_version") if config is not None else None
        raise BoftError(
            f"{path}: an OFT adapter in PEFT's old format (key {old_oft}), written by PEFT "
            f"{version if version else '0.15 or older'}: PEFT <= 0.13 stored oft_r (r, out/r, out/r), "
            "0.14-0.15 oft_r (r, in/r, in/r) with oft_s, and this pack reads only PEFT >= 0.16's "
            "oft_R.weight. Retrain or re-save it with PEFT >= 0.16."
        )
    found = [(what, hits[0]) for what, hits in (("LyCORIS/kohya/ComfyUI oft_blocks", oft),
                                                ("PEFT/kohya boft_R", boft_r), ("OFTv2 oft_R", packed)) if hits]
    if len(found) > 1:
        shown = " and ".join(f"{what} keys ({key})" for what, key in found)
        raise BoftError(f"{path}: mixes {shown}; one file must hold one format.")
    if packed:
        if peft_type == "OFT":
            return "peft-oft"
        if peft_type == "BOFT":
            raise BoftError(f"{path}: the adapter_config.json beside it says peft_type 'BOFT', but the "
                            f"file holds OFT keys ({packed[0]}).")
        if packed[0].startswith(PEFT_PREFIX):
            raise BoftError(
                f"{path}: a PEFT OFT adapter (key {packed[0]}) without its adapter_config.json beside "
                "it; the config says how to build the rotations (Neumann terms, PEFT version). Load "
                "the adapter folder, or put the config next to the file."
            )
        if metadata.get("ss_network_module") == "networks.oft_v2":
            return "kohya-oft-v2"
        return "onetrainer-oft"
    if oft:
        if any(k.startswith("oft_unet_") for k in oft):
            return "kohya-oft"
        if any(k.startswith("oft_te") for k in oft):
            raise BoftError(f"{path}: a kohya sd-scripts OFT file with text-encoder keys ({oft[0]}), "
                            "which sd-scripts' networks.oft never writes; not supported.")
        part = next((k for k in oft if _PART.search(k)), None)
        if part is not None:
            raise BoftError(f"{path}: key {part} splits oft_blocks into parts, which only kohya's "
                            "networks.oft does (with oft_unet_ names); this file is not one of those.")
        return "lycoris-boft"  # diag-OFT blocks are told apart per layer by ndim, see parse_lycoris
    if boft_r:
        if peft_type == "OFT":
            raise BoftError(f"{path}: the adapter_config.json beside it says peft_type 'OFT', but the "
                            f"file holds BOFT keys ({boft_r[0]}).")
        return boft_r_kind(boft_r[0], metadata)
    for suffix, what in OTHER_FORMATS:
        hit = next((k for k in keys if k.endswith(suffix)), None)
        if hit is not None:
            raise BoftError(
                f"{path}: this is {what} (key {hit}), not a BOFT/OFT adapter. Load it with a LoRA "
                "loader; this pack reads LyCORIS BOFT/diag-OFT, kohya and ComfyUI OFT (oft_blocks), "
                "PEFT/kohya BOFT (boft_R/boft_s) and OFTv2 (oft_R.weight)."
            )
    sample = ", ".join(keys[:3]) or "no tensors at all"
    raise BoftError(
        f"{path}: no BOFT/OFT keys found (expected '<layer>.oft_blocks', '<layer>.boft_R' or "
        f"'<layer>.oft_R.weight'; the file has {len(keys)} keys, e.g. {sample})."
    )


_PART = re.compile(r"\.oft_blocks\.\d+$")


# --- parsing -----------------------------------------------------------------------------------


def _group(tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> tuple[dict, list[str]]:
    """{layer name: {suffix: tensor}} for keys ending in one of ``suffixes``; and the rest."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    rest = []
    for key, value in tensors.items():
        for suffix in suffixes:
            if key.endswith("." + suffix):
                layers.setdefault(key[: -len(suffix) - 1], {})[suffix] = value
                break
        else:
            rest.append(key)
    return layers, rest


def _blocks(path: str, key: str, value: torch.Tensor, layout: str, ndim: int = 4) -> torch.Tensor:
    shape = tuple(value.shape)
    if not value.is_floating_point():
        raise BoftError(f"{path}: {key} has dtype {value.dtype}; expected a float tensor.")
    if value.ndim != ndim or shape[-1] != shape[-2]:
        want = "(m, block_num, b, b)" if ndim == 4 else "(block_num, b, b)"
        raise BoftError(f"{path}: {key} has shape {shape}; expected {want} with square blocks.")
    blocks = value if ndim == 4 else value.unsqueeze(0)
    why = check_butterfly_shape(*blocks.shape[:3], layout)
    if why:
        raise BoftError(f"{path}: {key} has shape {shape}, which cannot be a butterfly: {why}.")
    return blocks


def _vector(path: str, key: str, value: torch.Tensor, size: int | None, what: str) -> torch.Tensor:
    """A per-channel tensor stored as (n,), (n, 1, ...), (1, n) or (blocks, b, 1), flattened."""
    if not value.is_floating_point():
        raise BoftError(f"{path}: {key} has dtype {value.dtype}; expected a float tensor.")
    nontrivial = [d for d in value.shape if d != 1]
    flat_ok = len(nontrivial) <= 1 or (value.ndim == 3 and value.shape[-1] == 1)
    if not flat_ok or value.numel() == 0 or (size is not None and value.numel() != size):
        want = f"{size} values" if size is not None else "one value per channel"
        raise BoftError(
            f"{path}: {key} has shape {tuple(value.shape)}; expected {what} with {want}."
        )
    return value.reshape(-1)


def lycoris_layer(path: str, name: str, parts: dict[str, torch.Tensor], kind: str | None = None) -> BoftLayer:
    """One LyCORIS layer from its tensors by suffix (``oft_blocks``, ``alpha``, ``rescale``); ``kind``
    ``kohya-oft`` for sd-scripts' (3-D blocks only)."""
    key = f"{name}.oft_blocks"
    raw = parts["oft_blocks"]
    if kind == "kohya-oft" and raw.ndim != 3:
        raise BoftError(f"{path}: {key} has shape {tuple(raw.shape)}; kohya OFT stores (block_num, b, b).")
    if raw.ndim == 3:
        kind, blocks = kind or "lycoris-diag-oft", _blocks(path, key, raw, CONCATENATED, ndim=3)
    elif raw.ndim == 4:
        kind, blocks = "lycoris-boft", _blocks(path, key, raw, INTERLEAVED)
    else:
        raise BoftError(
            f"{path}: {key} has shape {tuple(raw.shape)}; expected 4-D (BOFT: m, block_num, b, b) "
            "or 3-D (diag-OFT: block_num, b, b)."
        )
    alpha = 0.0
    if parts.get("alpha") is not None:
        a = parts["alpha"]
        if a.numel() != 1 or a.is_complex():
            raise BoftError(f"{path}: {name}.alpha has shape {tuple(a.shape)} and dtype {a.dtype}; "
                            "expected a real scalar.")
        alpha = float(a.to(torch.float64).item())
    scale = None
    if parts.get("rescale") is not None:
        n = blocks.shape[1] * blocks.shape[2]
        scale = _vector(path, f"{name}.rescale", parts["rescale"], n, "a per-output-channel scale")
    layer = BoftLayer(name=name, kind=kind, blocks=blocks, alpha=alpha, scale=scale,
                      keys=tuple(f"{name}.{s}" for s, v in parts.items() if v is not None))
    check_finite(path, layer)
    return layer


def boft_r_layer(path: str, name: str, parts: dict[str, torch.Tensor], kind: str) -> BoftLayer:
    """One PEFT/kohya layer from its tensors by suffix (``boft_R``, ``boft_s``, ``base_layer.bias``)."""
    key = f"{name}.boft_R"
    blocks = _blocks(path, key, parts["boft_R"], CONCATENATED)
    if parts.get("boft_s") is None:
        raise BoftError(f"{path}: {key} has no matching {name}.boft_s (the output scale).")
    scale = _vector(path, f"{name}.boft_s", parts["boft_s"], None, "(out, 1) or (1, out)")
    bias = parts.get("base_layer.bias")
    if bias is not None:
        bias = _vector(path, f"{name}.base_layer.bias", bias, scale.numel(), "a bias")
    layer = BoftLayer(name=without_peft_prefix(name), kind=kind, blocks=blocks, scale=scale, bias=bias,
                      keys=tuple(f"{name}.{s}" for s, v in parts.items() if v is not None))
    check_finite(path, layer)
    return layer


def _parse(path: str, tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...], build,
           what: str) -> dict[str, BoftLayer]:
    """Group keys by layer (the first suffix is the layer's main tensor) and build each. Keys of
    no such layer are left for :func:`read_file`, which keeps them as the file's ``others``."""
    groups, _ = _group(tensors, suffixes)
    layers = {}
    for name, parts in groups.items():
        if suffixes[0] in parts:
            layer = build(path, name, parts)
            layers[layer.name] = layer
    return layers


def parse_lycoris(path: str, tensors: dict[str, torch.Tensor]) -> dict[str, BoftLayer]:
    return _parse(path, tensors, ("oft_blocks", "alpha", "rescale"), lycoris_layer, "LyCORIS BOFT")


def parse_peft(path: str, tensors: dict[str, torch.Tensor]) -> dict[str, BoftLayer]:
    def build(path, name, parts):
        return boft_r_layer(path, name, parts, "peft-boft")
    return _parse(path, tensors, BOFT_R_SUFFIXES, build, "BOFT (boft_R/boft_s)")


def parse_kohya(path: str, tensors: dict[str, torch.Tensor]) -> dict[str, BoftLayer]:
    def build(path, name, parts):
        return boft_r_layer(path, name, parts, "kohya-boft")
    return _parse(path, tensors, BOFT_R_SUFFIXES, build, "BOFT (boft_R/boft_s)")


def parse_kohya_oft(path: str, tensors: dict[str, torch.Tensor]) -> dict[str, BoftLayer]:
    """sd-scripts ``networks.oft``: ``<name>.oft_blocks`` (k, b, b) + ``<name>.alpha``; Flux's fused
    layers store parts ``<name>.oft_blocks.0..N`` (k, b_i, b_i) on consecutive row slices, each
    with the constraint ``alpha * rows of the part``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():  # other keys are left to read_file (a mixed file's others)
        hit = re.match(r"^(.*)\.(oft_blocks(?:\.\d+)?|alpha)$", key)
        if hit:
            groups.setdefault(hit[1], {})[hit[2]] = value
    layers = {}
    for name, parts in groups.items():
        alpha = parts.pop("alpha", None)
        if not parts:
            continue  # an .alpha of no oft_blocks: another adapter's (read_file keeps it with the others)
        if alpha is None:
            raise BoftError(f"{path}: {name} has oft_blocks but no {name}.alpha (kohya's constraint).")
        if "oft_blocks" in parts and len(parts) > 1:
            raise BoftError(f"{path}: {name} has both oft_blocks and oft_blocks.N parts.")
        if "oft_blocks" in parts:
            layer = lycoris_layer(path, name, {"oft_blocks": parts["oft_blocks"], "alpha": alpha}, kind="kohya-oft")
            layers[layer.name] = layer
            continue
        indices = sorted(int(k.rsplit(".", 1)[1]) for k in parts)
        if indices != list(range(len(indices))):
            raise BoftError(f"{path}: {name} has parts oft_blocks.{indices}; expected 0..{len(indices) - 1}.")
        start = 0
        for i in indices:
            key = f"oft_blocks.{i}"
            layer = lycoris_layer(path, f"{name}.{key}", {"oft_blocks": parts[key], "alpha": alpha}, kind="kohya-oft")
            layer = replace(layer, rows=(start, layer.dim), keys=(f"{name}.{key}", f"{name}.alpha"))
            layers[layer.name] = layer
            start += layer.dim
    return layers


def target_name(layer: BoftLayer) -> str:
    """The model layer an adapter layer acts on: its name, or for a part of a fused layer (kohya
    Flux ``<name>.oft_blocks.N``) the fused layer's name; ``layer.rows`` says which rows."""
    return layer.name.rsplit(".oft_blocks.", 1)[0] if layer.rows is not None else layer.name


# --- OFTv2 (packed oft_R) ------------------------------------------------------------------------

PEFT_OFT_FIELDS = ("oft_block_size", "r", "use_cayley_neumann", "block_share", "coft")


def packed_rule(path: str, fmt: str, config: dict | None, metadata: dict) -> dict:
    """How an OFTv2 file's rotations are built: ``neumann`` terms (0 = exact Cayley), the PEFT
    <0.18 series (``neumann_legacy``), coft's ``eps`` (0 = off) and PEFT's ``block_share``.

    PEFT: from ``adapter_config.json`` (every field required; ``peft_version`` missing means
    before 0.18, when PEFT added it, as PEFT itself reads it). kohya ``networks.oft_v2``: 5
    terms, coft from ``ss_network_args``. OneTrainer: 5 terms.
    """
    if fmt == "peft-oft":
        where = f"{path}: adapter_config.json"
        missing = [f for f in PEFT_OFT_FIELDS if f not in config]
        if config.get("use_cayley_neumann") and "num_cayley_neumann_terms" not in config:
            missing.append("num_cayley_neumann_terms")
        if config.get("coft") and "eps" not in config:
            missing.append("eps")
        if missing:
            raise BoftError(f"{where} lacks {', '.join(missing)}, which PEFT OFT (peft_type OFT) "
                            "configs carry; the rotations cannot be built without them.")
        for f in ("use_cayley_neumann", "block_share", "coft"):
            if not isinstance(config[f], bool):
                raise BoftError(f"{where}: {f} is {config[f]!r}; expected true or false.")
        terms = 0
        legacy = False
        if config["use_cayley_neumann"]:
            terms = config["num_cayley_neumann_terms"]
            if not isinstance(terms, int) or isinstance(terms, bool) or not 1 <= terms <= 64:
                raise BoftError(f"{where}: num_cayley_neumann_terms is {terms!r}; expected an integer 1-64.")
            version = config.get("peft_version")
            legacy = version is None or peft_version(version, where) < (0, 18, 0)
        eps = _config_eps(config.get("eps"), where) if config["coft"] else 0.0
        return {"neumann": terms, "neumann_legacy": legacy, "eps": eps, "block_share": config["block_share"]}
    eps = 0.0
    if fmt == "kohya-oft-v2":
        args = metadata.get("ss_network_args")
        args = parse_json(args, f"{path}: ss_network_args") if args else {}
        args = args if isinstance(args, dict) else {}
        if str(args.get("coft", "false")).lower() in ("true", "1", "yes"):
            if "coft_eps" not in args:
                raise BoftError(f"{path}: ss_network_args turns coft on but gives no coft_eps.")
            eps = _config_eps(args["coft_eps"], f"{path}: ss_network_args")
    return {"neumann": KOHYA_TERMS, "neumann_legacy": False, "eps": eps, "block_share": None}


def _config_eps(value, where: str) -> float:
    try:
        eps = float(value)
    except (TypeError, ValueError):
        eps = float("nan")
    if isinstance(value, bool) or not (math.isfinite(eps) and eps > 0):
        raise BoftError(f"{where}: coft's eps is {value!r}; expected a positive number.")
    return eps


def peft_version(text, where: str) -> tuple[int, int, int]:
    """``peft_version`` as (major, minor, patch); a pre-release (``0.18.0.dev0``, ``0.18.0rc1``) counts
    as the release before, as PEFT's own check (packaging) orders it. ``@commit`` is ignored."""
    hit = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?(.*)$", str(text).partition("@")[0].strip())
    if not isinstance(text, str) or hit is None or (hit[4] and not re.match(r"^(\.?(dev|rc|a|b|post)\d*)+$", hit[4])):
        raise BoftError(f"{where}: peft_version {str(text)[:40]!r} is not a PEFT version number.")
    version = (int(hit[1]), int(hit[2]), int(hit[3] or 0))
    if re.match(r"^\.?(dev|rc|a|b)", hit[4]):
        version = (version[0], version[1], version[2] - 1) if version[2] else (version[0], version[1] - 1, 999)
    if version < (0, 16, 0):
        raise BoftError(f"{where}: peft_version {text!r} with oft_R.weight keys: OFTv2 (oft_R) "
                        "appeared in PEFT 0.16; this combination is unknown.")
    return version


def block_size_of(width: int) -> int | None:
    """``b`` with ``b (b - 1) / 2 == width`` (b >= 2), or None."""
    b = (1 + math.isqrt(1 + 8 * width)) // 2
    return b if b >= 2 and b * (b - 1) // 2 == width else None


def packed_layer(path: str, name: str, parts: dict[str, torch.Tensor], kind: str, rule: dict) -> BoftLayer:
    """One OFTv2 layer: ``oft_R.weight`` (rows, b(b-1)/2) unpacked to upper triangles ``A`` (1,
    rows, b, b) with ``Q = A - Aᵀ``; OneTrainer's ``oft_R.scaled_oft``; PEFT's ``base_layer.bias``."""
    key = f"{name}.oft_R.weight"
    value = parts["oft_R.weight"]
    if not value.is_floating_point() or value.ndim != 2 or value.shape[0] < 1:
        raise BoftError(f"{path}: {key} has shape {tuple(value.shape)} and dtype {value.dtype}; expected "
                        "a float (rows, b*(b-1)/2) tensor (each row a block's packed upper triangle).")
    rows, width = value.shape
    b = block_size_of(width)
    if b is None:
        near = block_size_of(width) or (1 + math.isqrt(1 + 8 * width)) // 2
        raise BoftError(f"{path}: {key} has shape {tuple(value.shape)}: a width of {width} is not "
                        f"b*(b-1)/2 for any block size b (b = {near} gives {near * (near - 1) // 2}, "
                        f"b = {near + 1} gives {(near + 1) * near // 2}).")
    upper = torch.zeros(rows, b, b, dtype=value.dtype)
    i, j = torch.triu_indices(b, b, 1)
    upper[:, i, j] = value
    q_scale = 1.0
    scaled = parts.get("oft_R.scaled_oft")
    if scaled is not None:
        if scaled.numel() != 1:
            raise BoftError(f"{path}: {name}.oft_R.scaled_oft has shape {tuple(scaled.shape)}; expected a scalar.")
        if float(scaled.to(torch.float64).reshape(())) != 0:
            q_scale = 1 / (2 * math.sqrt(b - 1))
    shared = rows == 1 if rule["block_share"] is None else rule["block_share"]
    if rule["block_share"] and rows != 1:
        raise BoftError(f"{path}: {key} has shape {tuple(value.shape)}, but the config says block_share "
                        "(one shared block: 1 row).")
    bias = parts.get("base_layer.bias")
    if bias is not None:
        bias = _vector(path, f"{name}.base_layer.bias", bias, None, "a bias")
    short = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    layer = BoftLayer(name=short, kind=kind, blocks=upper.unsqueeze(0), bias=bias,
                      keys=tuple(f"{name}.{s}" for s, v in parts.items() if v is not None),
                      neumann=rule["neumann"], neumann_legacy=rule["neumann_legacy"],
                      coft_norm=rule["eps"] / math.sqrt(rows) if rule["eps"] else 0.0, q_scale=q_scale,
                      shared=shared and rows == 1, conv_untransposed=kind in ("kohya-oft-v2", "onetrainer-oft"))
    check_finite(path, layer)
    return layer


def parse_packed(path: str, tensors: dict[str, torch.Tensor], kind: str, rule: dict) -> dict[str, BoftLayer]:
    def build(path, name, parts):
        return packed_layer(path, name, parts, kind, rule)
    suffixes = ("oft_R.weight", "oft_R.scaled_oft", "base_layer.bias")
    return _parse(path, tensors, suffixes, build, "OFTv2 (oft_R)")


BOFT_R_SUFFIXES = ("boft_R", "boft_s", "base_layer.bias")
PARSERS = {"lycoris-boft": parse_lycoris, "peft-boft": parse_peft, "kohya-boft": parse_kohya,
           "kohya-oft": parse_kohya_oft}


def check_finite(path: str, layer: BoftLayer) -> None:
    parts = {"blocks": layer.blocks, "scale": layer.scale, "bias": layer.bias}
    for what, value in parts.items():
        if value is not None and not all_finite(value):
            raise BoftError(
                f"{path}: layer {layer.name}: its {what} tensor ({', '.join(layer.keys)}) contains "
                "NaN or infinite values; the file is broken."
            )
    if not math.isfinite(layer.alpha):
        raise BoftError(f"{path}: {layer.name}.alpha is not finite; the file is broken.")


def all_finite(value: torch.Tensor) -> bool:
    """Whether every value is finite; float8 (and other types isfinite lacks) checked in float32."""
    if value.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        value = value.to(torch.float32)
    if not value.numel():
        return True
    low, high = torch.aminmax(value)  # min and max propagate NaN: one pass, no mask the size of value
    return bool(torch.isfinite(low) & torch.isfinite(high))
