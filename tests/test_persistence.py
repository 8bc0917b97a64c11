"""Checkpoints and copies: state_dict is the supported path; whole-module pickling says so;
strict loads name what differs; a finalized state_dict fits the original architecture.

Already covered elsewhere: deepcopy independence of the schedule (test_surgery), exact resume
from a state_dict in-process (test_surgery) and in a new process (test_resume).
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import tost_surgery as tost
from tost_surgery import Recipe

from .conftest import TinyNet, bernoulli_mask

RECIPE = dict(total_steps=6, warmup=0.5)


def prepared(mask_seed: int = 0, **overrides) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    return tost.prepare(model, bernoulli_mask(model, seed=mask_seed), Recipe.tost(**{**RECIPE, **overrides}))


def images(seed: int = 3) -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def train(model: nn.Module, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    handle = tost.bind(model, optimizer)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images(step)), torch.arange(4)).backward()
        optimizer.step()
    handle.remove()


@pytest.mark.parametrize("save", [lambda m: torch.save(m, io.BytesIO()), pickle.dumps], ids=["torch.save", "pickle"])
def test_pickling_a_prepared_model_points_to_state_dict(save) -> None:
    model = prepared()
    with pytest.raises(RuntimeError, match=r"only supported through state_dict\(\)"):
        save(model)
    model(images())  # the refusal changed nothing


def test_a_finalized_model_pickles_whole_without_the_library() -> None:
    model = prepared()
    train(model, 3)
    tost.finalize(model)
    model.eval()
    blob = pickle.dumps(model)
    assert b"tost_surgery" not in blob  # nothing of the library is left in the module
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is TinyNet
    assert torch.equal(loaded(images()), model(images()))


def test_state_dict_checkpoint_loads_with_torch_load_defaults() -> None:
    """The supported path: ``torch.save(model.state_dict())`` then ``torch.load`` (weights_only=True)."""
    model = prepared()
    train(model, 2)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)  # weights_only is the default: plain tensors only
    resumed = prepared()
    resumed.load_state_dict(state, strict=True)
    assert resumed.tost.schedule.steps_taken == 2
    for mode in (False, True):
        model.train(mode)
        resumed.train(mode)
        with torch.no_grad():
            assert torch.equal(resumed(images()), model(images()))


# (id, source of the state_dict, model that loads it, keys the error must name)
STRICT_CASES = [
    ("dense-checkpoint-into-prepared", lambda: TinyNet().state_dict(), prepared,
     ["conv1.parametrizations.weight.original", "tost.schedule.step", "Unexpected key(s)", '"conv1.weight"']),
    ("prepared-checkpoint-into-plain", lambda: prepared().state_dict(), TinyNet,
     ['Missing key(s) in state_dict: "conv1.weight"', "tost.schedule.step", "conv1.parametrizations.weight.original"]),
    ("recipe-without-skips", lambda: prepared().state_dict(), lambda: prepared(ghost_skips=False),
     ["Unexpected key(s)", "tost.skips.tost_skip_0.conv.weight"]),
    ("other-skip-branch", lambda: prepared(skip_branch="conv_bn").state_dict(), prepared,
     ["Unexpected key(s)", "tost.skips.tost_skip_1.conv.weight"]),
    ("other-architecture", lambda: prepared().state_dict(),
     lambda: tost.prepare(TinyNet(num_classes=5), bernoulli_mask(TinyNet(num_classes=5)), Recipe.tost(**RECIPE)),
     ["size mismatch for fc.parametrizations.weight.original", "torch.Size([10, 16])", "torch.Size([5, 16])"]),
    ("fewer-masked-layers", lambda: prepared().state_dict(),
     lambda: tost.prepare(TinyNet(), {"fc.weight": torch.ones(10, 16)}, Recipe.tost(**RECIPE)),
     ['"conv1.weight"', "conv1.parametrizations.weight.original", "conv1.parametrizations.weight.0.mask"]),
]


@pytest.mark.parametrize(("make_state", "make_model", "names"), [c[1:] for c in STRICT_CASES],
                         ids=[c[0] for c in STRICT_CASES])
def test_strict_load_names_what_differs(make_state, make_model, names) -> None:
    torch.manual_seed(0)
    state = make_state()
    model = make_model()
    with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict for TinyNet") as raised:
        model.load_state_dict(state, strict=True)
    for name in names:
        assert name in str(raised.value), name


def test_a_checkpoints_masks_replace_the_prepared_ones() -> None:
    """Masks are state: loading a checkpoint made with another mask trains (and finalizes) that mask."""
    source = prepared(mask_seed=1)
    train(source, 2)
    target = prepared(mask_seed=0)
    target.load_state_dict(source.state_dict(), strict=True)
    checkpoint_mask = bernoulli_mask(TinyNet(), seed=1)
    for name, m in checkpoint_mask.items():
        module = target.get_submodule(name.rsplit(".", 1)[0])
        assert torch.equal(module.parametrizations.weight[0].mask.bool(), m)
    train(target, 4)
    tost.finalize(target)
    for name, m in checkpoint_mask.items():
        assert (dict(target.named_parameters())[name][~m] == 0).all()


def test_after_loading_another_mask_report_and_checks_see_the_loaded_one() -> None:
    """The surgery's record of each mask follows the buffer a checkpoint loaded, not the mask prepare got."""
    source = prepared(mask_seed=1)
    target = prepared(mask_seed=0)
    target.load_state_dict(source.state_dict(), strict=True)
    checkpoint_mask = bernoulli_mask(TinyNet(), seed=1)
    entries = {e.name: e for e in target.tost.surgery.decided.entries}
    for name, m in checkpoint_mask.items():
        assert torch.equal(entries[name].mask, m), name
        assert entries[name].kept == int(m.sum()), name
    rows = {row.name: row for row in tost.report(target).rows}
    for name, m in checkpoint_mask.items():
        assert rows[name].kept == int(m.sum()), name
    tost.check_masks_match(target)  # one process: trivially the same, but it must read the loaded masks


