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
import csv
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from dataset import table_name
from evaluation.tables import (csv_text, distinct_names, mean_std_cell, paper_columns, paper_table, pipe_table,
                               table_columns, variant_of)
from utils import (ArgumentParser, InputError, atomic_write_json, atomic_write_text, prepare_output_dir, read_manifest,
                   run_cli, safe_name, undefined_as_nan)



def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_result(result: object, path: str) -> dict:
    """A loaded results.json whose fields this script reads have test.py's types: ``datasets`` an
    object of metric objects, each tabled metric a number in [0, 1] (null when undefined: read back
    as NaN), each ``<metric>_ci`` a pair of them, ``args`` and ``checkpoint`` objects, ``complete``
    not false; anything else is an InputError naming ``path`` and the field."""
    if not isinstance(result, dict):
        raise InputError(f"{path}: not a results.json of test.py (a {type(result).__name__}, not an object)")
    datasets = result.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise InputError(f"{path}: no 'datasets' object of results")
    if result.get("complete") is False:
        raise InputError(f"{path}: an incomplete run (it stopped after {', '.join(datasets)}); run it again")
    for name, values in datasets.items():
        if not isinstance(values, dict):
            raise InputError(f"{path}: datasets.{name} is a {type(values).__name__}, not an object of metrics")
        for key in {key for key, _ in table_columns() + paper_columns()}:
            value = values.get(key)
            if value is not None and not (_number(value) and (math.isnan(value) or 0 <= value <= 1)):
                raise InputError(f"{path}: datasets.{name}.{key} is {value!r}, not a number in [0, 1]")
            bounds = values.get(f"{key}_ci")
            if bounds is not None and not (isinstance(bounds, list) and len(bounds) == 2 and all(
                    bound is None or _number(bound) and (math.isnan(bound) or 0 <= bound <= 1) for bound in bounds)):
                raise InputError(f"{path}: datasets.{name}.{key}_ci is {bounds!r}, not a [low, high] pair in [0, 1]")
            for field in (key, f"{key}_ci"):  # null (undefined) computes as NaN
                if field in values:
                    values[field] = undefined_as_nan(values[field])
    for field in ("args", "checkpoint"):
        if result.get(field) is not None and not isinstance(result[field], dict):
            raise InputError(f"{path}: '{field}' is a {type(result[field]).__name__}, not an object")
    k_shot = (result.get("args") or {}).get("k_shot")
    if k_shot is not None and not (isinstance(k_shot, int) and not isinstance(k_shot, bool) and k_shot >= 0):
        raise InputError(f"{path}: args.k_shot is {k_shot!r}, not a count")
    config = (result.get("checkpoint") or {}).get("config")
    if config is not None and not (isinstance(config, dict) and isinstance(config.get("variant", ""), str)):
        raise InputError(f"{path}: checkpoint.config is not a model config object")
    return result


def dataset_identity(result: dict, path: str, dataset: str) -> tuple:
    """What tells the data a run scored as ``dataset`` apart: its split, its image and abnormal
    counts, and, when the run's scores.csv is there, its images (paths under the data root) and labels."""
    args, values = result.get("args") or {}, result["datasets"][dataset]
    identity: tuple = (args.get("split"), values.get("n_images"), values.get("n_abnormal"))
    roots, names = args.get("data_path"), args.get("dataset")
    scores = Path(path).parent / "scores.csv"
    if not isinstance(roots, list) or not scores.is_file():
        return identity
    names = names if isinstance(names, list) and len(names) == len(roots) else [table_name(str(r)) for r in roots]
    root = str(roots[names.index(dataset)]) if dataset in names else None
    try:
        rows = list(csv.reader(io.StringIO(scores.read_text(encoding="utf-8"))))[1:]
    except (OSError, UnicodeDecodeError, csv.Error):
        return identity
    images = sorted((os.path.relpath(row[1], root) if root else os.path.basename(row[1]), row[2])
                    for row in rows if len(row) == 4 and row[0] == dataset)
    return identity + (tuple(images),)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single run) of the finite values."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def summarize(results: list[dict]) -> dict[tuple[str, int], dict[str, tuple[float, float, int]]]:
    """{(dataset, k_shot): {metric: (mean, std, runs)}} over the given results.json contents."""
    columns = table_columns()
    groups: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        k_shot = int((result.get("args") or {}).get("k_shot") or 0)
        for name, values in result["datasets"].items():
            for key, _ in columns:
                groups[(name, k_shot)][key].append(values.get(key, math.nan))
    return {group: {key: (*mean_std(values[key]), len(values[key])) for key, _ in columns}
            for group, values in sorted(groups.items())}


