"""BOFTLoader and BOFTLoaderModelOnly: patch MODEL (and CLIP) through ComfyUI's ModelPatcher."""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading

import comfy.utils
import comfy.weight_adapter
import folder_paths
import torch

from ..boft_core import (
    MODES,
    BoftError,
    BoftFile,
    batches_on,
    check_merge,
    check_mode,
    check_strength,
    check_weight,
    fused,  # noqa: F401  (batches_on asks fused.available; tests reach it here)
    load,
    read_header,
)
from ..boft_core.blocks import BlockWeights, parse_block_weights
from ..boft_core.formats import CONSTRAINTS, constraint_rule, resolve_path, target_name, with_constraint
from ..boft_core.merge import fit
from ..boft_core.names import guess_family
from ..boft_core.stats import TRIGGER_LIMIT, trigger_text
from .adapter import BOFTAdapter, BOFTBiasAdapter
from .host import check_host_patch, host_patches
from .keymap import key_maps, resolve

log = logging.getLogger("comfyui-boft")

STRENGTH_TOOLTIP = (
    "How strongly to apply the adapter. lycoris: what LyCORIS computes (each butterfly stage "
    "blended with identity; rescale always on). linear: W + s*(W' - W), straight line in weight "
    "space. orthogonal: the rotation angle scales with s, stays a rotation; 0 leaves the model as is."
)
MODE_TOOLTIP = (
    "Strength mode. lycoris (default) matches LyCORIS/kohya merges; linear matches LyCORIS's precise "
    "merge and A1111; orthogonal keeps every butterfly stage a rotation at any strength. All three "
    "agree at strength 1."
)
CONSTRAINT_TOOLTIP = (
    "How a file's .alpha constraint is read. auto: ComfyUI-trained OFT files (diffusion_model. names, "
    "alpha 1.0, no metadata) as ComfyUI's trainer clamps them (|Q| <= alpha), every other file as "
    "LyCORIS/kohya do (|Q| <= alpha x out_dim). lycoris / comfyui force one rule. Files without "
    ".alpha (PEFT, OFTv2) are not affected."
)
BLOCK_WEIGHTS_TOOLTIP = (
    "Strength per model block: a layer gets strength x its block's weight, in the chosen mode. Empty: every "
    "block at 1. A LoRA Block Weight vector (SD1.5: 17 values BASE,IN01,IN02,IN04,IN05,IN07,IN08,MID,"
    "OUT03-OUT11; SDXL: 12 values BASE,IN04,IN05,IN07,IN08,MID,OUT00-OUT05), a preset name (ALL, MIDD, "
    "OUTALL, ...), or named blocks: TE:0, IN:0.5, MID:1, OUT:1 (Flux: double:1, single:0.6). Weight 0 leaves "
    "a block untouched."
)

APPLY = ("auto", "merge", "bypass")
APPLY_TOOLTIP = (
    "How the BOFT reaches the model. auto (default): bypass when the layers' weights are quantized "
    "(float8, QuantizedTensor), merge otherwise. merge: rotate the weights (exact; quantized weights are "
    "dequantized, patched and requantized). bypass: leave the weights untouched and rotate each layer's "
    "output (or input) at run time, equal to the merge; needs ComfyUI 0.28 or newer."
)
BYPASS_VERSION = "0.28.0"
_INJECTION_IDS = itertools.count()


def bypass_supported() -> bool:
    """Whether the host has bypass mode (ComfyUI 0.28: ``comfy.weight_adapter.BypassInjectionManager``)."""
    return hasattr(comfy.weight_adapter, "BypassInjectionManager")


def host_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except ImportError:
        return "unknown"


def is_quantized(weight) -> bool:
    """A weight stored as float8 or as ComfyUI 0.28's ``QuantizedTensor`` (fp8 scaled, nvfp4, mixed)."""
    return (type(weight).__name__ == "QuantizedTensor"
            or getattr(weight, "dtype", None) in (torch.float8_e4m3fn, torch.float8_e5m2))


