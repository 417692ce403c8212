"""``python -m boft_core``: inspect a BOFT file, or merge it into a plain checkpoint.

Torch loads only once a command runs (``--help`` and argument errors answer without it): the
modules that need it are imported inside the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .modes import CONSTRAINTS, MODES
from .names import MODEL_PREFIXES, TE_PREFIXES, other_layers, strip_prefix

DESCRIPTION = """\
Inspect BOFT (Butterfly Orthogonal Fine-Tuning) adapter files, or merge one into a checkpoint.

Reads LyCORIS BOFT and diag-OFT (<layer>.oft_blocks), PEFT BOFT and OFT (an adapter folder, or
its adapter_model.safetensors with adapter_config.json beside it), kohya sd-scripts networks.boft
(lora_unet_/lora_te_ + boft_R/boft_s), networks.oft (oft_unet_ + oft_blocks) and networks.oft_v2
(oft_R.weight), OneTrainer OFT_2 (oft_R.weight) and ComfyUI-trained OFT (diffusion_model. +
oft_blocks) files.
"""

CONSTRAINT_HELP = ("how an .alpha constraint is read: auto (ComfyUI-trained files by ComfyUI's rule "
                   "|Q| <= alpha, others by LyCORIS/kohya's |Q| <= alpha*out_dim), lycoris, comfyui")

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


def match_layers(adapter, keys: list[str]) -> dict[str, str]:
    """{adapter layer name: BASE weight key}; every layer matched exactly once, or BoftError."""
    from .formats import BoftError, target_name

    weights = {k[: -len(".weight")].replace(".", "_"): k for k in keys if k.endswith(".weight")}
    matched = {}
    for name, layer in adapter.layers.items():
        stem = layer_stem(target_name(layer))
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
    from .formats import with_constraint
    from .guard import load

    adapter = with_constraint(load(args.path), args.constraint)
    info = describe(adapter)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{adapter.path}")
    print(f"  format:      {info['format']}")
    print(f"  constraint rule: {info['constraint_rule']}")
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
    print("  layer  m  blocks  block_size  constraint  rescaled  rotation")
    for module in info["modules"]:
        print(f"  {module['name']}  {module['m']}  {module['block_num']}  {module['block_size']}  "
              f"{module['constraint']:g}  {module['rescaled']}  {module['rotation']}")
    if info["other_layers"]:
        print(f"  other adapter layers (for the host's own adapters, e.g. ComfyUI's LoRA code): "
              f"{len(info['other_layers'])}")
        for other in info["other_layers"]:
            print(f"  {other['name']}  {other['kind']}  {', '.join(k[len(other['name']):] for k in other['keys'])}")
    return 0


def describe(adapter) -> dict:
    """A JSON-ready summary of a ``BoftFile``: format, layers, metadata, trigger words."""
    from .formats import constraint_rule, trigger_words

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
            "rotation": rotation_text(layer),
            "constraint_rule": layer.constraint if layer.alpha > 0 else "none",
            "rows": list(layer.rows) if layer.rows is not None else None,
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
        "constraint_rule": constraint_rule(adapter),
        "layers": len(modules),
        "other_layers": others,  # other adapter kinds in a mixed file: the host's adapters apply them
        "dtype": adapter.dtype,
        "parameters": adapter.parameter_count,
        "modules": modules,
        "metadata": adapter.metadata,
        "peft_config": adapter.config,
        "trigger_words": trigger_words(adapter.metadata),
    }


def rotation_text(layer) -> str:
    """How a layer's blocks become rotations, in words: ``cayley``, ``neumann-5`` (``, PEFT<0.18
    series``), plus ``coft``, ``shared block`` and ``scaled`` where they apply."""
    text = f"neumann-{layer.neumann}" if layer.neumann else "cayley"
    extras = [("PEFT<0.18 series", layer.neumann_legacy), (f"coft |Q|<={layer.coft_norm:.3g}", layer.coft_norm > 0),
              ("shared block", layer.shared), ("scaled_oft", layer.q_scale != 1),
              ("conv untransposed", layer.conv_untransposed)]
    shown = [what for what, on in extras if on]
    return text + (f" ({', '.join(shown)})" if shown else "")


def cmd_merge(args) -> int:
    from .formats import BoftError, all_finite, map_tensors, with_constraint, write_tensors
    from .guard import check_merge, check_strength, load
    from .merge import apply, fit, merge_bias, prepare, try_merge_into

    strength = check_strength(args.strength, "--strength")
    _set_threads(args.threads)
    adapter = with_constraint(load(args.adapter), args.constraint)
    if adapter.others:
        shown = ", ".join(sorted(adapter.others)[:5])
        raise BoftError(f"{adapter.path}: a mixed file: {len(adapter.others)} key(s) of other adapter kinds "
                        f"(e.g. {shown}) beside its BOFT layers; merge merges BOFT layers only and would "
                        "apply half of it. Load the file in ComfyUI (the pack's loader applies both).")
    # BASE mapped copy-on-write: only the matched weights are read before writing, and they are
    # merged in place (float16/bfloat16 computed in float32 a slice at a time, rounded once)
    try:
        mapped = map_tensors(args.base)
    except BoftError as e:
        raise BoftError(f"cannot read the base checkpoint: {e}") from None
    if mapped is not None:
        tensors, metadata = mapped
    else:  # a dtype torch lacks: safetensors reads it
        tensors, metadata = _read_all(args.base)
    matched = match_layers(adapter, list(tensors))
    shared = {key for key in matched.values() if list(matched.values()).count(key) > 1}
    merged = {}
    for name, key in matched.items():  # every layer checked and merged before anything is written
        layer = adapter.layers[name]
        weight = merged.get(key, tensors[key])
        target = weight if layer.rows is None else weight.narrow(0, *layer.rows)  # a part of a fused layer
        layer = fit(layer, target.shape)
        check_merge(layer, strength, args.mode, target, adapter.path)
        patch = prepare(layer, strength, args.mode)
        if layer.rows is None:
            in_place = mapped is not None and key not in shared and try_merge_into(patch, target)
            merged[key] = target if in_place else apply(patch, target)
        else:  # a part of a fused layer: its rows of a copy of the whole weight
            merged[key] = weight.clone() if key not in merged else weight
            merged[key][layer.rows[0]:layer.rows[0] + layer.rows[1]] = apply(patch, target)
        bias_key = key[: -len("weight")] + "bias"
        if patch.bias is not None:
            merged[bias_key] = merge_bias(tensors.get(bias_key), patch, strength)
        for out_key in (key, bias_key):
            if out_key in merged and not all_finite(merged[out_key]):  # the bound is loose; this is exact
                raise BoftError(f"{adapter.path}: layer {name}: at strength {strength:g} ({args.mode}) "
                                f"the merged {out_key} is not finite; nothing was written.")
    tensors.update(merged)
    try:
        if mapped is not None:
            write_tensors(args.out, tensors, metadata)
        else:
            from safetensors.torch import save_file

            save_file(tensors, args.out, metadata)
    except OSError as e:
        raise BoftError(f"{args.out}: cannot write: {e}") from None
    print(f"merged {len(matched)} {adapter.format} layers at strength {strength:g} "
          f"({args.mode}) into {args.out}")
    return 0


def _set_threads(threads: int | None) -> None:
    """torch's CPU threads for the merge: ``threads``, else torch's own choice less the cores that
    other work keeps busy (1-minute load average). The merge is many cache-sized batched matmuls,
    each a parallel region whose threads wait for one another: a thread whose core is taken by
    another process stalls every region, which made the merge slower than core's under load."""
    import torch

    if threads is None:
        try:
            busy = int(os.getloadavg()[0])
        except OSError:  # (no load average on this system)
            busy = 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, min(torch.get_num_threads(), cores - busy))
    torch.set_num_threads(threads)


