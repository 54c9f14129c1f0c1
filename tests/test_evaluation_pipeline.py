"""test.py's evaluation outputs on the demo set with the tiny model: float64 maps by default,
streamed maps, --save_maps and its reader, bootstrap intervals, patient and per-class tables."""
from __future__ import annotations

import csv
import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from evaluation import metrics
from evaluation.maps_io import load_maps, save_maps
from evaluation.predict import Predictions, maps_bytes
from utils import InputError
from tests.helpers import BASELINE, TINY_SIZE, test_script
from generate_dataset.demo import build_demo

EVAL = [*BASELINE, "--batch_size", "4", "--num_workers", "0", "--seed", "0"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    return build_demo(str(tmp_path_factory.mktemp("data")), n_train=2, n_valid=(2, 2), n_test=(5, 5),
                      image_size=TINY_SIZE)


def run(demo: str, out, *extra: str) -> dict:
    return test_script.main(["--data_path", demo, "--save_path", str(out), *EVAL, *extra])


def test_saved_float64_maps_rescore_to_the_results_and_intervals_cover_them(tmp_path, demo, strict_json_files):
    summary = run(demo, tmp_path / "a", "--save_maps", "--bootstrap", "50", "--max_ram_maps_gb", "0")
    name, values = next(iter(summary["datasets"].items()))
    saved = load_maps(tmp_path / "a" / "maps", name)
    assert saved.maps.dtype == np.float64 and isinstance(saved.maps, np.memmap)  # the default --map_dtype
    assert saved.maps.shape == saved.masks.shape == (10, TINY_SIZE, TINY_SIZE)
    assert len(saved.paths) == 10 and all(os.path.isfile(p) for p in saved.paths)
    assert values["pixel_auroc"] == pytest.approx(roc_auc_score(saved.masks.ravel(), saved.maps.ravel()), abs=1e-9)
    assert values["image_auroc"] == pytest.approx(roc_auc_score(saved.labels, saved.scores), abs=1e-6)
    assert values["pixel_aupro"] == pytest.approx(metrics.aupro(saved.masks, saved.maps))
    assert not [p for p in os.listdir(tmp_path / "a") if p.startswith(".maps-")]  # streamed files moved
    for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro", "pixel_ap"):
        low, high = values[f"{key}_ci"]
        assert low <= values[key] <= high and low < high
    assert summary["bootstrap"]["seed"] == 0 and summary["bootstrap"]["replicates"] == 50
    rows = list(csv.reader(open(tmp_path / "a" / "results.csv")))
    assert rows[0][:4] == ["dataset", "image AUROC", "image AUROC low", "image AUROC high"]
    assert rows[1][1:4] == [f"{100 * v:.1f}" for v in (values["image_auroc"], *values["image_auroc_ci"])]
    assert rows[-1][0] == "mean"
    log = (tmp_path / "a" / "test_log.txt").read_text()
    low, high = values["pixel_auroc_ci"]
    assert f"{100 * values['pixel_auroc']:.1f} [{100 * low:.1f}\u2013{100 * high:.1f}]" in log
    # Demo names are <case>_<slice>: patients group the slices of one case; normal samples 2-4 of 5
    # are patients without lesions (n002 ...), so the patient figures are defined.
    patients = summary["patients"][name]
    assert patients["n_patients"] == 8
    groups = {}
    for path, label, score in zip(saved.paths, saved.labels, saved.scores):
        case = os.path.basename(path).split("_")[0]
        old = groups.get(case, (0, -np.inf))
        groups[case] = (max(old[0], int(label)), max(old[1], float(score)))
    labels, scores = zip(*groups.values())
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 1, 1]
    assert patients["patient_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert "patient level" in log
    assert {"a/results.json", f"a/maps/{name}.json"} <= set(strict_json_files(tmp_path))

    # The same run with float16 maps in RAM and no intervals: rounded figures, no "_ci".
    half = run(demo, tmp_path / "b", "--map_dtype", "float16")["datasets"][name]
    assert "pixel_auroc_ci" not in half
    assert half["pixel_ap"] == pytest.approx(metrics.pixel_ap(saved.masks, saved.maps.astype(np.float16)))
    assert half["pixel_ap"] != values["pixel_ap"]


def test_save_maps_replaces_whole_files_and_a_failed_write_keeps_the_old(tmp_path, demo, monkeypatch):
    run(demo, tmp_path, "--save_maps")
    folder = tmp_path / "maps"
    name = next(p.stem for p in folder.glob("*.json"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(handle, array, allow_pickle):
        handle.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np.lib.format, "write_array", broken)
    with pytest.raises(InputError, match=f"no space left to write {name}.npy in {folder}"):
        run(demo, tmp_path, "--save_maps")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temp file left either
    assert load_maps(folder, name).maps.shape[0] == 10


def test_per_class_tables_for_a_meta_json_dataset(tmp_path, demo, strict_json_files):
    meta = {"test": {}}
    for cls in ("good", "Ungood"):
        folder = os.path.join(demo, "test", cls, "img")
        for i, file in enumerate(sorted(os.listdir(folder))):
            organ = "brain" if i % 2 == 0 else "liver"
            entry = {"img_path": os.path.join("test", cls, "img", file), "anomaly": int(cls == "Ungood")}
            if cls == "Ungood":
                mask_dir = "anomaly_mask" if os.path.isdir(os.path.join(demo, "test", cls, "anomaly_mask")) else "label"
                entry["mask_path"] = os.path.join("test", cls, mask_dir, file)
            meta["test"].setdefault(organ, []).append(entry)
    with open(os.path.join(demo, "meta.json"), "w") as handle:
        json.dump(meta, handle)
    try:
        summary = run(demo, tmp_path, "--save_maps")
    finally:
        os.remove(os.path.join(demo, "meta.json"))
    name, values = next(iter(summary["datasets"].items()))
    assert set(values["classes"]) == {"brain", "liver"}
    saved = load_maps(tmp_path / "maps", name)
    classes = {os.path.join(demo, e["img_path"]): organ for organ, es in meta["test"].items() for e in es}
    chosen = np.array([classes[p] == "liver" for p in saved.paths])
    assert values["classes"]["liver"]["image_auroc"] == pytest.approx(
        roc_auc_score(saved.labels[chosen], saved.scores[chosen]), abs=1e-6)
    assert values["classes"]["liver"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(saved.masks[chosen].ravel(), saved.maps[chosen].ravel()), abs=1e-9)
    rows = list(csv.reader(open(tmp_path / "results_per_class.csv")))
    assert [r[0] for r in rows[1:]] == [f"{name}/brain", f"{name}/liver", "mean"]
    assert "results.json" in strict_json_files(tmp_path)


def test_maps_over_the_ram_budget_are_streamed_to_a_temporary_folder_then_removed(tmp_path, demo, monkeypatch):
    """--max_ram_maps_gb 0: the maps and masks go to memory-mapped files in a temporary folder
    .maps-<name>-... of --save_path, removed afterwards; the figures are those of the run in RAM."""
    made, opened = [], []
    real_mkdtemp, real_open_memmap = tempfile.mkdtemp, np.lib.format.open_memmap

    def mkdtemp(suffix=None, prefix=None, dir=None):
        folder = real_mkdtemp(suffix, prefix, dir)
        if dir is not None and Path(dir).is_relative_to(tmp_path):  # not the libraries' own temp folders
            made.append((prefix, Path(dir), Path(folder)))
        return folder

    def open_memmap(filename, *args, **kwargs):
        opened.append((Path(filename), Path(filename).parent.is_dir()))
        return real_open_memmap(filename, *args, **kwargs)
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(np.lib.format, "open_memmap", open_memmap)
    in_ram = run(demo, tmp_path / "ram", "--max_ram_maps_gb", "1")
    assert made == [] and opened == []
    streamed = run(demo, tmp_path / "disk", "--max_ram_maps_gb", "0")
    [(prefix, folder, made_folder)] = made
    assert prefix.startswith(".maps-Brain-") and folder == tmp_path / "disk" and made_folder.parent == folder
    assert len(opened) == 2 and all(path.parent == made_folder and existed for path, existed in opened)
    assert not made_folder.exists() and not [p for p in os.listdir(folder) if p.startswith(".maps-")]
    assert streamed["datasets"] == in_ram["datasets"]


def test_save_maps_writes_the_three_documented_files(tmp_path):
    """maps_io's docstring and the README: NAME.npy (maps), NAME_masks.npy (bool masks), NAME.json
    (paths, labels, scores, has_masks), each readable without maps_io."""
    maps = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    masks = np.zeros((2, 3, 4), dtype=bool)
    masks[1, 1:, 2:] = True
    save_maps(tmp_path, "Brain", Predictions(["a.png", "b.png"], np.array([0, 1]), np.array([0.25, 0.75]),
                                             maps, masks, True))
    assert sorted(os.listdir(tmp_path)) == ["Brain.json", "Brain.npy", "Brain_masks.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "Brain.npy"), maps)
    assert np.load(tmp_path / "Brain.npy").dtype == np.float32
    np.testing.assert_array_equal(np.load(tmp_path / "Brain_masks.npy"), masks)
    assert json.loads((tmp_path / "Brain.json").read_text()) == {
        "paths": ["a.png", "b.png"], "labels": [0, 1], "scores": [0.25, 0.75], "has_masks": True}


def test_maps_bytes_counts_a_map_value_and_a_mask_byte_per_pixel():
    assert maps_bytes(3, 10, "float32") == 3 * 100 * (4 + 1)
    assert maps_bytes(3, 10, "float16") == 3 * 100 * (2 + 1)
    assert maps_bytes(3, 10) == 3 * 100 * (8 + 1)  # float64 by default
