"""HF Accelerate: bind the ToST schedule to the optimizer that really steps.

Accelerate is not a dependency of tost_surgery; copy this function. Prepare the model with
tost_surgery first, then hand it to Accelerate::

    model = tost.prepare(model, mask, tost.Recipe.tost(total_steps=optimizer_steps))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    bind_accelerate(accelerator, model, optimizer)
    for x, y in loader:
        with accelerator.accumulate(model):
            smoothing = tost.label_smoothing(accelerator.unwrap_model(model))
            loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

Accelerate's ``AcceleratedOptimizer`` calls the wrapped torch optimizer's ``step`` only when
gradients are synchronized (the last micro-batch of an accumulation) and not when the fp16
GradScaler skips a step, so binding the wrapped optimizer counts exactly the weight updates.
The schedule is in the model's ``state_dict``: ``accelerator.save_state`` keeps it.
"""

from __future__ import annotations

import torch
from torch import nn

import tost_surgery as tost


def bind_accelerate(accelerator, model: nn.Module, optimizer: torch.optim.Optimizer):
    """``tost.bind`` on the unwrapped model (DDP, compile) and the torch optimizer inside Accelerate's wrapper."""
    inner_model = accelerator.unwrap_model(model)
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer.optimizer
    return tost.bind(inner_model, inner_optimizer)
