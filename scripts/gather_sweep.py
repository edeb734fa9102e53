"""Gather the runs of a Hydra sweep (or any folder of runs) into one table: markdown + CSV.

    python scripts/gather_sweep.py outputs/qat_resnet/multiruns/2026-01-01_12-00-00
    python scripts/gather_sweep.py SWEEP_DIR --out results      # writes results.md and results.csv

Every `summary.json` under the folder is one row: the run's overrides (from .hydra/overrides.yaml),
task, quantization, and top-1 / size / latency of each variant (float, fake_quant, int8). The markdown
lists the overrides all runs share once, above the table; the CSV keeps each run's full list.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

VARIANTS = ("float", "fake_quant", "int8")
FIELDS = ("run", "overrides", "name", "task", "model", "quant", "observer", "epochs") + tuple(
    f"{variant}_{metric}" for variant in VARIANTS for metric in ("top1", "size_mb", "latency_ms")
)


def run_overrides(run_dir: Path) -> str:
    """The run's command-line overrides, space-separated ('' when Hydra saved none)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return " ".join(line[2:] for line in lines if line.startswith("- "))


def row_of(summary_path: Path, sweep_dir: Path) -> dict[str, str]:
    summary = json.loads(summary_path.read_text())
    run_dir = summary_path.parent
    row = {
        "run": str(run_dir.relative_to(sweep_dir)) if run_dir != sweep_dir else ".",
        "overrides": run_overrides(run_dir) or " ".join(summary.get("overrides", [])),
        "name": summary["name"],
        "task": summary["task"],
        "model": summary["model"],
        "quant": summary.get("quant_preset") or "",
        "observer": summary.get("observer") or "",
        "epochs": str(summary.get("epochs_trained", "")),
    }
    for variant in summary["variants"]:
        if variant["name"] in VARIANTS:
            row[f"{variant['name']}_top1"] = f"{variant['top1']:.2f}"
            row[f"{variant['name']}_size_mb"] = f"{variant['size_bytes'] / 2**20:.3f}"
            row[f"{variant['name']}_latency_ms"] = f"{variant['latency_ms']:.2f}"
    return {field: row.get(field, "") for field in FIELDS}


def gather(sweep_dir: Path) -> list[dict[str, str]]:
    """One row per summary.json under `sweep_dir`, in run order (numeric subfolders sort numerically)."""
    paths = sorted(Path(sweep_dir).rglob("summary.json"), key=lambda p: _run_key(p.parent, Path(sweep_dir)))
    if not paths:
        raise FileNotFoundError(f"no summary.json under {sweep_dir} (is it a sweep directory of train.py -m?)")
    return [row_of(path, Path(sweep_dir)) for path in paths]


def _run_key(run_dir: Path, sweep_dir: Path) -> tuple:
    parts = run_dir.relative_to(sweep_dir).parts
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def split_overrides(rows: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """(overrides every run shares, each run's own overrides joined by spaces)."""
    per_run = [row["overrides"].split() for row in rows]
    shared = [o for o in per_run[0] if all(o in run for run in per_run[1:])] if len(rows) > 1 else []
    return shared, [" ".join(o for o in run if o not in shared) for run in per_run]


def to_markdown(rows: list[dict[str, str]]) -> str:
    """A table of the columns that have values; overrides shared by every run go above it."""
    shared, own = split_overrides(rows)
    rows = [{**row, "overrides": text} for row, text in zip(rows, own)]
    columns = [f for f in FIELDS if any(row[f] for row in rows)]
    lines = [f"Shared overrides: `{' '.join(shared)}`", ""] if shared else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, str]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output stem (default: SWEEP_DIR/sweep)")
    args = parser.parse_args(argv)
    rows = gather(args.sweep_dir)
    stem = args.out if args.out is not None else args.sweep_dir / "sweep"
    markdown = to_markdown(rows)
    Path(f"{stem}.md").write_text(markdown)
    write_csv(rows, Path(f"{stem}.csv"))
    print(markdown + f"\nwrote {stem}.md and {stem}.csv ({len(rows)} runs)")


if __name__ == "__main__":
    main()
