"""Smoke runs of ``benchmarks/accuracy.py``, ``overhead.py``, ``gpu_check.py``, ``deploy.py`` and
``train_speed.py`` at tiny sizes.

They check that the scripts run end to end and write their files with the expected columns;
never a timing or an accuracy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
DATA = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def run(script: str, *args: str, timeout: int = 300) -> str:
    """Run a benchmark script; ``timeout`` stays under the per-test limit so a hung script is killed."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@pytest.mark.skipif(not DATA.is_file(), reason=f"the CIFAR-10 subset is not at {DATA}")
def test_accuracy_smoke(tmp_path: Path) -> None:
    common = ["--epochs", "1", "--subset", "256", "--masks", "erk", "--sparsities", "0.9", "--out", str(tmp_path)]
    output = run("accuracy.py", "--grid", "main", "--seeds", "0", "--threads", "1", *common)
    assert "2 to run now" in output, output

    records = [json.loads(line) for line in (tmp_path / "accuracy.jsonl").read_text().splitlines()]
    assert sorted(r["key"]["variant"] for r in records) == ["baseline", "tost"]
    assert all("kernels" not in r["key"] and "kernel_choices" not in r for r in records)  # keys as before
    for record in records:
        for field in ("test_acc", "val_acc", "train_loss", "wall_s", "device", "threads", "commit", "mask_sha"):
            assert field in record, field
        assert 0.0 <= record["test_acc"] <= 1.0
        assert record["masked_nonzero"] == 0
    # Same mask and same initial weights for both protocols of a seed.
    assert len({r["mask_sha"] for r in records}) == 1 and len({r["init_sha"] for r in records}) == 1

    again = run("accuracy.py", "--grid", "main", "--seeds", "0", *common)
    assert "0 to run now" in again, again  # finished runs are skipped
    kernels = run("accuracy.py", "--variants", "baseline", "--seeds", "0", "--sparse-kernels", "on", *common)
    assert "1 to run now" in kernels, kernels  # the kernels are part of the key

    sparse = json.loads((tmp_path / "accuracy.jsonl").read_text().splitlines()[-1])
    assert sparse["key"]["kernels"] == "on" and sparse["masked_nonzero"] == 0
    assert sparse["kernel_choices"] and all(c.startswith("sparse") for c in sparse["kernel_choices"].values())

    run("accuracy.py", "--report", *common)
    markdown = (tmp_path / "accuracy.md").read_text()
    header = "| mask | sparsity | default (baseline) | ToST | gain | seeds | ToST beats default? |"
    assert header in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| erk | 0.90 |"))
    assert "pending" not in row and row.count("|") == header.count("|")
    assert "## `resnet20`: CIFAR ResNet-20" in markdown and "## Budget" in markdown
    assert "Ablation" not in markdown  # no ablation run: no section
    report = json.loads((tmp_path / "accuracy.json").read_text())
    (section,) = report["architectures"]
    main = next(r for r in section["main"] if r["mask"] == "erk" and r["sparsity"] == 0.9)
    assert main["paired"] == 1 and set(main) >= {"baseline", "tost", "gain", "verdict"}  # kernels runs stay out
    (kernel_row,) = section["kernels"]
    assert (kernel_row["kernels"], kernel_row["variant"]) == ("on", "baseline")
    assert kernel_row["per_seed"]["dense"] == {"0": main["per_seed"]["baseline"]["0"]}
    assert "### Sparse training kernels against dense (test)" in markdown
    (pooled,) = section["pooled"]
    assert pooled["pairs"] == 1 and pooled["gain"]["mean"] == pytest.approx(main["gain"]["mean"])
    assert "| sparsity | masks | pairs | gain | ToST beats default? |" in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SMOKE_ARCHS = ("resnet32", "preact_resnet18_x0.25")
"""Two of the new architectures end to end (every one is built and prepared in the scope test below)."""