class Untraceable(nn.Module):
    """Data-dependent control flow: prepare runs it eagerly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("case", ["forced-mid-warmup", "eager-fallback", "bias-and-norm-masks"])
def test_finalized_state_dict_loads_strictly_into_a_fresh_instance(case) -> None:
    torch.manual_seed(0)
    if case == "eager-fallback":
        model = Untraceable()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tost.TostSurgeryWarning)
            tost.prepare(model, bernoulli_mask(model), Recipe.tost(**RECIPE))
    elif case == "bias-and-norm-masks":  # masking a bias or a norm's weight reorders _parameters while prepared
        model = TinyNet()
        mask = bernoulli_mask(model) | {"conv3.bias": torch.arange(16) % 2 == 0, "bn1.weight": torch.arange(8) < 6}
        tost.prepare(model, mask, Recipe.tost(**RECIPE))
    else:
        model = prepared()
    keys = list(type(model)().state_dict())
    train(model, 2)
    tost.finalize(model, force=True)
    assert list(model.state_dict()) == keys
    fresh = type(model)()
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    fresh.eval()
    assert torch.equal(fresh(images()), model(images()))


@pytest.mark.parametrize("finalized", ["copy", "original"])
def test_finalizing_a_deepcopy_leaves_the_other_model_working(finalized) -> None:
    model = prepared()
    clone = copy.deepcopy(model)
    tost.step(model, 6)
    tost.step(clone, 6)
    done, other = (clone, model) if finalized == "copy" else (model, clone)
    expected = other(images())
    tost.finalize(done)
    assert parametrize.is_parametrized(other.conv1, "weight")
    assert torch.equal(other(images()), expected)  # AttributeError today: the shared class lost its 'weight'
    tost.finalize(other)
    assert type(other.conv1) is nn.Conv2d


def test_deepcopy_of_a_bound_model_is_not_bound() -> None:
    model = prepared()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tost.bind(model, optimizer)
    clone = copy.deepcopy(model)
    optimizer.step()
    assert (model.tost.schedule.steps_taken, clone.tost.schedule.steps_taken) == (1, 0)
    tost.step(clone, 6)
    tost.finalize(clone)  # removes the clone's copy of the binding, not the original's
    optimizer.step()
    assert model.tost.schedule.steps_taken == 2


def test_deepcopy_after_retirement_trains_on_its_own() -> None:
    model = prepared()
    train(model, 3)  # every technique retired
    clone = copy.deepcopy(model)
    model.eval()
    clone.eval()
    assert torch.equal(clone(images()), model(images()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone.train()
    train(clone, 2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert clone.tost.schedule.steps_taken == 5 and model.tost.schedule.steps_taken == 3
