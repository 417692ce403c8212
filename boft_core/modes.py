"""The strength modes' and constraint rules' names: torch-free, so that the CLI's parser needs no
torch (see cli.py)."""

MODES = ("lycoris", "linear", "orthogonal")
CONSTRAINTS = ("auto", "lycoris", "comfyui")  # how an .alpha constraint is read (formats.with_constraint)