@pytest.mark.skipif(not DATA.is_file(), reason=f"the CIFAR-10 subset is not at {DATA}")
def test_accuracy_smoke_on_two_architectures(tmp_path: Path) -> None:
    common = ["--epochs", "1", "--subset", "64", "--masks", "erk", "--sparsities", "0.9", "--seeds", "0",
              "--out", str(tmp_path)]  # fmt: skip
    output = run("accuracy.py", "--grid", "main", "--arch", *SMOKE_ARCHS, *common, timeout=300)
    assert "4 to run now" in output, output
    scope = "rescale_scope=unnormalized"  # the old default, which rescales the ends of residual branches
    run("accuracy.py", "--variants", "tost", "--eval-on", "val", "--set", scope,
        "--arch", "preact_resnet18_x0.25", *common, timeout=300)  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "accuracy.jsonl").read_text().splitlines()]
    assert sorted({r["key"]["arch"] for r in records}) == sorted(SMOKE_ARCHS)
    assert len({r["id"] for r in records}) == 5 and all(r["masked_nonzero"] == 0 for r in records)
    for arch in SMOKE_ARCHS:  # both protocols of an architecture start from one mask and one init
        mine = [r for r in records if r["key"]["arch"] == arch]
        assert len({r["mask_sha"] for r in mine}) == 1 and len({r["init_sha"] for r in mine}) == 1, arch

    run("accuracy.py", "--report", *common)
    report = json.loads((tmp_path / "accuracy.json").read_text())
    assert [s["protocol"]["arch"] for s in report["architectures"]] == list(SMOKE_ARCHS)  # ARCHITECTURES order
    for section in report["architectures"]:
        (row,) = section["main"]
        assert row["paired"] == 1, section["protocol"]["arch"]
    (across,) = report["across"]
    assert across["pairs"] == 2 and across["archs"] == list(SMOKE_ARCHS)
    preact = report["architectures"][-1]
    (candidate,) = preact["candidates"]
    assert candidate["overrides"] == {"rescale_scope": "unnormalized"} and candidate["pairs"] == 1
    markdown = (tmp_path / "accuracy.md").read_text()
    for arch in SMOKE_ARCHS:
        assert f"## `{arch}`: " in markdown
    assert "| 0.90 | resnet32, preact_resnet18_x0.25 | 2 |" in markdown
    assert "| preact_resnet18_x0.25 | 3 |" in markdown  # the budget's row: 3 runs


def test_the_nonresidual_scope_changes_only_the_pre_activation_network() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import cifar
    finally:
        sys.path.remove(str(BENCHMARKS))
    import tost_surgery as tost

    changed = []
    for arch, build in cifar.ARCHITECTURES.items():
        rescaled = {}
        for scope in ("unnormalized", "unnormalized_nonresidual"):
            model = build()
            recipe = tost.Recipe.tost(total_steps=10, rescale_scope=scope)
            tost.prepare(model, tost.masks.erk(model, 0.98, seed=0), recipe)
            rescaled[scope] = set(model.tost.surgery.decided.rescaled)
        if rescaled["unnormalized"] != rescaled["unnormalized_nonresidual"]:
            changed.append(arch)
            assert rescaled["unnormalized_nonresidual"] == {"conv1.weight", "fc.weight"}  # the stem and the head
    assert changed == ["preact_resnet18_x0.25"]


def test_overhead_smoke(tmp_path: Path) -> None:
    run(
        "overhead.py", "--models", "tiny_cnn", "--prepare-models", "tiny_cnn", "--batch", "2", "--image-size", "16",
        "--repeats", "2", "--warmup-iters", "1", "--prepare-repeats", "1", "--memory-steps", "2",
        "--out", str(tmp_path),
    )  # fmt: skip
    report = json.loads((tmp_path / "overhead.json").read_text())
    (step,) = report["steps"]
    assert set(step["median_ms"]) == set("abcde")
    assert set(step["ratio_to"]) == {"a", "b", "c"} and step["ratio_to"]["a"]["a"] == 1.0
    assert set(report["memory"]["tiny_cnn"]) == set("abcde")
    assert all(m["peak_bytes"] > 0 for m in report["memory"]["tiny_cnn"].values())
    (prepare,) = report["prepare"]
    assert {"prepare_s", "finalize_s", "retire_s", "mask_s"} <= set(prepare)

    markdown = (tmp_path / "overhead.md").read_text()
    assert "| model | variant | median ms | x (a) dense | x (b) prune | x (c) masks | peak MiB |" in markdown
    assert sum(line.startswith("| tiny_cnn | (") for line in markdown.splitlines()) == 5
    assert "| model | target | measured (IQR over rounds) | met? |" in markdown
    assert "| model | params (M) | erk mask s | prepare s (ToST) |" in markdown

    (tmp_path / "overhead.md").unlink()
    run("overhead.py", "--render", "--out", str(tmp_path))  # the Markdown again, from the JSON alone
    assert (tmp_path / "overhead.md").read_text() == markdown


