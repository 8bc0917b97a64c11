"""CSR structures of a mask whose values say where each nonzero sits in the dense weight."""

from __future__ import annotations

import torch

from ..deploy.kernels import to_csr


def position_matrix(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as float64 holding ``1 + (flat position)`` where kept, 0 elsewhere.

    Any CSR built from it by the deploy kernels' own routines (``to_csr``, the conv's tap
    matrices) has, as values, the positions its nonzeros gather from: the structure and the
    order are theirs, not a copy of their logic. float64 holds integers exactly up to 2**53.

    Example:
        >>> position_matrix(torch.tensor([[True, False], [False, True]]))
        tensor([[1., 0.],
                [0., 4.]], dtype=torch.float64)
    """
    positions = torch.arange(1, mask.numel() + 1, dtype=torch.float64).view(mask.shape)
    return torch.where(mask.bool(), positions, 0.0)


def positions_of(values: torch.Tensor) -> torch.Tensor:
    """The int64 flat positions that :func:`position_matrix` values stand for."""
    return values.to(torch.int64) - 1


def csr_positions(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(crow, col, flat positions)`` of the int32 CSR of a 2-D :func:`position_matrix` (or its transpose)."""
    csr = to_csr(positions.contiguous())
    return csr.crow_indices(), csr.col_indices(), positions_of(csr.values())
