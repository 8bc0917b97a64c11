"""CSR matrices the way torch's MKL route wants them, and whether that route exists here."""

from __future__ import annotations

import functools
import warnings

import torch


def to_csr(dense: torch.Tensor) -> torch.Tensor:
    """A 2-D dense matrix as a CSR tensor with int32 indices.

    MKL's sparse BLAS is built with 32-bit indices: int64 indices are converted on every call
    (measured: 20-35% slower at 2-10% density), so they are converted once here.

    Example:
        >>> to_csr(torch.eye(3)).crow_indices().dtype
        torch.int32
    """
    if dense.dim() != 2:
        raise ValueError(f"to_csr takes a 2-D matrix, found shape {tuple(dense.shape)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = dense.detach().to_sparse_csr()
        return torch.sparse_csr_tensor(
            csr.crow_indices().to(torch.int32),
            csr.col_indices().to(torch.int32),
            csr.values(),
            csr.shape,
            check_invariants=False,
        )


@functools.cache
def has_sparse_matmul() -> bool:
    """True where torch multiplies a CSR matrix by a dense one on the CPU (MKL builds).

    Example:
        >>> has_sparse_matmul()  # Linux x86 wheels with MKL
        True
    """
    try:
        a = to_csr(torch.eye(2))
        out = torch.zeros(2, 3).addmm_(a, torch.ones(2, 3))
    except (RuntimeError, NotImplementedError):
        return False
    return bool((out == 1).all())
