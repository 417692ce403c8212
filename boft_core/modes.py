"""The strength modes' names: torch-free, so that the CLI's parser needs no torch (see cli.py)."""

MODES = ("lycoris", "linear", "orthogonal")
