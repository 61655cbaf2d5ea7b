"""The demo's report folder: ``report.md``, ``report.html`` and matplotlib (Agg) plots."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from quantwire.cli_support.demo import DemoResult  # noqa: E402
from quantwire.cli_support.stats import activation_sqnr, layer_rows, weight_grid  # noqa: E402
from quantwire.files import atomic_write, atomic_write_text  # noqa: E402

__all__ = ["write_report"]

HISTOGRAM_LAYERS = ("features.stage1.2", "classifier")
"""The layers whose weights (output channel 0) the report draws against the 4-bit grid."""


def _sqnr_plot(result: DemoResult, path: Path) -> Path:
    """Per-layer weight SQNR of each quantized model (top) and, below, one bar chart per model
    of its activation quantizers' SQNR on 128 test images (models quantize different tensors)."""
    quantized = {name: model for name, model in result.models.items() if name != "float"}
    figure = plt.figure(figsize=(5 * len(quantized), 8))
    grid = figure.add_gridspec(2, len(quantized))
    weights = figure.add_subplot(grid[0, :])
    batch = result.splits.test_x[:128]
    for column, (name, model) in enumerate(quantized.items()):
        rows = layer_rows(model)
        weights.plot([r.layer for r in rows], [r.weight_sqnr for r in rows], marker="o", label=name)
        acts = activation_sqnr(model, batch)
        ax = figure.add_subplot(grid[1, column])
        ax.bar(range(len(acts)), list(acts.values()), color=f"C{column}")
        ax.set_xticks(range(len(acts)), [label.removesuffix("_quant") for label in acts], rotation=35, ha="right")
        ax.set_title(f"activation SQNR: {name}", fontsize=10)
        _style(ax)
    weights.set_title("weight SQNR per layer")
    weights.legend(fontsize=8)
    _style(weights)
    return _save(figure, path)


def _style(ax: plt.Axes) -> None:
    """SQNR axis label, light grid, small tick labels."""
    ax.set_ylabel("SQNR (dB)")
    ax.grid(alpha=0.3)
    ax.tick_params(axis="x", labelsize=8)


def _histogram_plot(result: DemoResult, model_name: str, path: Path) -> Path:
    """Weights of output channel 0 of :data:`HISTOGRAM_LAYERS` with the quantization grid."""
    model = result.models[model_name]
    figure, axes = plt.subplots(1, len(HISTOGRAM_LAYERS), figsize=(6 * len(HISTOGRAM_LAYERS), 4))
    for ax, layer in zip(axes, HISTOGRAM_LAYERS, strict=True):
        grid = weight_grid(model, layer)
        ax.hist(grid.weights.numpy(), bins=60, color="tab:blue", alpha=0.8, label="float weights")
        for level in grid.levels.tolist():
            ax.axvline(level, color="tab:red", linewidth=0.8, alpha=0.7)
        ax.plot([], [], color="tab:red", label=f"{grid.bit_width}-bit grid ({len(grid.levels)} levels)")
        ax.set_title(f"{layer}, output channel {grid.channel}")
        ax.set_xlabel("weight value")
        ax.legend(fontsize=8)
    figure.suptitle(model_name)
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (atomically: a report never shows half a plot) and
    close it."""
    figure.tight_layout()
    try:
        atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    finally:
        plt.close(figure)
    return path


def _markdown(result: DemoResult, images: list[Path]) -> str:
    """The report text: accuracy table, integer agreement, export folder, timings, plots."""
    agreement = result.agreement
    lines = [
        "# quantwire demo",
        "",
        f"DigitsCNN on scikit-learn's digits; test accuracy on {len(result.splits.test_y)} images.",
        "",
        "| model | test accuracy (%) |",
        "|---|---|",
        *(f"| {name} | {value:.2f} |" for name, value in result.accuracies.items()),
        "",
        "## Integer backend (W8A8)",
        "",
        f"- equal predictions with the fake-quantized model: {100 * agreement.equal_predictions:.2f}%",
        f"- max abs logit difference: {agreement.max_abs_logit_diff:.3g}",
        f"- exported test vectors: `{result.export_dir}`",
        "",
        "## Time per stage",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {name} | {seconds:.1f} |" for name, seconds in result.seconds.items()),
        "",
        "## Plots",
        "",
        *(f"![{image.stem}]({image.name})" for image in images),
        "",
    ]
    return "\n".join(lines)


def _html_line(line: str) -> str:
    """One non-table Markdown line of the report as HTML."""
    if line.startswith("#"):
        level = len(line) - len(line.lstrip("#"))
        return f"<h{level}>{html.escape(line[level:].strip())}</h{level}>"
    if line.startswith("!["):
        alt, _, src = line[2:-1].partition("](")
        return f'<p><img src="{html.escape(src)}" alt="{html.escape(alt)}"></p>'
    if line.startswith("- "):
        return f"<ul><li>{html.escape(line[2:])}</li></ul>"
    return f"<p>{html.escape(line)}</p>" if line else ""


def _html_table(rows: list[str]) -> str:
    """Markdown table rows (header first, separator row skipped) as an HTML table."""
    cells = [[html.escape(cell.strip()) for cell in row.strip().strip("|").split("|")] for row in rows]
    header = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><tr>{header}</tr>{body}</table>"


def _html(markdown: str) -> str:
    """A minimal HTML rendering of the report's Markdown (headings, lists, tables, images)."""
    body: list[str] = []
    table: list[str] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            table += [] if line.startswith("|---") else [line]
            continue
        if table:
            body.append(_html_table(table))
            table = []
        body.append(_html_line(line))
    style = "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
    head = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>quantwire demo</title><style>{style}</style></head>"
    )
    return head + "<body>\n" + "\n".join(part for part in body if part) + "\n</body></html>\n"


def write_report(result: DemoResult, out_dir: Path) -> Path:
    """Write plots, ``report.md`` and ``report.html`` into ``out_dir``, each file atomically;
    returns ``report.md``."""
    images = [
        _sqnr_plot(result, out_dir / "sqnr.png"),
        _histogram_plot(result, "W4A4 PTQ (QDrop reconstruction)", out_dir / "weights_w4a4.png"),
    ]
    markdown = _markdown(result, images)
    atomic_write_text(out_dir / "report.html", _html(markdown))
    return atomic_write_text(out_dir / "report.md", markdown)
