"""Masks: validate a user's mask, attach it as a parametrization, bake it at the end."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._errors import MaskError, did_you_mean

MaskDict = Mapping[str, torch.Tensor]


class MaskParametrization(nn.Module):
    """``weight -> weight * mask``: the effective weight is exactly zero where ``mask`` is.

    The mask (0/1 in the weight's dtype) is a saved buffer, so checkpoints keep it. Assigning to the parametrized
    tensor stores the value as given (masked again on every read).
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def extra_repr(self) -> str:
        density = self.mask.float().mean().item() if self.mask.numel() else 0.0
        return f"shape={tuple(self.mask.shape)}, density={density:.4f}"


@dataclass(frozen=True)
class MaskEntry:
    """One masked parameter: where it lives and its validated boolean mask."""

    name: str
    module_name: str
    attr: str
    module: nn.Module
    given: torch.Tensor
    """The validated boolean mask ``prepare`` got."""
    parameter_order: tuple[str, ...]
    """The module's parameter names in their original order, restored when detaching."""

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
        from .masks import from_callable

        return from_callable(model, mask)
    return mask


def normalize_mask(model: nn.Module, mask: object) -> list[MaskEntry]:
    """Check ``mask`` against ``model`` and return one entry per masked parameter.

    Changes nothing. Raises :class:`MaskError` naming the parameter and the value found.
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
    owners = _parameter_owners(model)
    entries: list[MaskEntry] = []
    seen: dict[int, str] = {}
    for name, value in mask.items():
        if isinstance(name, str) and name not in params and _is_parametrized_tensor(model, name):
            raise MaskError(
                f"Parameter {name!r} already has a parametrization; tost_surgery will not stack on it.\n"
                "Hint: remove it with torch.nn.utils.parametrize.remove_parametrizations first."
            )
        if not isinstance(name, str) or name not in params:
            raise MaskError(
                f"Mask key {name!r} names no parameter of {type(model).__name__}." + did_you_mean(str(name), params)
            )
        param = params[name]
        module_name, attr = owners[name]
        module = model.get_submodule(module_name)
        if id(param) in seen:
            raise MaskError(
                f"Mask keys {seen[id(param)]!r} and {name!r} name the same (tied) parameter.\n"
                "Hint: give the mask once, under either name."
            )
        seen[id(param)] = name
        if parametrize.is_parametrized(module, attr):
            raise MaskError(
                f"Parameter {name!r} already has a parametrization; tost_surgery will not stack on it.\n"
                "Hint: remove it with torch.nn.utils.parametrize.remove_parametrizations first."
            )
        value = _check_mask_value(name, value, param)
        entries.append(MaskEntry(name, module_name, attr, module, value, tuple(module._parameters)))
    return entries


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


def _parameter_owners(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``"a.b.weight" -> ("a.b", "weight")`` for every parameter name, aliases included."""
    owners = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr in module._parameters:
            full = f"{module_name}.{attr}" if module_name else attr
            owners[full] = (module_name, attr)
    return owners


def attach_masks(entries: list[MaskEntry]) -> None:
    """Register a :class:`MaskParametrization` on every entry (parameter identity is kept)."""
    for entry in entries:
        weight = entry.module._parameters[entry.attr]
        # Stored in the weight's dtype: on CPU, multiplying by a bool tensor is ~8x slower.
        mask = entry.given.to(weight.dtype)
        parametrize.register_parametrization(entry.module, entry.attr, MaskParametrization(mask))


def detach_masks(entries: list[MaskEntry], *, bake: bool) -> None:
    """Remove our parametrizations; with ``bake`` the masked value stays in the parameter."""
    for entry in entries:
        if parametrize.is_parametrized(entry.module, entry.attr):
            _own_parametrized_class(entry.module)
            parametrize.remove_parametrizations(entry.module, entry.attr, leave_parametrized=bake)
        parameters = entry.module._parameters
        if tuple(parameters) != entry.parameter_order and set(parameters) == set(entry.parameter_order):
            for key in entry.parameter_order:  # same objects, original state_dict order
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
