"""Masks: validate a user's mask, attach it as a parametrization, bake it at the end."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._errors import MaskError, did_you_mean
from ._write_through import MaskedWeight, cached_by_version, plain_reads, wants_plain

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    return mask != 0


def _bits_of(itemsize: int):  # noqa: ANN202
    """``mask -> all-ones bits where kept, zero bits where masked``, as integers of ``itemsize`` bytes."""
    return lambda mask: torch.where(mask != 0, -1, 0).to(_BITS[itemsize])


class _KeepBits(torch.autograd.Function):
    """``weight & bits`` on the float's bit pattern, forward and backward.

    A masked position becomes +0.0 whatever it held, NaN and inf included (``NaN * 0`` is NaN), and so
    does the gradient there; unlike ``torch.where`` it is a multiply's cost on CPU.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(bits)
        return (weight.view(bits.dtype) & bits).view(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (bits,) = ctx.saved_tensors
        return _KeepBits.apply(grad, bits), None  # itself: differentiable again (GradInit's double backward)


class MaskParametrization(nn.Module):
    """``weight -> weight`` with the masked positions exactly +0.0: the mask's zeros in the effective weight.

    A NaN or inf at a masked position of the trainable tensor never reaches the effective weight,
    nor a gradient at one the trainable tensor (the bits are cleared, not multiplied by zero). The
    mask is a saved buffer of 0/1 in the weight's dtype (averaging helpers such as
    ``AveragedModel(use_buffers=True)`` average every buffer, and a bool tensor cannot be averaged).
    Assigning to the parametrized tensor stores the value as given (masked again on every read);
    read from outside the model's forward it is a :class:`~tost_surgery._write_through.MaskedWeight`,
    so in-place writes reach the trainable tensor.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        size = weight.element_size()
        bits = cached_by_version(self, f"_bits{size}", self.mask, _bits_of(size))
        effective = _KeepBits.apply(weight, bits)
        if wants_plain():
            return effective
        return MaskedWeight.wrap(effective, weight, cached_by_version(self, "_kept", self.mask, _nonzero))

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def extra_repr(self) -> str:
        density = self.mask.float().mean().item() if self.mask.numel() else 0.0
        return f"shape={tuple(self.mask.shape)}, density={density:.4f}"


@dataclass(frozen=True)
class Owner:
    """A module that holds a masked tensor under ``attr``, with its parameter order to restore."""

    module_name: str
    module: nn.Module
    attr: str
    parameter_order: tuple[str, ...]


@dataclass(frozen=True)
class MaskEntry:
    """One masked tensor: where it lives (every module that holds it) and its validated boolean mask."""

    name: str
    module_name: str
    attr: str
    module: nn.Module
    given: torch.Tensor
    """The validated boolean mask ``prepare`` got."""
    parameter_order: tuple[str, ...]
    """The module's parameter names in their original order, restored when detaching."""
    aliases: tuple[Owner, ...] = ()
    """Other modules holding the same (tied) tensor: each gets the same mask."""

    @property
    def owners(self) -> tuple[Owner, ...]:
        return (Owner(self.module_name, self.module, self.attr, self.parameter_order), *self.aliases)

    @property
    def mask(self) -> torch.Tensor:
        """The boolean mask in force: the attached buffer's once attached (``load_state_dict`` may have
        replaced it), else the one given."""
        if parametrize.is_parametrized(self.module, self.attr):
            for parametrization in self.module.parametrizations[self.attr]:
                if isinstance(parametrization, MaskParametrization):
                    return parametrization.mask != 0
        return self.given

    @property
    def kept(self) -> int:
        return int(self.mask.sum().item())

    @property
    def density(self) -> float:
        return self.kept / self.mask.numel()


def resolve_mask(model: nn.Module, mask: object) -> object:
    """A callable ``(name, param) -> Tensor | None`` becomes a dict; anything else is returned as is."""
    if callable(mask) and not isinstance(mask, (Mapping, torch.Tensor, nn.Module)):
        return mask_from_callable(model, mask)
    return mask


def mask_from_callable(
    model: nn.Module, fn: Callable[[str, torch.Tensor], torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    """``{name: bool mask}`` from ``fn(name, param)`` over the parameters (``None``: leave it dense), checked."""
    if not isinstance(model, nn.Module):
        raise MaskError(f"from_callable takes an nn.Module, found {type(model).__name__}.")
    if not callable(fn):
        raise MaskError(f"from_callable takes a function fn(name, param) -> Tensor | None, found {type(fn).__name__}.")
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = fn(name, param)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise MaskError(
                    f"fn({name!r}, param) returned a {type(value).__name__}; it must return a tensor or None.\n"
                    "Hint: return a bool tensor shaped like the parameter, e.g. param.abs() > threshold."
                )
            masks[name] = value
    if not masks:
        raise MaskError(
            f"fn returned None for every parameter of {type(model).__name__}: the mask covers nothing.\n"
            "Hint: return a bool tensor for the parameters to prune, e.g. conv and linear weights."
        )
    return {entry.name: entry.mask for entry in normalize_mask(model, masks)}


def normalize_mask(model: nn.Module, mask: object) -> list[MaskEntry]:
    """Check ``mask`` against ``model`` and return one entry per masked tensor.

    A tied tensor (one parameter held by several modules, like an LM head tied to its embedding)
    is one entry however many names the mask gives it; its owners all get the mask. Changes
    nothing. Raises :class:`MaskError` naming the parameter and the value found.
    """
    if not isinstance(mask, Mapping):
        raise MaskError(
            f"A mask is a dict mapping parameter names to tensors (or a callable (name, param) -> "
            f"tensor or None), found {type(mask).__name__}.\n"
            "Hint: build one with tost_surgery.masks.erk(model, sparsity=0.9)."
        )
    if not mask:
        raise MaskError(
            "The mask covers nothing: it names no parameter.\n"
            "Hint: to train without masks use plain PyTorch; for a dense layer omit it from the mask."
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    owners = _tensor_owners(model)
    entries: dict[int, MaskEntry] = {}
    for name, value in mask.items():
        param = _masked_parameter(model, name, params)
        value = _check_mask_value(name, value, param)
        if id(param) in entries:
            _check_same_mask(entries[id(param)], name, value)
            continue
        holders = owners[id(param)]
        for owner in holders:
            if parametrize.is_parametrized(owner.module, owner.attr):
                raise MaskError(
                    f"Parameter {name!r} already has a parametrization; tost_surgery will not stack on it.\n"
                    "Hint: remove it with torch.nn.utils.parametrize.remove_parametrizations first."
                )
        primary = next((o for o in holders if _full_name(o) == name), holders[0])
        aliases = tuple(o for o in holders if o is not primary)
        entries[id(param)] = MaskEntry(
            name, primary.module_name, primary.attr, primary.module, value, primary.parameter_order, aliases
        )
    return list(entries.values())


def _masked_parameter(model: nn.Module, name: object, params: dict[str, nn.Parameter]) -> nn.Parameter:
    if isinstance(name, str) and name not in params and _is_parametrized_tensor(model, name):
        raise MaskError(
            f"Parameter {name!r} already has a parametrization; tost_surgery will not stack on it.\n"
            "Hint: remove it with torch.nn.utils.parametrize.remove_parametrizations first."
        )
    if not isinstance(name, str) or name not in params:
        suggestion = f" Did you mean {name + '.weight'!r}?" if f"{name}.weight" in params else ""
        raise MaskError(
            f"Mask key {name!r} names no parameter of {type(model).__name__}."
            + (suggestion or did_you_mean(str(name), params))
        )
    return params[name]


def _check_same_mask(entry: MaskEntry, name: str, value: torch.Tensor) -> None:
    """Two keys for one tied tensor are fine when they give the same mask."""
    if not torch.equal(entry.given, value):
        differ = int((entry.given != value).sum())
        raise MaskError(
            f"Mask keys {entry.name!r} and {name!r} name the same (tied) parameter with different masks "
            f"({differ} of {value.numel()} positions differ).\n"
            "Hint: a tied tensor has one mask; give it once, under either name."
        )


def _check_mask_value(name: str, value: object, param: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise MaskError(f"Mask for {name!r} must be a torch.Tensor, found {type(value).__name__}.")
    if value.is_meta:
        raise MaskError(
            f"Mask for {name!r} is on the meta device: it holds no values.\n"
            "Hint: make masks from a model whose weights are materialized (not on the meta device)."
        )
    if value.layout != torch.strided or value.is_nested:
        layout = "nested" if value.is_nested else value.layout
        raise MaskError(
            f"Mask for {name!r} must be a dense tensor, found layout {layout}.\nHint: pass mask.to_dense()."
        )
    if tuple(value.shape) != tuple(param.shape):
        raise MaskError(
            f"Mask for {name!r} has the wrong shape.\n"
            f"  expected: {tuple(param.shape)}\n"
            f"  found:    {tuple(value.shape)}"
        )
    if value.dtype != torch.bool:
        if value.is_complex():
            raise MaskError(f"Mask for {name!r} must be real, found dtype {value.dtype}.")
        is_binary = (value == 0) | (value == 1)
        if not bool(is_binary.all()):
            bad = value[~is_binary].flatten()[0].item()
            raise MaskError(
                f"Mask for {name!r} is not binary: found the value {bad!r}.\n"
                "Hint: a mask holds only 0/1 or True/False; threshold scores first, e.g. scores > t."
            )
        value = value != 0
    if not bool(value.any()):
        raise MaskError(
            f"Mask for {name!r} keeps no weight: the whole layer would be empty "
            f"(0 of {value.numel()} kept).\nHint: keep at least one weight per layer, "
            "or leave the layer out of the mask to train it dense."
        )
    return value.detach().to(device=param.device, dtype=torch.bool).clone()


def _is_parametrized_tensor(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return parametrize.is_parametrized(module, attr)


def _tensor_owners(model: nn.Module) -> dict[int, list[Owner]]:
    """Every ``(module, attr)`` holding each parameter, by the parameter's id; a shared module counts once."""
    owners: dict[int, list[Owner]] = {}
    seen: set[tuple[int, str]] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is None or (id(module), attr) in seen:
                continue
            seen.add((id(module), attr))
            owners.setdefault(id(param), []).append(Owner(module_name, module, attr, tuple(module._parameters)))
    return owners


def _full_name(owner: Owner) -> str:
    return f"{owner.module_name}.{owner.attr}" if owner.module_name else owner.attr


def attach_masks(entries: list[MaskEntry]) -> None:
    """Register a :class:`MaskParametrization` on every owner of every entry (parameter identity is kept).

    The owners of a tied tensor share one parametrization module, so they read one mask.
    """
    for entry in entries:
        weight = entry.module._parameters[entry.attr]
        parametrization = MaskParametrization(entry.given.to(weight.dtype))
        for owner in entry.owners:
            parametrize.register_parametrization(owner.module, owner.attr, parametrization)


def detach_masks(entries: list[MaskEntry], *, bake: bool) -> None:
    """Remove our parametrizations; with ``bake`` the masked value stays in the parameter."""
    with plain_reads:
        for entry in entries:
            for owner in entry.owners:
                _detach(owner, bake=bake)


def _detach(owner: Owner, *, bake: bool) -> None:
    if parametrize.is_parametrized(owner.module, owner.attr):
        _own_parametrized_class(owner.module)
        parametrize.remove_parametrizations(owner.module, owner.attr, leave_parametrized=bake)
    parameters = owner.module._parameters
    if tuple(parameters) != owner.parameter_order and set(parameters) == set(owner.parameter_order):
        for key in owner.parameter_order:  # same objects, original state_dict order
            parameters[key] = parameters.pop(key)


def _own_parametrized_class(module: nn.Module) -> None:
    """Give ``module`` a parametrized class of its own before a parametrization is removed.

    torch's deepcopy of a parametrized module shares the injected ``Parametrized<Class>`` with the
    original, and removing a parametrization deletes its property from that class: finalizing a
    copy would strip ``weight`` from the original too.
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def original_parameter(entry: MaskEntry) -> torch.Tensor:
    """The trainable tensor behind a (possibly parametrized) masked parameter."""
    if parametrize.is_parametrized(entry.module, entry.attr):
        return entry.module.parametrizations[entry.attr].original
    return entry.module._parameters[entry.attr]
