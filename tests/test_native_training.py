"""The optional compiled training conv (``native_kernels=True``): against dense autograd, and without a compiler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import tost_surgery as tost
from tost_surgery import TostSurgeryError, TostSurgeryWarning
from tost_surgery._sparse_kernels import native
from tost_surgery._sparse_kernels.native import NativeStructure, native_sparse_conv
from tost_surgery.deploy import Timing
from tost_surgery.deploy.kernels import ConvGeometry
from tost_surgery.deploy.kernels._build import build_directory

from .conftest import TinyNet, bernoulli_mask
from .test_sparse_kernels import CONV_FORMS, close, compare, random_mask
from .test_sparse_training import data, pair, train


def built() -> None:
    available, why = native.training_native_available()
    if not available:
        pytest.skip(f"no C++ toolchain here: {why}")


def run_native(conv: nn.Module, mask: torch.Tensor):  # noqa: ANN201
    structure = NativeStructure.of(mask, ConvGeometry.of(conv))
    return lambda x, w, b: native_sparse_conv(x, w, b, structure)


@pytest.mark.slow  # the first run compiles the extension (minutes on a busy machine; cached after)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("form", list(CONV_FORMS))
def test_native_conv2d_matches_dense_autograd(form: str, batch: int) -> None:
    built()
    torch.manual_seed(0)
    out_channels = 8 if CONV_FORMS[form].get("groups", 1) == 8 else 12
    conv = nn.Conv2d(8, out_channels, **CONV_FORMS[form])
    mask = random_mask(conv.weight.shape, 0.3)
    compare(conv, mask, torch.randn(batch, 8, 11, 13), run_native(conv, mask))


@pytest.mark.slow
@pytest.mark.parametrize("form", ["3x3 pad 1", "3x3 stride 2", "reflect", "groups 2"])
def test_native_conv1d_matches_dense_autograd(form: str) -> None:
    built()
    torch.manual_seed(0)
    settings_1d = {k: (v[0] if isinstance(v, tuple) else v) for k, v in CONV_FORMS[form].items()}
    conv = nn.Conv1d(8, 6, **settings_1d)
    mask = random_mask(conv.weight.shape, 0.4)
    compare(conv, mask, torch.randn(2, 8, 70), run_native(conv, mask))  # 70: full 64-column tiles and a rest


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    groups=st.sampled_from([1, 2, 4]),
    batch=st.integers(1, 5),
    size=st.tuples(st.integers(6, 40), st.integers(6, 12)),
    density=st.sampled_from([0.02, 0.2, 1.0]),
)
def test_native_conv2d_matches_dense_autograd_on_any_geometry(
    kernel, stride, dilation, padding, groups, batch, size, density
) -> None:
    assume(all((k - 1) * d + 1 <= s + 2 * p for k, d, s, p in zip(kernel, dilation, size, padding)))
    built()
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, kernel, stride, padding, dilation, groups)
    mask = random_mask(conv.weight.shape, density, seed=batch)
    compare(conv, mask, torch.randn(batch, 4, *size), run_native(conv, mask))


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(
    channels=st.tuples(st.integers(33, 72), st.integers(1, 70)),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    batch=st.integers(1, 5),
    size=st.tuples(st.integers(3, 9), st.integers(3, 9)),
    density=st.sampled_from([0.05, 0.3]),
)
@example(channels=(40, 33), kernel=3, stride=1, batch=1, size=(7, 7), density=0.3)  # one 64-column tile exactly
def test_native_conv_over_several_blocks_of_source_rows(channels, kernel, stride, batch, size, density) -> None:
    built()
    torch.manual_seed(2)
    conv = nn.Conv2d(*channels, kernel, stride, padding=kernel // 2)
    mask = random_mask(conv.weight.shape, density, seed=batch)
    structure = NativeStructure.of(mask, ConvGeometry.of(conv))
    grid = structure.grid(torch.Size((batch, channels[0], *size)))
    assert grid.forward.ptr.numel() - 1 > conv.out_channels  # the forward reads more than one block
    compare(conv, mask, torch.randn(batch, channels[0], *size), run_native(conv, mask))


@pytest.mark.parametrize(
    ("settings_2d", "expected"),
    [
        (dict(kernel_size=3, padding=1), (33, 33)),  # neighbours share a pad row and column
        (dict(kernel_size=3, padding=3), (38, 38)),  # a pad longer than the kernel's reach: each image whole
        (dict(kernel_size=3, padding=1, stride=2), (17, 17)),
        (dict(kernel_size=1), (32, 32)),
    ],
)
def test_the_grid_shares_pads_only_where_the_kernel_reaches_across_them(settings_2d: dict, expected: tuple) -> None:
    assert native.grid_size(ConvGeometry.of(nn.Conv2d(2, 2, **settings_2d)), 32, 32) == expected


@pytest.mark.slow
def test_native_conv_with_pads_longer_than_the_kernel_reaches() -> None:
    built()
    torch.manual_seed(4)
    conv = nn.Conv2d(5, 6, 3, padding=3)
    mask = random_mask(conv.weight.shape, 0.4)
    compare(conv, mask, torch.randn(3, 5, 6, 5), run_native(conv, mask))


@pytest.mark.slow
def test_native_conv_with_no_kept_weight_and_a_poisoned_weight_off_the_mask() -> None:
    built()
    conv = nn.Conv2d(4, 4, 3, padding=1)
    empty = torch.zeros_like(conv.weight, dtype=torch.bool)
    compare(conv, empty, torch.randn(2, 4, 9, 9), run_native(conv, empty))
    mask = random_mask(conv.weight.shape, 0.3)
    poisoned = torch.where(mask, conv.weight.detach(), float("nan")).requires_grad_()
    x = torch.randn(2, 4, 6, 6)
    out = run_native(conv, mask)(x, poisoned, conv.bias)
    assert close(F.conv2d(x, torch.where(mask, conv.weight.detach(), 0.0), conv.bias, padding=1), out)
    out.sum().backward()
    assert bool(poisoned.grad.isfinite().all()) and bool((poisoned.grad[~mask] == 0).all())


def asked_timer(**seconds: float):  # noqa: ANN201
    """A timer that gives these per-call seconds to the candidates it is asked about, and records them."""
    asked: dict[str, tuple[str, ...]] = {}

    def timer(layer: str, candidates: dict) -> Timing:
        for run in candidates.values():
            run()
        asked[layer] = tuple(candidates)
        return Timing.of(**{name: seconds[name] for name in candidates})

    timer.asked = asked
    return timer


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_twenty_steps_on_the_native_kernels_match_the_masked_dense_path(optimizer: str) -> None:
    built()
    dense, fast = pair(mode="on", native=True)
    reference, found = train(dense, optimizer, 20), train(fast, optimizer, 20)
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(reference, found)), (reference, found)
    states = tost.status(fast).sparse_kernels
    assert states["conv2"] == "native" and states["conv4"] == "native"
    assert states["shortcut"] == "sparse" and states["fc"] == "sparse"  # 1x1 unpadded and Linear: torch-only
    for entry in fast.tost.surgery.decided.entries:
        assert bool((entry.module.parametrizations.weight.original[~entry.mask] == 0).all()), entry.name


@pytest.mark.slow
def test_auto_times_the_native_kernels_as_a_third_candidate() -> None:
    built()
    timer = asked_timer(dense=3.0, sparse=2.0, native=1.0)
    dense, fast = pair(TinyNet, "auto", timer, native=True)
    x, _ = data()
    assert torch.allclose(fast(x), dense(x), atol=1e-6)
    assert timer.asked["conv2"] == ("dense", "sparse", "native")
    assert timer.asked["fc"] == ("dense", "sparse")
    assert tost.status(fast).sparse_kernels["conv2"] == "native (3.00x)"
    assert tost.status(fast).sparse_kernels["fc"] == "sparse (1.50x)"


def test_without_a_compiler_native_kernels_warn_and_the_torch_kernels_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "training_extension", lambda: RuntimeError("Ninja is required to load C++ extensions"))
    assert native.training_native_available() == (False, "RuntimeError: Ninja is required to load C++ extensions")
    with pytest.warns(TostSurgeryWarning, match=r"compiled kernels could not be built \(RuntimeError: Ninja is"):
        dense, fast = pair(TinyNet, "on", native=True)
    reference, found = train(dense, "SGD", 3), train(fast, "SGD", 3)
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(reference, found)), (reference, found)
    assert set(tost.status(fast).sparse_kernels.values()) == {"sparse"}


def test_each_torch_installation_builds_in_its_own_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """torch's cache is keyed by name only; two environments sharing it would rebuild in turn."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here, there = build_directory("ext", "/env/a/torch"), build_directory("ext", "/env/b/torch")
    assert here != there and here.parent == there.parent
    assert here == build_directory("ext", "/env/a/torch") and here.is_relative_to(tmp_path)
    assert here.name.startswith("ext-") and build_directory("other", "/env/a/torch") != here