def choose_apply(apply: str, root, keys, boft_name: str) -> str:
    """``merge`` or ``bypass`` for one part (model or text encoder) whose patched weights are ``keys``."""
    if apply not in APPLY:
        raise BoftError(f"{boft_name}: unknown apply {apply!r}; expected one of {', '.join(APPLY)}.")
    if apply == "bypass" and not bypass_supported():
        raise BoftError(
            f"{boft_name}: apply=bypass needs ComfyUI {BYPASS_VERSION} or newer (bypass mode); this is "
            f"ComfyUI {host_version()}. Use apply=merge (or auto, which merges here)."
        )
    if apply == "auto":
        quantized = bypass_supported() and any(is_quantized(_target(root, key)) for key in keys)
        return "bypass" if quantized else "merge"
    return apply


def add_bypass(patcher, root, patches: dict, strengths: dict, device=None) -> None:
    """Our adapters as forward hooks (0.28's bypass mode) on ``patcher``'s model: the weights stay as
    they are. Row slices (offset keys, which bypass cannot take) and PEFT's trained biases are
    merged as usual, as core's ``load_bypass_lora_for_models`` does with non-adapter patches."""
    manager = comfy.weight_adapter.BypassInjectionManager()
    rest = {}
    for key, patch in patches.items():
        if isinstance(patch, BOFTAdapter) and isinstance(key, str):
            manager.add_adapter(key, patch, strength=strengths[key])
        else:
            rest[key] = patch
    for strength, group in by_strength(rest, strengths).items():
        patcher.add_patches(group, strength)
    if batches_on(device):
        for strength, group in by_strength(patches, strengths).items():  # one batched setup, as for a merge
            BOFTAdapter.prepare_all([p for p in group.values() if isinstance(p, BOFTAdapter)], strength,
                                    torch.device(device))
    injections = manager.create_injections(root)
    if manager.get_hook_count():
        # a key of our own per node run: chained loaders keep each other's hooks
        patcher.set_injections(f"boft_bypass_{next(_INJECTION_IDS)}", injections)


def file_stamp(path: str) -> tuple:
    """What changes when a file (or a PEFT folder's weights and config) is replaced on disk:
    the loader's IS_CHANGED and the parse cache both key on it."""
    stamp = []
    for part in resolve_path(path):
        if part is not None:
            stat = os.stat(part)
            stamp += [stat.st_ino, stat.st_mtime_ns, stat.st_size]
    return tuple(stamp)


class FileCache:
    """Parsed BOFT files by path, reread only when the file changes on disk."""

    def __init__(self):
        self._lock = threading.Lock()
        self._files: dict[str, tuple[tuple, BoftFile]] = {}

    def get(self, path: str) -> BoftFile:
        stamp = file_stamp(path)
        with self._lock:
            hit = self._files.get(path)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        boft_file = load(path)
        with self._lock:
            self._files[path] = (stamp, boft_file)
        return boft_file


CACHE = FileCache()


class LastRuns:
    """Each loader node's last run (what was applied, what was not), by node id, for the info panel."""

    def __init__(self, limit: int = 256):
        self._lock = threading.Lock()
        self._runs: dict[str, dict] = {}
        self._limit = limit

    def record(self, unique_id, run: dict) -> None:
        if unique_id is None:
            return
        with self._lock:
            self._runs.pop(str(unique_id), None)
            self._runs[str(unique_id)] = run
            while len(self._runs) > self._limit:
                del self._runs[next(iter(self._runs))]

    def latest(self, unique_ids, boft_name: str) -> dict | None:
        """The most recent run on ``boft_name`` among ``unique_ids`` (a node in a subgraph has one
        execution id per instance of the subgraph); runs are kept in the order they happened."""
        wanted = {str(u) for u in unique_ids}
        with self._lock:
            runs = [run for key, run in self._runs.items() if key in wanted]
        return next((run for run in reversed(runs) if run["boft_name"] == boft_name), None)


LAST_RUNS = LastRuns()


def parsed_file(path: str) -> BoftFile:
    """The parsed file at ``path``, from the loader's cache (the info routes read it here)."""
    return CACHE.get(path)


def last_run(unique_ids, boft_name: str) -> dict | None:
    """The most recent loader run on ``boft_name`` among ``unique_ids`` (see :meth:`LastRuns.latest`)."""
    return LAST_RUNS.latest(unique_ids, boft_name)
