"""Masks from elsewhere: a pruned checkpoint, ``torch.nn.utils.prune``, or any function."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from .._errors import MaskError
from .._masking import mask_from_callable
from .._scope import prunable_weights

# ``conv.parametrizations.weight.0.mask``: a checkpoint of a model prepared by tost_surgery (or torch.ao.pruning).
_PARAMETRIZED_MASK = re.compile(r"^(?P<owner>.*?)(?:^|\.)parametrizations\.(?P<attr>[^.]+)\.\d+\.mask$")


def from_state_dict(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    *,
    include: Sequence[str | type[nn.Module]] | None = None,
    exclude: Sequence[str | type[nn.Module]] = (),
) -> dict[str, torch.Tensor]:
    """The mask of a pruned checkpoint: its weights that are exactly zero are the pruned ones.

    Given a model, every prunable weight (see :func:`prunable_weights`; ``include`` / ``exclude``
    as there) gets ``mask = weight != 0``. Given a ``state_dict``, the masked tensors are:

    - every floating tensor whose key ends in ``weight``, with ``dim() >= 2``, holding at least one
      exact zero. Tensors without a zero (dense layers, and BatchNorm / bias vectors) are left out, so
      they stay dense; ``include`` / ``exclude`` are glob patterns over the keys;
    - ``X.weight_mask`` of a ``torch.nn.utils.prune`` checkpoint (next to ``X.weight_orig``): the mask
      of ``X.weight``, as saved;
    - ``X.parametrizations.weight.0.mask`` of a checkpoint taken while prepared: the mask of ``X.weight``.

    Returns ``{parameter name: bool tensor}``. Raises :class:`MaskError` if nothing is pruned or a
    layer is pruned away whole.

    Example:
        >>> mask = tost_surgery.masks.from_state_dict(torch.load("pruned.pt"))
        >>> model = tost_surgery.prepare(model, mask, tost_surgery.Recipe.tost(total_steps=10_000))
    """
    if isinstance(model_or_state_dict, nn.Module):
        if _pruning_hooks(model_or_state_dict):
            raise MaskError(
                f"{type(model_or_state_dict).__name__} is pruned with torch.nn.utils.prune: its masks are in "
                "buffers, not in zeros of its weights.\n"
                "Hint: use tost_surgery.masks.from_torch_prune(model), or from_state_dict(model.state_dict())."
            )
        weights = prunable_weights(model_or_state_dict, include, exclude)
        masks = {name: weight.detach() != 0 for name, weight in weights.items()}
        return _check_not_empty(masks, "from_state_dict")
    if not isinstance(model_or_state_dict, Mapping):
        raise MaskError(
            f"from_state_dict takes an nn.Module or a state_dict, found {type(model_or_state_dict).__name__}.\n"
            "Hint: pass model.state_dict() or torch.load(path)."
        )
    state_dict = model_or_state_dict
    for rules in (include or (), exclude):
        types = [rule for rule in rules if not isinstance(rule, str)]
        if types:
            raise MaskError(
                f"A state_dict has no modules, so include/exclude take glob patterns over keys, found {types!r}.\n"
                "Hint: pass the model instead, or patterns like '*.downsample.*'."
            )

    def is_chosen(name: str, default: bool) -> bool:
        chosen = default if include is None else any(fnmatch.fnmatchcase(name, p) for p in include)
        return chosen and not any(fnmatch.fnmatchcase(name, p) for p in exclude)

    mask_key_to_name: dict[str, str] = {}
    covered: set[str] = set()  # the masked values (weight_orig / original), and the names they stand for
    for key, value in state_dict.items():
        found = _masked_name(key, state_dict)
        if found is not None and isinstance(value, torch.Tensor):
            mask_key_to_name[key] = found[0]
            covered.update(found)
    masks: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():  # in checkpoint order
        if key in mask_key_to_name:
            name = mask_key_to_name[key]
            if is_chosen(name, default=True):
                masks[name] = value.detach() != 0
            continue
        if key in covered or not isinstance(key, str) or not _is_float_tensor(value):
            continue
        if is_chosen(key, default=key.endswith("weight") and value.dim() >= 2):
            mask = value.detach() != 0
            if not bool(mask.all()):
                masks[key] = mask
    if not masks:
        _raise_nothing_found(state_dict)
    return _check_not_empty(masks, "from_state_dict")


def from_torch_prune(model: nn.Module) -> dict[str, torch.Tensor]:
    """Take over the masks of ``torch.nn.utils.prune`` and leave the model unpruned.

    Every pruned tensor (``conv.weight``, stored as ``conv.weight_orig`` and the buffer
    ``conv.weight_mask``) gives the mask for ``conv.weight``. Then ``prune.remove`` makes ``weight``
    a plain ``nn.Parameter`` again, equal to ``weight_orig * weight_mask`` (the same object as
    ``weight_orig``, so optimizers built on it stay valid), without the forward pre-hook; a restored
    ``weight`` goes back before ``bias``, so ``state_dict`` keys read as those of an unpruned model.
    Nothing changes if a :class:`MaskError` is raised.

    Example:
        >>> torch.nn.utils.prune.l1_unstructured(model.fc, "weight", amount=0.9)
        >>> mask = tost_surgery.masks.from_torch_prune(model)   # model.fc.weight is a Parameter again
        >>> model = tost_surgery.prepare(model, mask)
    """
    if not isinstance(model, nn.Module):
        raise MaskError(f"from_torch_prune takes an nn.Module, found {type(model).__name__}.")
    pruned: list[tuple[nn.Module, str]] = []
    masks: dict[str, torch.Tensor] = {}
    for module_name, module, attr in _pruning_hooks(model):
        name = f"{module_name}.{attr}" if module_name else attr
        mask = getattr(module, f"{attr}_mask", None)
        if not isinstance(mask, torch.Tensor):
            raise MaskError(
                f"{name} has a torch.nn.utils.prune hook but no buffer {attr + '_mask'!r}.\n"
                f"Hint: prune with torch.nn.utils.prune functions, or call prune.remove(module, {attr!r})."
            )
        masks[name] = mask.detach() != 0
        pruned.append((module, attr))
    if not masks:
        raise MaskError(
            f"{type(model).__name__} is not pruned with torch.nn.utils.prune: no module has a pruning hook.\n"
            "Hint: for a checkpoint whose zeros are the mask use tost_surgery.masks.from_state_dict(model)."
        )
    _check_not_empty(masks, "from_torch_prune")
    for module, attr in pruned:
        prune.remove(module, attr)
        _put_back_in_order(module, attr)
    return masks


def from_callable(model: nn.Module, fn: Callable[[str, torch.Tensor], torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """A mask from ``fn(name, param)`` over ``model.named_parameters()``.

    ``fn`` returns a 0/1 or bool tensor shaped like ``param``, or ``None`` to leave the parameter
    unmasked (dense). It runs under ``torch.no_grad()``. Returns ``{name: bool tensor}``, checked
    as :func:`tost_surgery.prepare` checks it.

    Example:
        >>> mask = tost_surgery.masks.from_callable(
        ...     model, lambda name, w: w.abs() > 1e-2 if name.endswith("weight") and w.dim() > 1 else None
        ... )
    """
    return mask_from_callable(model, fn)


def _pruning_hooks(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(module name, module, tensor name)`` of every ``torch.nn.utils.prune`` forward pre-hook."""
    return [
        (module_name, module, hook._tensor_name)
        for module_name, module in model.named_modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, prune.BasePruningMethod)
    ]


