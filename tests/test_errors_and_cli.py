"""Bad input: a clear one-paragraph error naming the file, the key and the shapes; no traceback."""

import contextlib
import io
import json
import os
import subprocess
import sys

import oracles
import pytest
import torch
from safetensors.torch import load_file, save_file

import boft_core
from boft_core.cli import main


def cli(*args):
    """``python -m boft_core ARGS`` in this process (an uncaught exception fails the test)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse: --help and usage errors
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def cli_process(*args):
    return subprocess.run([sys.executable, "-m", "boft_core", *args], capture_output=True, text=True)


def assert_clean_failure(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.fixture
def boft_file(tmp_path):
    path = str(tmp_path / "good.safetensors")
    oracles.lycoris_file(path, "boft", rescaled=True, metadata={"ss_network_module": "lycoris.kohya"})
    return path


def rewrite(src, dst, change):
    tensors = load_file(src)
    change(tensors)
    save_file(tensors, dst)
    return dst


def test_lycoris_lora_and_loha_files_are_refused(tmp_path):
    for algo, what in (("lora", "LoRA"), ("loha", "LoHa")):
        path = str(tmp_path / f"{algo}.safetensors")
        oracles.lycoris_file(path, algo, std=0.1)
        assert_clean_failure(cli("inspect", path), path, what, "not a BOFT")


def test_peft_oft_folder_is_read_and_needs_its_config(tmp_path):
    from peft import OFTConfig, get_peft_model

    model = get_peft_model(oracles.Toy(), OFTConfig(r=0, oft_block_size=4, target_modules=["proj"]))
    model.save_pretrained(str(tmp_path / "oft"))
    done = cli("inspect", str(tmp_path / "oft"))
    assert done.returncode == 0 and "peft-oft" in done.stdout, done.stderr
    os.remove(tmp_path / "oft" / "adapter_config.json")  # the config says how to build the rotations
    assert_clean_failure(cli("inspect", str(tmp_path / "oft")), "PEFT OFT", "adapter_config.json")


def test_kohya_oft_is_read(tmp_path):
    path = str(tmp_path / "koft.safetensors")
    save_file({"oft_unet_proj.oft_blocks": torch.randn(8, 8, 8), "oft_unet_proj.alpha": torch.tensor(1.0)}, path)
    done = cli("inspect", path)
    assert done.returncode == 0 and "kohya-oft" in done.stdout, done.stderr


def test_not_safetensors_truncated_and_corrupt(tmp_path, boft_file):
    pickled = tmp_path / "model.ckpt"
    torch.save({"a": torch.ones(2)}, pickled)
    assert_clean_failure(cli("inspect", str(pickled)), "only .safetensors")
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pickled.read_bytes())
    assert_clean_failure(cli("inspect", str(disguised)), str(disguised), "safetensors")
    data = open(boft_file, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    assert_clean_failure(cli("inspect", str(truncated)), "truncated")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[:8] + b"{not json" + data[17:])
    assert_clean_failure(cli("inspect", str(corrupt)), "corrupt")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert_clean_failure(cli("inspect", str(empty)), "not a safetensors")
    assert_clean_failure(cli("inspect", str(tmp_path / "missing.safetensors")), "no such file")


def test_shapes_that_cannot_be_a_butterfly(tmp_path, boft_file):
    def odd_block(t):
        t["lycoris_proj.oft_blocks"] = torch.randn(4, 8, 7, 7)

    def bad_count(t):
        t["lycoris_proj.oft_blocks"] = torch.randn(4, 6, 8, 8)  # 3 later stages need 8 | 6

    def not_square(t):
        t["lycoris_proj.oft_blocks"] = torch.randn(4, 8, 8, 6)

    def rescale(t):
        t["lycoris_proj.rescale"] = torch.ones(63, 1)

    cases = [(odd_block, "(4, 8, 7, 7)", "odd"), (bad_count, "(4, 6, 8, 8)", "multiple of 2^3"),
             (not_square, "(4, 8, 8, 6)", "square"), (rescale, "(63, 1)", "64 values")]
    for change, shape, why in cases:
        path = rewrite(boft_file, str(tmp_path / "bad.safetensors"), change)
        assert_clean_failure(cli("inspect", path), path, "lycoris_proj", shape, why)


def test_non_finite_and_missing_scale(tmp_path, boft_file):
    def nan(t):
        t["lycoris_conv.oft_blocks"][0, 0, 0, 1] = float("nan")

    path = rewrite(boft_file, str(tmp_path / "nan.safetensors"), nan)
    assert_clean_failure(cli("inspect", path), "lycoris_conv", "NaN")
    kohya = str(tmp_path / "kohya.safetensors")
    save_file({"lora_unet_proj.boft_R": torch.randn(1, 8, 4, 4)}, kohya)
    assert_clean_failure(cli("inspect", kohya), "lora_unet_proj.boft_s")


def test_leftover_keys_are_not_skipped_silently(tmp_path, boft_file):
    """A mixed file: inspect lists the other adapter's layer; merge (BOFT only) refuses naming the key."""
    def extra(t):
        t["lora_te_x.lora_up.weight"] = torch.randn(4, 4)

    path = rewrite(boft_file, str(tmp_path / "mixed.safetensors"), extra)
    result = cli("inspect", "--json", path)
    assert result.returncode == 0, result.stderr
    others = json.loads(result.stdout)["other_layers"]
    assert others == [{"name": "lora_te_x", "kind": "lora", "keys": ["lora_te_x.lora_up.weight"]}]
    base = str(tmp_path / "base.safetensors")
    save_file({"proj.weight": torch.randn(64, 32)}, base)
    result = cli("merge", base, path, "--out", str(tmp_path / "o.safetensors"))
    assert_clean_failure(result, "lora_te_x.lora_up.weight", "mixed")
    assert not (tmp_path / "o.safetensors").exists()


