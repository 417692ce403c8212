import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture
def peft_factors(monkeypatch):
    """PEFT's multi-factor butterfly needs its CUDA extension; give its code a CPU block-diag."""
    import oracles

    oracles.enable_peft_butterfly_factors(monkeypatch)