@pytest.mark.slow  # compiles the extension where no earlier test did
def test_the_training_extension_is_built_in_this_installations_folder() -> None:
    built()
    module = native.training_extension()
    assert Path(module.__file__).parent == build_directory(native._NAME)


def test_native_kernels_need_the_sparse_kernels_on_and_a_bool() -> None:
    model = TinyNet()
    with pytest.raises(TostSurgeryError, match="(?s)native_kernels=True needs the sparse kernels on.*found: sparse_k"):
        tost.prepare(model, bernoulli_mask(model), native_kernels=True)
    with pytest.raises(TostSurgeryError, match="native_kernels must be True or False;\nfound: 'yes'"):
        tost.prepare(model, bernoulli_mask(model), sparse_kernels="on", native_kernels="yes")


def test_other_dtypes_and_pointwise_convs_run_the_torch_kernels() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    weight, bias = conv.weight.detach().requires_grad_(), conv.bias.detach().requires_grad_()
    run = run_native(conv, random_mask(conv.weight.shape, 0.4))
    assert torch.autograd.gradcheck(run, (x, weight, bias))
    pointwise = nn.Conv2d(4, 6, 1, stride=2)
    mask = random_mask(pointwise.weight.shape, 0.4)
    compare(pointwise, mask, torch.randn(2, 4, 7, 7), run_native(pointwise, mask))
