"""Mean ± std over seeds of several test.py runs, as a pipe table (x100, one decimal); or, with
--paper, one of the paper's tables: a row per run (model variant), with its 95% intervals.

    python summarize_results.py --results results/fewshot/*/results.json --save_path results/fewshot
    python summarize_results.py --paper --results results/paper/{medvmad,text_only,anomalyclip,mvfa}/results.json \
        --dataset Brain --title "Table 1: Brain test split" --save_path results/paper --name table1_brain

Runs are grouped by dataset and by their ``--k_shot`` argument; each group's runs are the seeds.
With --paper the rows keep the order of --results and are named after each run's checkpoint
variant (or --names); NAME.md, NAME.csv and NAME.json are written to --save_path.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from tables import TABLE_COLUMNS, csv_text, distinct_names, mean_std_cell, paper_table, pipe_table, variant_of
from utils import ArgumentParser, InputError, atomic_write_json, atomic_write_text, read_manifest, run_cli


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


def run_names(results: list[dict], paths: list[str]) -> list[str]:
    """Each run's model variant (its checkpoint's; ``baseline`` for the zero-training baseline),
    made distinct with the checkpoint's folder name where two runs share one."""
    checkpoints = [result.get("checkpoint") or {} for result in results]
    names = [variant_of(checkpoint.get("config")) if checkpoint else "baseline" for checkpoint in checkpoints]
    folders = [Path(checkpoint.get("path") or path).parent.name for checkpoint, path in zip(checkpoints, paths)]
    return distinct_names(names, folders)


def paper(args: argparse.Namespace, results: list[dict]) -> dict[str, dict]:
    """The paper table of ``args.dataset`` in ``results`` (a row per run), printed and written."""
    names = args.names or run_names(results, args.results)
    if len(names) != len(results):
        raise InputError(f"--names gives {len(names)} names for {len(results)} --results files")
    if len(set(names)) != len(names):
        raise InputError(f"--names {names} repeat: give each run its own name")
    rows = {}
    for name, result, path in zip(names, results, args.results):
        datasets = result.get("datasets", {})
        dataset = args.dataset or (next(iter(datasets)) if len(datasets) == 1 else None)
        if dataset is None:
            raise InputError(f"{path} holds datasets {sorted(datasets)}: choose one with --dataset")
        if dataset not in datasets:
            raise InputError(f"{path} has no results for --dataset {dataset} (it has {sorted(datasets)})")
        rows[name] = datasets[dataset]
    texts = paper_table(rows)
    if args.title:
        texts["md"] = f"{args.title}\n\n{texts['md']}"
    print(texts["md"], end="")
    if args.save_path:
        for kind, text in texts.items():
            atomic_write_text(Path(args.save_path) / f"{args.name}.{kind}", text)
        print(f"written to {Path(args.save_path) / args.name}.{{md,csv,json}}")
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", required=True, help="results.json files of test.py")
    parser.add_argument("--save_path", help="folder for summary.json and summary.csv (--paper: NAME.md/.csv/.json)")
    paper_args = parser.add_argument_group("paper tables (--paper)")
    paper_args.add_argument("--paper", action="store_true",
                            help="a row per --results file in its order, columns pixel AUROC, pixel AUPRO, image "
                                 "AUROC, image AP, with the 95%% intervals test.py --bootstrap wrote")
    paper_args.add_argument("--dataset", help="the dataset of each results.json to tabulate "
                                              "(default: its only one)")
    paper_args.add_argument("--names", nargs="+", help="row names (default: each run's checkpoint variant, "
                                                       "with its checkpoint folder when two share one)")
    paper_args.add_argument("--title", help="a line above the markdown table")
    paper_args.add_argument("--name", default="table", help="file name stem in --save_path (default: table)")
    args = parser.parse_args(argv)
    loaded = []
    for path in args.results:
        read_manifest(Path(path).parent)  # refuses an interrupted run, or results of two runs mixed
        try:
            loaded.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"{path}: not a readable results.json ({error})") from None
    if args.paper:
        return paper(args, loaded)
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
