"""Outputs, the environment and flags (issue #25, items 4, 5, 7, 8, 9): a full disk or a kill at any
write loses nothing and leaves records that agree with the files; output names, launcher variables,
seeds, sizes and contradicting data end in one clear line. Every crafted input is built here."""
from __future__ import annotations

import collections
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import nibabel
import numpy as np
import pytest
import torch

import curves
import dataset
import distributed
import run_jobs
import summarize_results
import test_one_example
import train
import utils
import visualize_compare
from CLIP.MedVMAD import MedVMAD
from evaluation import maps_io, tables
from evaluation.predict import Predictions
from generate_dataset.demo import build_demo
from scans.files import read_scan
from tests.helpers import BASELINE, ROOT, TINY, TINY_SIZE, medvmad_logger_kept, test_script
from utils import InputError, read_manifest, run_cli, write_result_files

# helpers' TINY at batch 8, as these runs were written (its own is 4): fewer steps for the many
# kill-and-resume trainings here
TINY_BATCH_8 = [*TINY, "--batch_size", "8"]
EVAL = [*BASELINE, "--num_workers", "0", "--batch_size", "4"]


class Killed(BaseException):
    """kill -9 at a write: the process ends there, with no handler run."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return build_demo(str(tmp_path_factory.mktemp("data")), n_train=2, n_valid=(2, 2), n_test=(2, 2),
                      image_size=TINY_SIZE)


def temp_files(folder: Path) -> list[Path]:
    """Leftovers of writes: temp files and staging folders anywhere under ``folder``."""
    return [path for path in folder.rglob("*") if path.name.endswith(".tmp") or ".tmp." in path.name
            or path.name == utils.STAGING]


def fail_at_write(monkeypatch, index: int, kind: str) -> list[str]:
    """Make the ``index``-th write through ``utils.atomic_write`` fail: ``kill`` leaves half a temp
    file (as kill -9 would) and ends the process; ``full`` runs out of space half way. Returns the
    names written, in order."""
    real, names = utils.atomic_write, []

    def write(path, fill):
        names.append(Path(path).name)
        if len(names) - 1 != index:
            return real(path, fill)
        if kind == "kill":
            (Path(path).parent / f".{Path(path).name}.killed.tmp").write_bytes(b"half")
            raise Killed

        def half_then_full(handle):
            handle.write(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, half_then_full)

    monkeypatch.setattr(utils, "atomic_write", write)
    return names


def one_line_error(capsys, main) -> str:
    """Run ``main`` as a script does (``run_cli``): exit code 2 and one ``error:`` line, no traceback."""
    with pytest.raises(SystemExit) as stopped:
        run_cli(main)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err and "Logging error" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    return last


# ----------------------------------------------------------------------------- 4. a full disk, the writers

def noise_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def disk_full():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullAfter:
    """A file handle on a disk that fills up after ``room`` bytes: the write that passes it writes
    what fits, then fails as the OS does."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        data = data if isinstance(data, (str, bytes)) else bytes(data)
        self.handle.write(data[:self.room])
        if len(data) > self.room:
            disk_full()
        self.room -= len(data)
        return len(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


WRITERS = {
    "text": ("notes.txt", lambda path: utils.atomic_write_text(path, "new\n")),
    "json": ("args.json", lambda path: utils.atomic_write_json(path, {"new": 1})),
    "torch": ("epoch_1.pth", lambda path: utils.atomic_torch_save({"w": torch.ones(1000)}, path)),
    "image": ("overlay.png", lambda path: utils.atomic_write_image(path, noise_image())),
    "curves": ("curves.png", lambda path: curves.draw(path, [{"epoch": 1.0, "train/loss": 1.0}])),
    "maps": ("Brain.npy", lambda path: maps_io.save_maps(path.parent, "Brain", Predictions(
        ["a.png"], np.zeros(1, np.int64), np.zeros(1), np.ones((1, 8, 8)), np.zeros((1, 8, 8), bool), True))),
    "record": ("predictions.jsonl", lambda path: utils.append_line(path, '{"new": 1}')),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_full_disk_keeps_the_old_file_whole_and_names_the_folder(tmp_path, monkeypatch, writer, failing):
    """Out of space while writing or at fsync (where delayed allocation reports it): the old file
    stays byte for byte, no temp file is left, and the error names the folder."""
    name, write = WRITERS[writer]
    old = b"old whole line\n"
    (tmp_path / name).write_bytes(old)
    real_write, real_fdopen, real_fsync = os.write, os.fdopen, os.fsync
    if failing == "fsync":
        monkeypatch.setattr(os, "fsync", lambda fd: disk_full())
    elif writer == "record":  # append_line writes with os.write
        monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:3]) and disk_full())
    else:
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullAfter(real_fdopen(fd, mode), 2))
    with pytest.raises(utils.DiskFullError, match=rf"no space left to write {name} in {tmp_path} "):
        write(tmp_path / name)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (tmp_path / name).read_bytes() == old
    assert temp_files(tmp_path) == []


