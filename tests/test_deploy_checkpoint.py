"""deploy.save / deploy.load: compressed, readable with weights_only=True, bit-exact back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tost_surgery import TostSurgeryError, deploy
from tost_surgery.deploy._checkpoint import decode, encode

from .conftest import TinyNet, bernoulli_mask, masked_reference
from .test_deploy import timer_with

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so equality is bitwise (-0.0 != 0.0, NaN == NaN)."""
    return t.contiguous().view(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name]), bits(b[name])), name


def sparse_tensor(shape: tuple[int, ...], density: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator) * 4
    values = values * (torch.rand(shape, generator=generator) < density)  # leaves -0.0 where values < 0
    return values.to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=0, max_size=4).map(tuple),
    density=st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]),
    dtype=st.sampled_from(DTYPES),
    signed_zeros=st.booleans(),
    seed=st.integers(0, 3),
)
def test_every_encoding_round_trips_bit_exactly(shape, density, dtype, signed_zeros, seed) -> None:
    tensor = sparse_tensor(shape, density, dtype, seed)
    back = decode(encode(tensor, signed_zeros))
    if signed_zeros or not tensor.is_floating_point():
        assert_bit_exact({"t": tensor}, {"t": back})
    else:  # -0.0 comes back as +0.0: equal values
        assert torch.equal(tensor, back) and not torch.signbit(back[back == 0]).any()


def test_special_values_round_trip() -> None:
    tensor = torch.zeros(4, 40)
    tensor[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    tensor[1, 7] = 1e-45  # a subnormal
    tensor.view(torch.int32)[2, 3] = 0x7FC00001  # a NaN with a payload
    for entry in (encode(tensor), encode(tensor.double()), encode(tensor.half())):
        assert entry["encoding"] in {"csr", "bitmask"}
        original = tensor.to(entry["values"].dtype)
        assert_bit_exact({"t": original}, {"t": decode(entry)})


def test_save_load_round_trip_under_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    model = masked_reference(model, bernoulli_mask(model, density=0.05))
    model.bn1.running_mean.uniform_()
    path = tmp_path / "model.tost.pt"
    size = deploy.save(model, path)
    assert size == os.path.getsize(path)
    raw = torch.load(path, weights_only=True)  # plain data: no pickled classes
    assert raw["format"] == "tost_surgery.deploy.checkpoint" and set(raw["tensors"]) == set(model.state_dict())
    state = deploy.load(path)
    assert_bit_exact(model.state_dict(), state)
    fresh = TinyNet()
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_a_sparse_model_saves_smaller(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    model = masked_reference(model, bernoulli_mask(model, density=0.02))
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    signed = deploy.save(model, tmp_path / "signed.pt")
    unsigned = deploy.save(model.state_dict(), tmp_path / "unsigned.pt", signed_zeros=False)
    assert unsigned < signed < os.path.getsize(tmp_path / "dense.pt")
    encodings = {e["encoding"] for e in torch.load(tmp_path / "signed.pt", weights_only=True)["tensors"].values()}
    assert "dense" in encodings and encodings & {"csr", "bitmask"}  # BatchNorm stays dense, weights do not


def test_save_refuses_an_accelerated_copy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet().eval()
    fast = deploy.accelerate(model, torch.randn(1, 3, 16, 16), timer=timer_with({}))
    with pytest.raises(TostSurgeryError, match="(?s)copy deploy.accelerate returned.*Hint: deploy.save\\(model"):
        deploy.save(fast, tmp_path / "x.pt")


def test_save_refuses_what_is_not_a_state_dict(tmp_path: Path) -> None:
    with pytest.raises(TostSurgeryError, match="takes an nn.Module or a state_dict, found list"):
        deploy.save([torch.ones(1)], tmp_path / "x.pt")
    with pytest.raises(TostSurgeryError, match="(?s)entry 'step' is not a tensor.*found: int"):
        deploy.save({"w": torch.ones(2), "step": 3}, tmp_path / "x.pt")


def test_load_says_what_it_found(tmp_path: Path) -> None:
    with pytest.raises(TostSurgeryError, match="No checkpoint at"):
        deploy.load(tmp_path / "missing.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(TostSurgeryError, match="(?s)is not a deploy checkpoint.*found: a dict with keys \\['w'\\]"):
        deploy.load(tmp_path / "plain.pt")
    deploy.save({"w": torch.ones(2)}, tmp_path / "ours.pt")
    saved = torch.load(tmp_path / "ours.pt", weights_only=True)
    torch.save({**saved, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(TostSurgeryError, match="(?s)expected: version 1\nfound: version 99"):
        deploy.load(tmp_path / "future.pt")