def refuse_mixed_data(scored: list[tuple[str, dict, str]]) -> None:
    """An InputError when the runs (results.json path, its contents, the dataset taken from it) to
    go in one row or table scored different data (``dataset_identity``)."""
    first_path, first_result, first_dataset = scored[0]
    first = dataset_identity(first_result, first_path, first_dataset)
    for path, result, dataset in scored[1:]:
        if dataset_identity(result, path, dataset) != first:
            raise InputError(f"{path} scored other data as {dataset} than {first_path} did as {first_dataset} "
                             f"(split, images or labels differ): one table compares runs on the same dataset")


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
    rows, scored = {}, []
    for name, result, path in zip(names, results, args.results):
        datasets = result["datasets"]
        dataset = args.dataset or (next(iter(datasets)) if len(datasets) == 1 else None)
        if dataset is None:
            raise InputError(f"{path} holds datasets {sorted(datasets)}: choose one with --dataset")
        if dataset not in datasets:
            raise InputError(f"{path} has no results for --dataset {dataset} (it has {sorted(datasets)})")
        scored.append((path, result, dataset))
        rows[name] = datasets[dataset]
    refuse_mixed_data(scored)
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
                            help=f"a row per --results file in its order, columns "
                                 f"{', '.join(title for _, title in paper_columns())} (the declared metrics' "
                                 f"paper columns), with the 95%% intervals test.py --bootstrap wrote")
    paper_args.add_argument("--dataset", help="the dataset of each results.json to tabulate "
                                              "(default: its only one)")
    paper_args.add_argument("--names", nargs="+", help="row names (default: each run's checkpoint variant, "
                                                       "with its checkpoint folder when two share one)")
    paper_args.add_argument("--title", help="a line above the markdown table")
    paper_args.add_argument("--name", default="table", help="file name stem in --save_path (default: table)")
    args = parser.parse_args(argv)
    safe_name(args.name, "--name")
    if args.save_path:  # checked before anything is read
        names = [f"{args.name}.{kind}" for kind in ("md", "csv", "json")] if args.paper else ["summary.csv",
                                                                                              "summary.json"]
        prepare_output_dir(args.save_path, files=tuple(names))
    loaded = []
    for path in args.results:
        read_manifest(Path(path).parent)  # refuses an interrupted run, or results of two runs mixed
        try:
            loaded.append(check_result(json.loads(Path(path).read_text()), path))
        except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as error:
            raise InputError(f"{path}: not a readable results.json ({type(error).__name__})") from None
    if args.paper:
        return paper(args, loaded)
    groups: dict[tuple[str, int], list[tuple[str, dict, str]]] = defaultdict(list)
    for path, result in zip(args.results, loaded):
        for name in result["datasets"]:
            groups[(name, int((result.get("args") or {}).get("k_shot") or 0))].append((path, result, name))
    for scored in groups.values():
        refuse_mixed_data(scored)
    summary = summarize(loaded)
    columns = table_columns()
    headers = ["dataset", "k", "runs"] + [title for _, title in columns]
    rows = [[name, k or "zero-shot", next(iter(values.values()))[2]]
            + [mean_std_cell(*values[key][:2]) for key, _ in columns] for (name, k), values in summary.items()]
    print(pipe_table(rows, headers))
    if args.save_path:
        atomic_write_text(Path(args.save_path) / "summary.csv", csv_text([headers] + rows))
        atomic_write_json(Path(args.save_path) / "summary.json", [
            {"dataset": name, "k_shot": k,
             **{key: {"mean": v[0], "std": v[1], "runs": v[2]} for key, v in values.items()}}
            for (name, k), values in summary.items()])
    return summary


if __name__ == "__main__":
    run_cli(main)
