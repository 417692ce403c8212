"""Bypass mode (issue 10): our adapter in 0.28's bypass protocol, in the real host's own classes.

ComfyUI 0.28 runs an adapter in bypass mode through ``comfy.weight_adapter.BypassInjectionManager``:
its hook sets ``multiplier``/``is_conv``/``kw_dict`` on the adapter, ``inject()`` moves (and casts)
the tensors in ``adapter.weights``, and the module's forward becomes ``adapter.bypass_forward``.
The oracle: the same host module run with the weight merged by our merge (itself tested against
LyCORIS and PEFT), float64-checked in float32 (relative 1e-5) and as close as the merge in
float16/bfloat16. Fresh random data everywhere. 0.3.75 has no bypass: those tests are skipped.
"""

import re
import sys
import zlib
from dataclasses import replace

import pytest
import torch

import boft_core
from boft_core import butterfly, merge

KINDS = ["lycoris-boft", "lycoris-diag-oft", "peft-boft", "kohya-boft"]
MODES = ["lycoris", "linear", "orthogonal"]
STRENGTHS = [-1.0, 0.5, 1.0, 2.0]


def seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


@pytest.fixture(scope="module")
def bypass_host(comfy, pack):
    import comfy.weight_adapter

    if not hasattr(comfy.weight_adapter, "BypassInjectionManager"):
        pytest.skip("this ComfyUI has no bypass mode (added in 0.28)")
    import comfy.ops

    return comfy


def adapter_class(pack):
    return sys.modules[pack.__name__ + ".nodes.adapter"].BOFTAdapter


def make_layer(gen, kind, dim, rows):
    """A layer of ``kind`` whose butterfly acts on ``dim`` rows (nb = 4 blocks of dim/4), with a
    rescale/boft_s of ``rows`` channels and a LyCORIS constraint that bites."""
    nb, b = 4, dim // 4
    m = 1 if kind == "lycoris-diag-oft" else 3
    blocks = torch.randn(m, nb, b, b, generator=gen) * 0.2
    alpha = 0.002 if kind.startswith("lycoris") else 0.0
    return boft_core.BoftLayer("layer", kind, blocks, alpha=alpha, scale=1 + 0.1 * torch.randn(rows, generator=gen))


def host_module(comfy, conv: bool, side: str, gen, dtype=torch.float32):
    """A host module (``comfy.ops.disable_weight_init``) with random weights and bias, in a root."""
    ops = comfy.ops.disable_weight_init
    if conv:  # output side: 32 output channels; input side: 8 x 2 x 2 = 32 input features
        mod = ops.Conv2d(16, 32, 3, padding=1) if side == "out" else ops.Conv2d(8, 12, 2, padding=1)
    else:
        mod = ops.Linear(24, 32) if side == "out" else ops.Linear(32, 20)
    with torch.no_grad():
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) / mod.weight[0].numel() ** 0.5)
        mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.5)
    root = torch.nn.Module()
    root.layer = mod.to(dtype)
    return root


def run_bypass(comfy, root, adapter, strength, x):
    manager = comfy.weight_adapter.BypassInjectionManager()
    manager.add_adapter("layer.weight", adapter, strength=strength)
    injections = manager.create_injections(root)
    for injection in injections:
        injection.inject(None)
    try:
        with torch.no_grad():
            return root.layer(x)
    finally:
        for injection in injections:
            injection.eject(None)


def merged_output(root, layer, strength, mode, x):
    """The same host module with its weight merged by our merge (float64), bias unchanged."""
    mod = root.layer
    merged = boft_core.merge_weight(mod.weight.double(), layer, strength, mode)
    with torch.no_grad():
        if isinstance(mod, torch.nn.Conv2d):
            return mod._conv_forward(x.double(), merged, mod.bias.double())
        return torch.nn.functional.linear(x.double(), merged, mod.bias.double())


