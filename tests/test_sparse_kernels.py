"""Every training kernel against dense autograd on the masked weight: forward, input, weight and bias gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from tost_surgery._sparse_kernels import ConvStructure, LinearStructure, sparse_conv, sparse_linear
from tost_surgery.deploy.kernels import ConvGeometry


def random_mask(shape: torch.Size, density: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator) < density
    mask.view(-1)[0] = True  # a masked layer keeps at least one weight
    return mask


def close(reference: torch.Tensor, found: torch.Tensor, tolerance: float = 1e-5) -> bool:
    assert found.shape == reference.shape and found.dtype == reference.dtype
    reference, found = reference.detach(), found.detach()
    scale = max(float(reference.abs().max()), 1e-6)
    return float((found - reference).abs().max()) <= tolerance * scale


def compare(layer: nn.Module, mask: torch.Tensor, x: torch.Tensor, run) -> None:  # noqa: ANN001
    """``run(x, weight, bias)`` against the layer's own forward on ``weight * mask``, values and gradients."""
    x_dense = x.clone().requires_grad_()
    x_sparse = x.clone().requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()
    weight_dense = layer.weight.detach().clone().requires_grad_()
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    bias_dense = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    reference = torch.func.functional_call(
        layer, {"weight": weight_dense * mask, **({"bias": bias_dense} if bias_dense is not None else {})}, (x_dense,)
    )
    out = run(x_sparse, weight, bias)
    assert close(reference, out)
    grad = torch.randn_like(reference)
    reference.backward(grad)
    out.backward(grad)
    assert close(x_dense.grad, x_sparse.grad)
    assert close(weight_dense.grad, weight.grad)
    assert bool((weight.grad[~mask] == 0).all())  # exact zeros off the mask
    if bias is not None:
        assert close(bias_dense.grad, bias.grad)