def test_writers_that_fail_silently_on_a_real_full_disk_are_caught(tmp_path):
    """A real short write (a file size limit: the kernel refuses bytes past it, as a full disk does):
    torch.save, cv2.imwrite and SimpleITK's .nii.gz writer can each leave a short file without a
    word. Through the atomic writers nothing is left; SimpleITK's short map is caught by its check."""
    script = f"""
import json, resource, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
import numpy as np, torch, SimpleITK as sitk, utils, test_one_example
folder = Path({str(tmp_path)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
outcome = {{}}
writes = {{"epoch_1.pth": lambda p: utils.atomic_torch_save({{"w": torch.randn(20000)}}, p),
          "overlay.png": lambda p: utils.atomic_write_image(
              p, np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)),
          "results.json": lambda p: utils.atomic_write_text(p, "x" * 10000)}}
for name, write in writes.items():
    try:
        write(folder / name)
        outcome[name] = "written"
    except utils.InputError as error:
        outcome[name] = str(error)
sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((20, 50, 50)).astype(np.float32)),
                str(folder / "map.nii.gz"), True)
outcome["sitk_size"] = (folder / "map.nii.gz").stat().st_size
try:
    test_one_example.check_written(folder / "map.nii.gz", folder / "map.nii.gz")
    outcome["check"] = "passed"
except utils.InputError as error:
    outcome["check"] = str(error)
print(json.dumps(outcome))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("epoch_1.pth", "overlay.png", "results.json"):
        assert outcome[name].startswith(f"no space left to write {name} in {tmp_path} (File too large)")
        assert not (tmp_path / name).exists()
    assert outcome["sitk_size"] == 4096  # SimpleITK returned normally with a short file
    assert "map.nii.gz: it is cut short" in outcome["check"]
    assert [p.name for p in temp_files(tmp_path)] == []


def test_a_log_file_on_a_full_disk_is_one_warning_not_a_traceback_per_line(tmp_path, capsys):
    logger = utils.setup_logging(tmp_path, "train_log.txt")
    [log_file] = [handler for handler in logger.handlers if isinstance(handler, utils.LogFileHandler)]
    log_file.stream = FullAfter(log_file.stream, 0)
    for epoch in range(3):
        logger.info(f"epoch {epoch}")
    err = capsys.readouterr().err
    assert err.count("warning: cannot write the log") == 1 and "No space left on device" in err
    assert "Traceback" not in err and "Logging error" not in err and err.count("epoch ") == 3


def test_a_full_disk_met_outside_the_writers_is_still_one_line(capsys):
    def main():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/results/maps/.maps-x/maps.npy")
    assert one_line_error(capsys, main) == ("error: no space left on the device writing /results/maps/.maps-x/maps.npy "
                                            "(No space left on device); free some space and run again")


# ----------------------------------------------------------------------------- 4, 5. training stopped at any write

FEWSHOT = ["--k_shot", "2", "--epoch", "2"]
TRAIN_WRITES = ["support_2shot_seed1.txt", "args.json",
                "best.pth", "metrics.csv", "curves.png", "epoch_1.pth",   # epoch_<n>.pth last: it commits the epoch
                "best.pth", "metrics.csv", "curves.png", "epoch_2.pth"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data) -> Path:
    """The uninterrupted few-shot run, its writes checked to come in TRAIN_WRITES' order."""
    run = tmp_path_factory.mktemp("reference") / "run"
    # the logger put back here: a module fixture is set up before conftest's per-test restore
    with medvmad_logger_kept(), pytest.MonkeyPatch.context() as monkeypatch:
        names = fail_at_write(monkeypatch, -1, "none")
        result = train.main(["--train_data_path", data, "--save_path", str(run), *FEWSHOT, *TINY_BATCH_8])
        assert result["best"]["epoch"] == 2
    assert names == TRAIN_WRITES
    return run


