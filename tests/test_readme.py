"""Every Python block of README.md and docs/*.md runs as written, with small stand-ins for the names it assumes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import tost_surgery as tost

from .conftest import TinyNet, bernoulli_mask

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (f"{doc.relative_to(ROOT)} block {i}", block)
    for doc in DOCS
    for i, block in enumerate(re.findall(r"^```python\n(.*?)^```", doc.read_text(), flags=re.S | re.M))
]


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


def test_the_docs_have_python_blocks() -> None:
    assert sum(name.startswith("README.md") for name, _ in BLOCKS) >= 1 and len(BLOCKS) >= 2


@pytest.mark.parametrize(("name", "block"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_docs_block_runs(name: str, block: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    needs_group = "DDP(" in block or "check_masks_match" in block
    if needs_group:  # a one-process group, as torchrun would set up on every rank
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        exec(compile(block, name, "exec"), stand_ins())  # noqa: S102 - the docs' own code
    finally:
        if needs_group:
            dist.destroy_process_group()
