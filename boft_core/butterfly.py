"""Butterfly orthogonal matrices: Cayley blocks, stage permutations, and applying them.

Every BOFT format reduces to the same object (see ``../shared/docs/boft-formats.md``):

* ``q``: skew-symmetric generators, shape ``(m, nb, b, b)``: ``m`` stages of ``nb`` blocks.
* Each block becomes ``R = (I + Q)(I - Q)^-1`` (Cayley, orthogonal).
* Stage ``i`` acts on ``n = nb * b`` rows. Rows are grouped in ``b * 2^i``; a group's
  half-chunks (``b / 2`` rows each) ``c`` and ``c + 2^i`` form one block, either
  *interleaved* (LyCORIS: ``[c[0], c'[0], c[1], ...]``) or *concatenated*
  (PEFT / kohya: ``[c..., c'...]``; stage 0 is then plain contiguous blocks).
* ``B = M_{m-1} ... M_1 M_0`` where ``M_i`` is stage ``i``'s block diagonal, permuted.

Functions here take and return tensors, never pick a device, and never log.
"""

from __future__ import annotations

import torch

INTERLEAVED = "interleaved"
CONCATENATED = "concatenated"


def cayley(q: torch.Tensor) -> torch.Tensor:
    """``(I + Q)(I - Q)^-1`` for a batch of skew-symmetric ``q`` (..., b, b).

    Computed with a linear solve (``X (I - Q) = I + Q``), which is better conditioned than an
    explicit inverse and gives the same matrix (``I + Q`` and ``(I - Q)^-1`` commute).
    """
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return torch.linalg.solve(eye - q, eye + q, left=False)


def neumann(q: torch.Tensor, terms: int, legacy: bool = False) -> torch.Tensor:
    """PEFT's Cayley-Neumann approximation of ``(I + Q)(I - Q)^-1`` for a batch ``q`` (..., b, b).

    PEFT >= 0.18 (``OFTRotationModule._cayley_batch``): ``I + 2Q + 2Q² + ... + 2Q^(k-1) + Q^k``
    with ``k = max(terms - 1, 3)`` for ``terms > 2``; ``I + 2Q`` for ``terms == 2``; ``I`` for 1.
    ``legacy`` (PEFT 0.16-0.17, kohya and OneTrainer's 5 terms are the new form): the last term is
    ``2Q^k`` too. Not exactly orthogonal; the error is O(‖Q‖^(k+1)).
    """
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    r = eye.expand(q.shape).clone()
    if terms > 1:
        r = r + 2 * q
    if terms > 2:
        power = q @ q
        r = r + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            r = r + 2 * power
        power = power @ q
        r = r + (2 if legacy else 1) * power
    return r


def stage_index(n: int, b: int, stage: int, layout: str, device=None) -> torch.Tensor:
    """Row order of stage ``stage``: position ``t*b + p`` of the block diagonal is row ``idx[t*b+p]``.

    So ``M[idx[r], idx[c]] = blockdiag(R)[r, c]`` and ``(M X)[idx] = blockdiag(R) X[idx]``.
    """
    rows = torch.arange(n, device=device)
    if layout == CONCATENATED and stage == 0:
        return rows  # contiguous blocks; also the only stage that allows an odd block size
    h = b // 2
    rows = rows.view(-1, 2, 2**stage, h)  # group, half, chunk in half, row in chunk
    if layout == INTERLEAVED:
        rows = rows.permute(0, 2, 3, 1)  # block = chunk; rows alternate between the halves
    elif layout == CONCATENATED:
        rows = rows.permute(0, 2, 1, 3)  # block = chunk; first half's rows, then the second's
    else:
        raise ValueError(f"unknown butterfly layout {layout!r}")
    return rows.reshape(n)


def check_butterfly_shape(m: int, nb: int, b: int, layout: str) -> str | None:
    """Why ``(m, nb, b, b)`` cannot be a butterfly of this layout, or ``None`` if it can."""
    if m < 1 or nb < 1 or b < 1:
        return "every dimension must be at least 1"
    needs_pairs = layout == INTERLEAVED or m > 1
    if needs_pairs and b % 2:
        return f"block size {b} is odd, but butterfly stages pair half-blocks"
    if nb % (2 ** (m - 1)):
        return f"{m} stages need the block count to be a multiple of 2^{m - 1}, got {nb}"
    return None


def apply_stages(x: torch.Tensor, rotations: torch.Tensor, layout: str,
                 transpose: bool = False) -> torch.Tensor:
    """``B @ x`` (or ``Bᵀ @ x``) for ``x`` of shape ``(n, ...)``, ``rotations`` ``(m, nb, b, b)``.

    One gather, one batched matmul and one scatter per stage: simple and exact, the reference
    for the fast path. ``Bᵀ = M_0ᵀ ... M_{m-1}ᵀ``: stages reversed, blocks transposed.
    """
    m, nb, b, _ = rotations.shape
    n = nb * b
    if x.shape[0] != n:
        raise ValueError(f"butterfly acts on {n} rows, got a tensor of shape {tuple(x.shape)}")
    rest = x.shape[1:]
    flat = x.reshape(n, -1)
    if transpose:
        rotations = rotations.transpose(-1, -2)
    for i in reversed(range(m)) if transpose else range(m):
        idx = stage_index(n, b, i, layout, device=x.device)
        blocks = flat[idx].view(nb, b, -1)
        out = torch.empty_like(flat)
        out[idx] = torch.bmm(rotations[i], blocks).view(n, -1)
        flat = out
    return flat.view(n, *rest)


def dense_matrix(rotations: torch.Tensor, layout: str) -> torch.Tensor:
    """The whole ``n x n`` matrix ``B`` (for tests and small layers)."""
    m, nb, b, _ = rotations.shape
    eye = torch.eye(nb * b, dtype=rotations.dtype, device=rotations.device)
    return apply_stages(eye, rotations, layout)
