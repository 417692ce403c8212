"""``python -m boft_core``: inspect a BOFT file, or merge it into a plain checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .formats import BoftError, BoftFile, all_finite, trigger_words
from .guard import check_merge, check_strength, load
from .merge import MODES, apply, merge_bias, prepare
from .names import MODEL_PREFIXES, TE_PREFIXES, other_layers, strip_prefix

DESCRIPTION = """\
Inspect BOFT (Butterfly Orthogonal Fine-Tuning) adapter files, or merge one into a checkpoint.

Reads LyCORIS BOFT and diag-OFT (<layer>.oft_blocks), PEFT BOFT (an adapter folder, or its
adapter_model.safetensors with adapter_config.json beside it) and kohya sd-scripts
networks.boft (lora_unet_/lora_te_ + boft_R/boft_s) files.
"""

MERGE_HELP = f"""\
Merge ADAPTER into BASE and write every tensor of BASE (changed or not, in its own dtype) to OUT.
Adapter layers are matched to BASE weights by name after removing the trainers' prefixes
({", ".join(MODEL_PREFIXES + TE_PREFIXES)})
and turning '.' into '_'; names must use the same convention as BASE (e.g. both LDM/SGM or both
diffusers). A layer that matches no weight or several is an error. Use this for hosts without
BOFT support (A1111, Forge, InvokeAI).

Strength modes:
  lycoris     what LyCORIS's merge_to(s) computes: each butterfly stage blended s*R + (1-s)*I,
              rescale always applied (default)
  linear      W + s*(W'(1) - W), linear in weight space (kohya networks.boft's own strength)
  orthogonal  each block is cayley(s*Q), a rotation for every s; s = 0 leaves W unchanged
"""



def layer_stem(name: str) -> str:
    """The layer's path without trainer and text-encoder prefixes, '.' turned into '_'."""
    return strip_prefix(name, text_encoders=True).replace(".", "_")


def match_layers(adapter: BoftFile, keys: list[str]) -> dict[str, str]:
    """{adapter layer name: BASE weight key}; every layer matched exactly once, or BoftError."""
    weights = {k[: -len(".weight")].replace(".", "_"): k for k in keys if k.endswith(".weight")}
    matched = {}
    for name in adapter.layers:
        stem = layer_stem(name)
        if stem in weights:
            matched[name] = weights[stem]
            continue
        hits = sorted(key for norm, key in weights.items() if norm.endswith("_" + stem))
        if len(hits) != 1:
            what = "matches no weight" if not hits else f"matches {len(hits)} weights"
            near = hits[:8] or sorted(k for n, k in weights.items() if n.endswith(stem.rsplit("_", 1)[-1]))[:8]
            raise BoftError(
                f"{adapter.path}: adapter layer {name} (as {stem}) {what} of the base model"
                f"{': ' + ', '.join(near) if near else ''}. The adapter may belong to another "
                "model, or use another naming convention (diffusers vs LDM/SGM)."
            )
        matched[name] = hits[0]
    return matched


def cmd_inspect(args) -> int:
    adapter = load(args.path)
    info = describe(adapter)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{adapter.path}")
    print(f"  format:      {info['format']}")
    print(f"  layers:      {info['layers']}")
    print(f"  dtype:       {info['dtype']}")
    print(f"  parameters:  {info['parameters']:,}")
    if info["trigger_words"]:
        words = ", ".join(f"{w} ({n})" for w, n in info["trigger_words"][:20])
        print(f"  trigger words: {words}")
    for key, value in sorted(info["metadata"].items()):
        if key != "ss_tag_frequency":
            text = value if len(value) < 100 else value[:97] + "..."
            print(f"  meta {key}: {text}")
    print("  layer  m  blocks  block_size  constraint  rescaled")
    for module in info["modules"]:
        print(f"  {module['name']}  {module['m']}  {module['block_num']}  {module['block_size']}  "
              f"{module['constraint']:g}  {module['rescaled']}")
    if info["other_layers"]:
        print(f"  other adapter layers (for the host's own adapters, e.g. ComfyUI's LoRA code): "
              f"{len(info['other_layers'])}")
        for other in info["other_layers"]:
            print(f"  {other['name']}  {other['kind']}  {', '.join(k[len(other['name']):] for k in other['keys'])}")
    return 0


