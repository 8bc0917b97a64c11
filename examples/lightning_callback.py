"""PyTorch Lightning: a callback that makes the trainer's optimizer steps advance the ToST schedule.

Lightning is not a dependency of tost_surgery; copy this file. Prepare the model before
``Trainer.fit`` (``prepare`` refuses DDP or compiled wrappers), with ``total_steps`` counted in
optimizer steps, i.e. after gradient accumulation::

    steps = epochs * math.ceil(len(train_loader) / accumulate)
    module.model = tost.prepare(module.model, mask, tost.Recipe.tost(total_steps=steps))
    trainer = L.Trainer(max_epochs=epochs, accumulate_grad_batches=accumulate, callbacks=[TostCallback()])
    trainer.fit(module, train_loader)

    # in LightningModule.training_step:
    #     loss = F.cross_entropy(self.model(x), y, label_smoothing=tost.label_smoothing(self.model))

Lightning calls each optimizer's ``step`` once per accumulated step, and not at all when AMP's
GradScaler skips one, so the schedule counts exactly the steps that updated the weights. The
schedule is in the model's ``state_dict``, so Lightning checkpoints resume it; the binding is
made again at every ``fit``.
"""

from __future__ import annotations

import warnings

from torch import nn

import tost_surgery as tost

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback
    except ImportError:
        Callback = object  # readable (and testable) without Lightning


def prepared_modules(module: nn.Module) -> list[nn.Module]:
    """The modules inside ``module`` (itself included) that ``tost.prepare`` was called on."""
    return [m for m in module.modules() if isinstance(getattr(m, "tost", None), nn.Module)]


class TostCallback(Callback):
    """Bind every prepared model inside the LightningModule to the trainer's optimizers.

    Args:
        finalize: at the end of training, finalize the prepared models (a plain sparse model
            again) when their warm-up is over; a warning says so if it is not.
    """

    def __init__(self, finalize: bool = True) -> None:
        super().__init__()
        self.finalize = finalize
        self.handles: list = []  # what tost.bind returned, one per prepared model

    def on_train_start(self, trainer, pl_module: nn.Module) -> None:
        models = prepared_modules(pl_module)
        if not models:
            raise tost.StateError(
                f"TostCallback: nothing inside {type(pl_module).__name__} is prepared by tost_surgery.\n"
                "Hint: call tost.prepare(model, mask, recipe) before Trainer.fit."
            )
        for model in models:
            for optimizer in trainer.optimizers:
                self.handles.append(tost.bind(model, optimizer))

    def on_train_end(self, trainer, pl_module: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if not self.finalize:
            return
        for model in prepared_modules(pl_module):
            try:
                tost.finalize(model)
            except tost.StateError as error:
                warnings.warn(f"TostCallback did not finalize {type(model).__name__}: {error}", stacklevel=2)