def test_merge_into_the_wrong_model(tmp_path, boft_file):
    other = {"proj.weight": torch.randn(32, 32), "conv.weight": torch.randn(32, 16, 3, 3),
             "mlp.weight": torch.randn(48, 32)}
    save_file(other, str(tmp_path / "other.safetensors"))
    result = cli("merge", str(tmp_path / "other.safetensors"), boft_file, "--out", str(tmp_path / "o.safetensors"))
    assert_clean_failure(result, "lycoris_proj", "(32, 32)", "64")
    assert not (tmp_path / "o.safetensors").exists()
    save_file({"unrelated.weight": torch.randn(64, 32)}, str(tmp_path / "unrelated.safetensors"))
    result = cli("merge", str(tmp_path / "unrelated.safetensors"), boft_file, "--out", str(tmp_path / "o.safetensors"))
    assert_clean_failure(result, "matches no weight")


def test_ambiguous_names_list_the_candidates(tmp_path, boft_file):
    base = {"a.proj.weight": torch.randn(64, 32), "b.proj.weight": torch.randn(64, 32),
            "conv.weight": torch.randn(32, 16, 3, 3), "mlp.weight": torch.randn(48, 32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    result = cli("merge", str(tmp_path / "base.safetensors"), boft_file, "--out", str(tmp_path / "o.safetensors"))
    assert_clean_failure(result, "matches 2 weights", "a.proj.weight", "b.proj.weight")


def test_inspect_json_and_metadata(tmp_path):
    tags = {"1_set": {"sks dog": 40, "grass": 3}, "2_other": {"grass": 5, "<script>x</script>": 1}}
    meta = {"ss_network_module": "lycoris.kohya", "ss_tag_frequency": json.dumps(tags),
            "ss_network_args": json.dumps({"algo": "boft", "constraint": "0.001"})}
    path = str(tmp_path / "meta.safetensors")
    oracles.lycoris_file(path, "boft", constraint=0.001, metadata=meta)
    result = cli("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "lycoris-boft" and info["layers"] == 3
    assert len(info["modules"]) == 3 and info["metadata"]["ss_network_module"] == "lycoris.kohya"
    assert info["trigger_words"] == [["sks dog", 40], ["grass", 8], ["<script>x</script>", 1]]
    by_name = {m["name"]: m for m in info["modules"]}
    assert by_name["lycoris_proj"]["m"] == 4 and by_name["lycoris_proj"]["block_size"] == 8
    assert by_name["lycoris_proj"]["constraint"] == pytest.approx(0.001)
    text = cli("inspect", path)
    assert text.returncode == 0 and "sks dog (40)" in text.stdout and "lycoris-boft" in text.stdout


@pytest.mark.parametrize("algo,fmt", [("boft", "lycoris-boft"), ("diag-oft", "lycoris-diag-oft")])
def test_inspect_names_every_format(tmp_path, algo, fmt, peft_factors):
    path = str(tmp_path / "a.safetensors")
    oracles.lycoris_file(path, algo, dtype=torch.bfloat16)
    assert json.loads(cli("inspect", path, "--json").stdout)["format"] == fmt
    oracles.peft_adapter(str(tmp_path / "peft"), factors=2)
    assert json.loads(cli("inspect", str(tmp_path / "peft"), "--json").stdout)["format"] == "peft-boft"
    kohya = str(tmp_path / "k.safetensors")
    save_file({"lora_te_x.boft_R": torch.randn(1, 8, 4, 4), "lora_te_x.boft_s": torch.ones(32, 1)}, kohya)
    assert json.loads(cli("inspect", kohya, "--json").stdout)["format"] == "kohya-boft"


def test_help_explains_itself():
    for args in ((), ("merge",), ("inspect",)):
        out = cli(*args, "--help").stdout
        assert "usage" in out
    assert "orthogonal" in cli("merge", "--help").stdout


def test_real_process_exit_codes(tmp_path, boft_file):
    """The module entry point itself: help, success, and a clean failure without a traceback."""
    assert "inspect" in cli_process("--help").stdout
    assert cli_process("inspect", boft_file).returncode == 0
    assert_clean_failure(cli_process("inspect", str(tmp_path / "nope.safetensors")), "no such file")


def test_api_errors_are_boft_errors(boft_file):
    adapter = boft_core.load(boft_file)
    with pytest.raises(boft_core.BoftError, match="lycoris_proj.*\\(10, 32\\)"):
        boft_core.merge_weight(torch.randn(10, 32), adapter.layers["lycoris_proj"])
    with pytest.raises(boft_core.BoftError, match="unknown strength mode"):
        boft_core.prepare(adapter.layers["lycoris_proj"], 1.0, "sideways")