TRIGGER_TOOLTIP = (f"The file's {TRIGGER_LIMIT} most frequent training tags (kohya ss_tag_frequency), "
                   "comma-separated, for a text encoder; empty if the file has none.")


def trigger_words_of(boft_name: str) -> str:
    """The trigger_words output: read from the header only, so it works at strength 0 too."""
    return trigger_text(read_header(folder_paths.get_full_path_or_raise("loras", boft_name))[1])


def _target_shape(root, key):
    """Shape of the weight a key-map entry points at; (key, (dim, start, length)) is a slice."""
    if isinstance(key, tuple):
        name, offset = key[0], key[1]
        shape = list(comfy.utils.get_attr(root, name).shape)
        shape[offset[0]] = offset[2]
        return tuple(shape)
    return tuple(comfy.utils.get_attr(root, key).shape)


def _target(root, key) -> torch.Tensor:
    """The weight (or row slice of one) a key-map entry points at; a view, nothing is read."""
    if isinstance(key, tuple):
        return comfy.utils.get_attr(root, key[0]).narrow(*key[1])
    return comfy.utils.get_attr(root, key)


def _rows_of(key, rows: tuple[int, int]):
    """The key-map entry for ``rows`` (start, count) of the weight ``key`` points at (itself maybe
    a row slice ``(name, (0, start, length))``)."""
    start, count = rows
    if isinstance(key, tuple):
        name, (dim, offset, _length) = key[0], key[1]
        if dim != 0:
            raise BoftError(f"{name}: the key map slices dimension {dim}; a fused layer's parts need rows.")
        return (name, (0, offset + start, count))
    return (key, (0, start, count))