@pytest.mark.parametrize("shape", [(5, 16), (16,), (2, 3, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("has_bias", [True, False])
def test_sparse_linear_matches_dense_autograd_with_any_batch_dims(shape: tuple[int, ...], has_bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 7, bias=has_bias)
    mask = random_mask(layer.weight.shape, 0.2)
    structure = LinearStructure.of(mask)
    compare(layer, mask, torch.randn(shape), lambda x, w, b: sparse_linear(x, w, b, structure))


@settings(max_examples=25, deadline=None)
@given(
    features=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    batch=st.integers(1, 9),
    density=st.sampled_from([0.01, 0.1, 0.5, 1.0]),
    has_bias=st.booleans(),
)
def test_sparse_linear_matches_dense_autograd_on_any_shape(features, batch, density, has_bias) -> None:
    torch.manual_seed(2)
    layer = nn.Linear(*features, bias=has_bias)
    mask = random_mask(layer.weight.shape, density, seed=batch)
    structure = LinearStructure.of(mask)
    compare(layer, mask, torch.randn(batch, features[0]), lambda x, w, b: sparse_linear(x, w, b, structure))


CONV_FORMS = {
    "3x3 pad 1": dict(kernel_size=3, padding=1),
    "1x1": dict(kernel_size=1),
    "1x1 stride 2": dict(kernel_size=1, stride=2),
    "3x3 stride 2": dict(kernel_size=3, stride=2, padding=1),
    "7x7 stride 2 pad 3": dict(kernel_size=7, stride=2, padding=3),
    "2x3 stride (2, 1)": dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0)),
    "same, even kernel": dict(kernel_size=4, padding="same"),
    "dilation (2, 1) stride 2": dict(kernel_size=3, padding=1, dilation=(2, 1), stride=2),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular stride 2": dict(kernel_size=3, padding=2, padding_mode="circular", stride=2),
    "groups 2": dict(kernel_size=3, padding=1, groups=2),
    "depthwise stride 2": dict(kernel_size=3, padding=1, groups=8, stride=2),
    "no bias": dict(kernel_size=3, padding=1, bias=False),
}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("form", list(CONV_FORMS))
def test_sparse_conv2d_matches_dense_autograd(form: str, batch: int) -> None:
    torch.manual_seed(0)
    out_channels = 8 if CONV_FORMS[form].get("groups", 1) == 8 else 12
    conv = nn.Conv2d(8, out_channels, **CONV_FORMS[form])
    mask = random_mask(conv.weight.shape, 0.3)
    structure = ConvStructure.of(mask, ConvGeometry.of(conv))
    compare(conv, mask, torch.randn(batch, 8, 11, 13), lambda x, w, b: sparse_conv(x, w, b, structure))


@pytest.mark.parametrize("form", ["3x3 pad 1", "3x3 stride 2", "reflect", "groups 2", "1x1 stride 2"])
def test_sparse_conv1d_matches_dense_autograd(form: str) -> None:
    torch.manual_seed(0)
    settings_1d = {k: (v[0] if isinstance(v, tuple) else v) for k, v in CONV_FORMS[form].items()}
    conv = nn.Conv1d(8, 6, **settings_1d)
    mask = random_mask(conv.weight.shape, 0.4)
    structure = ConvStructure.of(mask, ConvGeometry.of(conv))
    compare(conv, mask, torch.randn(2, 8, 17), lambda x, w, b: sparse_conv(x, w, b, structure))


@settings(max_examples=30, deadline=None)
@given(
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    groups=st.sampled_from([1, 2, 4]),
    batch=st.integers(1, 3),
    size=st.tuples(st.integers(6, 10), st.integers(6, 10)),
    density=st.sampled_from([0.02, 0.2, 1.0]),
    has_bias=st.booleans(),
)
def test_sparse_conv2d_matches_dense_autograd_on_any_geometry(
    kernel, stride, dilation, padding, mode, groups, batch, size, density, has_bias
) -> None:
    assume(mode == "zeros" or all(p < s for p, s in zip(padding, size)))  # reflect pads less than the input
    # the dilated kernel must fit the padded input (dense conv refuses otherwise)
    assume(all((k - 1) * d + 1 <= s + 2 * p for k, d, s, p in zip(kernel, dilation, size, padding)))
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, kernel, stride, padding, dilation, groups, has_bias, padding_mode=mode)
    mask = random_mask(conv.weight.shape, density, seed=batch)
    structure = ConvStructure.of(mask, ConvGeometry.of(conv))
    compare(conv, mask, torch.randn(batch, 4, *size), lambda x, w, b: sparse_conv(x, w, b, structure))


def test_kernels_pass_gradcheck_in_float64() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1).double()
    conv_structure = ConvStructure.of(random_mask(conv.weight.shape, 0.4), ConvGeometry.of(conv))
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    weight, bias = conv.weight.detach().requires_grad_(), conv.bias.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: sparse_conv(*a, conv_structure), (x, weight, bias))
    linear = nn.Linear(5, 3).double()
    linear_structure = LinearStructure.of(random_mask(linear.weight.shape, 0.4))
    v = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = linear.weight.detach().requires_grad_(), linear.bias.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: sparse_linear(*a, linear_structure), (v, weight, bias))


def test_kernels_never_read_the_weight_off_the_mask() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1)
    mask = random_mask(conv.weight.shape, 0.3)
    structure = ConvStructure.of(mask, ConvGeometry.of(conv))
    poisoned = torch.where(mask, conv.weight.detach(), float("nan")).requires_grad_()
    x = torch.randn(2, 4, 6, 6)
    out = sparse_conv(x, poisoned, conv.bias, structure)
    reference = F.conv2d(x, torch.where(mask, conv.weight.detach(), 0.0), conv.bias, padding=1)
    assert close(reference, out)
    out.sum().backward()
    assert bool(poisoned.grad.isfinite().all()) and bool((poisoned.grad[~mask] == 0).all())


def test_input_gradient_is_skipped_when_not_needed() -> None:
    linear = nn.Linear(6, 4)
    structure = LinearStructure.of(random_mask(linear.weight.shape, 0.5))
    x = torch.randn(3, 6)
    sparse_linear(x, linear.weight, linear.bias, structure).sum().backward()
    assert x.grad is None and linear.weight.grad is not None
