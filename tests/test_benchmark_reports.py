"""The benchmark reports, rendered again from saved results, equal the files saved beside them.

Each expected file was written by the benchmark that measured the data (the committed results in
``benchmarks/results`` and ``benchmarks/COVERAGE.md``, and small fixtures in
``tests/fixtures/benchmarks``); a renderer change that moves a number or a word shows here.
Rendering takes milliseconds and needs no torch, except the accuracy report's (a third of a
second): it names each record by the variants whose Recipe, with today's defaults, it trained with
(``benchmarks/deploy.py``, whose page is checked too, imports torch to run, not to render).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import re
import statistics
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
FIXTURES = ROOT / "tests" / "fixtures" / "benchmarks"

sys.path.insert(0, str(BENCHMARKS))
try:
    import _common
    import accuracy
    import accuracy_keys
    import accuracy_report
    import coverage_report
    import deploy as deploy_benchmark
    import gpu_check_report
    import overhead_report
finally:
    sys.path.remove(str(BENCHMARKS))

OVERHEAD_JSONS = sorted(p for p in RESULTS.rglob("overhead*.json") if "profile" not in p.name)


def test_every_committed_overhead_json_has_its_markdown() -> None:
    assert len(OVERHEAD_JSONS) >= 7
    assert all(p.with_suffix(".md").is_file() for p in OVERHEAD_JSONS)


@pytest.mark.parametrize("source", OVERHEAD_JSONS, ids=lambda p: str(p.relative_to(RESULTS)))
def test_overhead_markdown_renders_again_from_its_json(source: Path, tmp_path: Path) -> None:
    overhead_report.render(_common.read_json(source), tmp_path)
    assert (tmp_path / "overhead.md").read_text() == source.with_suffix(".md").read_text()


def test_overhead_profile_renders_again_from_its_json() -> None:
    profiled = _common.read_json(FIXTURES / "overhead_profile_tiny_cnn.json")
    assert overhead_report.render_profile(profiled) == (FIXTURES / "overhead_profile_tiny_cnn.md").read_text()


def _environment_of(page: str) -> dict[str, str | None]:
    """The machine facts a COVERAGE.md states (they describe where it was rendered)."""
    processor, python = re.search(r"one thread per model \((.+), Python (\S+)\)\.", page).groups()
    versions = re.search(r"^Versions: (.+)\.$", page, re.MULTILINE)
    return {"processor": processor, "python": python, "versions": versions and versions.group(1)}


def test_coverage_page_renders_again_from_the_committed_csv() -> None:
    page = (BENCHMARKS / "COVERAGE.md").read_text()
    rows = _common.read_csv(RESULTS / "coverage.csv")
    text = coverage_report.render(rows, "benchmarks/results/coverage.csv", _environment_of(page), {}, 6e8)
    assert text == page


def test_coverage_page_of_a_partial_sweep_with_failures() -> None:
    """Failed rows, every kind of row not buildable, partial and eager tracing, and "N of M run so far"."""
    page = (FIXTURES / "COVERAGE.md").read_text()
    rows = _common.read_csv(FIXTURES / "coverage.csv")
    listed = {"tv": 80, "timm": 1371}
    text = coverage_report.render(rows, "tests/fixtures/benchmarks/coverage.csv", _environment_of(page), listed, 6e8)
    assert text == page
    assert "(5 of 80 models run so far)" in text and "## Failures (3)" in text


def test_coverage_write_report_renders_the_csv_into_the_page(tmp_path: Path) -> None:
    csv_path = tmp_path / "coverage.csv"
    csv_path.write_text((FIXTURES / "coverage.csv").read_text())
    listed = {"tv": 80, "timm": 1371}
    coverage_report.write_report(csv_path, tmp_path / "out" / "COVERAGE.md", 6e8, listed)
    label = os.path.relpath(csv_path, ROOT)  # the page names the CSV relative to the repository
    expected = coverage_report.render(_common.read_csv(csv_path), label, coverage_report.environment(), listed, 6e8)
    assert (tmp_path / "out" / "COVERAGE.md").read_text() == expected


def test_gpu_check_table_prints_again_from_its_json() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=160, color_system=None, force_terminal=False)
    gpu_check_report.print_report(_common.read_json(FIXTURES / "gpu_check.json"), console)
    assert buffer.getvalue() == (FIXTURES / "gpu_check.txt").read_text()


def test_deploy_page_renders_again_from_the_committed_jsonl() -> None:
    records = deploy_benchmark.read_records(RESULTS / "deploy.jsonl")
    assert len(records) == 90
    assert deploy_benchmark.render(records) == (RESULTS / "deploy.md").read_text()


def _accuracy_settings(page: str) -> argparse.Namespace:
    """The command line of ``accuracy.py --report`` that a page says regenerates it."""
    flags = re.search(r"^python benchmarks/accuracy\.py --report(.*)$", page, re.MULTILINE).group(1).split()
    return accuracy.build_parser().parse_args(["--report", *flags])


@pytest.mark.parametrize("folder", [".", "kernels", "epochs40"])
def test_accuracy_report_renders_again_from_the_committed_jsonl(folder: str) -> None:
    results = RESULTS / folder
    page = (results / "accuracy.md").read_text()
    settings = _accuracy_settings(page)
    report = accuracy_report.build_report(accuracy_keys.read_results(results / "accuracy.jsonl"), settings)
    assert accuracy_report.render_markdown(report, settings) == page
    assert accuracy_report.report_json(report) == (results / "accuracy.json").read_text()


def test_accuracy_write_report_writes_the_three_files(tmp_path: Path) -> None:
    lines = (RESULTS / "accuracy.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "accuracy.jsonl").write_text("".join(lines[:12]) + '{"key": {"arch": "resnet')  # a torn last line
    settings = accuracy.build_parser().parse_args(["--report", "--out", str(tmp_path)])
    written = accuracy_report.write_report(tmp_path, settings)
    assert written["budget"]["runs"] == 12
    expected = accuracy_report.build_report([json.loads(line) for line in lines[:12]], settings)
    assert (tmp_path / "accuracy.json").read_text() == accuracy_report.report_json(expected)
    assert (tmp_path / "accuracy.md").read_text() == accuracy_report.render_markdown(expected, settings)
    assert f"--report --out {tmp_path}\n" in (tmp_path / "accuracy.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_accuracy_records_keep_their_keys_and_ids() -> None:
    """A run is skipped when its id is in the jsonl: the ids of committed records must not move."""
    records = accuracy_keys.read_results(RESULTS / "accuracy.jsonl")
    assert all(accuracy_keys.RunKey.from_dict(r["key"]).to_dict() == r["key"] for r in records)
    by_id = {r["id"]: r for r in records}
    latest = by_id["c7b6f409f08a"]  # preact_resnet18_x0.25 synflow 0.98 seed 0, tost with the old rescale_scope
    assert accuracy_keys.record_id(latest) == "c7b6f409f08a"
    vgg = by_id[next(i for i, r in by_id.items() if r["key"]["arch"] == "vgg16_x0.5" and r["key"]["variant"] == "tost")]
    assert accuracy_keys.RunKey.from_dict(vgg["key"]).id == accuracy_keys.record_id(vgg) == vgg["id"]
    # Made before Recipe had skip_pointwise: its id then differs from the one its Recipe has today.
    first = by_id["4a1ae5fb1a27"]  # resnet20 erk 0.98 seed 0, baseline
    assert accuracy_keys.record_id(first) == accuracy_keys.RunKey.from_dict(first["key"]).id == "830c0f86f011"
    assert "830c0f86f011" in accuracy.done_ids(RESULTS / "accuracy.jsonl")


def test_a_scope_that_rescales_the_same_layers_names_the_same_run() -> None:
    """The default ``rescale_scope`` moved to ``unnormalized_nonresidual``: on a post-activation ResNet it
    rescales what ``unnormalized`` did, so the old ``tost`` runs stay ``tost``; on PreAct ResNet-18 not."""
    records = accuracy_keys.read_results(RESULTS / "accuracy.jsonl")
    by_id = {r["id"]: r for r in records}
    old = by_id["c7b6f409f08a"]  # preact_resnet18_x0.25 synflow 0.98 seed 0, tost, before the change
    assert old["recipe"]["rescale_scope"] == "unnormalized"
    assert accuracy_keys.labels_of(old) == [("tost", '{"rescale_scope": "unnormalized", "skip_branch": "bn"}')]
    assert accuracy_keys.RunKey.from_dict(old["key"]).id != "c7b6f409f08a"  # today's tost is another run
    resnet20 = by_id["129775185928"]  # resnet20 erk 0.98 seed 0, tost
    assert resnet20["recipe"]["rescale_scope"] == "unnormalized"
    assert ("tost", "{}") in accuracy_keys.labels_of(resnet20)
    assert accuracy_keys.RunKey.from_dict(resnet20["key"]).id == accuracy_keys.record_id(resnet20) == "129775185928"
    assert accuracy_keys.alike("resnet20", "rescale_scope", "unnormalized_nonresidual", "unnormalized")
    assert not accuracy_keys.alike("preact_resnet18_x0.25", "rescale_scope", "unnormalized_nonresidual", "unnormalized")
    assert not accuracy_keys.alike("not_a_benchmark_net", "rescale_scope", "unnormalized_nonresidual", "unnormalized")


def test_a_skip_branch_is_named_by_the_branches_it_gave() -> None:
    """``skip_branch="auto"`` became ``conv_bn`` on pre-activation networks and the old ``auto`` is ``bn``:
    the old PreAct ``tost`` runs are ``tost`` with ``skip_branch=bn``, its ``conv_bn`` runs are ``tost``,
    and on every other network ``tost`` names the same runs as before."""
    records = accuracy_keys.read_results(RESULTS / "accuracy.jsonl")
    by_id = {r["id"]: r for r in records}
    old = by_id["c1cfc6674c5f"]  # preact_resnet18_x0.25 erk 0.98 seed 2, tost skip_branch=conv_bn (val)
    assert ("tost", "{}") in accuracy_keys.labels_of(old)
    assert accuracy_keys.RunKey.from_dict({**old["key"], "overrides": {}}).id == accuracy_keys.record_id(old)
    preact_auto = [r for r in records if r["key"]["arch"] == "preact_resnet18_x0.25" and r["key"]["variant"] == "tost"
                   and r["recipe"]["skip_branch"] == "auto"]  # fmt: skip
    before = [r for r in preact_auto if r["commit"] in accuracy_keys.AUTO_WAS_BN]
    assert before and all(("tost", "{}") not in accuracy_keys.labels_of(r) for r in before)
    assert all("skip_branch" in json.loads(over) for r in before for _, over in accuracy_keys.labels_of(r))
    since = [r for r in preact_auto if r["commit"] not in accuracy_keys.AUTO_WAS_BN]  # today's auto: conv_bn there
    assert all(("tost", "{}") in accuracy_keys.labels_of(r) for r in since)
    resnet20 = by_id["129775185928"]  # resnet20 erk 0.98 seed 0, tost
    assert ("tost", "{}") in accuracy_keys.labels_of(resnet20) and resnet20["recipe"]["skip_branch"] == "auto"
    assert accuracy_keys.RunKey.from_dict(resnet20["key"]).id == "129775185928"
    assert accuracy_keys.RunKey.from_dict({**resnet20["key"], "overrides": {"skip_branch": "bn"}}).id == "129775185928"
    assert accuracy_keys.alike("resnet20", "skip_branch", "auto", "bn")
    assert accuracy_keys.alike("preact_resnet18_x0.25", "skip_branch", "auto", "conv_bn")
    assert accuracy_keys.branch_name("auto", "not_a_benchmark_net", None) == "auto+preact"
    assert accuracy_keys.branch_name("auto", "not_a_benchmark_net", "47359dedcb17") == "auto"


def test_accuracy_candidates_are_paired_with_todays_tost_by_mask_and_seed() -> None:
    val_acc = {  # (mask, seed, variant, overrides) -> validation accuracy
        ("erk", 0, "baseline", "{}"): 0.50, ("erk", 0, "tost", "{}"): 0.52, ("erk", 0, "tost", '{"warmup": 0.6}'): 0.55,
        ("erk", 1, "baseline", "{}"): 0.40, ("erk", 1, "tost", "{}"): 0.41, ("erk", 1, "tost", '{"warmup": 0.6}'): 0.42,
        ("snip", 0, "baseline", "{}"): 0.30, ("snip", 0, "tost", '{"warmup": 0.6}'): 0.33,  # no ToST pair
        ("snip", 0, "tost", '{"warmup": 1.0}'): 0.20,  # at another sparsity
    }  # fmt: skip
    val = {
        (mask, 0.9 if "1.0" in over else 0.98, seed, variant, over): {"val_acc": acc}
        for (mask, seed, variant, over), acc in val_acc.items()
    }
    rows = {(r["sparsity"], json.dumps(r["overrides"])): r for r in accuracy_report._candidates(val)}
    assert set(rows) == {(0.98, '{"warmup": 0.6}'), (0.9, '{"warmup": 1.0}')}
    row = rows[(0.98, '{"warmup": 0.6}')]
    assert row["masks"] == ["erk"] and row["pairs"] == 2
    assert row["vs_tost"]["mean"] == pytest.approx((0.03 + 0.01) / 2)
    assert row["vs_tost_per_mask"] == {"erk": pytest.approx((0.03 + 0.01) / 2)}  # snip has no ToST pair
    assert row["vs_baseline"]["mean"] == pytest.approx((0.05 + 0.02 + 0.03) / 3)
    lone = rows[(0.9, '{"warmup": 1.0}')]
    assert lone["pairs"] == 0 and lone["vs_tost"]["mean"] is None and lone["verdict"] == "pending"


def test_split_noise_pairs_each_test_gain_with_the_validation_gain_of_the_same_runs() -> None:
    test = {  # (mask, seed, variant) -> (test accuracy, validation accuracy)
        ("erk", 0, "baseline"): (0.50, 0.60), ("erk", 0, "tost"): (0.53, 0.61),
        ("erk", 1, "baseline"): (0.40, 0.45), ("erk", 1, "tost"): (0.40, 0.47),
        ("erk", 2, "tost"): (0.90, 0.10),  # no default-protocol run: no pair
        ("snip", 0, "baseline"): (0.30, 0.30), ("snip", 0, "tost"): (0.35, 0.31),
    }  # fmt: skip
    chosen = {
        (mask, 0.98, seed, variant, "{}"): {"test_acc": t, "val_acc": v}
        for (mask, seed, variant), (t, v) in test.items()
    }
    sections = [{"main": accuracy_report._main_rows(chosen, ["erk", "snip"], [0.98])}]
    noise = accuracy_report._split_noise(sections)
    diffs = [0.03 - 0.01, 0.00 - 0.02, 0.05 - 0.01]
    assert noise["pairs"] == 3
    assert noise["test_minus_val"]["mean"] == pytest.approx(sum(diffs) / 3)
    assert noise["test_minus_val"]["std"] == pytest.approx(statistics.stdev(diffs))
    assert noise["correlation"] == pytest.approx(statistics.correlation([0.03, 0.00, 0.05], [0.01, 0.02, 0.01]))
    (line,) = [x for x in accuracy_report._split_noise_lines(noise) if x]
    assert "over the 3 pairs" in line and "+1.33 ± 3.06 points" in line
    one = accuracy_report._split_noise([{"main": accuracy_report._main_rows(chosen, ["snip"], [0.98])}])
    assert one["pairs"] == 1 and one["correlation"] is None
    assert accuracy_report._split_noise_lines(one) == []  # one pair has no spread to state


def test_markdown_table_aligns_and_rules() -> None:
    assert _common.markdown_table(["a", "b"], [["1", "2"]], right=[1]) == ["| a | b |", "| --- | ---: |", "| 1 | 2 |"]
    assert _common.markdown_table(["a", "b"], [], compact_rule=True) == ["| a | b |", "|---|---|"]


@given(st.lists(st.sampled_from("abcde"), min_size=1, max_size=5, unique=True), st.integers(0, 12))
def test_interleaved_rounds_take_every_variant_once_and_rotate(order: list[str], rounds: int) -> None:
    orders = list(_common.interleaved(order, rounds))
    assert len(orders) == rounds
    for r, each in enumerate(orders):
        assert sorted(each) == sorted(order) and each[0] == order[r % len(order)]


def test_paired_ratios_and_quartiles() -> None:
    ratios = _common.paired_ratios([2.0, 3.0, 8.0], [1.0, 2.0, 4.0])
    assert ratios == [2.0, 1.5, 2.0]
    assert _common.quartiles(ratios) == (1.75, 2.0, 2.0)
    assert _common.quartiles([1.5]) == (1.5, 1.5, 1.5)
