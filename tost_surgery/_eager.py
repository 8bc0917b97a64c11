"""Ghost neurons without a graph, for models whose forward torch.fx cannot trace."""

from __future__ import annotations

import torch
from torch import nn

from ._fx.passes.ghost_neurons import HARD_ACTIVATIONS, SOFT_ACTIVATIONS
from ._schedule import Schedule


class EagerGhostNeuron(nn.Module):
    """Stands in for an ``nn.ReLU`` / ``nn.ReLU6`` module: ``lerp(soft(x), hard(x), b)``.

    The schedule is held without registering it, so ``state_dict`` keys do not change.
    """

    def __init__(self, kind: str, soft: str, schedule: Schedule) -> None:
        super().__init__()
        self.kind, self.soft = kind, soft
        object.__setattr__(self, "_schedule", schedule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blend = self._schedule("neurons")
        return torch.lerp(SOFT_ACTIVATIONS[self.soft](x), HARD_ACTIVATIONS[self.kind](x), blend)

    def extra_repr(self) -> str:
        return f"{self.soft} -> {self.kind}"


class EagerNeurons:
    """The activation modules of a model, and the ghosts that stand in for them while active."""

    def __init__(self, model: nn.Module, kinds: set[str], soft: str, schedule: Schedule) -> None:
        types = {"relu": nn.ReLU, "relu6": nn.ReLU6}
        self.sites: list[tuple[nn.Module, str, nn.Module, EagerGhostNeuron]] = []
        self.site_names: list[str] = []
        for parent_name, parent in model.named_modules():
            for name, child in parent._modules.items():
                kind = next((k for k in kinds if type(child) is types[k]), None)
                if kind is not None:
                    self.sites.append((parent, name, child, EagerGhostNeuron(kind, soft, schedule)))
                    self.site_names.append(f"{parent_name}.{name}" if parent_name else name)

    def swap(self, *, ghosts: bool) -> None:
        """Put the ghosts in (``ghosts=True``) or the original modules back."""
        for parent, name, original, ghost in self.sites:
            parent._modules[name] = ghost if ghosts else original