def model_family(model) -> str:
    """The model's family for ``block_weights`` (``sd1``, ``sdxl``, ``flux``, ``sd3``, ``other``), from
    ComfyUI's detected model config (SSD-1B, Vega and KOALA are SDXL subclasses)."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    names = {cls.__name__ for cls in type(config).__mro__} if config is not None else set()
    for family, classes in (("sdxl", {"SDXL", "SDXLRefiner"}), ("sd1", {"SD15", "SD20"}), ("flux", {"Flux"}),
                            ("sd3", {"SD3"})):
        if names & classes:
            return family
    return "other"


def plan_patches(boft_file: BoftFile, model, clip, mode: str, strength_model: float = 1.0,
                 strength_clip: float = 1.0, weights: BlockWeights | None = None):
    """Validated patches for model and clip, each layer's strength (its part's strength x its
    block's weight), the layers left out, and ``{layer: adapter kind}`` of a mixed file's other
    layers, which the host's own adapters apply in the same patch set. Touches nothing: every
    layer's shape and merged values (at its own strength) are checked first. A layer at strength
    0 gets no patch."""
    unet_map, te_map = key_maps(model, clip)
    roots = {"model": model.model if model is not None else None,
             "clip": clip.cond_stage_model if clip is not None else None}
    patches = {"model": {}, "clip": {}}
    strengths = {"model": {}, "clip": {}}
    missing = []
    off = 0  # layers found but at strength 0 (block weight 0): left as they are, not missing
    owners = {}  # file layer -> (part, model weight, first row, end row)
    for name, layer in boft_file.layers.items():
        hit = resolve(target_name(layer), unet_map, te_map)
        if hit is None:
            missing.append(name)
            continue
        where, key = hit
        if isinstance(key, tuple) and (len(key) > 2 or key[1] is None):
            raise BoftError(f"{boft_file.path}: layer {name} maps onto the model's {key[0]} with its rows in "
                            "another order (a function in ComfyUI's key map, e.g. swap_scale_shift); a rotation "
                            "of the file's rows is no rotation of the model's, so it cannot be applied.")
        if layer.rows is not None:  # a part of a fused layer (kohya Flux): its rows of the target
            key = _rows_of(key, layer.rows)
        strength = (strength_model if where == "model" else strength_clip) * (
            weights.weight(name) if weights is not None else 1.0)
        if strength == 0:
            off += 1
            continue  # block weight 0: the block stays as it is (as strength 0 does for the whole node)
        try:
            layer = fit(layer, _target_shape(roots[where], key))
            check_weight(layer, _target_shape(roots[where], key))
            check_merge(layer, strength, mode, _target(roots[where], key))
        except BoftError as e:
            raise BoftError(f"{boft_file.path}: {e} (model key {key})") from None
        # aliases (0.28 maps Flux 1 and Flux 2 diffusers names, a whole weight and its row slices, to one weight)
        weight_key = key[0] if isinstance(key, tuple) else key
        start, stop = (key[1][1], key[1][1] + key[1][2]) if isinstance(key, tuple) else (0, float("inf"))
        for other, (o_where, o_key, o_start, o_stop) in owners.items():
            if (o_where, o_key) == (where, weight_key) and start < o_stop and o_start < stop:
                raise BoftError(f"{boft_file.path}: layers {other} and {name} both adapt the model's {weight_key} "
                                "(the same rows); one file may adapt a weight once.")
        owners[name] = (where, weight_key, start, stop)
        patches[where][key] = BOFTAdapter.from_layer(layer, mode)
        strengths[where][key] = strength
        if layer.bias is not None and isinstance(key, str) and key.endswith(".weight"):
            bias_key = key[: -len("weight")] + "bias"
            patches[where][bias_key] = BOFTBiasAdapter(set(), (layer.bias,))
            strengths[where][bias_key] = strength
    handed = {}  # file layer -> adapter kind, for the layers the host's adapters apply
    host, host_layers, host_missing = host_patches(boft_file.path, boft_file.others, unet_map, te_map)
    missing += host_missing
    for key, patch in host.items():
        if key not in host_layers:
            continue  # a patch for a layer this model lacks (core's load_lora maps what it can)
        name, _ = host_layers[key]
        where = next((w for w in ("model", "clip") if roots[w] is not None and _has(roots[w], key)), None)
        if where is None:
            missing.append(name)
            continue
        strength = (strength_model if where == "model" else strength_clip) * (
            weights.weight(name) if weights is not None else 1.0)
        if strength == 0:
            off += 1
            continue
        if key in patches[where]:
            raise BoftError(f"{boft_file.path}: layer {name} and a BOFT layer both change the model's {key}; "
                            "one file may adapt a weight once.")
        check_host_patch(boft_file.path, roots[where], key, patch, name)
        patches[where][key] = patch
        strengths[where][key] = strength
        handed[name] = host_layers[key][1]
    missing = sorted(set(missing), key=missing.index)
    if not patches["model"] and not patches["clip"] and not off:
        family = guess_family(boft_file.layers)
        sample = ", ".join(list(boft_file.layers)[:3])
        raise BoftError(
            f"{boft_file.path}: none of its {len(boft_file.layers)} layers ({sample}, ...) exist in "
            f"this {'model' if clip is None else 'model or text encoder'}. The adapter likely "
            f"belongs to another base model: its layer names suggest {family}."
        )
    return patches, strengths, missing, handed


def _has(root, key) -> bool:
    """Whether ``root`` has the weight a patch key (a name, or (name, offset)) points at."""
    try:
        comfy.utils.get_attr(root, key[0] if isinstance(key, tuple) else key)
    except AttributeError:
        return False
    return True


def by_strength(patches: dict, strengths: dict) -> dict[float, dict]:
    """``{strength: {key: patch}}``: ComfyUI's add_patches takes one strength per call."""
    groups: dict[float, dict] = {}
    for key, patch in patches.items():
        groups.setdefault(strengths[key], {})[key] = patch
    return groups