def _read_all(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    from .formats import BoftError

    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors' own error types; the user needs the file name
        raise BoftError(f"{path}: cannot read the base checkpoint: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m boft_core", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show a BOFT file's format, layers and metadata",
                       description="Show a BOFT file's format, layers, metadata and trigger words.")
    p.add_argument("path", help="a .safetensors file or a PEFT adapter folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--constraint", choices=CONSTRAINTS, default="auto", help=CONSTRAINT_HELP)
    p.set_defaults(run=cmd_inspect)
    p = sub.add_parser("merge", help="merge an adapter into a checkpoint", description=MERGE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the base checkpoint (.safetensors)")
    p.add_argument("adapter", help="the BOFT file or PEFT adapter folder")
    p.add_argument("--out", required=True, help="where to write the merged .safetensors")
    p.add_argument("--strength", type=float, default=1.0, help="adapter strength (default 1)")
    p.add_argument("--mode", choices=MODES, default="lycoris", help="strength mode (see above)")
    p.add_argument("--constraint", choices=CONSTRAINTS, default="auto", help=CONSTRAINT_HELP)
    p.add_argument("--threads", type=_positive, help="CPU threads (default: torch's choice, less the cores "
                   "that other work keeps busy)")
    p.set_defaults(run=cmd_merge)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad input (one ``error:`` line), 1 output closed early (``| head``),
    70 an unexpected error (a bug: one ``error:`` line that says so, no traceback)."""
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # names and tags the terminal cannot show: escaped, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    from .formats import BoftError  # (imports torch: after the arguments are parsed)

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
