"""What ``benchmarks/coverage.py`` compares: model outputs, masked weights, buffers; errors in one line."""

from __future__ import annotations

import math

# torch is imported inside the functions, as everywhere in the sweep: a process imports it where it
# runs a model, not where it only lists, drives or reports.


def restore_buffers(model, saved: dict) -> None:
    """Put every buffer back as it was: values copied in place, and a buffer the forward replaced
    (a cache such as timm ConViT's ``rel_indices``, resized to the input) set back to its old tensor."""
    import torch

    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, value in list(module._buffers.items()):
                key = f"{module_name}.{name}" if module_name else name
                if key not in saved or value is None:
                    continue
                if value.shape == saved[key].shape:
                    value.copy_(saved[key])
                else:
                    module._buffers[name] = saved[key].clone()


def tensors(output) -> list:
    """Every tensor in a model output (tensor, tuple/list, dict, namedtuple, dataclass-like)."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output.detach()]
    if isinstance(output, dict):
        return [t for v in output.values() for t in tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in tensors(v)]
    if hasattr(output, "__dict__"):
        return [t for v in vars(output).values() for t in tensors(v)]
    return []


def first_tensor(output):
    import torch

    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    if isinstance(output, (tuple, list, dict)):
        return None
    raise TypeError(f"the model output holds no tensor: {type(output).__name__}")


def compare(expected: list, actual: list, *, relative: float, floor: float) -> tuple[float, bool]:
    """``(max abs diff, ok)``: NaN/inf must sit at the same places; finite values within tolerance."""
    import torch

    if len(expected) != len(actual):
        return math.inf, False
    worst, ok = 0.0, True
    for a, b in zip(expected, actual):
        if a.shape != b.shape:
            return math.inf, False
        a, b = a.double(), b.double()
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        if not torch.equal(fa, fb):
            return math.nan, False
        na, nb = a[~fa], b[~fb]
        if not bool(((na == nb) | (na.isnan() & nb.isnan())).all()):
            return math.nan, False
        if fa.any():
            scale = float(a[fa].abs().max())
            diff = float((a[fa] - b[fa]).abs().max())
            worst = max(worst, diff)
            ok = ok and diff <= relative * max(floor, scale)
    return worst, ok


def masked_nonzero(model, mask: dict) -> str:
    """Masked layers whose (effective) weight is not zero where the mask is zero."""
    import torch

    bad = []
    with torch.no_grad():
        for name, keep in mask.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            weight = getattr(module, attr)  # when parametrized: the effective (masked) weight
            count = int((weight[~keep] != 0).sum())
            if count:
                bad.append(f"{name} ({count})")
    return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:200]}"


def is_oom(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or "can't allocate memory" in str(error) or "out of memory" in str(error)


def fmt(value: float) -> str:
    return f"{value:.3g}"