def inputs(root, gen, dtype):
    mod = root.layer
    shape = (2, mod.in_channels, 6, 5) if isinstance(mod, torch.nn.Conv2d) else (2, 5, mod.in_features)
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_bypass_equals_merge_float32(bypass_host, pack, kind, mode, conv):
    """Every format, strength mode and s in {-1, 0.5, 1, 2}: the bypass output equals the output
    with merged weights, relative 1e-5 in float32 (an input-side conv merges on the fly)."""
    comfy = bypass_host
    adapter_cls = adapter_class(pack)
    gen = torch.Generator().manual_seed(seed("f32", kind, mode, conv))
    side = "in" if kind in ("peft-boft", "kohya-boft") else "out"
    root = host_module(comfy, conv, side, gen)
    rows = root.layer.weight.shape[0]
    layer = make_layer(gen, kind, 32, rows)
    weight_before = root.layer.weight.detach().clone()
    x = inputs(root, gen, torch.float32)
    for s in STRENGTHS:
        got = run_bypass(comfy, root, adapter_cls.from_layer(layer, mode), s, x)
        want = merged_output(root, layer, s, mode, x)
        assert got.dtype == torch.float32
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel < 1e-5, (s, rel)
        assert not torch.allclose(want, merged_output(root, layer, 0.0, "orthogonal", x), rtol=1e-3)
    assert torch.equal(root.layer.weight, weight_before)  # never written


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lycoris-boft", "peft-boft"])
def test_bypass_half_activations_as_close_as_the_merge(bypass_host, pack, kind, dtype):
    """A float16/bfloat16 module: inject() would cast the adapter's tensors to the module's dtype;
    ours keep theirs (the rotation computed in float32), alpha stays a Python float, and the
    output is as close to the float64 merge as the merged half-precision layer's."""
    comfy = bypass_host
    adapter_cls = adapter_class(pack)
    gen = torch.Generator().manual_seed(seed("half", kind, str(dtype)))
    side = "in" if kind == "peft-boft" else "out"
    root = host_module(comfy, False, side, gen, dtype)
    layer = make_layer(gen, kind, 32, root.layer.weight.shape[0])
    x = inputs(root, gen, dtype)
    adapter = adapter_cls.from_layer(layer, "lycoris")
    got = run_bypass(comfy, root, adapter, 0.8, x)
    assert adapter.weights[0].dtype == layer.blocks.dtype and adapter.weights[1].dtype == layer.scale.dtype
    assert type(adapter.weights[2]) is float
    assert got.dtype == dtype
    want = merged_output(root, layer, 0.8, "lycoris", x)
    merged_half = boft_core.merge_weight(root.layer.weight, layer, 0.8, "lycoris")
    via_merge = torch.nn.functional.linear(x, merged_half, root.layer.bias)
    err_bypass = ((got.double() - want).norm() / want.norm()).item()
    err_merge = ((via_merge.double() - want).norm() / want.norm()).item()
    eps = torch.finfo(dtype).eps
    assert err_bypass <= max(1.5 * err_merge, eps), (err_bypass, err_merge)


def test_core_default_path_g_rotates_output_channels(bypass_host, pack):
    """``g()`` (the hook's default path, not taken since we override bypass_forward) is
    ``scale * B(s) y`` on the channel axis: LyCORIS's bypass, checked against a dense float64 B."""
    gen = torch.Generator().manual_seed(seed("g"))
    layer = make_layer(gen, "lycoris-boft", 32, 32)
    adapter = adapter_class(pack).from_layer(layer, "orthogonal")
    adapter.multiplier, adapter.is_conv = 0.7, True
    y = torch.randn(2, 32, 3, 3, generator=gen)
    patch = merge.prepare(layer, 0.7, "orthogonal", dtype=torch.float64)
    dense = butterfly.dense_matrix(patch.rotations, patch.layout) * patch.scale.unsqueeze(1)
    want = torch.einsum("oc,bchw->bohw", dense, y.double())
    assert torch.allclose(adapter.g(y).double(), want, atol=1e-5)


