"""summarize_results.py: mean ± std over support seeds."""
from __future__ import annotations

import json
import math

import pytest

import summarize_results
from utils import InputError, write_result_files


def result(k: int, auroc: float, aupro: float | None) -> dict:
    values = {"image_auroc": auroc, "image_ap": 0.5, "pixel_auroc": 0.9}
    if aupro is not None:
        values["pixel_aupro"] = aupro
    return {"args": {"k_shot": k}, "datasets": {"brain": values}}


def write_runs(folder, runs: list[dict]) -> list[str]:
    """Each run's results.json in its own folder, written as test.py writes it (manifest last)."""
    paths = []
    for i, run in enumerate(runs):
        write_result_files(folder / f"r{i}", {"results.json": json.dumps(run)})
        paths.append(str(folder / f"r{i}" / "results.json"))
    return paths


def test_mean_and_sample_std_per_dataset_and_k(tmp_path):
    """Hand-computed mean and sample std (ddof 1) per (dataset, k); a missing metric is skipped, not zero."""
    runs = [result(2, 0.6, 0.3), result(2, 0.8, 0.5), result(2, 0.7, None), result(4, 0.9, 0.4)]
    paths = write_runs(tmp_path, runs)
    summary = summarize_results.main(["--results", *paths, "--save_path", str(tmp_path / "out")])
    mean, std, count = summary[("brain", 2)]["image_auroc"]
    assert (mean, std, count) == (pytest.approx(0.7), pytest.approx(0.1), 3)
    assert summary[("brain", 2)]["pixel_aupro"][:2] == (pytest.approx(0.4), pytest.approx(math.sqrt(0.02)))
    assert summary[("brain", 4)]["image_auroc"][:2] == (pytest.approx(0.9), 0.0)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written[0]["k_shot"] == 2 and written[0]["image_auroc"]["runs"] == 3
    assert "70.0 ± 10.0" in (tmp_path / "out" / "summary.csv").read_text()


def test_datasets_and_zero_shot_runs_are_separate_groups(tmp_path, capsys):
    """Each (dataset, k) is its own group; runs without --k_shot are labelled zero-shot."""
    runs = [{"args": {"k_shot": 0}, "datasets": {"brain": {"image_auroc": 0.5}, "liver": {"image_auroc": 0.9}}},
            {"args": {}, "datasets": {"brain": {"image_auroc": 0.7}}},
            {"args": {"k_shot": 4}, "datasets": {"liver": {"image_auroc": 0.2}}}]
    paths = write_runs(tmp_path, runs)
    summary = summarize_results.main(["--results", *paths, "--save_path", str(tmp_path / "out")])
    assert sorted(summary) == [("brain", 0), ("liver", 0), ("liver", 4)]
    assert summary[("brain", 0)]["image_auroc"] == (pytest.approx(0.6), pytest.approx(math.sqrt(0.02)), 2)
    assert summary[("liver", 0)]["image_auroc"][:2] == (pytest.approx(0.9), 0.0)
    assert math.isnan(summary[("liver", 4)]["pixel_auroc"][0])
    rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert rows[1].startswith("brain,zero-shot,2,60.0 ± 14.1,-") and rows[3].startswith("liver,4,1,20.0 ± 0.0")


def test_interrupted_or_mixed_runs_are_refused(tmp_path):
    """A results.json without its manifest (a killed run) or changed after it (two runs mixed) is refused."""
    [path] = write_runs(tmp_path, [result(2, 0.6, 0.3)])
    (tmp_path / "r0" / "results.json").write_text(json.dumps(result(2, 0.9, 0.3)))
    with pytest.raises(InputError, match="mixed"):
        summarize_results.main(["--results", path])
    (tmp_path / "r0" / "manifest.json").unlink()
    with pytest.raises(InputError, match="interrupted"):
        summarize_results.main(["--results", path])


def run(variant: str | None, auroc: float, folder: str) -> dict:
    """A results.json of test.py on Brain and Liver, its checkpoint trained as ``variant``
    (None: a checkpoint written before the variant field)."""
    config = {"sigma": 4} if variant is None else {"sigma": 4, "variant": variant}
    return {"checkpoint": {"path": f"/ck/{folder}/best.pth", "config": config}, "args": {},
            "datasets": {"Brain": {"pixel_auroc": auroc, "pixel_auroc_ci": [auroc - 0.01, auroc + 0.01],
                                   "pixel_aupro": 0.5, "image_auroc": 0.7, "image_ap": 0.6},
                         "Liver": {"pixel_auroc": 0.5, "image_auroc": 0.4}}}


def test_paper_table_has_a_row_per_run_in_order_named_by_variant(tmp_path, capsys):
    runs = [run("medvmad", 0.9, "medvmad"), run("text_only", 0.8, "text_only"), run("mvfa", 0.7, "mvfa")]
    paths = write_runs(tmp_path, runs)
    rows = summarize_results.main(["--paper", "--results", *paths, "--dataset", "Brain", "--title", "Table 1",
                                   "--save_path", str(tmp_path / "out"), "--name", "table1"])
    assert list(rows) == ["medvmad", "text_only", "mvfa"]
    markdown = (tmp_path / "out" / "table1.md").read_text()
    assert markdown.startswith("Table 1\n\n| variant") and "| text_only | 80.0 [79.0\u201381.0] | 50.0" in markdown
    table = (tmp_path / "out" / "table1.csv").read_text().splitlines()
    assert table[1].startswith("medvmad,90.0,89.0,91.0,50.0") and len(table) == 4
    assert [row["variant"] for row in json.loads((tmp_path / "out" / "table1.json").read_text())["rows"]] == [
        "medvmad", "text_only", "mvfa"]
    assert "Table 1" in capsys.readouterr().out
    liver = summarize_results.main(["--paper", "--results", *paths, "--dataset", "Liver"])
    assert liver["mvfa"] == runs[2]["datasets"]["Liver"]


def test_paper_table_names_and_datasets(tmp_path):
    """Runs of one variant (older checkpoints read as medvmad) take their checkpoint folder; bad
    --names or --dataset are refused with one line."""
    paths = write_runs(tmp_path, [run(None, 0.9, "a"), run("medvmad", 0.8, "b")])
    assert list(summarize_results.main(["--paper", "--results", *paths, "--dataset", "Brain"])) == [
        "medvmad (a)", "medvmad (b)"]
    assert list(summarize_results.main(["--paper", "--results", *paths, "--dataset", "Brain",
                                        "--names", "x", "y"])) == ["x", "y"]
    with pytest.raises(InputError, match="2 names for 1"):
        summarize_results.main(["--paper", "--results", paths[0], "--names", "x", "y"])
    with pytest.raises(InputError, match="choose one with --dataset"):
        summarize_results.main(["--paper", "--results", paths[0]])
    with pytest.raises(InputError, match="no results for --dataset Chest"):
        summarize_results.main(["--paper", "--results", paths[0], "--dataset", "Chest"])


def test_a_missing_flag_is_one_line_error():
    with pytest.raises(InputError, match="the following arguments are required: --results"):
        summarize_results.main([])
