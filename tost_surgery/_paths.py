"""Which output channels of each masked layer lie on a path of kept weights from the input to the output."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .masks._scores import _scratch_copy, sum_of_tensors

_NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm)


def channels_on_paths(
    model: nn.Module, mask: Mapping[str, torch.Tensor], input_size: Sequence[int]
) -> dict[str, tuple[int, int]]:
    """``{module name: (channels on a path, output channels)}`` for each masked weight's module.

    A channel is on a path when the input reaches it and it reaches the output through kept
    weights only. Worked out on a float32 copy where every kept weight is 1, every masked one 0,
    every other weight 1, every bias 0, every norm the identity (a norm would renormalize a
    constant input to zero) and every max pool an average pool: one forward of
    ``ones(1, *input_size)`` in eval mode, then the gradient of the output's sum. Each module's
    output is made 0/1 (reached or not) on the way forward and its gradient 0/1 (reaches the
    output or not) on the way back, so nothing overflows or underflows however deep the network.
    A channel is on a path if it is reached somewhere and its gradient is positive there.
    ``model`` and the global RNG are untouched (:func:`_scratch_copy`); an output other than tensors gives ``{}``.
    """
    owners = {name.rpartition(".")[0]: name for name in mask}
    outputs: dict[str, torch.Tensor] = {}
    with _scratch_copy(model) as net:
        _linearize(net, mask)
        for name, module in net.named_modules():
            if not any(True for _ in module.children()):
                module.register_forward_hook(_indicator(outputs, name if name in owners else None))
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        total = sum_of_tensors(net(torch.ones(1, *input_size, device=device, requires_grad=True)))
        if total is None:
            return {}
        total.backward()
    result = {}
    for name, value in outputs.items():
        if value.grad is None or value.dim() < 2:
            continue
        others = tuple(d for d in range(value.dim()) if d != 1)
        on_path = ((value.detach() > 0) & (value.grad > 0)).any(dim=others)
        result[name] = (int(on_path.sum()), value.shape[1])
    return result


def _linearize(net: nn.Module, mask: Mapping[str, torch.Tensor]) -> None:
    """Make ``net`` (a scratch copy) the float32 0/1 network of the docstring above, in eval mode."""
    net.eval().float()
    for name, module in list(net.named_modules()):
        replacement = _path_preserving(module)
        if name and replacement is not None:
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, replacement)
    with torch.no_grad():
        for name, param in net.named_parameters():
            param.requires_grad_(False)
            if name in mask:
                param.copy_(mask[name].to(param.device, param.dtype))
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def _path_preserving(module: nn.Module) -> nn.Module | None:
    """What stands in for ``module`` in the linearized copy: a norm becomes the identity, a max pool the
    average pool of its window (every position of a window leads on, not only the first of equal
    maxima); None keeps the module."""
    if isinstance(module, _NORMS):
        return nn.Identity()
    if isinstance(module, nn.MaxPool2d) and module.dilation in (1, (1, 1)) and not module.return_indices:
        return nn.AvgPool2d(module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode)
    if isinstance(module, nn.AdaptiveMaxPool2d) and not module.return_indices:
        return nn.AdaptiveAvgPool2d(module.output_size)
    return None


def _indicator(outputs: dict[str, torch.Tensor], name: str | None):
    """A forward hook: the output becomes 1 where positive, else 0, with the identity as its gradient,
    and its gradient becomes 1 where positive, else 0; kept in ``outputs[name]`` when named."""

    def hook(module: nn.Module, inputs: tuple, output: object) -> object:
        if not isinstance(output, torch.Tensor) or not output.is_floating_point() or not output.requires_grad:
            return None
        reached = (output.detach() > 0).to(output.dtype) + (output - output.detach())
        reached.register_hook(lambda grad: (grad > 0).to(grad.dtype))
        if name is not None:
            reached.retain_grad()
            outputs[name] = reached
        return reached

    return hook