def test_bypass_wrong_shape_names_the_layer(bypass_host, pack):
    comfy = bypass_host
    gen = torch.Generator().manual_seed(seed("shape"))
    root = host_module(comfy, False, "out", gen)
    layer = make_layer(gen, "lycoris-boft", 16, 16)
    adapter = adapter_class(pack).from_layer(layer, "lycoris")
    error = sys.modules[pack.__name__ + ".boft_core"].BoftError
    with pytest.raises(error, match=r"layer.*\(32, 24\).*another model"):
        run_bypass(comfy, root, adapter, 1.0, inputs(root, gen, torch.float32))


# --- our loader's apply input, in process ---------------------------------------------------------


def loader_setup(comfy, pack, ckpt, loras_dir, name, **model_options):
    import tiny_models
    from lycoris_comfy import write_boft

    model, _, _ = tiny_models.load_checkpoint(ckpt, with_vae=False) if not model_options else (
        *comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False,
                                               model_options=model_options)[:2], None)
    if not (loras_dir / name).exists():
        write_boft(loras_dir / name, model.model.diffusion_model, "lora_unet", rescaled=True, constraint=0.01)
    return model, pack.NODE_CLASS_MAPPINGS["BOFTLoaderModelOnly"]()


def unet_output(comfy, patcher, seed_=0):
    """One forward of the patched UNet as ComfyUI runs it (weights loaded, patches and bypass hooks in)."""
    gen = torch.Generator().manual_seed(seed_)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, 768, generator=gen)
    try:
        with torch.inference_mode():  # as ComfyUI's executor runs a prompt
            comfy.model_management.load_models_gpu([patcher])
            return patcher.model.diffusion_model(x, timesteps=torch.tensor([400.0]), context=context).double()
    finally:
        comfy.model_management.unload_all_models()


def test_apply_on_a_host_without_bypass(comfy, pack, sd15_ckpt, loras_dir):
    """0.3.75: apply=bypass fails naming the version needed and leaves the model as it is; auto merges."""
    import comfy.weight_adapter

    if hasattr(comfy.weight_adapter, "BypassInjectionManager"):
        pytest.skip("this ComfyUI has bypass mode")
    model, node = loader_setup(comfy, pack, sd15_ckpt, loras_dir, "apply_old_host.safetensors")
    error = sys.modules[pack.__name__ + ".boft_core"].BoftError
    with pytest.raises(error, match=r"apply=bypass needs ComfyUI 0\.28\.0 or newer.*this is ComfyUI 0\.3\.75"):
        node.load_boft(model, "apply_old_host.safetensors", 1.0, apply="bypass")
    assert not model.patches
    out = node.load_boft(model, "apply_old_host.safetensors", 1.0, apply="auto")
    assert re.search(r", merge[,)].*: applied 51 of 51", out["ui"]["boft_report"][0])
    assert len(out["result"][0].patches) == 51


