"""``GhostSkip``: the temporary conv-input -> conv-output branch, for every Conv2d geometry."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from tost_surgery._modules import GhostSkip

HYP = settings(max_examples=150, deadline=None)


def pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


def reference_sample(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: output pixel i reads input i * stride - pad_before + reach // 2, zero outside."""
    kernel, stride, dilation = pair(conv.kernel_size), pair(conv.stride), pair(conv.dilation)
    reach = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
    if conv.padding == "same":
        before, total = [r // 2 for r in reach], reach  # torch puts the odd extra pixel after
    elif conv.padding == "valid":
        before, total = [0, 0], [0, 0]
    else:
        before = list(pair(conv.padding))
        total = [2 * p for p in before]
    out = [(n + t - r - 1) // s + 1 for n, t, r, s in zip(x.shape[-2:], total, reach, stride, strict=True)]
    rows = torch.arange(out[0]) * stride[0] - before[0] + reach[0] // 2
    cols = torch.arange(out[1]) * stride[1] - before[1] + reach[1] // 2
    result = x.new_zeros(*x.shape[:-2], *out)
    r_ok = (rows >= 0) & (rows < x.shape[-2])
    c_ok = (cols >= 0) & (cols < x.shape[-1])
    result[..., r_ok.nonzero()[:, 0, None], c_ok.nonzero()[:, 0]] = x[..., rows[r_ok][:, None], cols[c_ok]]
    return result


@st.composite
def geometries(draw, square_channels: bool = False):
    """(conv kwargs, input height, input width) for a valid Conv2d."""
    depthwise = draw(st.booleans())
    if depthwise:
        groups = draw(st.integers(1, 6))
        cin = groups
        cout = groups if square_channels else groups * draw(st.integers(1, 2))
    else:
        groups = draw(st.integers(1, 3))
        cin = groups * draw(st.integers(1, 3))
        cout = cin if square_channels else groups * draw(st.integers(1, 3))
    kernel = draw(st.one_of(st.integers(1, 5), st.tuples(st.integers(1, 5), st.integers(1, 5))))
    dilation = draw(st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 2), st.integers(1, 2))))
    stride = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = draw(
        st.one_of(
            st.integers(0, 3),
            st.tuples(st.integers(0, 3), st.integers(0, 3)),
            st.just("valid"),
            st.just("same") if pair(stride) == (1, 1) else st.just(0),
        )
    )
    kwargs = dict(
        in_channels=cin,
        out_channels=cout,
        kernel_size=kernel,
        stride=stride,
        dilation=dilation,
        padding=padding,
        groups=groups,
        bias=draw(st.booleans()),
    )
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    reach = [d * (k - 1) for d, k in zip(pair(dilation), pair(kernel), strict=True)]
    pads = [0, 0] if padding in ("valid", "same") else [2 * p for p in pair(padding)]
    if padding != "same":
        assume(all(n + p >= r + 1 for n, p, r in zip((h, w), pads, reach, strict=True)))
    return kwargs, h, w


def make(kwargs: dict, dtype: torch.dtype = torch.float32) -> nn.Conv2d:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.Conv2d(**kwargs, dtype=dtype)


def run_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # 'same' with even kernels warns about a padded copy
        warnings.simplefilter("ignore")
        return conv(x)


# --------------------------------------------------------------------------- property: shapes and values


@HYP
@given(geometry=geometries())
def test_conv_branch_matches_conv_shape(geometry) -> None:
    kwargs, h, w = geometry
    conv = make(kwargs)
    x = torch.randn(2, conv.in_channels, h, w)
    skip = GhostSkip(conv, branch="conv_bn", init=0.25).eval()
    out = skip(x)
    assert out.shape == run_conv(conv, x).shape
    # values: the fresh 1x1 conv (groups kept) + eval BN applied to the receptive-field centres
    expected = skip.bn(F.conv2d(reference_sample(conv, x), skip.conv.weight, groups=conv.groups))
    torch.testing.assert_close(out, expected)
    # train mode (batch statistics) gives the same shape
    assert skip.train()(x).shape == out.shape


@HYP
@given(geometry=geometries(square_channels=True))
def test_identity_branch_matches_conv_shape_and_samples_centre(geometry) -> None:
    kwargs, h, w = geometry
    conv = make(kwargs)
    x = torch.randn(2, conv.in_channels, h, w)
    skip = GhostSkip(conv, branch="identity", init=0.0)
    out = skip(x)
    assert out.shape == run_conv(conv, x).shape
    assert torch.equal(out, reference_sample(conv, x))
    assert list(skip.parameters()) == [] and list(skip.buffers()) == []