def trainable(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["trainable"]


def assert_same_run(run: Path, reference: Path, epochs: int = 2) -> None:
    """best.pth holds the epoch the records call best (few-shot keeps the last), with the
    reference's weights; metrics.csv has the uninterrupted run's rows; nothing half-written is left."""
    best = torch.load(run / "best.pth", map_location="cpu", weights_only=True)
    assert best["epoch"] == epochs
    expected = trainable(reference / f"epoch_{epochs}.pth")
    assert all(torch.equal(best["trainable"][key], expected[key]) for key in expected)
    rows = (reference / "metrics.csv").read_text().splitlines(keepends=True)
    assert (run / "metrics.csv").read_text() == "".join(rows[:epochs + 1])
    assert cv2.imread(str(run / "curves.png")) is not None
    assert temp_files(run) == []


@pytest.mark.parametrize("index, kind", [(index, "kill") for index in range(len(TRAIN_WRITES))]
                         + [(9, "full")])
def test_training_stopped_at_any_write_resumes_to_the_uninterrupted_run(tmp_path, data, reference_run, capsys,
                                                                        monkeypatch, index, kind):
    """kill -9 at each write in turn (and a full disk at epoch_2.pth), then --resume:
    the run ends as the uninterrupted one, and best.pth and the records agree (issue: best epoch 2
    reported while best.pth held epoch 1)."""
    run = tmp_path / "run"
    argv = ["--train_data_path", data, "--save_path", str(run), *FEWSHOT, *TINY_BATCH_8]
    fail_at_write(monkeypatch, index, kind)
    if kind == "kill":
        with pytest.raises(Killed):
            train.main(argv)
    else:
        line = one_line_error(capsys, lambda: train.main(argv))
        assert line.startswith(f"error: no space left to write {TRAIN_WRITES[index]} in {run} ")
        assert line.endswith("then continue with --resume")
    monkeypatch.undo()
    if index <= TRAIN_WRITES.index("epoch_1.pth"):  # stopped before the first epoch was saved
        with pytest.raises(InputError, match="no whole epoch_<n>.pth .* start afresh with --overwrite"):
            train.main([*argv, "--resume"])
        assert train.main([*argv, "--overwrite", "--epoch", "1"])["best"]["epoch"] == 1  # the first epoch is enough
        assert_same_run(run, reference_run, epochs=1)
    else:
        assert train.main([*argv, "--resume"])["best"]["epoch"] == 2
        assert_same_run(run, reference_run)


def test_resume_puts_back_the_best_pth_its_records_name(tmp_path, data, reference_run):
    """A run stopped after best.pth of epoch 2 but before epoch_2.pth: the records (epoch_1.pth)
    say epoch 1 is best. Resumed without more epochs to run, best.pth is epoch 1's again."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    (run / "epoch_2.pth").unlink()
    result = train.main(["--train_data_path", data, "--save_path", str(run), "--k_shot", "2", "--epoch", "1",
                         *TINY_BATCH_8, "--resume"])
    assert result["best"]["epoch"] == 1
    best = torch.load(run / "best.pth", map_location="cpu", weights_only=True)
    assert best["epoch"] == 1 and "optimizer" not in best
    expected = trainable(run / "epoch_1.pth")
    assert all(torch.equal(best["trainable"][key], expected[key]) for key in expected)


@pytest.mark.parametrize("damage", [
    lambda text: "epoch,train/loss\nnot a number,1\n",
    lambda text: text.replace(text.splitlines()[1].split(",")[1], "abc", 1),
    lambda text: "\n".join(text.splitlines()[:1]) + "\n",      # the rows of finished epochs lost
], ids=["garbage", "a cell", "no rows"])
def test_resume_with_a_damaged_metrics_csv_rebuilds_it(tmp_path, data, reference_run, damage):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    (run / "epoch_2.pth").unlink()
    (run / "metrics.csv").write_text(damage((reference_run / "metrics.csv").read_text()))
    train.main(["--train_data_path", data, "--save_path", str(run), *FEWSHOT, *TINY_BATCH_8, "--resume"])
    assert_same_run(run, reference_run)


def test_resume_passes_over_a_half_written_checkpoint(tmp_path, data, reference_run):
    """A short epoch_2.pth (from a version that wrote in place) is not taken for a whole one."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    whole = (run / "epoch_2.pth").read_bytes()
    (run / "epoch_2.pth").write_bytes(whole[:len(whole) // 2])
    train.main(["--train_data_path", data, "--save_path", str(run), *FEWSHOT, *TINY_BATCH_8, "--resume"])
    assert_same_run(run, reference_run)
    assert "passed over" in (run / "train_log.txt").read_text()


# ------------------------------------------------------------------------ 4, 7. test_one_example stopped at any write

@pytest.fixture
def volume(tmp_path) -> Path:
    path = tmp_path / "inputs" / "vol.nii.gz"
    path.parent.mkdir()
    voxels = np.random.default_rng(1).uniform(0, 100, (24, 20, 3)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(voxels, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return path


def assert_records_match_files(folder: Path) -> list[dict]:
    """Every line of predictions.jsonl is JSON naming files that exist, and every output file is
    named by a line; no staging or temp file is left."""
    records = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    named = {Path(record[key]).name for record in records
             for key in ("overlay", "map_npy", "map_png", "mask_png", "map_volume", "mask_volume") if key in record}
    files = {path.name for path in folder.iterdir() if not path.name.startswith(".")} - {"predictions.jsonl"}
    assert files == named and all((folder / name).is_file() for name in named)
    assert temp_files(folder) == []
    return records


def kill_inside_volume_writer(monkeypatch) -> None:
    """SimpleITK's writer killed half way: what the issue found left behind."""
    def write_volume(path, stored, affine):
        Path(f"{path}.tmp.nii.gz").write_bytes(b"half a volume")
        raise Killed
    monkeypatch.setattr("scans.volumes.write_volume", write_volume)


def kill_when_committing(monkeypatch) -> None:
    """Killed after the first staged file was moved into place."""
    real, moved = os.replace, []

    def replace(source, target):
        if Path(source).parent.name == utils.STAGING and Path(target).parent.name != utils.STAGING:
            moved.append(target)
            if len(moved) == 2:
                raise Killed
        return real(source, target)
    monkeypatch.setattr(os, "replace", replace)


def kill_while_appending(monkeypatch) -> None:
    """Killed with half of the record line written."""
    def append(path, line, at=None):
        with open(path, "a") as handle:
            handle.write(line[:len(line) // 2])
        raise Killed
    monkeypatch.setattr(utils, "append_line", append)


def kill_before_clearing_staging(monkeypatch) -> None:
    """Killed with the record appended but the staging folder (and its commit note) still there."""
    monkeypatch.setattr(utils, "discard_staged", lambda folder: (_ for _ in ()).throw(Killed()))


ONE_KILLS = {
    "map array": (lambda monkeypatch: fail_at_write(monkeypatch, 0, "kill"), 1),
    "map volume": (kill_inside_volume_writer, 1),
    "overlay": (lambda monkeypatch: fail_at_write(monkeypatch, 1, "kill"), 1),
    "commit note": (lambda monkeypatch: fail_at_write(monkeypatch, 2, "kill"), 1),
    "moving in": (kill_when_committing, 2),
    "record": (kill_while_appending, 2),
    "after the record": (kill_before_clearing_staging, 2),  # replayed, the record is not appended twice
}


@pytest.mark.parametrize("point", list(ONE_KILLS))
def test_one_example_killed_at_any_write_leaves_records_and_files_agreeing(tmp_path, monkeypatch, volume, point):
    """kill -9 at each write of a volume's outputs, then a run into the same folder: the input the
    killed run was committing is finished (its commit note was written) or dropped; every record
    names whole files and no file, temp file or `..._map.nii.gz.tmp.nii.gz` is left without one."""
    out = tmp_path / "out"
    argv = ["--image_path", str(volume), "--save_path", str(out), *BASELINE]
    kill, records_after = ONE_KILLS[point]
    kill(monkeypatch)
    with pytest.raises(Killed):
        test_one_example.main(argv)
    monkeypatch.undo()
    [record] = test_one_example.main(argv)
    records = assert_records_match_files(out)
    assert len(records) == records_after and records[-1] == record
    assert np.load(record["map_npy"]).shape == (3, 20, 24)  # the slices as shown
    assert nibabel.load(record["map_volume"]).shape == (24, 20, 3)


def test_one_example_on_a_full_disk_says_so_and_keeps_nothing(tmp_path, monkeypatch, volume, capsys):
    """The issue: a traceback, a 128-byte .npy and an empty predictions.jsonl."""
    out = tmp_path / "out"
    argv = ["--image_path", str(volume), "--save_path", str(out), *BASELINE]
    fail_at_write(monkeypatch, 0, "full")
    line = one_line_error(capsys, lambda: test_one_example.main(argv))
    assert line.startswith(f"error: no space left to write vol.npy in {out} ")
    assert [path.name for path in out.iterdir()] == [".lock"]
    monkeypatch.undo()
    test_one_example.main(argv)
    assert len(assert_records_match_files(out)) == 1


def test_a_short_volume_map_is_never_recorded(tmp_path, monkeypatch, volume):
    """A writer that leaves a short .nii.gz without a word (as SimpleITK's does on a full disk):
    the map is read back through its gzip checksum before it is recorded."""
    from scans import volumes

    def short_write(path, data):
        Path(path).write_bytes(data[:len(data) // 2])
    monkeypatch.setattr(volumes, "atomic_write_bytes", short_write)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"cannot write {out}/vol_map.nii.gz: it is cut short"):
        test_one_example.main(["--image_path", str(volume), "--save_path", str(out), *BASELINE])
    assert not (out / "predictions.jsonl").exists() and temp_files(out) == []


# ----------------------------------------------------------------------------- 4, 9. test.py: finished work is kept

def test_a_full_disk_while_drawing_keeps_the_finished_results(tmp_path, data, monkeypatch, capsys):
    """The first figure (the reliability diagram, before the overlays) meets a full disk: the
    results written before it are whole (manifest checked), no figure is half-written, and the
    line names the folder."""
    out = tmp_path / "out"
    (out / ".maps-Brain-killed").mkdir(parents=True)  # maps a killed run streamed to disk
    (out / ".maps-Brain-killed" / "maps.npy").write_bytes(b"\x93NUMPY half")
    real = utils.atomic_write

    def write(path, fill):
        if Path(path).suffix == ".png":
            raise utils.write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return real(path, fill)
    monkeypatch.setattr(utils, "atomic_write", write)
    line = one_line_error(capsys, lambda: test_script.main(["--data_path", data, "--save_path", str(out),
                                                             "--visualize", "1", *EVAL]))
    assert line.startswith(f"error: no space left to write reliability_Brain.png in {out} ")
    assert sorted(read_manifest(out)) == sorted(["results.csv", "results_patient.csv", "results_calibration.csv",
                                                 "scores.csv", "results.json"])
    summary = json.loads((out / "results.json").read_text())
    assert summary["complete"] and summary["datasets"]["Brain"]["n_images"] == 4
    assert not list(out.rglob("*.png")) and temp_files(out) == []
    assert not (out / ".maps-Brain-killed").exists()


def test_a_bootstrap_that_does_not_fit_is_refused_before_any_image_is_scored(tmp_path, data, monkeypatch):
    """One free page of memory: 1000 resamples of the small demo's 3 patients (000_*, 001_*, and n001_* with
    normal slices only) need 48 kB."""
    assert {name.split("_")[0] for kind in ("good", "Ungood") for name in os.listdir(Path(data) / "test" / kind / "img")
            } == {"000", "001", "n001"}
    real_sysconf = os.sysconf
    fit = real_sysconf("SC_PAGE_SIZE") // 2 // (3 * 16)
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else real_sysconf(name))
    monkeypatch.setattr(test_script, "predict", lambda *args, **kwargs: pytest.fail("scored before the check"))
    with pytest.raises(InputError, match=rf"--bootstrap 1000: 3 patients of Brain need 0.0 GiB .* use at most {fit} "):
        test_script.main(["--data_path", data, "--save_path", str(tmp_path / "out"), "--bootstrap", "1000",
                          "--max_ram_maps_gb", "1", *EVAL])
    assert not (tmp_path / "out" / "results.json").exists()


def test_the_bootstrap_limit_is_half_the_available_memory(tmp_path, data, monkeypatch):
    """Three free pages of memory: by the rule "R resamples x 3 patients x 16 bytes over half of it",
    R = 3 x page / 2 / 48 (128 for 4096-byte pages) takes exactly half and is allowed; one more is
    refused, naming that count."""
    page = os.sysconf("SC_PAGE_SIZE")
    fit = page // 32
    assert fit * 3 * 16 == 3 * page / 2 and (page != 4096 or fit == 128)
    real_sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 3 if name == "SC_AVPHYS_PAGES" else real_sysconf(name))
    argv = ["--data_path", data, "--metrics", "image-level", "--max_ram_maps_gb", "1", *EVAL]
    with pytest.raises(InputError, match=rf"--bootstrap {fit + 1}: 3 patients of Brain need .* use at most {fit} "):
        test_script.main([*argv, "--save_path", str(tmp_path / "over"), "--bootstrap", str(fit + 1)])
    assert not (tmp_path / "over" / "results.json").exists()
    summary = test_script.main([*argv, "--save_path", str(tmp_path / "under"), "--bootstrap", str(fit)])
    assert summary["bootstrap"]["replicates"] == fit and summary["datasets"]["Brain"]["image_auroc_ci"]


DiskUsage = collections.namedtuple("DiskUsage", "total used free")
DEMO_MAPS_BYTES = 4 * 64 * 64 * (8 + 1)  # the small demo's 4 test maps (float64) and masks (1 byte a pixel)


@pytest.mark.parametrize("extra, advice", [
    (["--save_maps"], "free some space$"),
    (["--max_ram_maps_gb", "0"], "free some space or raise --max_ram_maps_gb$"),  # streamed to a temp folder
])
def test_maps_that_do_not_fit_on_the_disk_are_refused_before_any_image_is_scored(tmp_path, data, monkeypatch,
                                                                                  extra, advice):
    """A disk with one byte fewer free than the maps and masks need: refused before the model runs."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(10 ** 12, 10 ** 12, DEMO_MAPS_BYTES - 1))
    monkeypatch.setattr(MedVMAD, "forward", lambda *args, **kwargs: pytest.fail("scored before the check"))
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"^--save_path {out}: the maps to write there take 0.0 GiB, but only "
                                         rf"0.0 GiB are free; {advice}"):
        test_script.main(["--data_path", data, "--save_path", str(out), *EVAL, *extra])
    assert not (out / "maps").exists() and not (out / "results.json").exists()


def test_maps_that_just_fit_on_the_disk_are_written(tmp_path, data, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(10 ** 12, 10 ** 12, DEMO_MAPS_BYTES))
    out = tmp_path / "out"
    test_script.main(["--data_path", data, "--save_path", str(out), *EVAL, "--save_maps"])
    assert sorted(os.listdir(out / "maps")) == ["Brain.json", "Brain.npy", "Brain_masks.npy"]
    assert sum((out / "maps" / name).stat().st_size - 128 for name in ("Brain.npy", "Brain_masks.npy")
               ) == DEMO_MAPS_BYTES  # each .npy: a 128-byte header, then the array


@pytest.mark.parametrize("flag, value, fragment", [
    ("--bootstrap", "1000000000", "at most 100000 resamples"),
    ("--bootstrap", "3000000", "at most 100000 resamples"),
    ("--seed", "4294967296", r"--seed: must be in \[0, 2\*\*32\)"),
    ("--fewshot_seed", str(2 ** 64), r"--fewshot_seed: must be in \[0, 2\*\*32\)"),
    ("--bootstrap_seed", str(2 ** 32), r"--bootstrap_seed: must be in \[0, 2\*\*32\)"),
    ("--sigma", "20000", r"--sigma: must be in \[0, 10000\]"),
    ("--image_std", "inf", "--image_std: expected a finite number, got 'inf'"),
    ("--image_std", "0", "--image_std: must be > 0"),
    ("--image_std", "-1", "--image_std: must be > 0"),
    ("--image_mean", "nan", "--image_mean: expected a finite number, got 'nan'"),
    ("--dataset", "../../../escaped", "--dataset '../../../escaped': must be a plain name"),
    ("--dataset", "..", "--dataset '..': must be a plain name"),
])
def test_flags_out_of_range_are_one_clear_line_before_any_work(tmp_path, data, flag, value, fragment):
    """Each flag on test.py (and, where it has it, train.py): refused naming the flag, nothing
    written outside --save_path."""
    values = [value] * 3 if flag in ("--image_std", "--image_mean") else [value]
    out = tmp_path / "deep" / "er" / "out"
    with pytest.raises(InputError, match=fragment):
        test_script.main(["--data_path", data, "--save_path", str(out), *EVAL, flag, *values])
    if flag not in ("--bootstrap", "--bootstrap_seed"):
        with pytest.raises(InputError, match=fragment):
            train.main(["--train_data_path", data, "--save_path", str(out), *TINY_BATCH_8, flag, *values])
    assert not list(tmp_path.rglob("escaped*")) and not list(tmp_path.rglob("*.json"))


def test_largest_accepted_values_pass(tmp_path, volume):
    args = test_script.parse_args(["--seed", str(2 ** 32 - 1), "--fewshot_seed", str(2 ** 32 - 1), "--bootstrap",
                                   "100000", "--image_std", "0.1", "0.2", "0.3"])
    assert args.seed == 2 ** 32 - 1 and args.bootstrap == 100000
    [record] = test_one_example.main(["--image_path", str(volume), "--save_path", str(tmp_path / "out"),
                                      *BASELINE, "--sigma", "1000"])  # the blur wider than the map
    assert np.isfinite(record["score"]) and np.isfinite(np.load(record["map_npy"]).astype(np.float32)).all()


# ----------------------------------------------------------------------------- 7. silently wrong: names and data

def write_png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((TINY_SIZE, TINY_SIZE), value, np.uint8)
    pixels[10:30, 12:40] = 255 - value
    assert cv2.imwrite(str(path), pixels)
    return path


def test_inputs_sharing_a_stem_get_their_own_files(tmp_path):
    """x.png and x.jpg in one folder, then two other x.png scored alone into the same folder: four
    records, four sets of files, each map its own input's (scored here by hand); scoring an input
    again reuses its own names."""
    write_png(tmp_path / "in" / "x.png", 40)
    write_png(tmp_path / "in" / "x.jpg", 200)
    write_png(tmp_path / "other" / "x.png", 120)
    write_png(tmp_path / "third" / "x.png", 160)
    out = tmp_path / "out"
    for image_path in ("in", "other/x.png", "third/x.png", "other/x.png"):
        test_one_example.main(["--image_path", str(tmp_path / image_path), "--save_path", str(out), *BASELINE])
    records = assert_records_match_files(out)
    assert [Path(r["map_npy"]).name for r in records] == ["x.jpg.npy", "x.png.npy", "x.npy", "x-2.npy", "x.npy"]
    args = test_one_example.parse_args(["--image_path", "x.png", *BASELINE])
    model, _, _ = test_one_example.build(args, torch.device("cpu"))
    for record in records[1:]:  # the last record rewrote x.npy with the same input's map
        _, [heat] = test_one_example.score_slices(model, read_scan(record["path"]).slices, torch.device("cpu"),
                                                  "fp32", 1, record["path"])
        np.testing.assert_array_equal(np.load(record["map_npy"]), heat.astype(np.float16))


@pytest.mark.parametrize("paths, names", [
    (["a/x.png", "a/y.png"], ["x", "y"]),
    (["a/x.png", "a/x.jpg", "a/x.nii.gz"], ["x.png", "x.jpg", "x.nii.gz"]),
    (["a/x.png", "b/x.png", "c/x.png", "a/x.jpg"], ["x.png", "x.png-2", "x.png-3", "x.jpg"]),
    (["a/scan.nii.gz", "a/scan.nrrd"], ["scan.nii.gz", "scan.nrrd"]),
])
def test_output_names_of_inputs_are_distinct(paths, names):
    """The names overlays (test.py) and outputs (test_one_example.py) are written under."""
    assert utils.unique_stems(paths) == names


@pytest.mark.parametrize("name", ["scan.npy", "scan.png", "scan_map.png", "scan_mask.png", "predictions.jsonl"])
def test_one_example_output_names_taken_by_folders_are_refused_before_scoring(tmp_path, name):
    """The issue: scan_map.png a folder, exit 0, and a record naming a map never written."""
    image = write_png(tmp_path / "scan.png", 90)
    (tmp_path / "out" / name).mkdir(parents=True)
    with pytest.raises(InputError, match=f"--save_path {tmp_path / 'out'}: {name} is taken by a folder"):
        test_one_example.main(["--image_path", str(image), "--save_path", str(tmp_path / "out"), *BASELINE])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) in ([name], sorted([name, ".lock"]))


def bmad_split(root: Path) -> Path:
    write_png(root / "test" / "good" / "img" / "a.png", 30)
    write_png(root / "test" / "Ungood" / "img" / "b.png", 200)
    write_png(root / "test" / "Ungood" / "anomaly_mask" / "b.png", 0)
    return root


def meta_index(root: Path, entries: list[dict]) -> str:
    (root / "meta.json").write_text(json.dumps({"test": {"brain": entries}}))
    return str(root / "meta.json")


def good_and_Good(root: Path) -> str:
    bmad_split(root)
    write_png(root / "test" / "Good" / "img" / "c.png", 60)
    return str(root)


def linked_twice_bmad(root: Path) -> str:
    bmad_split(root)
    os.symlink(root / "test" / "good" / "img" / "a.png", root / "test" / "good" / "img" / "link.png")
    return str(root)


def linked_twice_meta(root: Path) -> str:
    bmad_split(root)
    os.symlink(root / "test" / "good" / "img" / "a.png", root / "link.png")
    return meta_index(root, [{"img_path": "test/good/img/a.png", "anomaly": 0},
                             {"img_path": "link.png", "anomaly": 0}])


def normal_with_a_lesion(root: Path) -> str:
    bmad_split(root)
    write_png(root / "lesion.png", 0)  # a bright rectangle on black
    return meta_index(root, [{"img_path": "test/good/img/a.png", "mask_path": "lesion.png", "anomaly": 0}])


def nested_too_deep(root: Path) -> str:
    root.mkdir(parents=True)
    (root / "meta.json").write_text('{"test": ' + "[" * 50_000 + "]" * 50_000 + "}")
    return str(root / "meta.json")


@pytest.mark.parametrize("build, fragment", [
    (good_and_Good, r"test holds both Good/ and good/: folder names are matched case-insensitively"),
    (linked_twice_bmad, r"link.png and .*a.png are the same file"),
    (linked_twice_meta, r"test/brain\[1\] lists .*link.png again \(first at test/brain\[0\]\)"),
    (normal_with_a_lesion,
     r"test/brain\[0\] is labelled normal \(anomaly 0\), but its mask .*lesion.png marks a lesion"),
    (nested_too_deep, "nested too deeply"),
])
def test_data_that_contradicts_itself_is_refused_naming_the_files(tmp_path, build, fragment):
    with pytest.raises(InputError, match=fragment):
        dataset.list_samples(build(tmp_path / "set"), "test")


def test_a_normal_entry_with_an_empty_mask_is_read(tmp_path):
    bmad_split(tmp_path)
    cv2.imwrite(str(tmp_path / "empty.png"), np.zeros((TINY_SIZE, TINY_SIZE), np.uint8))
    path = meta_index(tmp_path, [{"img_path": "test/good/img/a.png", "mask_path": "empty.png", "anomaly": 0}])
    assert dataset.list_samples(path, "test") == [dataset.Sample(str(tmp_path / "test/good/img/a.png"), None, 0)]


def run_shell(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


@pytest.mark.parametrize("script, args, env, fragment", [
    ("train.sh", ["frobnicate"], {}, "unknown protocol 'frobnicate'"),
    ("test.sh", ["indomian"], {}, "unknown protocol 'indomian'"),
    ("test.sh", ["crossorgan"], {"TARGETS": "Brain"}, "TARGETS must name two datasets"),
    ("test.sh", ["all"], {"TARGETS": "Brain"}, "TARGETS must name two datasets"),
])
def test_launcher_scripts_stop_on_a_typo_before_any_job(tmp_path, script, args, env, fragment):
    (tmp_path / "Brain").mkdir()
    done = run_shell(script, *args, DATA_ROOT=str(tmp_path), SAVE_ROOT=str(tmp_path / "ck"),
                     RESULTS=str(tmp_path / "res"), **env)
    assert done.returncode == 2 and fragment in done.stderr and "unbound variable" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Brain"]  # no job ran


def test_compare_figure_is_written_in_the_format_its_name_says(tmp_path):
    figure = visualize_compare.comparison_figure([noise_image()], np.random.default_rng(0).random((1, 1, 64, 64)),
                                                 [np.zeros((64, 64), bool)], ["a"])
    assert visualize_compare.figure_bytes(figure, visualize_compare.figure_format(Path("x.jpg")))[:3] == b"\xff\xd8\xff"
    assert visualize_compare.figure_bytes(figure, visualize_compare.figure_format(Path("x.png")))[:4] == b"\x89PNG"
    with pytest.raises(InputError, match=r"--save_path .*x.xyz: give a file name ending in one of .*\.jpg"):
        visualize_compare.main(["--checkpoint_path", "missing.pth", "--data_path", "missing",
                                "--save_path", str(tmp_path / "x.xyz")])


@pytest.mark.parametrize("argv, fragment", [
    (["--image_paths", *["one.png"] * 400], "--image_paths: at most 40 images in one figure, got 400"),
    (["--n_abnormal", "300", "--n_normal", "100"], "--n_abnormal \\+ --n_normal: at most 40 images"),
    (["--seed", str(2 ** 32)], r"--seed: must be in \[0, 2\*\*32\)"),
])
def test_compare_figure_size_is_capped(argv, fragment):
    with pytest.raises(InputError, match=fragment):
        visualize_compare.parse_args(["--checkpoint_path", "a.pth", "--data_path", "d", *argv])


def test_compare_refuses_an_image_given_twice(tmp_path):
    image = write_png(tmp_path / "a.png", 50)
    samples = [dataset.Sample(str(image), None, 0)]
    os.symlink(image, tmp_path / "link.png")
    with pytest.raises(InputError, match="link.png: given twice"):
        visualize_compare.find_samples(samples, [str(image), str(tmp_path / "link.png")], "the split")


# ------------------------------------------------------------------------ 8. output names, environment, results files

@pytest.mark.parametrize("name, kind, extra", [
    ("train_log.txt", "dir", []), ("curves.png", "dir", []), ("metrics.csv", "dir", []), (".lock", "dir", []),
    ("args.json", "dir", ["--overwrite"]), ("best.pth", "dir", ["--overwrite"]),
    ("epoch_1.pth", "dir", ["--overwrite"]),
    ("tensorboard", "file", ["--tensorboard"]),
])
def test_training_output_names_taken_are_refused_before_the_work(tmp_path, data, name, kind, extra):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).mkdir() if kind == "dir" else (run / name).write_text("x")
    with pytest.raises(InputError, match=f"--save_path {run}: {name} is taken by a "
                                         f"{'folder' if kind == 'dir' else 'file'}"):
        train.main(["--train_data_path", data, "--save_path", str(run), "--epoch", "1", *TINY_BATCH_8, *extra])
    assert not (run / "args.json").is_file() and not any(path.is_file() for path in run.glob("*.pth"))


@pytest.mark.parametrize("name, kind, extra", [
    ("test_log.txt", "dir", []), (".lock", "dir", []), ("maps", "file", ["--save_maps"]),
    ("visualization", "file", ["--visualize", "1"]), ("maps/Brain.npy", "dir", ["--save_maps"]),
    ("maps/Brain.json", "dir", ["--save_maps"]), ("visualization/Brain/roc_image.png", "dir", ["--visualize", "1"]),
    ("visualization/Brain", "file", ["--visualize", "1"]), ("reliability_Brain.png", "dir", []),
    ("results_calibration.csv", "dir", []), ("visualization/Brain/normal", "file", ["--visualize", "1"]),
    ("visualization/Brain/abnormal", "file", ["--visualize", "1"]), ("maps/Brain_masks.npy", "dir", ["--save_maps"]),
])
def test_evaluation_output_names_taken_are_refused_before_the_work(tmp_path, data, monkeypatch, name, kind, extra):
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).mkdir() if kind == "dir" else (out / name).write_text("x")
    monkeypatch.setattr(test_script, "predict", lambda *args, **kwargs: pytest.fail("scored before the check"))
    taker = "folder" if kind == "dir" else "file"
    with pytest.raises(InputError, match=f"--save_path {out}: {name} is taken by a {taker}"):
        test_script.main(["--data_path", data, "--save_path", str(out), *EVAL, *extra])


def test_an_overlay_name_taken_is_refused_before_the_work(tmp_path, data, monkeypatch):
    out = tmp_path / "out"
    [stem] = [Path(name).stem for name in sorted(os.listdir(Path(data) / "test/good/img"))][:1]
    (out / "visualization" / "Brain" / "normal" / f"{stem}.png").mkdir(parents=True)
    monkeypatch.setattr(test_script, "predict", lambda *args, **kwargs: pytest.fail("scored before the check"))
    with pytest.raises(InputError, match=f"visualization/Brain/normal/{stem}.png is taken by a folder"):
        test_script.main(["--data_path", data, "--save_path", str(out), *EVAL, "--visualize", "1"])


def test_log_dir_under_a_file_is_refused_before_any_job(tmp_path):
    (tmp_path / "blocker").write_text("a file")
    (tmp_path / "jobs.txt").write_text(f"touch {tmp_path / 'ran'}\n")
    with pytest.raises(InputError, match=r"--log_dir \(LOG_DIR\) .*blocker/logs lies under .*blocker, which is a file"):
        run_jobs.main(["--gpus", "0", "--jobs", str(tmp_path / "jobs.txt"),
                       "--log_dir", str(tmp_path / "blocker" / "logs")])
    assert not (tmp_path / "ran").exists()


LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PEERS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}


@pytest.mark.parametrize("env, fragment", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc': expected a whole number"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: must be >= 1"),
    ({"WORLD_SIZE": "-1"}, "WORLD_SIZE=-1: must be >= 1"),
    ({"WORLD_SIZE": "2", **PEERS}, "WORLD_SIZE is 2 but RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "2", **PEERS}, "RANK=2 with WORLD_SIZE=2: ranks run from 0 to 1"),
    ({"WORLD_SIZE": "2", "RANK": "one", **PEERS}, "RANK='one': expected a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0.5", **PEERS}, "LOCAL_RANK='0.5': expected a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "29999"}, "WORLD_SIZE is 2 but MASTER_ADDR is not set"),
])
def test_bad_launcher_variables_are_one_clear_line(monkeypatch, capsys, env, fragment):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    line = one_line_error(capsys, distributed.launched_world)
    assert fragment in line


def test_a_peer_that_never_joins_stops_the_run_with_one_line(monkeypatch, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)

    def main():
        with distributed.distributed("cpu", 1):
            pytest.fail("joined without the other process")
    line = one_line_error(capsys, main)
    assert f"could not start the run's 2 processes at 127.0.0.1:{port} within --dist_timeout 1 s" in line
    assert "DistStoreError" in line


def results_file(folder: Path, result: object, scores: str | None = None) -> str:
    """A results.json as test.py writes it (manifest last), with ``scores.csv`` when given."""
    files = {"results.json": json.dumps(result)}
    if scores is not None:
        files["scores.csv"] = scores
    write_result_files(folder, files)
    return str(folder / "results.json")


def brain(**values) -> dict:
    return {"datasets": {"Brain": {"image_auroc": 0.8, "pixel_auroc": 0.9, **values}}, "args": {}}


@pytest.mark.parametrize("result, fragment", [
    ([1, 2], "not a results.json of test.py \\(a list"),
    ({"args": {}}, "no 'datasets' object"),
    ({"datasets": ["Brain"]}, "no 'datasets' object"),
    ({"datasets": {"Brain": [0.8]}}, "datasets.Brain is a list, not an object of metrics"),
    (brain(image_auroc="0.8"), "datasets.Brain.image_auroc is '0.8', not a number in \\[0, 1\\]"),
    (brain(image_auroc=True), "datasets.Brain.image_auroc is True"),
    (brain(pixel_aupro=1.5), "datasets.Brain.pixel_aupro is 1.5"),
    (brain(pixel_auroc=float("inf")), "datasets.Brain.pixel_auroc is inf"),
    (brain(pixel_auroc_ci="wide"), "datasets.Brain.pixel_auroc_ci is 'wide', not a \\[low, high\\] pair"),
    ({**brain(), "args": ["--k_shot"]}, "'args' is a list, not an object"),
    ({**brain(), "args": {"k_shot": "2"}}, "args.k_shot is '2', not a count"),
    ({**brain(), "checkpoint": "best.pth"}, "'checkpoint' is a str, not an object"),
    ({**brain(), "checkpoint": {"config": {"variant": 3}}}, "checkpoint.config is not a model config"),
    ({**brain(), "complete": False}, "an incomplete run \\(it stopped after Brain\\)"),
])
@pytest.mark.parametrize("paper", [False, True])
def test_results_files_with_wrong_field_types_are_one_clear_line(tmp_path, result, fragment, paper):
    path = results_file(tmp_path / "run", result)
    with pytest.raises(InputError, match=f"{path}: {fragment}"):
        summarize_results.main(["--results", path, *(["--paper"] if paper else [])])


def test_paper_tables_are_strict_json():
    """An infinite value never reaches the table (refused above); the table writes null for it anyway."""
    text = tables.paper_table({"a": {"pixel_auroc": float("inf"), "image_auroc": float("nan"),
                                     "image_ap": 0.5, "image_ap_ci": [float("-inf"), 0.6]}})["json"]
    rows = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))["rows"]
    assert rows == [{"variant": "a", "pixel_auroc": None, "image_auroc": None, "image_ap": 0.5,
                     "image_ap_ci": [None, 0.6]}]


def scores_csv(names: list[str], root: str = "/data/Brain") -> str:
    return "dataset,path,label,score\n" + "".join(f"Brain,{root}/test/{name},0,0.5\n" for name in names)


@pytest.mark.parametrize("second, scores, mixed", [
    (brain(n_images=2, n_abnormal=1), ["a.png", "b.png"], False),
    (brain(n_images=3, n_abnormal=1), ["a.png", "b.png"], True),
    ({**brain(n_images=2, n_abnormal=1), "args": {"split": "valid"}}, ["a.png", "b.png"], True),
    (brain(n_images=2, n_abnormal=1), ["a.png", "c.png"], True),
])
def test_runs_on_different_data_are_not_put_in_one_table(tmp_path, second, scores, mixed):
    """Two runs named Brain: one table only when they scored the same images (wherever the data lay)."""
    first = results_file(tmp_path / "a", {**brain(n_images=2, n_abnormal=1), "args": {"data_path": ["/data/Brain"]}},
                         scores_csv(["a.png", "b.png"]))
    second = results_file(tmp_path / "b", {**second, "args": {"data_path": ["/copy/Brain"], **second["args"]}},
                          scores_csv(scores, "/copy/Brain"))
    for argv in (["--paper", "--names", "x", "y"], []):
        if mixed:
            with pytest.raises(InputError, match=f"{second} scored other data as Brain than {first} did"):
                summarize_results.main(["--results", first, second, *argv])
        else:
            summarize_results.main(["--results", first, second, *argv])


@pytest.mark.parametrize("blocker", ["read-only", "under a file", "name"])
def test_summary_output_problems_are_refused_before_reading(tmp_path, monkeypatch, blocker):
    missing = str(tmp_path / "never_read" / "results.json")
    save_path, argv, fragment = tmp_path / "out", [], "is not writable"
    if blocker == "read-only":
        save_path.mkdir()
        real_access = os.access
        monkeypatch.setattr(os, "access",
                            lambda path, mode: False if Path(path) == save_path else real_access(path, mode))
        fragment = f"--save_path {save_path}: the folder is not writable"
    elif blocker == "under a file":
        (tmp_path / "blocker").write_text("a file")
        save_path, fragment = tmp_path / "blocker" / "out", "lies under .*blocker, which is a file"
    else:
        argv, fragment = ["--paper", "--name", "../escaped"], "--name '../escaped': must be a plain name"
    with pytest.raises(InputError, match=fragment):
        summarize_results.main(["--results", missing, "--save_path", str(save_path), *argv])


def test_streamed_maps_reserve_their_disk_before_scoring(tmp_path, monkeypatch):
    """Maps streamed to memory-mapped files take their blocks up front: a disk too small ends with
    one line naming the folder, not with a bus error when a page is first written."""
    from CLIP.MedVMAD import MedVMADOutput
    from evaluation.predict import predict

    class Maps(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> MedVMADOutput:
            maps = torch.zeros(len(images), 8, 8, dtype=torch.float64)
            return MedVMADOutput(torch.zeros(len(images), dtype=torch.float64), maps, maps, maps, [], maps, None)

    items = [dict(image=torch.zeros(3, 8, 8), path=str(i), label=i % 2, has_mask=True, mask=torch.zeros(8, 8))
             for i in range(4)]
    loader = torch.utils.data.DataLoader(items, batch_size=2)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(InputError, match=rf"no space left to stream the maps to {tmp_path / 'maps'} "):
        predict(Maps(), loader, torch.device("cpu"), maps_dir=tmp_path / "maps")
    monkeypatch.undo()
    predictions = predict(Maps(), loader, torch.device("cpu"), maps_dir=tmp_path / "ok")
    assert os.stat(tmp_path / "ok" / "maps.npy").st_blocks * 512 >= predictions.maps.nbytes  # really allocated