def test_apply_bypass_equals_merge_and_writes_no_weight(bypass_host, pack, sd15_ckpt, loras_dir):
    """0.28: apply=bypass puts hooks on the clone (no weight patches), its UNet output equals
    apply=merge's (float32, relative 1e-5), and the weights are the originals after the forward."""
    comfy = bypass_host
    name = "apply_bypass.safetensors"
    model, node = loader_setup(comfy, pack, sd15_ckpt, loras_dir, name)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    base = unet_output(comfy, model)
    for s in (0.5, 2.0):
        bypassed = node.load_boft(model, name, s, "orthogonal", apply="bypass")
        assert re.search(r", bypass[,)].*: applied 51 of 51", bypassed["ui"]["boft_report"][0])
        patcher = bypassed["result"][0]
        assert not patcher.patches and any(k.startswith("boft_bypass_") for k in patcher.injections)
        got = unet_output(comfy, patcher)
        want = unet_output(comfy, node.load_boft(model, name, s, "orthogonal", apply="merge")["result"][0])
        assert ((got - want).norm() / want.norm()).item() < 1e-5, s
        assert ((got - base).norm() / base.norm()).item() > 1e-3  # the adapter does something
        for k, v in model.model.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_fp8_model_auto_bypasses_and_keeps_its_weights_bit_for_bit(bypass_host, pack, sd15_ckpt, loras_dir):
    """A float8 UNet (what --fp8_e4m3fn-unet loads): auto chooses bypass, the float8 weights are
    bit-identical after a forward, and the output is at least as close to the float32 model with
    the BOFT merged as merging into the float8 weights is (the numbers are printed)."""
    comfy = bypass_host
    name = "apply_fp8.safetensors"
    model32, node = loader_setup(comfy, pack, sd15_ckpt, loras_dir, name)
    reference = unet_output(comfy, node.load_boft(model32, name, 1.0, apply="merge")["result"][0])
    model8, _ = loader_setup(comfy, pack, sd15_ckpt, loras_dir, name, dtype=torch.float8_e4m3fn)
    weights = {k: v for k, v in model8.model.diffusion_model.state_dict().items() if v.dtype == torch.float8_e4m3fn}
    assert len(weights) > 51
    before = {k: v.clone() for k, v in weights.items()}
    out = node.load_boft(model8, name, 1.0, apply="auto")
    assert re.search(r", bypass[,)].*: applied 51 of 51", out["ui"]["boft_report"][0])
    bypass = unet_output(comfy, out["result"][0])
    for k, v in model8.model.diffusion_model.state_dict().items():
        if k in before:
            assert torch.equal(v.view(torch.uint8), before[k].view(torch.uint8)), k
    merge_ = unet_output(comfy, node.load_boft(model8, name, 1.0, apply="merge")["result"][0])
    plain8 = unet_output(comfy, model8)
    err = {what: ((y - reference).norm() / reference.norm()).item()
           for what, y in (("bypass", bypass), ("merge", merge_), ("unpatched fp8", plain8))}
    print("\nfp8 UNet output, relative distance to the float32 model with the BOFT merged:", err)
    assert err["bypass"] <= err["merge"], err


# --- the finite guard on the bypass path ----------------------------------------------------------


