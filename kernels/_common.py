"""Small helpers shared by the Triton wrappers (no Triton import here, so the package stays CPU-importable)."""

from __future__ import annotations

import torch

# Tests set this to True: every output buffer of a Triton launch is then NaN-filled instead of left uninitialised,
# so an element a kernel forgets to write shows up as NaN in the comparison instead of passing by luck.
POISON = False


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor when POISON is set (integer dtypes are filled with -1)."""
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def block(n: int, cap: int, floor: int = 16) -> int:
    """Tile size for a dimension of size n: the next power of two, at least `floor` (tl.dot needs >= 16 on GPUs),
    at most `cap`."""
    p = 1
    while p < n:
        p *= 2
    return max(floor, min(cap, p))

