"""Channels on a path of kept weights (``_paths``) and layers on every path of a graph (``on_every_path``)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from tost_surgery._fx._patterns import on_every_path
from tost_surgery._paths import channels_on_paths


def test_a_channel_counts_only_if_the_input_reaches_it_and_it_reaches_the_output() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)
    )
    nn.init.zeros_(model[3].weight)  # a zero scale or a bias is not a path of kept weights
    before = {name: p.clone() for name, p in model.state_dict().items()}
    first = torch.zeros(4, 3, 1, 1, dtype=torch.bool)
    first[0, 0] = first[1, 1] = first[3, 2] = True  # channel 2 keeps nothing
    second = torch.zeros(4, 4, 1, 1, dtype=torch.bool)
    second[0, 0] = second[1, 2] = second[2, 3] = second[3, 1] = True  # 1 reads the empty channel
    head = torch.zeros(2, 4, dtype=torch.bool)
    head[0, 0] = head[1, 1] = True  # reads channels 0 and 1 of the second conv only
    mask = {"0.weight": first, "2.weight": second, "6.weight": head}
    assert channels_on_paths(model, mask, (3, 1, 1)) == {"0": (1, 4), "2": (1, 4), "6": (1, 2)}
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    density=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**16),
)
def test_channels_on_paths_match_boolean_reachability(widths: list[int], density: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    model = nn.Sequential(*(m for layer in layers for m in (layer, nn.ReLU())))
    masks = [torch.rand(layer.weight.shape, generator=generator) < density for layer in layers]
    forward = [torch.ones(widths[0], dtype=torch.bool)]
    for m in masks:
        forward.append((m.double() @ forward[-1].double()) > 0)
    backward = [torch.ones(widths[-1], dtype=torch.bool)]
    for m in reversed(masks):
        backward.insert(0, (m.double().T @ backward[0].double()) > 0)
    expected = {str(2 * i): (int((forward[i + 1] & backward[i + 1]).sum()), widths[i + 1]) for i in range(len(masks))}
    found = channels_on_paths(model, {f"{2 * i}.weight": m for i, m in enumerate(masks)}, (widths[0],))
    assert found == expected


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.twice, self.head = nn.ReLU(), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.twice(self.stem(x))
        x = x + self.conv2(self.conv1(x))
        return self.head(self.twice(x))


def test_on_every_path_leaves_out_residual_branches_and_modules_called_twice() -> None:
    graph = fx.symbolic_trace(_Residual()).graph
    names = ["stem", "conv1", "conv2", "twice", "head"]
    assert on_every_path(graph, names) == frozenset({"stem", "head"})
    assert on_every_path(graph, ["conv1"]) == frozenset()
    chain = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))).graph
    assert on_every_path(chain, ["0", "1", "2"]) == frozenset({"0", "1", "2"})


def test_a_single_path_beside_wide_ones_is_found_however_deep() -> None:
    depth = 40  # channel 0 has 1 path, the others 15**depth: far below float32's range relative to them
    model = nn.Sequential(*(nn.Linear(16, 16) for _ in range(depth)))
    block = torch.zeros(16, 16, dtype=torch.bool)
    block[0, 0] = True
    block[1:, 1:] = True
    mask = {f"{i}.weight": block for i in range(depth)}
    assert channels_on_paths(model, mask, (16,)) == {str(i): (16, 16) for i in range(depth)}


def test_every_position_of_a_max_pool_window_leads_on() -> None:
    # conv 0: channel 0 reads the centre tap (reached at both positions), channel 1 the left tap
    # (reached at position 1 only); conv 1 reads both at the centre, so its two positions tie and a
    # max pool's gradient would go to position 0 only, missing channel 1's path through position 1.
    model = nn.Sequential(
        nn.Conv2d(1, 2, (1, 3), padding=(0, 1)), nn.ReLU(), nn.Conv2d(2, 1, (1, 3), padding=(0, 1)),
        nn.MaxPool2d((1, 2)), nn.Flatten(), nn.Linear(1, 1),
    )  # fmt: skip
    first = torch.zeros(2, 1, 1, 3, dtype=torch.bool)
    first[0, 0, 0, 1] = first[1, 0, 0, 0] = True
    second = torch.zeros(1, 2, 1, 3, dtype=torch.bool)
    second[0, :, 0, 1] = True
    mask = {"0.weight": first, "2.weight": second, "5.weight": torch.ones(1, 1, dtype=torch.bool)}
    assert channels_on_paths(model, mask, (1, 1, 2)) == {"0": (2, 2), "2": (1, 1), "5": (1, 1)}
