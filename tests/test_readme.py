"""Every Python block of README.md runs as written, with small stand-ins for the names it assumes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import tost_surgery as tost

from .conftest import TinyNet, bernoulli_mask

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def stand_ins() -> dict[str, object]:
    """What the README's snippets take as given: a model, its data, a mask, a recipe."""
    torch.manual_seed(0)
    model = TinyNet()
    generator = torch.Generator().manual_seed(0)
    loader = [(torch.randn(4, 3, 16, 16, generator=generator), torch.randint(0, 10, (4,), generator=generator))
              for _ in range(3)]
    x, y = loader[0]
    return {"model": model, "loader": loader, "epochs": 1, "x": x, "y": y, "mask": bernoulli_mask(model),
            "recipe": tost.Recipe.tost(total_steps=len(loader))}


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int, tmp_path, monkeypatch) -> None:
    block = BLOCKS[index]
    monkeypatch.chdir(tmp_path)
    needs_group = "DDP(" in block or "check_masks_match" in block
    if needs_group:  # a one-process group, as torchrun would set up on every rank
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        exec(compile(block, f"README.md block {index}", "exec"), stand_ins())  # noqa: S102 - the docs' own code
    finally:
        if needs_group:
            dist.destroy_process_group()