def apply_boft(model, clip, boft_name, strength_model, strength_clip, mode, unique_id=None, block_weights="",
               apply="auto", constraint="auto"):
    if constraint not in CONSTRAINTS:
        raise BoftError(f"unknown constraint rule {constraint!r}; expected one of {', '.join(CONSTRAINTS)}.")
    check_mode(mode)
    # NaN passes ComfyUI's min/max check (every comparison with it is false)
    strength_model = check_strength(strength_model, f"{boft_name}: strength_model")
    strength_clip = check_strength(strength_clip, f"{boft_name}: strength_clip")
    weights = parse_block_weights(block_weights, model_family(model)) if (block_weights or "").strip() else None
    if strength_model == 0 and strength_clip == 0:
        LAST_RUNS.record(unique_id, {"boft_name": boft_name, "applied": 0, "total": None, "not_applied": [],
                                     "report": "BOFT: strength 0, nothing applied.", "apply": None})
        return model, clip, "BOFT: strength 0, nothing applied."
    path = folder_paths.get_full_path_or_raise("loras", boft_name)
    boft_file = with_constraint(CACHE.get(path), constraint)
    use_clip = clip if (clip is not None and strength_clip != 0) else None
    patches, strengths, missing, handed = plan_patches(boft_file, model if strength_model != 0 else None, use_clip,
                                               mode, strength_model, strength_clip, weights)
    how = {part: choose_apply(apply, root, [k for k, p in patches[part].items() if isinstance(p, BOFTAdapter)],
                              boft_name)
           for part, root in (("model", model.model if model is not None else None),
                              ("clip", clip.cond_stage_model if clip is not None else None)) if patches[part]}
    new_model, new_clip = model, clip
    if patches["model"]:
        new_model = model.clone()
        if how["model"] == "bypass":
            add_bypass(new_model, new_model.model, patches["model"], strengths["model"],
                       getattr(model, "load_device", None))
        else:
            _merge_patches(new_model, patches["model"], strengths["model"], getattr(model, "load_device", None))
    if patches["clip"]:
        new_clip = clip.clone()
        if how["clip"] == "bypass":
            add_bypass(new_clip.patcher, new_clip.cond_stage_model, patches["clip"], strengths["clip"])
        else:
            _merge_patches(new_clip, patches["clip"], strengths["clip"], None)
    used = "/".join(sorted(set(how.values())))
    applied = sum(isinstance(p, BOFTAdapter) for group in patches.values() for p in group.values())
    rule = constraint_rule(boft_file)
    report = (f"BOFT {os.path.basename(boft_name)} ({boft_file.format}, {mode}{', ' + used if used else ''}"
              f"{'' if rule == 'none' else f', constraint rule {rule}'}): applied "
              f"{applied} of {len(boft_file.layers)} layers")
    report += f" (model {sum(isinstance(p, BOFTAdapter) for p in patches['model'].values())}"
    report += f", clip {sum(isinstance(p, BOFTAdapter) for p in patches['clip'].values())})."
    if handed:
        kinds = sorted(set(handed.values()))
        report += (f" {len(handed)} other layers applied by ComfyUI's own adapters ("
                   + ", ".join(f"{kind} {list(handed.values()).count(kind)}" for kind in kinds) + ").")
    if weights is not None:
        off = len(boft_file.layers) - applied - len([m for m in missing if m in boft_file.layers])
        report += f" block_weights {weights.text!r}"
        report += f": {off} layers at weight 0, left as they are." if off else "."
    if missing:
        why = "no such layer in this model"
        if clip is None or strength_clip == 0 or strength_model == 0:
            why += " (or its part is switched off: strength 0 or no CLIP input)"
        report += f" Not applied ({why}): {', '.join(missing[:12])}"
        report += f" and {len(missing) - 12} more." if len(missing) > 12 else "."
        log.warning(report)
    else:
        log.info(report)
    LAST_RUNS.record(unique_id, {"boft_name": boft_name, "applied": applied, "total": len(boft_file.layers),
                                 "not_applied": missing, "host": handed, "report": report, "apply": used,
                                 "apply_asked": apply, "constraint_rule": rule})
    return new_model, new_clip, report


def _merge_patches(patcher, patches: dict, strengths: dict, device) -> None:
    """Our adapters as weight patches (merged by ComfyUI's ModelPatcher)."""
    for strength, group in by_strength(patches, strengths).items():
        patcher.add_patches(group, strength)
        if batches_on(device):
            # one batched setup for every layer now, instead of per layer while ComfyUI patches
            BOFTAdapter.prepare_all([p for p in group.values() if isinstance(p, BOFTAdapter)],
                                    strength, torch.device(device))