def _accuracy_module():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("accuracy_under_test", BENCHMARKS / "accuracy.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_accuracy_runs_are_identified_by_their_recipe() -> None:
    accuracy = _accuracy_module()
    common = dict(arch="resnet20", mask="erk", sparsity=0.98, seed=0, epochs=20, eval="val")
    no_skips = accuracy.RunKey(variant="no_skips", **common)
    same = accuracy.RunKey(variant="tost", overrides=(("ghost_skips", False),), **common)
    assert no_skips.id == same.id  # two names of one Recipe: one run
    assert no_skips.id != accuracy.RunKey(variant="tost", **common).id
    assert no_skips.id != accuracy.RunKey(variant="no_skips", **{**common, "seed": 1}).id

    record = {"key": no_skips.to_dict(), "recipe": {**no_skips.recipe(), "total_steps": 720}}
    assert accuracy.record_id(record) == no_skips.id
    assert ("no_skips", "{}") in accuracy.labels_of(record) and ("tost", "{}") not in accuracy.labels_of(record)
    # A field the record predates takes its default; a default that changed since makes it stale.
    older = {**record, "recipe": {k: v for k, v in record["recipe"].items() if k != "skip_pointwise"}}
    assert accuracy.record_id(older) == no_skips.id
    # A record made before a default changed is reported under the overrides that give its Recipe back.
    warmup = record["recipe"]["warmup"] + 0.1
    stale = {**record, "recipe": {**record["recipe"], "warmup": warmup}}
    assert accuracy.labels_of(stale) == [("no_skips", json.dumps({"warmup": warmup}))]
    assert accuracy.record_id(stale) != no_skips.id
    # Overrides that today's defaults equal are dropped from the label: no row of ToST against itself.
    tost_key = accuracy.RunKey(variant="tost", overrides=(("warmup", accuracy.RECIPE_DEFAULTS["warmup"]),), **common)
    same_as_tost = {"key": tost_key.to_dict(), "recipe": {**tost_key.recipe(), "total_steps": 720}}
    assert accuracy.labels_of(same_as_tost) == [("tost", "{}")]
    # Settings of a technique that is off do not make another run.
    baseline = accuracy.RunKey(variant="baseline", **common)
    assert baseline.id == accuracy.RunKey(variant="baseline", overrides=(("skip_init", 0.5),), **common).id


@pytest.mark.skipif(not DATA.is_file(), reason=f"the CIFAR-10 subset is not at {DATA}")
def test_accuracy_runs_gradinit_when_the_recipe_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    accuracy = _accuracy_module()
    monkeypatch.setattr(accuracy, "GRADINIT_STEPS", 2)
    common = dict(arch="resnet20", mask="erk", sparsity=0.9, seed=0, epochs=1, eval="val", subset=256)
    key = accuracy.RunKey(variant="only_rescale", overrides=(("rescale_rule", "gradinit"),), **common)
    record = accuracy.run_one(key, str(DATA), "cpu", 1, log=lambda _: None)
    report = record["gradinit"]
    assert report["steps"] == 2 and record["gradinit_s"] > 0
    assert [layer["name"] for layer in report["layers"]] == ["fc.weight"]  # the scope: layers feeding no norm
    assert report["layers"][0]["scale"] != 1.0 and record["masked_nonzero"] == 0
    plain = accuracy.run_one(accuracy.RunKey(variant="only_rescale", **common), str(DATA), "cpu", 1, log=lambda _: None)
    assert "gradinit" not in plain


def test_gpu_check_runs_on_cpu(tmp_path: Path) -> None:
    output = run(
        "gpu_check.py", "--device", "cpu", "--models", "resnet18", "--modes", "fp32", "bf16",
        "--image-size", "32", "--batch", "2", "--steps", "2", "--out", str(tmp_path),
    )  # fmt: skip
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [("resnet18", "fp32"), ("resnet18", "bf16")]
    for row in rows:
        assert row["ok"], row
        assert row["masked_nonzero"] == 0 and row["baseline_vs_reference"] == 0.0
    assert "resnet18" in output

    table = output[output.index("GPU check on cpu") :]
    again = run("gpu_check.py", "--report", "--out", str(tmp_path))  # the table again, from the JSON alone
    assert again[again.index("GPU check on cpu") :] == table


def test_gpu_check_report_needs_the_directory_of_its_json(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", BENCHMARKS / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--report"])
    assert "--report reads <out>/gpu_check.json: pass --out DIR" in capsys.readouterr().err


