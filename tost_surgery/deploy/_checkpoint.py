"""Compressed checkpoints: per tensor, dense, a bitmask + values, or CSR, whichever is smallest.

The file is a plain ``torch.save`` of dicts, lists, strings, ints and tensors, so
``torch.load(path, weights_only=True)`` reads it; :func:`load` turns it back into the exact
dense ``state_dict``: same keys in the same order, dtypes, shapes and bits.

Pruning by multiplying with a mask leaves ``-0.0`` wherever a negative weight was removed
(about half the zeros). Its sign changes no product, but it is a bit: by default one bit per
zero keeps it (for a 98%-sparse float32 tensor, 3% of its dense size);
``save(..., signed_zeros=False)`` stores every zero as ``+0.0`` instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from .._errors import TostSurgeryError
from ._report import is_accelerated

FORMAT = "tost_surgery.deploy.checkpoint"
VERSION = 1
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def save(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike, *, signed_zeros: bool = True
) -> int:
    """Write a compressed checkpoint of a model's ``state_dict`` (or of a state_dict); returns its bytes.

    ``signed_zeros=False`` stores ``-0.0`` as ``+0.0`` (equal values, a smaller file).

    Example:
        >>> tost_surgery.deploy.save(finalized_model, "model.tost.pt")
        >>> model.load_state_dict(tost_surgery.deploy.load("model.tost.pt"))
    """
    state = _state_dict(model_or_state_dict)
    tensors = {name: encode(tensor, signed_zeros) for name, tensor in state.items()}
    torch.save({"format": FORMAT, "version": VERSION, "tensors": tensors}, path)
    return os.path.getsize(path)


def load(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense ``state_dict`` saved by :func:`save`, bit for bit (CPU tensors).

    Example:
        >>> model.load_state_dict(tost_surgery.deploy.load("model.tost.pt"), strict=True)
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise TostSurgeryError(f"No checkpoint at {str(path)!r}.\nHint: check the path.") from error
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise TostSurgeryError(
            f"{str(path)!r} is not a deploy checkpoint;\nexpected: a file written by tost_surgery.deploy.save\n"
            f"found: {_describe(saved)}\nHint: read an ordinary checkpoint with torch.load(path, weights_only=True)."
        )
    if saved.get("version") != VERSION:
        raise TostSurgeryError(
            f"{str(path)!r} is a deploy checkpoint of another version;\n"
            f"expected: version {VERSION}\nfound: version {saved.get('version')!r}\n"
            "Hint: load it with the tost_surgery release that wrote it."
        )
    return {name: decode(entry) for name, entry in saved["tensors"].items()}


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that holds a checkpoint written by :func:`save`.

    Example:
        >>> state = deploy.load(path) if deploy.is_checkpoint(path) else torch.load(path, weights_only=True)
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get("format") == FORMAT


def encode(tensor: torch.Tensor, signed_zeros: bool = True) -> dict[str, object]:
    """The smallest of the three encodings of one tensor, as plain data."""
    tensor = tensor.detach().cpu()
    if tensor.is_complex() or tensor.layout != torch.strided or tensor.numel() == 0:
        return {"encoding": "dense", "tensor": tensor.clone()}
    flat = tensor.contiguous().view(-1)
    nonzero = flat != 0  # NaN counts as a value, as does every bit pattern but the two zeros
    count, size = int(nonzero.sum()), tensor.element_size()
    negative = _negative_zeros(flat, nonzero) if signed_zeros else None
    sign_bytes = 0 if negative is None else -(-(flat.numel() - count) // 8)
    rows = tensor.shape[0] if tensor.dim() > 1 else 1
    cols = flat.numel() // rows
    index_size = 2 if cols <= 2**15 else 4
    costs = {
        "dense": flat.numel() * size,
        "bitmask": -(-flat.numel() // 8) + count * size + sign_bytes,
        "csr": (rows + 1) * 4 + count * (size + index_size) + sign_bytes,
    }
    encoding = min(costs, key=costs.__getitem__)
    if encoding == "dense":
        return {"encoding": "dense", "tensor": tensor.clone()}
    entry: dict[str, object] = {"encoding": encoding, "shape": list(tensor.shape), "values": flat[nonzero].clone()}
    if negative is not None:
        entry["negative_zeros"] = _pack(negative)
    if encoding == "bitmask":
        entry["bits"] = _pack(nonzero)
        return entry
    matrix = nonzero.view(rows, cols)
    crow = torch.zeros(rows + 1, dtype=torch.int32)
    crow[1:] = matrix.sum(1).cumsum(0)
    entry["crow"] = crow
    entry["cols"] = matrix.nonzero()[:, 1].to(torch.int16 if index_size == 2 else torch.int32)
    return entry


def decode(entry: Mapping[str, object]) -> torch.Tensor:
    """The dense tensor of one :func:`encode` entry."""
    if entry["encoding"] == "dense":
        return entry["tensor"]
    values, shape = entry["values"], list(entry["shape"])
    flat = torch.zeros(_numel(shape), dtype=values.dtype)
    if entry["encoding"] == "bitmask":
        where = _unpack(entry["bits"], flat.numel())
    else:
        crow = entry["crow"].long()
        rows = crow.numel() - 1
        row_of = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
        where = torch.zeros(flat.numel(), dtype=torch.bool)
        where[row_of * (flat.numel() // rows) + entry["cols"].long()] = True
    flat[where] = values
    if "negative_zeros" in entry:
        zeros = (~where).nonzero().view(-1)
        flat[zeros[_unpack(entry["negative_zeros"], zeros.numel())]] = -0.0
    return flat.view(shape)


def _negative_zeros(flat: torch.Tensor, nonzero: torch.Tensor) -> torch.Tensor | None:
    """Which zeros are ``-0.0``, in order over the zeros; None if there are none."""
    if not flat.is_floating_point():
        return None
    negative = torch.signbit(flat[~nonzero])
    return negative if bool(negative.any()) else None


def _pack(mask: torch.Tensor) -> torch.Tensor:
    padded = torch.zeros(-(-mask.numel() // 8) * 8, dtype=torch.uint8)
    padded[: mask.numel()] = mask.to(torch.uint8)
    return (padded.view(-1, 8) * _BITS).sum(1, dtype=torch.uint8)


def _unpack(bits: torch.Tensor, numel: int) -> torch.Tensor:
    return ((bits.unsqueeze(1) & _BITS) != 0).view(-1)[:numel]


def _numel(shape: list[int]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def _state_dict(model_or_state_dict: object) -> Mapping[str, torch.Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        if is_accelerated(model_or_state_dict):
            raise TostSurgeryError(
                "deploy.save got the copy deploy.accelerate returned, whose layers hold kernels, not weights;\n"
                "expected: the model (or state_dict) you passed to accelerate\nfound: an accelerated copy\n"
                "Hint: deploy.save(model, path), then accelerate the loaded model again."
            )
        model_or_state_dict = model_or_state_dict.state_dict()
    if not isinstance(model_or_state_dict, Mapping):
        raise TostSurgeryError(
            f"deploy.save takes an nn.Module or a state_dict, found {type(model_or_state_dict).__name__}.\n"
            "Hint: deploy.save(model, 'model.tost.pt')"
        )
    for name, value in model_or_state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TostSurgeryError(
                f"state_dict entry {name!r} is not a tensor;\nexpected: tensors only\n"
                f"found: {type(value).__name__}\nHint: drop non-tensor entries (extra state) before deploy.save."
            )
    return model_or_state_dict


def _describe(saved: object) -> str:
    if isinstance(saved, dict):
        return f"a dict with keys {list(saved)[:3]}{'...' if len(saved) > 3 else ''}"
    return f"a {type(saved).__name__}"
