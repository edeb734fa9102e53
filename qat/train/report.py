"""The end-of-run report: summary.json, a printed table and a PNG plot in the run directory.

    >>> from qat.train.evaluate import VariantResult
    >>> row = VariantResult("int8", 90.5, 99.0, 100, 300_000, 1.5, 32, "cpu")
    >>> print(markdown_table([row]))
    | variant | top-1 % | top-5 % | images | size MB | latency ms (batch) | device |
    |---|---|---|---|---|---|---|
    | int8 | 90.50 | 99.00 | 100 | 0.29 | 1.50 (32) | cpu |
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qat.train.evaluate import VariantResult

COLUMNS = ("variant", "top-1 %", "top-5 %", "images", "size MB", "latency ms (batch)", "device")


@dataclass(frozen=True)
class RunSummary:
    """What a run did and measured; `variants` in the order float, fake_quant, int8 (those that exist).

    float is the trained model for task fp32 and the starting model (when pretrained) for ptq / qat.
    train_seconds: wall time of calibration and training.
    """

    name: str
    task: str
    model: str
    quant_preset: str | None
    observer: str | None
    backend: str | None
    world_size: int
    epochs_trained: int
    train_seconds: float
    variants: tuple[VariantResult, ...]
    artifacts: dict[str, str] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()

    def variant(self, name: str) -> VariantResult | None:
        return next((v for v in self.variants if v.name == name), None)


def _cells(v: VariantResult) -> tuple[str, ...]:
    return (v.name, f"{v.top1:.2f}", f"{v.top5:.2f}", str(v.num_images), f"{v.size_mb:.2f}",
            f"{v.latency_ms:.2f} ({v.latency_batch_size})", v.device)


def markdown_table(variants: list[VariantResult] | tuple[VariantResult, ...]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(v)) + " |" for v in variants]
    return "\n".join(lines)


def print_table(summary: RunSummary, console: Console | None = None) -> None:
    """A rich table of the variants, titled with the run's name, task and quantization."""
    quant = f"{summary.quant_preset}" + (f" (observer {summary.observer})" if summary.observer else "")
    table = Table(title=f"{summary.name}: {summary.task} {summary.model} {quant if summary.quant_preset else ''}")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("variant", "device") else "right")
    for v in summary.variants:
        table.add_row(*_cells(v))
    (console or Console()).print(table)


def write_summary(summary: RunSummary, run_dir: Path) -> Path:
    path = Path(run_dir) / "summary.json"
    record = dataclasses.asdict(summary)
    for row, variant in zip(record["variants"], summary.variants):
        row["size_mb"] = round(variant.size_mb, 4)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_summary(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def plot_summary(summary: RunSummary, path: Path) -> Path:
    """Bars of top-1 accuracy per variant, annotated with size and latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v.name for v in summary.variants]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.6))
    bars = ax.bar(names, [v.top1 for v in summary.variants], color=["#4c72b0", "#dd8452", "#55a868"][: len(names)])
    for bar, v in zip(bars, summary.variants):
        label = f"{v.top1:.2f}%\n{v.size_mb:.2f} MB\n{v.latency_ms:.1f} ms"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    low = min(v.top1 for v in summary.variants)
    ax.set_ylim(max(0.0, low - 10.0), 100.0 + 8.0)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{summary.name} ({summary.model}, {summary.quant_preset or 'float'})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
