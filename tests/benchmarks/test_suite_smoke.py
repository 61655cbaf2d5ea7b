"""Smoke test of ``benchmarks/suite.py``: its cheapest sections run in-process at tiny sizes and
fill the table with the expected rows of finite positive numbers. Timings are never asserted."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

SUITE_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "suite.py"
TINY = ["--batch", "2", "--size", "32", "--steps", "1", "--warmup", "0", "--models", "resnet18", "--schemes", "w8a8"]


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("quantwire_benchmark_suite", SUITE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_cheap_sections_fill_the_table(suite, tmp_path):
    rows = suite.run_suite(suite.parse_args([*TINY, "--only", "calibration", "qat", "eval"]))

    assert [(row.section, row.case) for row in rows] == [
        ("qat", "resnet18 W8A8 / float"),
        ("eval", "resnet18 W8A8 / float"),
        ("calibration", "resnet18 W8A8 / float"),
    ]
    for row in rows:
        assert row.unit == "ms"
        assert math.isfinite(row.value) and row.value > 0
        assert math.isfinite(row.reference) and row.reference > 0
        assert row.ratio == pytest.approx(row.value / row.reference)
        assert row.result in ("PASS", "MISS")  # each of these rows has a target

    markdown = suite.markdown_table(rows).splitlines()
    assert markdown[0] == "| section | case | quantwire | reference | ratio | target | result |"
    assert len(markdown) == 2 + len(rows)
    assert all(row.case in line for row, line in zip(rows, markdown[2:], strict=True))


def test_rss_child_reports_its_peak_memory(suite):
    args = suite.parse_args([*TINY, "--rss-child", "resnet18", "float"])

    peak = suite.rss_child(args)["peak_mb"]

    assert math.isfinite(peak) and peak > 0


def test_quick_and_only_set_the_defaults(suite):
    quick = suite.parse_args(["--quick", "--schemes", "w8a8", "--only", "memory", "qat"])
    full = suite.parse_args(["--schemes", "w8a8"])

    assert (quick.steps, quick.models, quick.only) == (3, ["resnet18"], ["qat", "memory"])
    assert (full.steps, full.models) == (10, ["resnet18", "vit_tiny"])
    assert "compile" not in full.only and "integer" in full.only


def test_schemes_without_w8a8_are_refused(suite):
    with pytest.raises(SystemExit):
        suite.parse_args(["--schemes", "w4a4_lsq"])


@given(
    value=st.floats(1e-3, 1e4),
    reference=st.floats(1e-3, 1e4),
    at_most=st.floats(0.1, 10.0),
)
def test_a_row_passes_exactly_when_its_ratio_is_within_the_target(suite, value, reference, at_most):
    row = suite.compared("qat", "case", value, reference, at_most=at_most)

    assert row.result == ("PASS" if value / reference <= at_most else "MISS")
    assert suite.compared("qat", "case", value, reference).result == ""


def test_notes_follow_the_table(suite):
    rows = [suite.Row("compile", "breaks", 1, 3, "breaks", "0 inside", False, "quantwire/x.py:1 (reason)")]

    text = suite.format_table(rows)

    assert "MISS" in text
    assert text.splitlines()[-1] == "- compile / breaks: quantwire/x.py:1 (reason)"
