"""Every deploy kernel against the dense layer it replaces, over the conv forms it claims."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tost_surgery import TostSurgeryError
from tost_surgery.deploy.kernels import ChannelsLast, CsrConv, CsrLinear, candidates, to_csr


def sparsify(layer: nn.Module, density: float, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(layer.weight.shape, generator=generator) < density)
    return layer.eval()


def assert_close(reference: torch.Tensor, out: torch.Tensor) -> None:
    assert out.shape == reference.shape and out.dtype == reference.dtype
    assert out.is_contiguous()
    scale = reference.abs().max().clamp_min(1e-12)
    assert float((out - reference).abs().max() / scale) < 1e-5


CONV_FORMS = {
    "3x3 pad 1": dict(kernel_size=3, padding=1),
    "1x1": dict(kernel_size=1),
    "1x1 stride 2": dict(kernel_size=1, stride=2),
    "3x3 stride 2": dict(kernel_size=3, stride=2, padding=1),
    "7x7 stride 2 pad 3": dict(kernel_size=7, stride=2, padding=3),
    "5x5 stride 3": dict(kernel_size=5, stride=3, padding=2),
    "2x3 stride (2, 1)": dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0)),
    "valid": dict(kernel_size=3, padding="valid"),
    "same, even kernel": dict(kernel_size=4, padding="same"),
    "dilation 2": dict(kernel_size=3, padding=2, dilation=2),
    "dilation (2, 1) stride 2": dict(kernel_size=3, padding=1, dilation=(2, 1), stride=2),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "replicate stride 2": dict(kernel_size=3, padding=1, padding_mode="replicate", stride=2),
    "circular": dict(kernel_size=3, padding=2, padding_mode="circular"),
    "groups 2": dict(kernel_size=3, padding=1, groups=2),
    "depthwise": dict(kernel_size=3, padding=1, groups=8),
    "depthwise stride 2": dict(kernel_size=3, padding=1, groups=8, stride=2),
    "no bias": dict(kernel_size=3, padding=1, bias=False),
}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("form", list(CONV_FORMS))
def test_csr_conv2d_matches_dense(form: str, batch: int) -> None:
    torch.manual_seed(0)
    out_channels = 8 if CONV_FORMS[form].get("groups", 1) == 8 else 12
    conv = sparsify(nn.Conv2d(8, out_channels, **CONV_FORMS[form]), density=0.3)
    x = torch.randn(batch, 8, 11, 13)
    with torch.no_grad():
        assert_close(conv(x), CsrConv.from_conv(conv)(x))


@pytest.mark.parametrize(
    "form", ["3x3 pad 1", "3x3 stride 2", "dilation 2", "reflect", "groups 2", "same, even kernel"]
)
def test_csr_conv1d_matches_dense(form: str) -> None:
    torch.manual_seed(0)
    settings_1d = {k: (v[0] if isinstance(v, tuple) else v) for k, v in CONV_FORMS[form].items()}
    conv = sparsify(nn.Conv1d(8, 6, **settings_1d), density=0.4)
    x = torch.randn(2, 8, 17)
    with torch.no_grad():
        assert_close(conv(x), CsrConv.from_conv(conv)(x))


@settings(max_examples=40, deadline=None)
@given(
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    groups=st.sampled_from([1, 2, 4]),
    batch=st.integers(1, 3),
    size=st.tuples(st.integers(6, 12), st.integers(6, 12)),
    density=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    bias=st.booleans(),
)
def test_csr_conv2d_matches_dense_on_any_geometry(
    kernel, stride, dilation, padding, mode, groups, batch, size, density, bias
):
    if mode != "zeros" and any(p >= s for p, s in zip(padding, size)):
        return  # reflect padding must be smaller than the input
    if any(d * (k - 1) + 1 > s + 2 * p for d, k, s, p in zip(dilation, kernel, size, padding)):
        return  # the kernel reaches past the padded input: torch refuses the layer itself
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, kernel, stride, padding, dilation, groups, bias, padding_mode=mode)
    sparsify(conv, density)
    x = torch.randn(batch, 4, *size)
    with torch.no_grad():
        reference = conv(x)
        out = CsrConv.from_conv(conv)(x)
    assert out.shape == reference.shape
    assert float((out - reference).abs().max()) <= 1e-5 * max(float(reference.abs().max()), 1e-6)


def test_csr_conv_reads_a_channels_last_or_strided_input() -> None:
    conv = sparsify(nn.Conv2d(6, 6, 3, padding=1), density=0.3)
    x = torch.randn(2, 6, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close(conv(x), CsrConv.from_conv(conv)(x))
        wide = torch.randn(1, 6, 9, 20)[..., ::2]  # not contiguous
        assert_close(conv(wide), CsrConv.from_conv(conv)(wide))


def test_csr_conv_of_an_all_zero_weight_is_its_bias() -> None:
    conv = sparsify(nn.Conv2d(4, 5, 3, padding=1), density=0.0)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        out = CsrConv.from_conv(conv)(x)
    assert torch.equal(out, conv.bias.view(1, -1, 1, 1).expand(2, 5, 6, 6))


@pytest.mark.parametrize("shape", [(5, 16), (16,), (2, 3, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_csr_linear_matches_dense_with_any_batch_dims(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    linear = sparsify(nn.Linear(16, 7, bias=bias), density=0.2)
    x = torch.randn(shape)
    with torch.no_grad():
        assert_close(linear(x), CsrLinear.from_linear(linear)(x))


def test_kernels_follow_a_dtype_change() -> None:
    conv = sparsify(nn.Conv2d(3, 4, 3, padding=1), 0.5).double()
    linear = sparsify(nn.Linear(6, 2), 0.5).double()
    sparse_conv = CsrConv.from_conv(conv.float()).double()
    sparse_linear = CsrLinear.from_linear(linear.float()).double()
    conv, linear = conv.double(), linear.double()
    x, v = torch.randn(1, 3, 5, 5, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        assert_close(conv(x), sparse_conv(x))
        assert_close(linear(v), sparse_linear(v))


@pytest.mark.parametrize("layer", [nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(3, 1, 1)])
def test_channels_last_pooling_is_bit_exact(layer: nn.Module) -> None:
    x = torch.randn(2, 5, 9, 11)
    out = ChannelsLast(layer)(x)
    assert out.is_contiguous()
    if isinstance(layer, nn.MaxPool2d):
        assert torch.equal(out, layer(x))
    else:
        assert_close(layer(x), out)


def test_channels_last_conv_matches_dense() -> None:
    conv = sparsify(nn.Conv2d(3, 8, 7, 2, 3), 0.5)
    x = torch.randn(1, 3, 20, 20)
    with torch.no_grad():
        assert_close(conv(x), ChannelsLast(conv)(x))


def test_kernels_refuse_inputs_that_need_gradients() -> None:
    sparse = CsrLinear.from_linear(nn.Linear(4, 2))
    with pytest.raises(TostSurgeryError, match="inference kernel.*no backward"):
        sparse(torch.randn(1, 4, requires_grad=True))
    with torch.no_grad():
        sparse(torch.randn(1, 4, requires_grad=True))  # fine without autograd


def test_candidates_say_why_a_layer_has_no_kernel() -> None:
    class WeightStandardized(nn.Conv2d):
        def forward(self, x):
            w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    assert set(candidates(nn.Conv2d(2, 2, 3))[0]) == {"csr", "channels_last"}
    assert set(candidates(nn.Conv1d(2, 2, 3))[0]) == {"csr"}
    assert set(candidates(nn.Linear(2, 2))[0]) == {"csr"}
    assert set(candidates(nn.MaxPool2d(2))[0]) == {"channels_last"}
    assert candidates(nn.Conv3d(2, 2, 3)) == ({}, "Conv3d: no sparse kernel")
    assert candidates(nn.ConvTranspose2d(2, 2, 3)) == ({}, "ConvTranspose2d: no sparse kernel")
    assert "has its own forward" in candidates(WeightStandardized(2, 2, 3))[1]
    assert "float16" in candidates(nn.Linear(2, 2).half())[1]
    assert candidates(nn.MaxPool2d(2, return_indices=True)) == (
        {},
        "MaxPool2d: only plain MaxPool2d / AvgPool2d have a kernel",
    )


def test_to_csr_keeps_values_and_uses_int32_indices() -> None:
    dense = torch.tensor([[0.0, -0.0, 2.0], [3.0, 0.0, 0.0]])
    csr = to_csr(dense)
    assert csr.crow_indices().dtype == torch.int32 and csr.col_indices().dtype == torch.int32
    assert torch.equal(csr.to_dense(), dense)
    with pytest.raises(ValueError, match="2-D"):
        to_csr(torch.ones(2, 2, 2))


def native_conv():
    from tost_surgery.deploy.kernels import NativeConv, native_available

    available, why = native_available()
    if not available:
        pytest.skip(f"no C++ toolchain here: {why}")
    return NativeConv


@pytest.mark.slow  # the first run compiles the extension (minutes on a busy machine; cached after)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("form", list(CONV_FORMS))
def test_native_conv_matches_dense(form: str, batch: int) -> None:
    kernel = native_conv()
    torch.manual_seed(0)
    out_channels = 8 if CONV_FORMS[form].get("groups", 1) == 8 else 12
    conv = sparsify(nn.Conv2d(8, out_channels, **CONV_FORMS[form]), density=0.3)
    x = torch.randn(batch, 8, 11, 13)
    with torch.no_grad():
        assert_close(conv(x), kernel.from_conv(conv)(x))


@pytest.mark.slow
def test_native_conv_refuses_other_dtypes() -> None:
    kernel = native_conv()
    sparse = kernel.from_conv(sparsify(nn.Conv2d(2, 2, 3), 0.5))
    with pytest.raises(TostSurgeryError, match="(?s)computes in float32.*found: input torch.float64"):
        sparse(torch.randn(1, 2, 5, 5, dtype=torch.float64))


@pytest.mark.slow
def test_native_conv1d_and_an_empty_weight_match_dense() -> None:
    kernel = native_conv()
    conv1d = sparsify(nn.Conv1d(8, 6, 3, stride=2, padding=2, dilation=2), density=0.3)
    empty = sparsify(nn.Conv2d(4, 4, 3, padding=1), density=0.0)
    with torch.no_grad():
        v = torch.randn(2, 8, 17)
        assert_close(conv1d(v), kernel.from_conv(conv1d)(v))
        x = torch.randn(2, 4, 7, 7)
        assert_close(empty(x), kernel.from_conv(empty)(x))


def test_native_is_a_candidate_only_when_asked_and_for_float32_convs() -> None:
    assert "native" not in candidates(nn.Conv2d(2, 2, 3))[0]
    assert set(candidates(nn.Conv2d(2, 2, 3), native=True)[0]) == {"csr", "native", "channels_last"}
    assert "native" in candidates(nn.Conv1d(2, 2, 3), native=True)[0]
    assert "native" not in candidates(nn.Linear(2, 2), native=True)[0]
    assert "native" not in candidates(nn.Conv2d(2, 2, 3).double(), native=True)[0]


def test_without_a_compiler_native_warns_and_the_torch_kernels_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from tost_surgery import TostSurgeryWarning, deploy
    from tost_surgery.deploy.kernels import native_conv

    monkeypatch.setattr(
        native_conv, "native_extension", lambda: RuntimeError("Ninja is required to load C++ extensions")
    )
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    for layer in (model[0], model[2]):
        sparsify(layer, 0.2)
    with pytest.warns(TostSurgeryWarning, match=r"native kernel could not be built \(RuntimeError: Ninja is required"):
        fast = deploy.accelerate(model, torch.randn(1, 3, 8, 8), native=True)
    report = deploy.report(fast)
    assert all(row.kernel != "native" for row in report.rows)
    assert any("torch-only kernels ran" in note for note in report.notes)


@pytest.mark.slow
def test_a_model_on_the_native_kernel_exports() -> None:
    kernel = native_conv()
    model = nn.Sequential(sparsify(nn.Conv2d(3, 8, 3, stride=2, padding=1), 0.3), nn.ReLU()).eval()
    fast = nn.Sequential(kernel.from_conv(model[0]), nn.ReLU())
    x = torch.randn(2, 3, 9, 9)
    exported = torch.export.export(fast, (x,))
    assert "tost_surgery_deploy.native_conv.default" in {str(n.target) for n in exported.graph.nodes}
    with torch.no_grad():
        assert torch.equal(exported.module()(x), fast(x))
        assert_close(model(x), exported.module()(x))
