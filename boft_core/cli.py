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
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from .formats import BoftError, all_finite, map_tensors, with_constraint
    from .guard import check_merge, check_strength, load
    from .merge import fit, merge_bias, prepare

    strength = check_strength(args.strength, "--strength")
    adapter = with_constraint(load(args.adapter), args.constraint)
    if adapter.others:
        shown = ", ".join(sorted(adapter.others)[:5])
        raise BoftError(f"{adapter.path}: a mixed file: {len(adapter.others)} key(s) of other adapter kinds "
                        f"(e.g. {shown}) beside its BOFT layers; merge merges BOFT layers only and would "
                        "apply half of it. Load the file in ComfyUI (the pack's loader applies both).")
    # BASE mapped copy-on-write (never written): only what is merged is read before writing
    try:
        mapped = map_tensors(args.base)
    except BoftError as e:
        raise BoftError(f"cannot read the base checkpoint: {e}") from None
    tensors, metadata = mapped if mapped is not None else _read_all(args.base)  # (a dtype torch lacks)
    matched = match_layers(adapter, list(tensors))
    jobs: dict[str, list] = {}  # BASE key -> its layers, in the adapter's order
    for name, key in matched.items():  # every layer checked before anything is computed or written
        layer = adapter.layers[name]
        target = tensors[key] if layer.rows is None else tensors[key].narrow(0, *layer.rows)  # a part of a fused layer
        layer = fit(layer, target.shape)
        check_merge(layer, strength, args.mode, target, adapter.path)
        jobs.setdefault(key, []).append(layer)
    layers = [layer for group in jobs.values() for layer in group]
    # One worker per CPU this process may run on, each with one torch thread: whole layers run
    # side by side, with no parallel region whose threads wait for one another (a thread whose
    # core is taken by other work would stall every region)
    workers = args.threads or _cpus()
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        patches = dict(zip((layer.name for layer in layers),
                           pool.map(lambda layer: prepare(layer, strength, args.mode), layers), strict=True))
        out = dict(tensors)
        for key, group in jobs.items():
            for layer in group:
                patch = patches[layer.name]
                if patch.bias is not None:
                    bias_key = key[: -len("weight")] + "bias"
                    out[bias_key] = merge_bias(tensors.get(bias_key), patch, strength)
                    if not all_finite(out[bias_key]):
                        raise BoftError(f"{adapter.path}: layer {layer.name}: at strength {strength:g} "
                                        f"({args.mode}) the merged {bias_key} is not finite; nothing was written.")

        def merged(key: str, result):
            """BASE's ``key`` with every layer of ``jobs[key]`` merged, written into ``result``."""
            _merge_layers(tensors[key], jobs[key], patches, result)
            if not all_finite(result):  # the check before the merge bounds loosely; this is exact
                raise BoftError(f"{adapter.path}: layer {jobs[key][-1].name}: at strength {strength:g} "
                                f"({args.mode}) the merged {key} is not finite; {args.out} was not written.")
            return result

        try:
            if mapped is not None:
                _write_merged(args.out, out, metadata, merged, list(jobs), pool)
            else:
                from safetensors.torch import save_file

                out.update({key: merged(key, torch.empty_like(tensors[key])) for key in jobs})
                save_file(out, args.out, metadata)
        except OSError as e:
            raise BoftError(f"{args.out}: cannot write: {e}") from None
    print(f"merged {len(matched)} {adapter.format} layers at strength {strength:g} "
          f"({args.mode}) into {args.out}")
    return 0


def _merge_layers(weight, layers, patches, result) -> None:
    """``weight`` with ``layers`` merged in turn (each into its rows, for parts of a fused
    layer), into ``result`` (same shape and dtype): in place where :func:`try_merge_into` can,
    the first layer straight from ``weight`` into ``result`` where it can."""
    from .merge import apply, try_merge_into

    first = layers[0]
    if first.rows is None and try_merge_into(patches[first.name], result, source=weight):
        layers = layers[1:]
    else:
        result.copy_(weight)
    for layer in layers:
        target = result if layer.rows is None else result.narrow(0, *layer.rows)
        patch = patches[layer.name]
        if not try_merge_into(patch, target):
            target.copy_(apply(patch, target))


def _write_merged(path: str, tensors: dict, metadata: dict, merged, keys: list[str], pool) -> None:
    """``tensors`` written as a safetensors file at ``path`` (beside it, then renamed over it),
    ``keys`` computed by ``merged(key, result)`` on ``pool``'s threads as the file is written:
    each thread merges into its own buffer, reused from layer to layer (fresh memory costs a page
    fault every 4 KB), and writes the result at its place in the file. Largest layers first."""
    import threading
    from concurrent.futures import FIRST_EXCEPTION, wait

    import torch

    from .formats import replacing, tensor_layout, write_at

    head, offsets = tensor_layout(tensors, metadata)
    local = threading.local()
    keys_set = set(keys)
    order = sorted(keys, key=lambda k: -tensors[k].numel() * tensors[k].element_size())

    def task(fd: int, key: str) -> None:
        t = tensors[key]
        if key in keys_set:
            size = t.numel() * t.element_size()
            buffer = getattr(local, "buffer", None)
            if buffer is None or buffer.numel() < size:
                buffer = local.buffer = torch.empty(size, dtype=torch.uint8)
            t = merged(key, buffer[:size].view(t.dtype).view(t.shape))
        write_at(fd, t, offsets[key])

    with replacing(path) as fd:
        write_at(fd, head, 0)
        futures = [pool.submit(task, fd, key) for key in order + [k for k in offsets if k not in keys_set]]
        done, waiting = wait(futures, return_when=FIRST_EXCEPTION)
        for future in waiting:
            future.cancel()
        wait(waiting)  # (those already running)
        for future in futures:
            if future.done() and not future.cancelled():
                future.result()  # the first error, raised here


def _cpus() -> int:
    """The CPUs this process may run on (its affinity mask: taskset and cpusets count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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
    p.add_argument("--threads", type=_positive, help="CPU threads: layers merged side by side, one "
                   "torch thread each (default: the CPUs this process may use)")
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
