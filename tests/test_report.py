"""``report``: per-layer and global densities of a mask, a plain model, or a prepared model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

import tost_surgery as tost
from tost_surgery import MaskError
from tost_surgery._report import LayerRow, Report, report

from .conftest import TinyNet, bernoulli_mask


class SquareMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def assert_rows_add_up(result: Report) -> None:
    assert result.kept == sum(row.kept for row in result.rows)
    assert result.total == sum(row.total for row in result.rows)
    assert result.density == result.kept / result.total
    for row in result.rows:
        assert row.total == torch.Size(row.shape).numel() and 0 <= row.kept <= row.total
        assert row.density == row.kept / row.total


def test_mask_report(tiny: TinyNet) -> None:
    mask = bernoulli_mask(tiny, density=0.3)
    mask["fc.weight"] = mask["fc.weight"].float()  # 0/1 floats count the same

    result = report(mask)

    assert_rows_add_up(result)
    assert [row.name for row in result.rows] == list(mask)
    assert result.rows[0] == LayerRow(
        "conv1.weight", (8, 3, 3, 3), int(mask["conv1.weight"].sum()), 216, int(mask["conv1.weight"].sum()) / 216
    )
    assert result.kept == sum(int(m.sum()) for m in mask.values()) and result.total == 2104
    assert all(row.scaffolding == "" for row in result.rows)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_rows_add_up_to_the_global_line(tiny: TinyNet, sparsity: float) -> None:
    mask = tost.masks.erk(tiny, sparsity, seed=0)
    for result in (report(mask), report(tost.prepare(copy.deepcopy(tiny), mask)), report(tiny)):
        assert_rows_add_up(result)
    assert report(mask).kept == round((1 - sparsity) * 2104)


def test_plain_text_has_every_layer_and_the_global_line(tiny: TinyNet) -> None:
    result = report(tost.masks.random(tiny, 0.75, seed=0))

    text = str(result)

    lines = text.splitlines()
    for row in result.rows:
        line = next(line for line in lines if row.name in line)
        assert f"{row.kept:,}" in line and f"{row.total:,}" in line and f"{row.density:.4f}" in line
    footer = next(line for line in lines if "global" in line)
    assert f"{result.kept:,}" in footer and f"{result.total:,}" in footer and f"{result.density:.4f}" in footer
    assert lines.index(footer) > max(i for i, line in enumerate(lines) if "fc.weight" in line)
    assert "\x1b" not in text  # plain text, no colour codes
    table = result.__rich__()
    assert isinstance(table, Table) and table.row_count == len(result.rows) and table.show_footer
    console = Console(record=True, width=120, file=None, force_terminal=False)
    with console.capture() as capture:
        console.print(result)
    assert "conv3.weight" in capture.get()


def test_prepared_model_rows_show_scaffolding(tiny: TinyNet) -> None:
    mask = bernoulli_mask(tiny, density=0.3)
    recipe = tost.Recipe.tost(total_steps=10, skip_branch="auto", rescale_scope="all")
    model = tost.prepare(tiny, mask, recipe)
    skips = model.tost.surgery.runner.context.conv_to_skip
    assert skips == {
        "conv1": "tost.skips.tost_skip_0",
        "conv2": "tost.skips.tost_skip_1",
        "conv3": "tost.skips.tost_skip_2",
    }
    rescaled = model.tost.surgery.decided.rescaled

    result = report(model)

    assert_rows_add_up(result)
    scaffolding = {row.name: row.scaffolding for row in result.rows}
    assert scaffolding == {
        "conv1.weight": f"ghost skip tost_skip_0 (conv1x1+bn), rescaled x{rescaled['conv1.weight']:.2f}",
        "conv2.weight": f"ghost skip tost_skip_1 (bn), rescaled x{rescaled['conv2.weight']:.2f}",
        "conv3.weight": f"ghost skip tost_skip_2 (conv1x1+bn), rescaled x{rescaled['conv3.weight']:.2f}",
        "fc.weight": f"rescaled x{rescaled['fc.weight']:.2f}",
    }
    assert [(r.name, r.kept) for r in result.rows] == [(r.name, r.kept) for r in report(mask).rows]
    text = str(result)
    assert "ghost skip tost_skip_1 (bn)" in text and "scaffolding" in text

    tost.step(model, 3)  # warm-up is 30% of 10 steps: the skips retire
    assert "(retired)" in report(model).rows[0].scaffolding


def test_prepared_square_linear_shows_its_identity_skip() -> None:
    torch.manual_seed(0)
    model = SquareMLP()
    mask = tost.masks.random(model, 0.5, seed=0)
    tost.prepare(model, mask, tost.Recipe.tost(total_steps=10, skip_linear=True, rescale_init=False))
    assert [row.scaffolding for row in report(model).rows] == ["identity skip", ""]


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so prepare calls it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if x.sum() > 0 else x


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.gate(x)))


def test_prepared_model_notes_are_shown_under_the_table() -> None:
    model = GatedNet()
    mask = tost.masks.random(model, 0.5, seed=0)
    with pytest.warns(UserWarning, match="cannot be traced"):
        tost.prepare(model, mask, tost.Recipe.tost(total_steps=10))

    result = report(model)

    assert result.notes and result.notes[0].startswith("gate (Gate) called whole")
    assert "note: gate (Gate) called whole" in str(result)
    assert result.to_dict()["notes"] == list(result.notes)
    assert not report(mask).notes


def test_names_are_not_read_as_markup() -> None:
    text = str(report({"[bold]w": torch.ones(2, 2, dtype=torch.bool)}))
    assert "[bold]w" in text


def test_prepared_model_reports_the_mask_its_parametrizations_hold(tiny: TinyNet) -> None:
    model = tost.prepare(tiny, bernoulli_mask(tiny, density=0.3))
    other = bernoulli_mask(TinyNet(), density=0.6, seed=1)
    state = model.state_dict()
    for name, value in other.items():
        module, _, attr = name.rpartition(".")
        state[f"{module}.parametrizations.{attr}.0.mask"] = value.float()
    model.load_state_dict(state)
    assert report(model) == report(other)


def test_finalized_model_report_equals_the_mask_report(tiny: TinyNet, images: torch.Tensor) -> None:
    mask = tost.masks.erk(tiny, 0.8, seed=0)
    model = tost.prepare(tiny, mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        loss = F.cross_entropy(model(images), torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert report(model) == report(mask)

    tost.finalize(model)

    assert not hasattr(model, "tost")
    assert report(model) == report(mask)
    assert str(report(model)).splitlines()[1:] == str(report(mask)).splitlines()[1:]  # all but the title


def test_to_dict_is_plain_data(tiny: TinyNet) -> None:
    result = report(tost.prepare(tiny, bernoulli_mask(tiny), tost.Recipe.tost(total_steps=10)))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["kept"] == result.kept and data["total"] == result.total and data["density"] == result.density
    assert data["rows"][0] == {
        "name": "conv1.weight",
        "shape": [8, 3, 3, 3],
        "kept": result.rows[0].kept,
        "total": 216,
        "density": result.rows[0].density,
        "scaffolding": result.rows[0].scaffolding,
    }
    assert len(data["rows"]) == 4 and "TinyNet" in data["title"]


def test_errors() -> None:
    with pytest.raises(MaskError, match="report takes a mask .* or an nn.Module, found int"):
        report(42)
    with pytest.raises(MaskError, match="empty mask"):
        report({})
    with pytest.raises(MaskError, match="'w' is not binary.*\n.*Hint"):
        report({"w": torch.tensor([0.0, 0.5])})
    with pytest.raises(MaskError, match="'w' must be a torch.Tensor, found list"):
        report({"w": [1, 0]})
