"""The README's demo command works on a fresh folder: scripts/demo.py --no-wait."""

import re
import subprocess
import urllib.error
import urllib.request

import numpy as np
from comfy_host import REPO_ROOT, venv_python
from PIL import Image


def test_demo_writes_before_and_after_and_stops(tmp_path):
    proc = subprocess.run([venv_python(), str(REPO_ROOT / "scripts" / "demo.py"), "--no-wait", "--dir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]

    paths = dict(re.findall(r"^(before|after): +(\S+)$", proc.stdout, re.M))
    assert set(paths) == {"before", "after"}, proc.stdout
    images = {}
    for label, path in paths.items():
        assert path == str(tmp_path / "out" / f"{label}.png")
        image = Image.open(path)
        assert image.size == (256, 256)
        assert {"prompt", "workflow"} <= set(image.info), "the PNG should open the graph in ComfyUI"
        images[label] = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert np.abs(images["after"] - images["before"]).mean() > 5, "the BOFT did not change the picture"
    assert "BOFT: strength 0, nothing applied." in proc.stdout
    assert re.search(r"applied (\d+) of \1 layers \(model \d+, clip \d+\)", proc.stdout), proc.stdout

    url = re.search(r"^UI: +(http://127\.0\.0\.1:\d+)", proc.stdout, re.M)
    assert url, proc.stdout
    try:  # --no-wait: the server is gone
        urllib.request.urlopen(url.group(1) + "/system_stats", timeout=2)
        raise AssertionError("the demo's ComfyUI still answers after --no-wait")
    except (urllib.error.URLError, ConnectionError):
        pass
