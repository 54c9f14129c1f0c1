"""Mean ± std over seeds of several test.py runs, as a pipe table (x100, one decimal).

    python summarize_results.py --results results/fewshot/*/results.json --save_path results/fewshot

Runs are grouped by dataset and by their ``--k_shot`` argument; each group's runs are the seeds.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from tables import TABLE_COLUMNS, csv_text, mean_std_cell, pipe_table
from utils import InputError, atomic_write_json, atomic_write_text, read_manifest, run_cli


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single run) of the finite values."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def summarize(results: list[dict]) -> dict[tuple[str, int], dict[str, tuple[float, float, int]]]:
    """{(dataset, k_shot): {metric: (mean, std, runs)}} over the given results.json contents."""
    groups: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        k_shot = int(result.get("args", {}).get("k_shot") or 0)
        for name, values in result["datasets"].items():
            for key, _ in TABLE_COLUMNS:
                groups[(name, k_shot)][key].append(values.get(key, math.nan))
    return {group: {key: (*mean_std(values[key]), len(values[key])) for key, _ in TABLE_COLUMNS}
            for group, values in sorted(groups.items())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", required=True, help="results.json files of test.py")
    parser.add_argument("--save_path", help="folder for summary.json and summary.csv")
    args = parser.parse_args(argv)
    loaded = []
    for path in args.results:
        read_manifest(Path(path).parent)  # refuses an interrupted run, or results of two runs mixed
        try:
            loaded.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"{path}: not a readable results.json ({error})") from None
    summary = summarize(loaded)
    headers = ["dataset", "k", "runs"] + [title for _, title in TABLE_COLUMNS]
    rows = [[name, k or "zero-shot", next(iter(values.values()))[2]]
            + [mean_std_cell(*values[key][:2]) for key, _ in TABLE_COLUMNS] for (name, k), values in summary.items()]
    print(pipe_table(rows, headers))
    if args.save_path:
        atomic_write_text(Path(args.save_path) / "summary.csv", csv_text([headers] + rows))
        atomic_write_json(Path(args.save_path) / "summary.json", [
            {"dataset": name, "k_shot": k, **{key: {"mean": v[0], "std": v[1], "runs": v[2]} for key, v in values.items()}}
            for (name, k), values in summary.items()])
    return summary


if __name__ == "__main__":
    run_cli(main)
