"""Masked weights read from outside the model's forward: in-place writes reach the trainable tensor.

A parametrized ``conv.weight`` is computed on every read (``where(mask, original, 0)``), so an
in-place write to it (``nn.init.ones_(conv.weight)``, ``conv.weight.data.mul_(2)``,
``conv.weight[0] = 1``) would change a temporary and vanish. Read from user code, the weight is a
:class:`MaskedWeight` instead: a tensor that applies every in-place write to the trainable tensor
too (the masked positions stay zero in the effective weight). Inside the prepared forward, and
under ``torch.compile``, reads return plain tensors, so training pays nothing for this.
"""

from __future__ import annotations

import threading

import torch

from ._errors import TostSurgeryError

_state = threading.local()

# In-place methods that change a tensor's metadata or autograd state, not its values: they act on
# the temporary only, as on any tensor.
_NOT_WRITES = frozenset(
    {"requires_grad_", "share_memory_", "detach_", "resize_", "resize_as_", "set_", "record_stream"}
)


class _PlainReads:
    """Masked weights read inside this context are plain tensors (the prepared forward, our own code)."""

    def __enter__(self) -> None:
        _state.depth = getattr(_state, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _state.depth -= 1


plain_reads = _PlainReads()


def wants_plain() -> bool:
    """Whether a masked weight read now should be a plain tensor."""
    return getattr(_state, "depth", 0) > 0 or torch.compiler.is_compiling() or torch.jit.is_scripting()


def cached_by_version(owner: object, slot: str, source: torch.Tensor, compute) -> torch.Tensor:  # noqa: ANN001
    """``compute(source)``, computed again only when ``source`` was replaced or written since.

    The cache is a plain attribute ``slot`` of ``owner`` (not a buffer: never saved, moved or averaged).
    """
    if torch.compiler.is_compiling() or torch.is_inference(source):
        return compute(source)
    cached = owner.__dict__.get(slot)
    if cached is None or cached[0] is not source or cached[1] != source._version:
        cached = (source, source._version, compute(source))
        owner.__dict__[slot] = cached
    return cached[2]


class MaskedWeight(torch.Tensor):
    """The effective weight (a plain tensor's values and autograd history) that writes through.

    ``_tost_target`` is ``(trainable view, kept view)``: where an in-place write goes, and the
    mask that the effective values obey.
    """

    _tost_target: tuple[torch.Tensor, torch.Tensor]

    @staticmethod
    def wrap(effective: torch.Tensor, trainable: torch.Tensor, kept: torch.Tensor) -> MaskedWeight:
        out = effective.as_subclass(MaskedWeight)
        out._tost_target = (trainable, kept)
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        written = _written(func, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            if written is not None:
                return _write(func, written, args, kwargs)
            result = func(*args, **kwargs)
            if isinstance(args[0] if args else None, MaskedWeight) and _is_view(result, args[0]):
                return _view(func, args, kwargs, result)
        return result

    def __reduce_ex__(self, protocol):  # noqa: ANN001 - saved as the plain tensor it is
        with torch._C.DisableTorchFunctionSubclass():
            return self.detach().as_subclass(torch.Tensor).__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return self.detach().as_subclass(torch.Tensor).clone()


def _name(func) -> str:  # noqa: ANN001
    return getattr(func, "__name__", "")


def _is_data_setter(func) -> bool:  # noqa: ANN001 - ``weight.data = value``
    return _name(func) == "__set__" and getattr(func, "__self__", None) is torch.Tensor.data


def _written(func, args: tuple, kwargs: dict) -> MaskedWeight | None:  # noqa: ANN001
    """The masked weight ``func`` writes into, if any."""
    out = kwargs.get("out")
    if isinstance(out, MaskedWeight):
        return out
    if not args or not isinstance(args[0], MaskedWeight):
        return None
    name = _name(func)
    is_inplace = name.endswith("_") and not name.startswith("__") and name not in _NOT_WRITES
    return args[0] if is_inplace or name == "__setitem__" or _is_data_setter(func) else None


def _write(func, weight: MaskedWeight, args: tuple, kwargs: dict):  # noqa: ANN001
    """Apply the write to the trainable tensor, then refresh ``weight``'s own values from it."""
    trainable, kept = weight._tost_target
    with torch.no_grad():
        if _is_data_setter(func):  # the values, not the storage: the parameter stays the optimizer's
            value = args[1]
            if tuple(value.shape) != tuple(trainable.shape):
                raise TostSurgeryError(
                    "Cannot assign a tensor of another shape to a masked weight's .data.\n"
                    f"  expected: {tuple(trainable.shape)}\n  found:    {tuple(value.shape)}\n"
                    "Hint: finalize the model first, or assign values of the same shape."
                )
            trainable.copy_(value)
        else:
            func(*[trainable if a is weight else a for a in args],
                 **{k: (trainable if v is weight else v) for k, v in kwargs.items()})
        weight.copy_(torch.where(kept, trainable, 0))
    return None if _is_data_setter(func) else weight


def _is_view(result: object, base: torch.Tensor) -> bool:
    return (
        isinstance(result, torch.Tensor)
        and result is not base
        and result.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    )


def _view(func, args: tuple, kwargs: dict, result: torch.Tensor) -> MaskedWeight:  # noqa: ANN001
    """A view of a masked weight (``w[0]``, ``w.view(...)``, ``w.data``) writes through to the same view."""
    trainable, kept = args[0]._tost_target
    rest = args[1:]
    return MaskedWeight.wrap(result, func(trainable, *rest, **kwargs), func(kept, *rest, **kwargs))