def _masked_name(key: object, state_dict: Mapping) -> tuple[str, str] | None:
    """``("conv.weight", key of the unmasked values)`` for a mask key of a pruned or prepared checkpoint."""
    if not isinstance(key, str):
        return None
    if key.endswith("_mask") and f"{key[: -len('_mask')]}_orig" in state_dict:
        return key[: -len("_mask")], f"{key[: -len('_mask')]}_orig"
    match = _PARAMETRIZED_MASK.match(key)
    original = f"{key.rsplit('.', 2)[0]}.original"
    if match and original in state_dict:
        owner = match["owner"]
        return (f"{owner}.{match['attr']}" if owner else match["attr"]), original
    return None


def _is_float_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _check_not_empty(masks: dict[str, torch.Tensor], verb: str) -> dict[str, torch.Tensor]:
    for name, mask in masks.items():
        if not bool(mask.any()):
            module, _, attr = name.rpartition(".")
            hint = (
                f"prune.remove(model.get_submodule({module!r}), {attr!r}) first to train it dense, or prune less"
                if verb == "from_torch_prune"
                else f"leave it out with exclude=[{name!r}], or drop the layer from the model"
            )
            raise MaskError(
                f"{verb}: {name!r} is pruned whole (0 of {mask.numel()} weights kept); "
                f"a mask keeps at least one weight per layer.\nHint: {hint}."
            )
    return masks


def _raise_nothing_found(state_dict: Mapping) -> None:
    nested = [key for key, value in state_dict.items() if isinstance(value, Mapping)]
    hint = (
        f"Hint: this looks like a checkpoint holding {nested!r}; pass checkpoint[{nested[0]!r}]."
        if nested
        else "Hint: a dense checkpoint has no mask; prune it first, or build one with tost_surgery.masks.erk."
    )
    raise MaskError(
        f"from_state_dict found nothing pruned among {len(state_dict)} entries: no floating weight with dim >= 2 "
        "holds an exact zero, and there are no torch.nn.utils.prune masks.\n" + hint
    )


def _put_back_in_order(module: nn.Module, attr: str) -> None:
    """prune.remove re-registers ``attr`` last; torch.nn layers list ``weight`` just before ``bias``."""
    parameters = module._parameters
    keys = list(parameters)
    if attr == "weight" and "bias" in parameters:
        for key in keys[keys.index("bias") :]:
            if key != "weight":
                parameters[key] = parameters.pop(key)