def test_deploy_smoke(tmp_path: Path) -> None:
    run(
        "deploy.py", "--models", "tiny_cnn", "--masks", "erk", "uniform", "--sparsities", "0.9", "--batches", "1",
        "--two-threads", "--rounds", "2", "--turn-seconds", "0.001", "--out", str(tmp_path),
    )  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "deploy.jsonl").read_text().splitlines()]
    assert sorted((r["model"], r["mask"], r["batch"], r["threads"]) for r in records) == [
        ("tiny_cnn", "erk", 1, 1), ("tiny_cnn", "uniform", 1, 1),
    ]  # fmt: skip
    for record in records:
        assert set(record["ms"]) == {"dense", "accelerated", "dense_cl"}
        assert record["speedup"]["q1"] <= record["speedup"]["median"] <= record["speedup"]["q3"]
        assert record["compressed_bytes"] < record["dense_bytes"] and record["mac_ratio"] > 1
        assert record["layers"] == 3 and {"cpu", "torch", "commit"} <= set(record)
    markdown = (tmp_path / "deploy.md").read_text()
    assert markdown.count("| tiny_cnn |") == 2 and "| every one-thread cell >= 0.97x |" in markdown
    again = run("deploy.py", "--models", "tiny_cnn", "--masks", "erk", "--sparsities", "0.9", "--batches", "1",
                "--two-threads", "--out", str(tmp_path))  # fmt: skip
    assert "0 cells to run" in again  # finished cells are skipped
    (tmp_path / "deploy.md").unlink()
    run("deploy.py", "--render", "--out", str(tmp_path))
    assert (tmp_path / "deploy.md").read_text() == markdown


def test_train_speed_smoke(tmp_path: Path) -> None:
    out = tmp_path / "train_speed.md"
    run(
        "train_speed.py", "--models", "tiny_cnn", "--masks", "erk", "--sparsities", "0.9", "--rounds", "2",
        "--turn-seconds", "0.001", "--out", str(out),
    )  # fmt: skip
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny_cnn |")]
    assert len(rows) == 1 and rows[0].count("|") == 11  # ten columns
    assert rows[0].split("|")[9].strip().endswith("/3")  # layers on the kernels, of the three masked ones
    layers = tmp_path / "layers.md"
    run("train_speed.py", "--layers", "--models", "tiny_cnn", "--sparsities", "0.9", "--rounds", "2",
        "--turn-seconds", "0.001", "--out", str(layers))  # fmt: skip
    assert sum(line.startswith("| tiny_cnn |") for line in layers.read_text().splitlines()) == 3


@pytest.mark.slow  # builds the compiled training kernels on a first run
def test_train_speed_native_smoke(tmp_path: Path) -> None:
    out = tmp_path / "train_speed.md"
    run(
        "train_speed.py", "--models", "tiny_cnn", "--masks", "erk", "--sparsities", "0.9", "--rounds", "2",
        "--turn-seconds", "0.001", "--native", "--out", str(out),
    )  # fmt: skip
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny_cnn |")]
    assert len(rows) == 1 and rows[0].count("|") == 14  # thirteen columns
    assert rows[0].split("|")[12].strip().endswith("/3")
