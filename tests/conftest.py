import atexit
import os
import shutil
import sys
import tempfile

import pytest

# PEFT tries to build its CUDA extension (fbd_cuda) when a BOFT layer is made; torch's builder
# takes a lock file in TORCH_EXTENSIONS_DIR, and a run killed meanwhile leaves it behind, which
# makes every later run wait on it forever. Each run gets its own folder (subprocesses inherit it).
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="boft-torch-extensions-")
    atexit.register(shutil.rmtree, os.environ["TORCH_EXTENSIONS_DIR"], True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture
def peft_factors(monkeypatch):
    """PEFT's multi-factor butterfly needs its CUDA extension; give its code a CPU block-diag."""
    import oracles

    oracles.enable_peft_butterfly_factors(monkeypatch)


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's `comfy` imported in this process (CPU), from scripts/setup.sh's checkout."""
    import tiny_models

    return tiny_models.import_comfy()


@pytest.fixture(scope="session")
def pack(comfy):
    """This repository imported as a ComfyUI custom-node package (relative imports and all)."""
    import importlib.util

    name = "comfyui_boft_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def sd15_ckpt(tmp_path_factory, comfy):
    import tiny_models

    return tiny_models.make_sd15_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_sd15.safetensors")


@pytest.fixture(scope="session")
def loras_dir(tmp_path_factory, comfy):
    """A folder registered as one of ComfyUI's `loras` folders for in-process node tests."""
    import folder_paths

    folder = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(folder))
    return folder


@pytest.fixture(scope="session")
def sd15_clip_ckpt(tmp_path_factory, comfy):
    """The tiny SD1.5 checkpoint with a full random CLIP-L text encoder (~276 MB, ~7 s)."""
    import tiny_models

    return tiny_models.make_sd15_checkpoint(tmp_path_factory.mktemp("ckpt_clip") / "tiny_sd15_clip.safetensors",
                                            with_clip=True)


@pytest.fixture(scope="module")
def sd15_server(request, tmp_path_factory):
    """One real ComfyUI server per test module (``main.py --cpu``, comfy_host.ComfyServer) with the
    tiny SD1.5 checkpoint as ``checkpoints/<the module's CKPT>`` (none if the module has no CKPT)
    and the zero conditioning ``sd15_workflow`` uses; it boots while this process builds them."""
    import tiny_models
    from comfy_host import ComfyServer

    srv = ComfyServer(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    srv.start(wait=False)
    try:
        if getattr(request.module, "CKPT", None):
            tiny_models.make_sd15_checkpoint(srv.models / "checkpoints" / request.module.CKPT)
            tiny_models.write_zero_conditioning(srv.output_dir)
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true",
                     help="tests/test_fuzz.py: run 100 000 cases (BOFT_FUZZ_CASES=N sets any number)")
