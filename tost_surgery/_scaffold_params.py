"""The scaffolding's parameters as one group, for their own optimizer settings."""

from __future__ import annotations

from torch import nn

from ._surgery import surgery_of


def scaffold_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters ``prepare`` added (everything under ``model.tost``), in a stable order.

    Give them their own learning rate or weight decay with two parameter groups. They stay in
    the model after their technique retires (they then get no gradient and ``requires_grad``
    is off, so optimizers skip them and a DDP wrapper built afterwards leaves them out), and
    ``finalize`` removes them.

    Example:
        >>> scaffold = tost_surgery.scaffold_parameters(model)
        >>> ids = {id(p) for p in scaffold}
        >>> rest = [p for p in model.parameters() if id(p) not in ids]
        >>> optimizer = torch.optim.SGD(
        ...     [{"params": rest}, {"params": scaffold, "weight_decay": 0.0}], lr=0.1, momentum=0.9, weight_decay=5e-4
        ... )
    """
    surgery_of(model, "scaffold_parameters")
    return list(model.tost.parameters())
