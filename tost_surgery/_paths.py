"""Which output channels of each masked layer lie on a path of kept weights from the input to the output."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

_NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm)


def channels_on_paths(
    model: nn.Module, mask: Mapping[str, torch.Tensor], input_size: Sequence[int]
) -> dict[str, tuple[int, int]]:
    """``{module name: (channels on a path, output channels)}`` for each masked weight's module.

    A channel is on a path when the input reaches it and it reaches the output through kept
    weights only. Worked out on a copy where every kept weight is 1, every masked one 0, every
    other weight 1, every bias 0 and every norm the identity (a norm would renormalize a constant
    input to zero): one forward of ``ones(1, *input_size)`` in eval mode and float64, each
    module's output divided by its maximum (no overflow however deep), then the gradient of the
    output's sum. A channel is on a path if it is positive somewhere and so is its gradient.
    ``model`` and the global RNG are untouched; an output other than tensors gives ``{}``.
    """
    owners = {name.rpartition(".")[0]: name for name in mask}
    rng = torch.get_rng_state()
    try:
        net = _linearized(model, mask)
        outputs: dict[str, torch.Tensor] = {}
        handles = []
        for name, module in net.named_modules():
            if name in owners:
                handles.append(module.register_forward_hook(_keeper(outputs, name)))
            if not any(True for _ in module.children()):
                handles.append(module.register_forward_hook(_rescale))
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        total = _sum(net(torch.ones(1, *input_size, dtype=torch.float64, device=device, requires_grad=True)))
        for handle in handles:
            handle.remove()
        if total is None:
            return {}
        total.backward()
    finally:
        torch.set_rng_state(rng)
    result = {}
    for name, value in outputs.items():
        if value.grad is None or value.dim() < 2:
            continue
        others = tuple(d for d in range(value.dim()) if d != 1)
        on_path = (value.detach() > 0).any(dim=others) & (value.grad > 0).any(dim=others)
        result[name] = (int(on_path.sum()), value.shape[1])
    return result


def _linearized(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> nn.Module:
    net = copy.deepcopy(model).eval().to(torch.float64)
    for name, module in list(net.named_modules()):
        if name and isinstance(module, _NORMS):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, nn.Identity())
    with torch.no_grad():
        for name, param in net.named_parameters():
            param.requires_grad_(False)
            if name in mask:
                param.copy_(mask[name].to(param.device, torch.float64))
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return net


def _keeper(outputs: dict[str, torch.Tensor], name: str):
    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.retain_grad()
            outputs[name] = output

    return hook


def _rescale(module: nn.Module, inputs: tuple, output: object) -> object:
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return None
    peak = output.detach().amax()
    return output / peak if peak > 0 else None


def _sum(output: object) -> torch.Tensor | None:
    """The sum of a tensor, or of a tuple, list or dict of tensors; None for anything else."""
    leaves = list(output.values()) if isinstance(output, Mapping) else output
    if isinstance(leaves, torch.Tensor):
        return leaves.sum()
    if isinstance(leaves, (tuple, list)) and leaves and all(isinstance(v, torch.Tensor) for v in leaves):
        return torch.stack([v.sum() for v in leaves]).sum()
    return None
