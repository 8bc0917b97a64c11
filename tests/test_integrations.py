"""The Lightning and Accelerate glue examples against the real libraries (extra ``integrations``).

``tests/test_examples.py`` drives the same examples with hand-written stand-ins, which run
without either library; here a real ``lightning.Trainer`` and a real ``accelerate.Accelerator``
(CPU, one process) do the stepping, gradient accumulation included.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tost_surgery as tost
from tost_surgery import Recipe

from .conftest import TinyNet, bernoulli_mask

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# Five micro-batches per epoch with accumulation 2: an optimizer step after micro-batches 2 and 4,
# and one more at the end of the epoch (both libraries flush a partial accumulation there).
BATCHES_PER_EPOCH, ACCUMULATE, EPOCHS = 5, 2, 2
OPTIMIZER_STEPS = EPOCHS * -(-BATCHES_PER_EPOCH // ACCUMULATE)  # 6 optimizer steps for 10 micro-batches


def _smoothed_cross_entropy(model, logits, target, **kwargs):
    """Cross-entropy with the recipe's current label smoothing, as a training loop computes it."""
    return F.cross_entropy(logits, target, label_smoothing=tost.label_smoothing(model), **kwargs)


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2 * BATCHES_PER_EPOCH, 3, 8, 8, generator=generator)
    y = torch.randint(0, 10, (2 * BATCHES_PER_EPOCH,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=2, shuffle=False)


def prepared(total_steps: int = OPTIMIZER_STEPS) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    mask = bernoulli_mask(TinyNet())
    return tost.prepare(TinyNet(), mask, Recipe.tost(total_steps=total_steps, warmup=0.5)), mask


def masked_weights(model: nn.Module, mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The effective weight at every masked-out position, per layer (parametrized or finalized)."""
    return {n: model.get_submodule(n.rsplit(".", 1)[0]).weight.detach()[~m] for n, m in mask.items()}


def assert_plain_sparse(model: nn.Module, mask: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    """Finalized: a plain TinyNet again, masked weights exactly zero, the others trained."""
    assert type(model) is TinyNet and not hasattr(model, "tost")
    assert list(model.state_dict()) == list(TinyNet().state_dict())
    for name, zeros in masked_weights(model, mask).items():
        assert zeros.numel() > 0 and torch.count_nonzero(zeros) == 0, name
    assert not torch.equal(model.fc.bias.detach(), before["fc.bias"])  # the optimizer really stepped


# --------------------------------------------------------------------------- Lightning


def test_lightning_trainer_counts_optimizer_steps_and_the_callback_finalizes() -> None:
    L = pytest.importorskip("lightning")
    callback_module = load_example("lightning_callback")
    assert issubclass(callback_module.TostCallback, L.pytorch.Callback)  # the real base, not the fallback

    class LitTiny(L.LightningModule):
        def __init__(self, model: nn.Module, mask: dict[str, torch.Tensor]) -> None:
            super().__init__()
            self.model, self.mask = model, mask
            self.schedule_after_batch: list[int] = []
            self.global_step_after_batch: list[int] = []
            self.masked_nonzero = 0

        def training_step(self, batch, batch_idx):
            x, y = batch
            return _smoothed_cross_entropy(self.model, self.model(x), y)

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            self.schedule_after_batch.append(self.model.tost.schedule.steps_taken)
            self.global_step_after_batch.append(self.trainer.global_step)
            zeros = masked_weights(self.model, self.mask).values()
            self.masked_nonzero += sum(int(torch.count_nonzero(z)) for z in zeros)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    model, mask = prepared()
    before = copy.deepcopy(model.state_dict())
    module = LitTiny(model, mask)
    callback = callback_module.TostCallback()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=OPTIMIZER_STEPS,
        accumulate_grad_batches=ACCUMULATE,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader())

    assert trainer.global_step == OPTIMIZER_STEPS
    assert len(module.schedule_after_batch) == EPOCHS * BATCHES_PER_EPOCH  # 10 micro-batches
    # The schedule moved with Lightning's optimizer steps, batch by batch: 0 1 1 2 3 | 3 4 4 5 6.
    assert module.schedule_after_batch == module.global_step_after_batch == [0, 1, 1, 2, 3, 3, 4, 4, 5, 6]
    assert module.masked_nonzero == 0  # masks exact after every micro-batch
    assert callback.handles == []  # unbound at the end of fit
    assert module.model is model
    assert_plain_sparse(model, mask, before)  # warm-up over at step 3 of 6: the callback finalized


def test_lightning_callback_warns_and_keeps_the_scaffolding_when_the_warmup_is_not_over() -> None:
    L = pytest.importorskip("lightning")
    callback_module = load_example("lightning_callback")

    class LitTiny(L.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model, _ = prepared(total_steps=100)  # warm-up: 50 steps, the trainer stops after 2
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        callbacks=[callback_module.TostCallback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="did not finalize TinyNet"):
        trainer.fit(LitTiny(model), loader())
    assert model.tost.schedule.steps_taken == 2
    optimizer = trainer.optimizers[0]
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()  # the binding was removed at the end of fit
    assert model.tost.schedule.steps_taken == 2


# --------------------------------------------------------------------------- Accelerate


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons: start and leave them empty."""
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_accelerate_hook_counts_only_synchronized_steps(fresh_accelerate_state) -> None:
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    hook = load_example("accelerate_hook")
    model, mask = prepared()
    before = copy.deepcopy(model.state_dict())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    wrapped, optimizer, data = accelerator.prepare(model, sgd, loader())
    assert isinstance(optimizer, AcceleratedOptimizer) and optimizer.optimizer is sgd

    hook.bind_accelerate(accelerator, wrapped, optimizer)
    assert set(model.tost.surgery.bindings) == {id(sgd)}  # bound to the torch optimizer inside the wrapper

    schedule_after_batch, synced_after_batch = [], []
    for _ in range(EPOCHS):
        for x, y in data:
            with accelerator.accumulate(wrapped):
                loss = _smoothed_cross_entropy(accelerator.unwrap_model(wrapped), wrapped(x), y)
                accelerator.backward(loss)
                optimizer.step()  # called every micro-batch; the inner SGD steps only when synchronized
                optimizer.zero_grad(set_to_none=True)
            synced_after_batch.append(accelerator.sync_gradients)
            schedule_after_batch.append(model.tost.schedule.steps_taken)
            for name, zeros in masked_weights(model, mask).items():
                assert torch.count_nonzero(zeros) == 0, name

    assert synced_after_batch == [False, True, False, True, True] * EPOCHS  # the epoch's end flushes
    assert schedule_after_batch == [0, 1, 1, 2, 3, 3, 4, 4, 5, 6]
    assert model.tost.schedule.steps_taken == sum(synced_after_batch) == OPTIMIZER_STEPS
    assert not optimizer.step_was_skipped

    unwrapped = accelerator.unwrap_model(wrapped)
    assert unwrapped is model
    assert tost.finalize(unwrapped) is model  # warm-up over at step 3 of 6; removes the binding too
    assert_plain_sparse(model, mask, before)
    sgd.step()  # unbound: no schedule left to advance, no error