def test_bypass_guard_refuses_non_finite_and_huge_outputs_before_computing(bypass_host, pack, monkeypatch):
    """In bypass mode no weight is written, so the merge's guard never sees the layer: a rescale of
    1e7, a non-finite rescale, a non-finite strength or a lycoris blend that blows up (s = 1e4, three
    stages) is refused at the first forward, naming the layer and the value, before any output;
    a sane layer passes and is checked once per strength, not per forward."""
    comfy = bypass_host
    adapter_cls = adapter_class(pack)
    error = sys.modules[pack.__name__ + ".boft_core"].BoftError
    gen = torch.Generator().manual_seed(seed("guard"))
    root = host_module(comfy, False, "out", gen)
    x = inputs(root, gen, torch.float32)
    layer = make_layer(gen, "lycoris-boft", 32, 32)
    huge = torch.ones(32)
    huge[5] = 1e7
    cases = [
        (replace(layer, scale=huge, token="guard-huge"), 1.0, "lycoris",
         r"layer layer: at strength 1 \(lycoris\) in bypass mode its output could be up to 1[.0-9]*e\+07 times "
         r"the layer's own: blocks up to .*scale up to 1e\+07"),
        (replace(layer, scale=huge * float("inf"), token="guard-inf"), 1.0, "orthogonal",
         r"layer layer: at strength 1 \(orthogonal\) in bypass mode its prepared rotation is not finite"),
        (layer, float("nan"), "lycoris", r"layer layer: bypass strength must be a finite number, got nan"),
        (layer, 1e4, "lycoris", r"at strength 10000 \(lycoris\) in bypass mode its output could be up to"),
    ]
    for bad, s, mode, message in cases:
        with pytest.raises(error, match=message):
            run_bypass(comfy, root, adapter_cls.from_layer(bad, mode), s, x)

    adapter_mod = sys.modules[pack.__name__ + ".nodes.adapter"]
    calls = []
    real = adapter_mod.check_bypass
    monkeypatch.setattr(adapter_mod, "check_bypass", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    adapter = adapter_cls.from_layer(layer, "lycoris")
    for s in (2.0, 2.0, 2.0, 0.5, 0.5):
        got = run_bypass(comfy, root, adapter, s, x)
        want = merged_output(root, layer, s, "lycoris", x)
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-5, s
    assert calls == [2.0, 0.5]  # once per strength


def huge_rescale_file(loras_dir, name, source):
    """``source`` (a LyCORIS file) with one channel of one layer's rescale set to 1e7."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(loras_dir / source))
    key = sorted(k for k in tensors if k.endswith(".rescale"))[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = 1e7
    save_file(tensors, str(loras_dir / name))
    return key[: -len(".rescale")]


def test_loader_apply_bypass_refuses_a_huge_rescale_before_injecting(bypass_host, pack, sd15_ckpt, loras_dir):
    """Our loader with apply=bypass: a file whose rescale reaches 1e7 fails when the node runs
    (every layer's values are checked at its strength before anything is injected), naming the
    file, the layer and the value; the model gets no hook and no patch."""
    comfy = bypass_host
    model, node = loader_setup(comfy, pack, sd15_ckpt, loras_dir, "guard_source.safetensors")
    layer = huge_rescale_file(loras_dir, "guard_huge.safetensors", "guard_source.safetensors")
    error = sys.modules[pack.__name__ + ".boft_core"].BoftError
    with pytest.raises(error, match=rf"guard_huge\.safetensors: layer {layer}: at strength 1 \(lycoris\).*1e\+07"):
        node.load_boft(model, "guard_huge.safetensors", 1.0, apply="bypass")
    assert not model.patches and not any(k.startswith("boft_bypass_") for k in model.injections)


def test_core_lora_loader_bypass_reaches_the_guard(bypass_host, pack, sd15_ckpt, loras_dir):
    """Core's LoraLoaderBypass path (``comfy.sd.load_bypass_lora_for_models``, our adapter from core's
    adapter list) checks nothing itself: the first forward fails in our adapter, naming the layer
    and the value, before any output, for a rescale of 1e7 and for a NaN strength (which passes
    the node's min/max); the weights stay untouched, and a sane file at a finite strength runs."""
    comfy = bypass_host
    model, _ = loader_setup(comfy, pack, sd15_ckpt, loras_dir, "guard_source.safetensors")
    layer = huge_rescale_file(loras_dir, "guard_huge.safetensors", "guard_source.safetensors")
    error = sys.modules[pack.__name__ + ".boft_core"].BoftError
    before = {k: v.clone() for k, v in model.model.state_dict().items()}

    def core_bypass(name, strength):
        lora = comfy.utils.load_torch_file(str(loras_dir / name), safe_load=True)
        patcher = comfy.sd.load_bypass_lora_for_models(model, None, lora, strength, 0.0)[0]
        assert patcher.injections and not patcher.patches
        return patcher

    with pytest.raises(error, match=rf"layer {layer}: at strength 1 \(lycoris\) in bypass mode.*1e\+07"):
        unet_output(comfy, core_bypass("guard_huge.safetensors", 1.0))
    with pytest.raises(error, match=r"bypass strength must be a finite number, got nan"):
        unet_output(comfy, core_bypass("guard_source.safetensors", float("nan")))
    assert torch.isfinite(unet_output(comfy, core_bypass("guard_source.safetensors", 1.0))).all()
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, before[k]), k
