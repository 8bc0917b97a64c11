"""The ghost skip keeps clear of oneDNN's broken strided 1x1 weight gradient (see ``_modules``).

oneDNN's AVX2 kernel for the weight gradient of a strided 1x1 conv with 2-7 input channels in
channels_last corrupts the heap or hangs; the ghost skip beside an RGB stem conv was that conv.
``ONEDNN_MAX_CPU_ISA=AVX2`` (a oneDNN setting) gives an AVX-512 machine the kernels a CPU
without AVX-512 (an AMD EPYC before Zen 4) runs, so the training check below runs them anywhere
on x86.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tost_surgery._modules import GhostSkip


@pytest.mark.parametrize(
    ("in_channels", "groups", "strided"),
    [(3, 1, False), (7, 1, False), (8, 1, True), (12, 3, False), (16, 2, True)],
)
def test_branch_conv_is_strided_only_with_8_or_more_channels_per_group(in_channels, groups, strided) -> None:
    conv = nn.Conv2d(in_channels, 2 * in_channels, 3, stride=2, padding=1, groups=groups)
    skip = GhostSkip(conv, branch="conv_bn", init=0.5).eval()  # eval: the BN does not cancel the weight's scale
    assert skip.conv.stride == ((2, 2) if strided else (1, 1))
    nn.init.normal_(skip.conv.weight)
    x = torch.randn(4, in_channels, 16, 16).contiguous(memory_format=torch.channels_last)
    out = skip(x)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()

    # Dense reference: the 1x1 conv on the subsampled input, oneDNN off.
    weight = skip.conv.weight.detach().clone().requires_grad_(True)
    bn = GhostSkip(conv, branch="conv_bn").bn.eval()
    with torch.backends.mkldnn.flags(enabled=False):
        expected = bn(F.conv2d(x.contiguous()[..., ::2, ::2], weight, groups=groups))
        (expected * upstream).sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(skip.conv.weight.grad, weight.grad)


TRAIN = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from torch import nn
    import tost_surgery as tost

    def train(threads):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )
        model = tost.prepare(model, tost.masks.erk(model, 0.5, seed=0), tost.Recipe.tost(4))
        model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        tost.bind(model, optimizer)
        for step in range(3):
            generator = torch.Generator().manual_seed(step)
            x = torch.randn(4, 3, 16, 16, generator=generator).contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad()
            F.cross_entropy(model(x), torch.randint(0, 10, (4,), generator=generator)).backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    for threads in (1, 2):
        onednn = train(threads)
        with torch.backends.mkldnn.flags(enabled=False):
            native = train(threads)
        worst = max(float((a - b).abs().max()) for a, b in zip(onednn, native))
        assert worst < 1e-4, (threads, worst)
        print(f"threads={threads} worst={worst:.2g}")
    """
)


def test_prepared_rgb_model_trains_on_onednn_avx2_kernels() -> None:
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", TRAIN], capture_output=True, text=True, timeout=300, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exit code {result.returncode} (negative: killed by that signal)\n{output}"
    assert "threads=1" in output and "threads=2" in output, output