@HYP
@given(geometry=geometries())
def test_fast_path_equals_generic_sampling(geometry) -> None:
    kwargs, h, w = geometry
    conv = make(kwargs)
    skip = GhostSkip(conv, branch="conv_bn", init=0.0)  # the sampler does not depend on the branch
    x = torch.randn(1, conv.in_channels, h, w)
    sampled = skip._sample(x)
    assert torch.equal(sampled, reference_sample(conv, x))
    if skip.is_aligned:
        s = pair(conv.stride)
        assert torch.equal(sampled, x[..., :: s[0], :: s[1]])
        if conv.in_channels == conv.out_channels:
            assert torch.equal(GhostSkip(conv, branch="identity")(x), sampled)
        # conv branch: the strided 1x1 conv on the fast path equals the 1x1 conv on the sampled input
        branch = GhostSkip(conv, branch="conv_bn", init=0.5).eval()
        expected = branch.bn(F.conv2d(sampled, branch.conv.weight, groups=conv.groups))
        torch.testing.assert_close(branch(x), expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=5, padding=2),
        dict(kernel_size=1, padding=0),
        dict(kernel_size=3, padding=2, dilation=2),
        dict(kernel_size=(1, 3), padding=(0, 1)),
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=(2, 2), padding=(1, 1), dilation=2),
    ],
)
def test_aligned_stride1_identity_returns_x(kwargs) -> None:
    conv = nn.Conv2d(4, 4, **kwargs)
    skip = GhostSkip(conv, branch="identity", init=0.0)
    assert skip.is_aligned
    x = torch.randn(2, 4, 7, 9)
    out = skip(x)
    assert torch.equal(out, x)
    assert out.shape == conv(x).shape


@pytest.mark.parametrize(
    ("size", "kernel", "padding"), [((8, 8), 3, 1), ((7, 9), 3, 1), ((9, 6), 5, 2), ((5, 5), 1, 0)]
)
def test_aligned_stride2_identity_subsamples(size, kernel, padding) -> None:
    conv = nn.Conv2d(3, 3, kernel, stride=2, padding=padding)
    skip = GhostSkip(conv, branch="identity", init=0.0)
    assert skip.is_aligned
    x = torch.randn(1, 3, *size)
    out = skip(x)
    assert torch.equal(out, x[..., ::2, ::2])
    assert out.shape == conv(x).shape


def test_generic_path_samples_receptive_field_centre() -> None:
    x = torch.arange(2 * 6 * 7, dtype=torch.float32).view(1, 2, 6, 7)
    # kernel 3, no padding: output pixel i sees inputs i..i+2, centre i+1
    skip = GhostSkip(nn.Conv2d(2, 2, 3), branch="identity", init=0.0)
    assert not skip.is_aligned
    assert torch.equal(skip(x), x[..., 1:-1, 1:-1])
    # kernel 5, no padding, stride 2: centre 2i+2
    skip = GhostSkip(nn.Conv2d(2, 2, 5, stride=2), branch="identity", init=0.0)
    assert torch.equal(skip(x), x[..., 2:4:2, 2:5:2])
    # kernel (1, 3), no padding: only the width shifts
    skip = GhostSkip(nn.Conv2d(2, 2, (1, 3)), branch="identity", init=0.0)
    assert torch.equal(skip(x), x[..., :, 1:-1])
    # kernel 3, dilation 2, no padding: reach 4, centre i+2
    skip = GhostSkip(nn.Conv2d(2, 2, 3, dilation=2), branch="identity", init=0.0)
    assert torch.equal(skip(x), x[..., 2:-2, 2:-2])
    # kernel 1, padding 1: output is one pixel larger on each side, zero border
    skip = GhostSkip(nn.Conv2d(2, 2, 1, padding=1), branch="identity", init=0.0)
    assert torch.equal(skip(x), F.pad(x, (1, 1, 1, 1)))
    # kernel 2 (even), no padding: reach 1, centre rounds down to i
    skip = GhostSkip(nn.Conv2d(2, 2, 2), branch="identity", init=0.0)
    assert torch.equal(skip(x), x[..., :-1, :-1])


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("init", [0.0, 1.0, -0.5, 0.125])
@pytest.mark.parametrize(("cin", "cout", "groups"), [(4, 8, 1), (4, 8, 2), (6, 6, 6), (6, 12, 3)])
def test_conv_branch_init_groups_and_fresh_bn(init, cin, cout, groups) -> None:
    conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, groups=groups)
    with torch.no_grad():
        conv.weight.fill_(3.0)
    skip = GhostSkip(conv, branch="conv_bn", init=init)
    assert skip.conv.groups == groups
    assert skip.conv.in_channels == cin and skip.conv.out_channels == cout
    assert skip.conv.kernel_size == (1, 1) and skip.conv.bias is None
    assert skip.conv.weight.shape == (cout, cin // groups, 1, 1)
    assert torch.equal(skip.conv.weight, torch.full_like(skip.conv.weight, init))
    bn = skip.bn
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == cout and bn.training
    assert torch.equal(bn.weight, torch.ones(cout)) and torch.equal(bn.bias, torch.zeros(cout))
    assert torch.equal(bn.running_mean, torch.zeros(cout)) and torch.equal(bn.running_var, torch.ones(cout))
    assert int(bn.num_batches_tracked) == 0
    assert bn.eps == nn.BatchNorm2d(cout).eps and bn.momentum == nn.BatchNorm2d(cout).momentum
    # the branch owns new parameters: nothing shared with the conv, which is left alone
    assert all(p is not q for p in skip.parameters() for q in conv.parameters())
    assert torch.equal(conv.weight, torch.full_like(conv.weight, 3.0))


def test_identity_branch_has_no_modules() -> None:
    skip = GhostSkip(nn.Conv2d(4, 4, 3, padding=1), branch="identity", init=1.0)
    assert skip.conv is None and skip.bn is None
    assert list(skip.parameters()) == []
    assert "identity" in repr(skip)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(padding=0, stride=2)])