def _inputs(with_clip: bool) -> dict:
    """Both loaders' inputs, in UI order; the model-only loader leaves out clip and strength_clip."""
    strength = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": STRENGTH_TOOLTIP}
    required = {"model": ("MODEL", {"tooltip": "The diffusion model the BOFT is applied to."})}
    if with_clip:
        required["clip"] = ("CLIP", {"tooltip": "The text encoder the BOFT's text-encoder layers are applied to."})
    required["boft_name"] = (folder_paths.get_filename_list("loras"), {
        "tooltip": "The BOFT/OFT file, from the loras folder (LyCORIS BOFT/diag-OFT, kohya networks.boft/oft/"
                   "oft_v2, OneTrainer OFT_2, ComfyUI-trained OFT, or a PEFT BOFT/OFT adapter folder "
                   "through its adapter_model.safetensors)."})
    required["strength_model"] = ("FLOAT", strength)
    if with_clip:
        required["strength_clip"] = ("FLOAT", dict(strength))
    required["mode"] = (list(MODES), {"default": "lycoris", "tooltip": MODE_TOOLTIP})
    optional = {"block_weights": ("STRING", {"default": "", "multiline": False, "tooltip": BLOCK_WEIGHTS_TOOLTIP}),
                "apply": (list(APPLY), {"default": "auto", "tooltip": APPLY_TOOLTIP}),
                "constraint": (list(CONSTRAINTS), {"default": "auto", "tooltip": CONSTRAINT_TOOLTIP})}
    return {"required": required, "optional": optional, "hidden": {"unique_id": "UNIQUE_ID"}}


def _host_category() -> str:
    """Where the host keeps its own LoRA loaders (``loaders`` on 0.3.75, ``model/loaders`` on 0.28):
    ours sit beside them. ComfyUI's ``nodes`` module is loaded before any custom node."""
    lora_loader = getattr(sys.modules.get("nodes"), "LoraLoader", None)
    return getattr(lora_loader, "CATEGORY", "loaders")


class _Loader:
    """What both loader nodes share: where they sit, how search finds them, when they re-run."""

    CATEGORY = _host_category()
    SEARCH_ALIASES = ["boft", "oft", "lycoris", "orthogonal", "lora", "butterfly"]
    FUNCTION = "load_boft"

    @classmethod
    def IS_CHANGED(cls, boft_name, **_):
        """The file's identity on disk: replacing a file under the same name re-runs the node
        (ComfyUI otherwise reuses the cached output, whose inputs did not change)."""
        try:
            return f"{boft_name}:{file_stamp(folder_paths.get_full_path_or_raise('loras', boft_name))}"
        except (OSError, BoftError):
            return float("nan")  # missing now: never equal, so the run happens and reports the error


class BOFTLoader(_Loader):
    @classmethod
    def INPUT_TYPES(cls):
        return _inputs(with_clip=True)

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "trigger_words")
    OUTPUT_TOOLTIPS = ("The patched diffusion model.", "The patched text encoder.", TRIGGER_TOOLTIP)
    DESCRIPTION = "Apply a BOFT (butterfly orthogonal fine-tuning) adapter to a model and its text encoder."

    def load_boft(self, model, clip, boft_name, strength_model, strength_clip, mode="lycoris", unique_id=None,
                  block_weights="", apply="auto", constraint="auto"):
        new_model, new_clip, report = apply_boft(model, clip, boft_name, strength_model, strength_clip,
                                                 mode, unique_id, block_weights, apply, constraint)
        return {"ui": {"boft_report": [report]}, "result": (new_model, new_clip, trigger_words_of(boft_name))}


class BOFTLoaderModelOnly(_Loader):
    @classmethod
    def INPUT_TYPES(cls):
        return _inputs(with_clip=False)

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "trigger_words")
    OUTPUT_TOOLTIPS = ("The patched diffusion model.", TRIGGER_TOOLTIP)
    DESCRIPTION = "Apply a BOFT (butterfly orthogonal fine-tuning) adapter to a diffusion model."

    def load_boft(self, model, boft_name, strength_model, mode="lycoris", unique_id=None, block_weights="",
                  apply="auto", constraint="auto"):
        new_model, _, report = apply_boft(model, None, boft_name, strength_model, 0.0, mode, unique_id,
                                          block_weights, apply, constraint)
        return {"ui": {"boft_report": [report]}, "result": (new_model, trigger_words_of(boft_name))}