def describe(adapter: BoftFile) -> dict:
    """A JSON-ready summary of the file: format, layers, metadata, trigger words."""
    modules = [
        {
            "name": layer.name,
            "m": layer.m,
            "block_num": layer.block_num,
            "block_size": layer.block_size,
            "constraint": layer.alpha,
            "rescaled": layer.scale is not None,
            "side": layer.side,
            "dtype": str(layer.blocks.dtype).replace("torch.", ""),
        }
        for layer in adapter.layers.values()
    ]
    kinds = other_layers(adapter.others)
    others = [{"name": name, "kind": kind,
               "keys": sorted(k for k in adapter.others if k == name or k.startswith(name + "."))}
              for name, kind in sorted(kinds.items())]
    return {
        "path": adapter.path,
        "format": adapter.format,
        "layers": len(modules),
        "other_layers": others,  # other adapter kinds in a mixed file: the host's adapters apply them
        "dtype": adapter.dtype,
        "parameters": adapter.parameter_count,
        "modules": modules,
        "metadata": adapter.metadata,
        "peft_config": adapter.config,
        "trigger_words": trigger_words(adapter.metadata),
    }


def cmd_merge(args) -> int:
    from safetensors import safe_open
    from safetensors.torch import save_file

    strength = check_strength(args.strength, "--strength")
    adapter = load(args.adapter)
    try:
        with safe_open(args.base, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors' own error types; the user needs the file name
        raise BoftError(f"{args.base}: cannot read the base checkpoint: {e}") from None
    if adapter.others:
        shown = ", ".join(sorted(adapter.others)[:5])
        raise BoftError(f"{adapter.path}: a mixed file: {len(adapter.others)} key(s) of other adapter kinds "
                        f"(e.g. {shown}) beside its BOFT layers; merge merges BOFT layers only and would "
                        "apply half of it. Load the file in ComfyUI (the pack's loader applies both).")
    matched = match_layers(adapter, list(tensors))
    merged = {}
    for name, key in matched.items():  # every layer checked and merged before anything is written
        layer = adapter.layers[name]
        check_merge(layer, strength, args.mode, tensors[key], adapter.path)
        patch = prepare(layer, strength, args.mode)
        merged[key] = apply(patch, tensors[key])
        bias_key = key[: -len("weight")] + "bias"
        if patch.bias is not None:
            merged[bias_key] = merge_bias(tensors.get(bias_key), patch, strength)
        for out_key in (key, bias_key):
            if out_key in merged and not all_finite(merged[out_key]):  # the bound is loose; this is exact
                raise BoftError(f"{adapter.path}: layer {name}: at strength {strength:g} ({args.mode}) "
                                f"the merged {out_key} is not finite; nothing was written.")
    tensors.update(merged)
    try:
        save_file(tensors, args.out, metadata)
    except OSError as e:
        raise BoftError(f"{args.out}: cannot write: {e}") from None
    print(f"merged {len(matched)} {adapter.format} layers at strength {strength:g} "
          f"({args.mode}) into {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m boft_core", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show a BOFT file's format, layers and metadata",
                       description="Show a BOFT file's format, layers, metadata and trigger words.")
    p.add_argument("path", help="a .safetensors file or a PEFT adapter folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_inspect)
    p = sub.add_parser("merge", help="merge an adapter into a checkpoint", description=MERGE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the base checkpoint (.safetensors)")
    p.add_argument("adapter", help="the BOFT file or PEFT adapter folder")
    p.add_argument("--out", required=True, help="where to write the merged .safetensors")
    p.add_argument("--strength", type=float, default=1.0, help="adapter strength (default 1)")
    p.add_argument("--mode", choices=MODES, default="lycoris", help="strength mode (see above)")
    p.set_defaults(run=cmd_merge)
    return parser


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad input (one ``error:`` line), 1 output closed early (``| head``),
    70 an unexpected error (a bug: one ``error:`` line that says so, no traceback)."""
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # names and tags the terminal cannot show: escaped, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        code = args.run(args)
        sys.stdout.flush()
        return code
    except BoftError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`inspect FILE | head`): stop quietly
        _discard_stdout()
        return 1
    except Exception as e:  # a bug: say so in one line instead of a traceback
        print(f"error: unexpected {type(e).__name__}: {_one_line(e)} (a bug in boft_core; please "
              "report it with the command and the file)", file=sys.stderr)
        return 70


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split("\n"))


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (tests redirect stdout)
        pass