def test_branch_follows_conv_dtype(dtype, kwargs) -> None:
    conv = nn.Conv2d(4, 8, 3, groups=2, dtype=dtype, **kwargs)
    skip = GhostSkip(conv, branch="conv_bn", init=0.5)
    tensors = list(skip.parameters()) + [b for b in skip.buffers() if b.is_floating_point()]
    assert tensors and all(t.dtype == dtype for t in tensors)
    if dtype == torch.float64:
        x = torch.randn(2, 4, 9, 9, dtype=dtype)
        out = skip(x)
        assert out.dtype == dtype and out.shape == conv(x).shape


def test_branch_follows_conv_device() -> None:
    conv = nn.Conv2d(4, 8, 3, device="meta")
    skip = GhostSkip(conv, branch="conv_bn", init=0.5)
    assert all(t.device.type == "meta" for t in list(skip.parameters()) + list(skip.buffers()))


def test_gradients_flow_through_conv_branch() -> None:
    conv = nn.Conv2d(3, 6, 3, stride=2)  # generic path
    skip = GhostSkip(conv, branch="conv_bn", init=0.1)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    skip(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert skip.conv.weight.grad is not None and skip.bn.weight.grad is not None


# torch's padding="same" pads ``reach`` in total: an odd reach puts the extra pixel after.
@pytest.mark.parametrize("identity", [True, False])
@pytest.mark.parametrize("kernel", [2, 4, (1, 2), (2, 3)])
def test_same_padding_even_kernel(kernel, identity) -> None:
    conv = nn.Conv2d(3, 3, kernel, padding="same")
    skip = GhostSkip(conv, branch="identity" if identity else "conv_bn", init=0.5).eval()
    x = torch.randn(2, 3, 7, 8)
    out = skip(x)
    assert out.shape == run_conv(conv, x).shape
    if identity:
        assert torch.equal(out, reference_sample(conv, x))


@pytest.mark.parametrize("branch", ["bn", "identity"])
def test_channel_preserving_branches_need_square_convs(branch) -> None:
    with pytest.raises(ValueError, match=f"A '{branch}' ghost skip needs in_channels == out_channels"):
        GhostSkip(nn.Conv2d(3, 4, 3, padding=1), branch=branch)


def test_bn_branch_normalizes_the_sampled_input() -> None:
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=1)
    skip = GhostSkip(conv, branch="bn").train()
    x = torch.randn(8, 4, 9, 9) * 5 + 3
    out = skip(x)
    assert out.shape == conv(x).shape and skip.conv is None
    torch.testing.assert_close(out, F.batch_norm(x[..., ::2, ::2], None, None, training=True))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [1, 0])
def test_depthwise_branch_is_a_per_channel_scale_equal_to_the_grouped_conv(stride, padding) -> None:
    # float64: the two forms sum the weight gradient in different orders; in float32 the
    # difference (~1e-4 relative) depends on the thread count.
    conv = nn.Conv2d(6, 6, 3, stride=stride, padding=padding, groups=6).double()
    skip = GhostSkip(conv, branch="conv_bn").double()
    assert skip.per_channel and "per-channel" in repr(skip)
    assert skip.conv.weight.shape == (6, 1, 1, 1)  # the same parameter (and state_dict entry) as the conv form
    with torch.no_grad():
        skip.conv.weight.copy_(torch.randn(6, 1, 1, 1, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(4, 6, 9, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    weight = skip.conv.weight.detach().clone().requires_grad_(True)
    expected = nn.BatchNorm2d(6).double()(F.conv2d(reference_sample(conv, x), weight, groups=6))
    torch.testing.assert_close(skip(x), expected, rtol=0, atol=1e-6)  # train mode: batch statistics
    # Gradients in eval mode (train-mode BatchNorm is invariant to a per-channel scale: ~0 gradient).
    skip.eval()
    out = skip(x)
    expected = skip.bn(F.conv2d(reference_sample(conv, x), weight, groups=6))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(skip.conv.weight.grad, weight.grad, rtol=1e-10, atol=1e-12)
    assert not GhostSkip(nn.Conv2d(6, 12, 3, groups=6), branch="conv_bn").per_channel  # depth multiplier 2
    assert not GhostSkip(nn.Conv2d(6, 6, 3, groups=3), branch="conv_bn").per_channel
