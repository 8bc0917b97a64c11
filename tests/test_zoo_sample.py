"""Round trip on a fixed sample of real architectures across families (issue: every model).

prepare -> two training steps -> step to the end -> finalize, checking the invariants that
matter for each: the rewritten graph equals the masked model, finalize is exact, and the model
comes back as it was. The detailed invariants are in test_zoo.py; the full sweep is
benchmarks/coverage.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import tost_surgery as tost

from .conftest import masked_reference

pytestmark = pytest.mark.zoo
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# (source, name, build kwargs, input size, family note)
SAMPLE = [
    ("tv", "resnet18", {}, 32, "CNN with BN"),
    ("tv", "mobilenet_v3_small", {}, 32, "depthwise, hardswish"),
    ("tv", "regnet_x_400mf", {}, 32, "RegNet"),
    ("tv", "densenet121", {}, 32, "DenseNet"),
    ("tv", "squeezenet1_1", {}, 64, "no BN"),
    ("tv", "shufflenet_v2_x0_5", {}, 32, "channel shuffle"),
    ("tv", "googlenet", {"aux_logits": False, "init_weights": False}, 32, "inception branches"),
    ("tv", "efficientnet_b0", {}, 32, "torchvision EfficientNet"),
    ("tv", "mnasnet0_5", {}, 32, "MNASNet"),
    ("timm", "resnet18", {}, 32, "CNN with BN"),
    ("timm", "efficientnet_b0", {"drop_rate": 0.2}, 32, "BatchNormAct2d (SiLU), dropout"),
    ("timm", "mnasnet_100", {}, 32, "BatchNormAct2d with ReLU"),
    ("timm", "tf_efficientnet_b0", {}, 33, "Conv2dSame (TF padding), odd size"),
    ("timm", "mobilenetv3_small_050", {}, 32, "depthwise, traced-dropout trap"),
    ("timm", "rexnet_100", {}, 32, "traced-dropout trap"),
    ("timm", "convnext_atto", {}, 32, "ConvNeXt, LayerNorm"),
    ("timm", "regnetx_002", {}, 32, "RegNet"),
    ("timm", "densenet121", {}, 32, "DenseNet"),
    ("timm", "resnetv2_50x1_bit", {}, 32, "StdConv2d, GroupNorm"),
    ("timm", "nf_resnet26", {}, 32, "norm-free, blocks kept whole by timm"),
    ("timm", "vit_tiny_patch16_224", {"img_size": 32}, 32, "ViT"),
    ("timm", "deit_tiny_patch16_224", {"img_size": 32}, 32, "ViT"),
    ("timm", "mixer_s16_224", {"img_size": 32}, 32, "MLP-mixer"),
    ("timm", "levit_128s", {"img_size": 64}, 64, "attention-bias cache trap"),
    ("timm", "efficientformer_l1", {}, 224, "attention-bias cache trap (fixed input size)"),
    ("timm", "hiera_tiny_224", {"img_size": 64}, 64, "optional mask=None argument trap"),
    ("timm", "ghostnet_100", {}, 32, "GhostNet"),
]


def build(source: str, name: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    if source == "tv":
        return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def first_tensor(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return first_tensor(next(iter(out.values())))
    return first_tensor(out[0])


@pytest.mark.parametrize(
    ("source", "name", "kwargs", "size"),
    [case[:4] for case in SAMPLE],
    ids=[f"{case[0]}:{case[1]}" for case in SAMPLE],
)
def test_round_trip(source: str, name: str, kwargs: dict, size: int) -> None:
    model = build(source, name, kwargs)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    mask = tost.masks.erk(model, 0.9, seed=0)
    reference = masked_reference(model, mask).eval()
    keys = list(model.state_dict())
    param_ids = [id(p) for p in model.parameters()]

    # The rewritten graph itself, with no scaffolding, equals the masked model.
    baseline = tost.prepare(masked_reference(model, mask), mask).eval()
    with torch.no_grad():
        torch.testing.assert_close(first_tensor(baseline(x)), first_tensor(reference(x)), rtol=1e-5, atol=1e-5)

    tost.prepare(model, mask, tost.Recipe.tost(total_steps=4, warmup=0.5, skip_pointwise=True))
    # Adam's step is bounded: with batch 2 at these input sizes many BatchNorms see 2 values, and
    # the paper's 1e-4-filled skip branch gets 1e4x gradients, which SGD would turn into overflow.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tost.bind(model, optimizer)
    model.train()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        logits = first_tensor(model(x)).float()
        smoothing = tost.label_smoothing(model)
        torch.nn.functional.cross_entropy(logits, torch.arange(2), label_smoothing=smoothing).backward()
        optimizer.step()
    tost.step(model, 2)
    model.eval()
    with torch.no_grad():
        prepared_out = first_tensor(model(x))
    tost.finalize(model)
    with torch.no_grad():
        final_out = first_tensor(model(x))
    scale = max(1.0, prepared_out.abs().max().item())
    assert torch.isfinite(prepared_out).all()
    assert (final_out - prepared_out).abs().max().item() <= 1e-5 * scale
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == param_ids
    assert not hasattr(model, "tost") and "forward" not in model.__dict__
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    params = dict(model.named_parameters())
    assert all((params[n][~m] == 0).all() for n, m in mask.items())
    model.train()
    first_tensor(model(x))  # the original forward still runs in both modes
