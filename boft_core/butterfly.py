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


# The CPU's batched elimination (:func:`_cayley_eliminate`) instead of LAPACK's per-matrix
# solves, where it measured faster (one core of a 2-core AMD EPYC VM shared with other work,
# medians of 21, alternating; /tmp scripts, not kept): blocks up to this size (10x10: 2.0 against
# 3.4 ms for 1024 blocks, 8.4 against 12.6 for 4096; 16x16: 6.6 against 7.9 for 1024; 24x24 and
# 32x32 within +-30% either way: LAPACK kept), with at least this many elements and blocks (10x10:
# 0.88 against 0.91 ms for 256 blocks, 0.82 against 0.53 for 128; 4x4: 1.03 against 1.28 ms for
# 4096, 0.47 against 0.39 for 1024), its working set taken this many elements at a time (it stays
# in the cache), and generators up to this Frobenius norm per block (its error grows like ‖Q‖²
# beyond: 10x10, float32: LAPACK's up to 10; 2e-6 against 9e-7 at 30, 3e-5 against 2e-6 at 100;
# tests/test_fast.py). The CLI benchmark's 22 SDXL layers (25 472 blocks of 10x10): 41-51
# against 93-101 ms.
ELIMINATE_MAX_BLOCK = 16
ELIMINATE_MIN_ELEMENTS = 1 << 15
ELIMINATE_MIN_BLOCKS = 256
ELIMINATE_CHUNK = 1 << 18
ELIMINATE_MAX_NORM = 10.0


def cayley(q: torch.Tensor) -> torch.Tensor:
    """``(I + Q)(I - Q)^-1`` for a batch of skew-symmetric ``q`` (..., b, b).

    Computed with a linear solve (``X (I - Q) = I + Q``), which is better conditioned than an
    explicit inverse and gives the same matrix (``I + Q`` and ``(I - Q)^-1`` commute). On the CPU,
    for many small blocks of moderate norm (:data:`ELIMINATE_MAX_BLOCK`,
    :data:`ELIMINATE_MIN_ELEMENTS`, :data:`ELIMINATE_MAX_NORM`), by a batched elimination in torch
    ops (:func:`_cayley_eliminate`); otherwise (GPUs, larger blocks or norms, autograd) by
    ``torch.linalg.solve``.
    """
    b = q.shape[-1]
    if (q.device.type == "cpu" and 0 < b <= ELIMINATE_MAX_BLOCK
            and q.numel() >= max(ELIMINATE_MIN_ELEMENTS, ELIMINATE_MIN_BLOCKS * b * b)
            and q.dtype in (torch.float32, torch.float64) and not (q.requires_grad and torch.is_grad_enabled())
            and torch.linalg.vector_norm(q, dim=(-2, -1)).amax() <= ELIMINATE_MAX_NORM):  # (NaN: False)
        return _cayley_eliminate(q)
    eye = torch.eye(b, dtype=q.dtype, device=q.device)
    return torch.linalg.solve(eye - q, eye + q, left=False)


def _cayley_eliminate(q: torch.Tensor) -> torch.Tensor:
    """:func:`cayley` by Gauss-Jordan elimination without pivoting, many blocks at once (blocks
    on the last axis, so every step is a few vectorised ops over all of them, not one LAPACK call
    each), :data:`ELIMINATE_CHUNK` elements of working set at a time.

    Solves ``X (I - Q) = I + Q`` by column operations on ``[I - Q; I + Q]`` (elimination on the
    rows of ``(I - Q)ᵀ = I + Q``). No pivoting is needed: ``I + Q`` has symmetric part ``I``, and
    each Schur complement of such a matrix again has a skew-symmetric part plus a symmetric part
    ``I + Σ s sᵀ ⪰ I`` (eliminating ``[[1, sᵀ], [-s, I + S]]`` leaves ``I + S + s sᵀ``), so every
    pivot (a diagonal entry of that symmetric part) is at least 1: the elimination cannot break
    down, and its growth is bounded in terms of ``‖Q‖`` (Golub & Van Loan, "Unsymmetric positive
    definite linear systems", Linear Algebra Appl. 28, 1979; Higham, "Accuracy and Stability of
    Numerical Algorithms", 2nd ed., §10.4: elimination without pivoting is stable for matrices
    with positive definite symmetric part whose skew part is not large relative to it).
    :func:`cayley` uses it for ``‖Q‖_F <= ELIMINATE_MAX_NORM`` only, where its error is LAPACK's
    (tests: against float64 ``linalg.solve``).
    """
    shape, b = q.shape, q.shape[-1]
    flat = q.reshape(-1, b * b)
    out = torch.empty_like(flat)
    eye = torch.eye(b, dtype=q.dtype).view(b, b, 1)
    step = max(1, ELIMINATE_CHUNK // (2 * b * b))
    for c0 in range(0, flat.shape[0], step):
        p = flat[c0:c0 + step].t().contiguous().view(b, b, -1)  # p[i, j, t] = q[t, i, j]
        m = torch.empty(2 * b, b, p.shape[2], dtype=q.dtype)  # [I - Q; I + Q], blocks last
        torch.sub(eye, p, out=m[:b])
        torch.add(eye, p, out=m[b:])
        for k in range(b):  # column k /= pivot; column j -= (I - Q)[k, j] * column k
            live = m[k + 1:]  # rows k+1.. (row k of I - Q is e_k from here on: never read again)
            col = live[:, k] / m[k, k]
            live.addcmul_(col[:, None], m[k], value=-1)
            live[:, k] = col
        out[c0:c0 + step] = m[b:].view(b * b, -1).t()  # X's blocks
    return out.view(shape)


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
