"""Bad input, class by class (issue #12): each ends in one clear InputError line naming the flag or
the file, or is refused before any work starts; never a traceback or a confident wrong answer."""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import nibabel
import numpy as np
import pytest
import torch

import test_one_example
import train
from CLIP.MedVMAD import MedVMAD
from CLIP.backbone import BackboneConfig
from CLIP.checkpoint import load_model, save_checkpoint
from tests.helpers import BASELINE, ROOT, TINY, TINY_SIZE, test_script, tiny_config
from dataset import MedicalDataset, list_samples, load_image, read_support
from generate_dataset import brats2021, demo, folder, liverct
from generate_dataset.demo import build_demo
from scans.files import read_scan
from utils import (InputError, atomic_write_text, locked_folder, read_manifest, run_cli,
                   write_result_files)




@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return build_demo(str(tmp_path_factory.mktemp("data")), n_train=2, n_valid=(4, 4), n_test=(2, 2),
                      image_size=TINY_SIZE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny checkpoint as train.py writes best.pth (no optimizer state)."""
    path = tmp_path_factory.mktemp("ckpt") / "best.pth"
    torch.manual_seed(0)
    save_checkpoint(path, MedVMAD(tiny_config()), epoch=1, threshold=0.5)
    return path


def run_script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def assert_one_line_error(done: subprocess.CompletedProcess, fragment: str) -> None:
    """Exit code 2, no traceback, and the last stderr line is the error (log lines may precede it)."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, last


# ----------------------------------------------------------------------------- 1. non-finite input

def float_tiff(path: Path, bad: float) -> Path:
    image = np.full((TINY_SIZE, TINY_SIZE), 0.5, np.float32)
    image[10:20, 10:20] = bad
    assert cv2.imwrite(str(path), image)
    return path


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_image_is_refused_naming_the_file(tmp_path, bad):
    path = float_tiff(tmp_path / "scan.tiff", bad)
    with pytest.raises(InputError, match=rf"{path}.* NaN or infinite"):
        load_image(str(path))
    with pytest.raises(InputError, match=str(path)):
        read_scan(str(path))


def test_non_finite_image_in_a_dataset_stops_before_scoring(tmp_path):
    normal = tmp_path / "normal"
    normal.mkdir()
    float_tiff(normal / "a.tiff", 0.5)
    bad = float_tiff(normal / "b.tiff", np.nan)
    folder.build_index(str(tmp_path / "meta.json"), str(normal), None)
    dataset = MedicalDataset(list_samples(str(tmp_path / "meta.json"), "test"), TINY_SIZE)
    with pytest.raises(InputError, match=str(bad)):
        dataset[1]
    assert len(MedicalDataset(dataset.samples, TINY_SIZE, skip_bad=True)) == 1  # --skip_bad drops it


def test_nifti_with_an_inf_region_is_refused_not_called_normal(tmp_path):
    volume = np.random.default_rng(0).uniform(1, 100, (16, 16, 4)).astype(np.float32)
    volume[4:8, 4:8, 2] = np.inf
    path = tmp_path / "vol.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(path))
    with pytest.raises(InputError, match=rf"{path}: holds 16 NaN or infinite"):
        test_one_example.main(["--image_path", str(path), "--save_path", str(tmp_path / "out"), *BASELINE])
    assert not (tmp_path / "out" / "predictions.jsonl").exists() or \
        not (tmp_path / "out" / "predictions.jsonl").read_text()


def test_a_nan_score_is_never_written_as_a_decision(tmp_path, monkeypatch):
    """A model whose score is NaN (say, NaN weights): test_one_example and the web demo both refuse."""
    import app

    image = tmp_path / "scan.png"
    cv2.imwrite(str(image), np.full((TINY_SIZE, TINY_SIZE), 128, np.uint8))
    real_forward = MedVMAD.forward

    def nan_forward(self, images):
        output = real_forward(self, images)
        output.image_score = output.image_score * float("nan")
        return output

    monkeypatch.setattr(MedVMAD, "forward", nan_forward)
    with pytest.raises(InputError, match=rf"{image}: the model gave a NaN score"):
        test_one_example.main(["--image_path", str(image), "--save_path", str(tmp_path / "out"), *BASELINE])
    assert not (tmp_path / "out" / "predictions.jsonl").exists()  # no record, and no empty file either
    args = test_one_example.parse_args(["--image_path", str(image), *BASELINE])
    model, threshold, source = test_one_example.build(args, torch.device("cpu"))
    with pytest.raises(InputError, match="NaN score"):
        app.Scorer(model, threshold, source, args, torch.device("cpu"))(str(image))


# ----------------------------------------------------------------------------- 2. index and label values

def write_meta(tmp_path: Path, test_split) -> str:
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8), np.uint8))
    (tmp_path / "meta.json").write_text(json.dumps({"test": test_split}))
    return str(tmp_path / "meta.json")


def entry(**values) -> dict:
    return {"img_path": "a.png", "mask_path": "", "anomaly": 0, **values}


@pytest.mark.parametrize("split, fragment", [
    (3, "split 'test' must map class names to lists"),
    (None, "split 'test' must map class names to lists"),
    ({"brain": "a.png"}, "split 'test' must map class names to lists"),
    ({"brain": [entry(anomaly=2)]}, r"test/brain\[0\]: anomaly must be 0 \(normal\) or 1 \(abnormal\), got 2"),
    ({"brain": [entry(anomaly=-1)]}, "got -1"),
    ({"brain": [entry(anomaly=0.9)]}, "got 0.9"),
    ({"brain": [entry(anomaly="1")]}, "got '1'"),
    ({"brain": [entry(anomaly=True)]}, "got True"),
    ({"brain": [entry(anomaly=None)]}, "got None"),
    ({"brain": ["a.png"]}, r"test/brain\[0\] is str, not an object"),
    ({"brain": [entry(img_path=3)]}, "img_path must be a non-empty string, got 3"),
    ({"brain": [entry(mask_path=5, anomaly=1)]}, "mask_path must be a string or empty"),
    ({"brain": [entry(), entry()]}, r"test/brain\[1\] lists .*a.png again \(first at test/brain\[0\]\)"),
    ({"brain": [entry()], "liver": [entry(anomaly=1)]}, r"test/liver\[0\] lists .*a.png again"),
])
def test_malformed_index_values_are_refused(tmp_path, split, fragment):
    with pytest.raises(InputError, match=fragment):
        list_samples(write_meta(tmp_path, split), "test")


def test_integral_float_labels_are_read(tmp_path):
    samples = list_samples(write_meta(tmp_path, {"brain": [entry(anomaly=0.0)]}), "test")
    assert [s.label for s in samples] == [0] and isinstance(samples[0].label, int)


def test_a_support_file_listing_an_image_twice_is_refused(tmp_path, data):
    support = tmp_path / "support.txt"
    support.write_text("0\tvalid/good/img/" + sorted(os.listdir(Path(data) / "valid/good/img"))[0] + "\n" * 1)
    support.write_text(support.read_text() * 2)
    with pytest.raises(InputError, match="line 2: .* is listed twice"):
        read_support(str(support), data)


# ----------------------------------------------------------------------------- 3. numeric flags at parse time

PARSERS = {"train": train.parse_args, "test": test_script.parse_args, "one": test_one_example.parse_args}
ONE = ["--image_path", "x.png"]


@pytest.mark.parametrize("script, argv, fragment", [
    ("train", ["--image_size", "0"], "argument --image_size: must be >= 1, got 0"),
    ("train", ["--image_size", "-14"], "argument --image_size: must be >= 1"),
    ("train", ["--batch_size", "0"], "argument --batch_size: must be >= 1, got 0"),
    ("train", ["--epoch", "0"], "argument --epoch: must be >= 1, got 0"),
    ("train", ["--learning_rate", "nan"], "argument --learning_rate: expected a finite number, got 'nan'"),
    ("train", ["--learning_rate", "0"], "argument --learning_rate: must be > 0"),
    ("train", ["--learning_rate", "inf"], "argument --learning_rate: expected a finite number"),
    ("train", ["--alpha", "nan"], "argument --alpha: expected a finite number"),
    ("train", ["--alpha", "1.5"], r"argument --alpha: must be in \[0, 1\]"),
    ("train", ["--sigma", "nan"], "argument --sigma: expected a finite number"),
    ("train", ["--sigma", "-1"], r"argument --sigma: must be in \[0, 10000\]"),
    ("train", ["--k_shot", "-2"], "argument --k_shot: must be >= 0, got -2"),
    ("train", ["--holdout_fraction", "1.5"], r"argument --holdout_fraction: must be in \[0, 1\]"),
    ("train", ["--features_list", "0", "2"], "argument --features_list: must be >= 1"),
    ("train", ["--num_workers", "-1"], "argument --num_workers: must be >= 0"),
    ("train", ["--seed", "-1"], r"argument --seed: must be in \[0, 2\*\*32\)"),
    ("train", ["--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
    ("train", ["--device", "gpu0"], "argument --device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu0'"),
    ("train", ["--dice_weight", "-1"], "argument --dice_weight: must be >= 0"),
    ("train", ["--focal_weight", "0", "--dice_weight", "0", "--normal_dice_weight", "0", "--image_weight", "0"],
     "all 0: nothing to train"),
    ("train", ["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
    ("test", ["--batch_size", "0"], "argument --batch_size: must be >= 1"),
    ("test", ["--image_size", "0"], "argument --image_size: must be >= 1"),
    ("test", ["--sigma", "nan"], "argument --sigma: expected a finite number"),
    ("test", ["--k_shot", "-1"], "argument --k_shot: must be >= 0"),
    ("test", ["--visualize", "-3"], "argument --visualize: must be >= 0"),
    ("test", ["--fewshot_weight", "nan"], "argument --fewshot_weight: expected a finite number"),
    ("test", ["--device", "tpu"], "argument --device: expected auto"),
    ("one", ONE + ["--threshold", "nan"], "argument --threshold: expected a finite number"),
    ("one", ONE + ["--threshold", "2"], r"argument --threshold: must be in \[0, 1\]"),
    ("one", ONE + ["--window", "0", "inf"], "argument --window: expected a finite number"),
    ("one", ONE + ["--axis", "3"], "argument --axis: invalid choice: 3"),
    ("one", ONE + ["--slices", "-1", "4"], "argument --slices: must be >= 0"),
    ("one", ONE + ["--top_k", "0"], "argument --top_k: must be >= 1"),
    ("one", ONE + ["--batch_size", "0"], "argument --batch_size: must be >= 1"),
])
def test_bad_flags_are_refused_at_parse_time(script, argv, fragment):
    with pytest.raises(InputError, match=fragment):
        PARSERS[script](argv)


@pytest.mark.parametrize("main, argv, fragment", [
    (demo.main, ["--n_test", "-1", "5"], "argument --n_test: must be >= 1, got -1"),
    (demo.main, ["--n_valid", "4", "0"], "argument --n_valid: must be >= 1, got 0"),
    (demo.main, ["--n_train", "0"], "argument --n_train: must be >= 1"),
    (brats2021.main, ["--raw_path", "r", "--save_path", "s", "--split", "0.7", "nan", "0.2"],
     "argument --split: expected a finite number"),
    (brats2021.main, ["--raw_path", "r", "--save_path", "s", "--slice_range", "-5", "9"],
     "argument --slice_range: must be >= 0"),
    (liverct.main, ["--btcv_path", "b", "--lits_path", "l", "--save_path", "s", "--valid_fraction", "2"],
     r"argument --valid_fraction: must be in \[0, 1\]"),
    (liverct.main, ["--btcv_path", "b", "--lits_path", "l", "--save_path", "s", "--hu_window", "nan", "2"],
     "argument --hu_window: expected a finite number"),
    (folder.main, ["--normal", "n"], "the following arguments are required: --save_path"),
])
def test_generator_flags_are_refused_at_parse_time(main, argv, fragment):
    with pytest.raises(InputError, match=fragment):
        main(argv)


def test_image_size_below_the_patch_is_refused(tmp_path):
    image = tmp_path / "scan.png"
    cv2.imwrite(str(image), np.zeros((32, 32), np.uint8))
    with pytest.raises(InputError, match="--image_size 8 is smaller than tiny's patch size 16; use at least 16"):
        test_one_example.main(["--image_path", str(image), "--save_path", str(tmp_path / "out"),
                               *BASELINE, "--image_size", "8"])


def test_image_size_not_a_multiple_of_the_patch_keeps_the_map_in_place(caplog, monkeypatch):
    """72 px with 16 px patches: the ViT sees 4 patches (64 px). The last patch's value must sit on
    pixels 48-63 (its peak from pixel 56, the bilinear centre 55.5), not be stretched to 72 px
    (peak from pixel 63); the 8 unseen pixels repeat the edge."""
    monkeypatch.setattr(logging.getLogger("medvmad"), "propagate", True)  # setup_logging turns it off
    with caplog.at_level("WARNING", logger="medvmad"):
        model = MedVMAD(tiny_config(backbone=BackboneConfig("tiny", "none", 72)))
    assert "72 is not a multiple of the patch size 16" in caplog.text
    values = torch.zeros(1, 1, 16)
    values[0, 0, 3] = 1.0  # row 0, column 3 of the 4x4 grid
    heat = model._upsample(values, (72, 72))[0, 0]
    assert heat.shape == (72, 72)
    assert int(torch.argmax(heat[0])) == 56
    assert torch.equal(heat[:, 64:], heat[:, 63:64].expand(72, 8)) and float(heat[0, 39]) == 0.0


# ----------------------------------------------------------------------------- 4. divergence

def test_a_diverging_learning_rate_ends_with_the_nan_line(tmp_path, data):
    done = run_script("train.py", "--train_data_path", data, "--save_path", str(tmp_path / "run"),
                      "--epoch", "2", "--learning_rate", "1e6", *TINY, "--batch_size", "2")
    assert_one_line_error(done, "loss became nan at epoch 1 step 2")
    assert "last good checkpoint: none yet" in done.stderr.strip().splitlines()[-1]


def test_a_non_finite_weight_after_a_step_stops_the_run(tmp_path, data, monkeypatch):
    class PoisonedAdam(torch.optim.Adam):
        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))

    monkeypatch.setattr(torch.optim, "Adam", PoisonedAdam)
    with pytest.raises(InputError, match="a weight became NaN or infinite at epoch 1 step 1 .*none yet"):
        train.main(["--train_data_path", data, "--save_path", str(tmp_path / "run"), "--epoch", "1", *TINY])


# ----------------------------------------------------------------------------- 5. weights and checkpoints

@pytest.mark.parametrize("name, content", [
    ("random.pt", os.urandom(2048)), ("random.bin", os.urandom(2048)), ("random.safetensors", os.urandom(2048)),
    ("text.pt", b"these are not weights\n"), ("zip.pt", b"PK\x03\x04garbage"),
])
def test_unreadable_pretrained_weights_are_one_clear_error(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    image = tmp_path / "scan.png"
    cv2.imwrite(str(image), np.zeros((32, 32), np.uint8))
    with pytest.raises(InputError, match=rf"--pretrained {tmp_path / name}: not a readable weights file") as caught:
        test_one_example.main(["--image_path", str(image), "--save_path", str(tmp_path / "out"),
                               "--model_name", "tiny", "--pretrained", str(tmp_path / name),
                               "--image_size", str(TINY_SIZE), "--device", "cpu"])
    assert "weights_only" not in str(caught.value)


def damaged(checkpoint: Path, tmp_path: Path, change) -> Path:
    payload = torch.load(checkpoint, weights_only=True)
    change(payload)
    torch.save(payload, tmp_path / "damaged.pth")
    return tmp_path / "damaged.pth"


@pytest.mark.parametrize("change, fragment", [
    (lambda p: p.pop("trainable"), "holds no 'trainable' tensors"),
    (lambda p: p.update(trainable=[1, 2]), "holds no 'trainable' tensors"),
    (lambda p: p.pop("config"), r"bad model config: 'config' is NoneType"),
    (lambda p: p["config"].update(extra_key=1), r"unknown 'config' key\(s\) \['extra_key'\]"),
    (lambda p: p["config"]["backbone"].update(colour=1), r"unknown 'config.backbone' key\(s\) \['colour'\]"),
    (lambda p: p["config"]["backbone"].pop("model_name"), r"'config.backbone' lacks \['model_name'\]"),
    (lambda p: p["config"].pop("backbone"), r"'config' lacks \['backbone'\]"),
    (lambda p: p["trainable"].update({next(iter(p["trainable"])): torch.tensor([float("nan")])}),
     "hold NaN or inf"),
    (lambda p: p["trainable"].pop(next(iter(p["trainable"]))), "checkpoint does not fit this model"),
])
def test_damaged_or_foreign_checkpoints_are_clear_errors(tmp_path, checkpoint, change, fragment):
    path = damaged(checkpoint, tmp_path, change)
    with pytest.raises(InputError, match=rf"^--checkpoint_path {path}: .*{fragment}"):
        load_model(path, torch.device("cpu"))


def test_a_missing_optional_config_key_takes_its_default(tmp_path, checkpoint):
    path = damaged(checkpoint, tmp_path, lambda p: p["config"].pop("fewshot_weight"))
    model, _ = load_model(path, torch.device("cpu"))
    assert model.config.fewshot_weight == 0.5


@pytest.mark.parametrize("content", [b"random bytes \x00\x01", b"a text file\n"])
def test_a_checkpoint_that_is_not_one_names_the_flag(tmp_path, content):
    (tmp_path / "best.pth").write_bytes(content)
    with pytest.raises(InputError, match=rf"^--checkpoint_path {tmp_path / 'best.pth'}: not a readable checkpoint"):
        load_model(tmp_path / "best.pth", torch.device("cpu"))


def test_resume_from_best_pth_says_to_use_an_epoch_checkpoint(tmp_path, data, checkpoint):
    with pytest.raises(InputError, match=rf"^--resume {checkpoint} holds no optimizer/rng/best/args state .*"
                                         r"resume from an epoch_<n>.pth"):
        train.main(["--train_data_path", data, "--save_path", str(tmp_path / "run"), "--epoch", "2",
                    "--resume", str(checkpoint), *TINY])
    with pytest.raises(InputError, match=rf"^--resume {tmp_path / 'nope.pth'}: no such file"):
        train.main(["--train_data_path", data, "--save_path", str(tmp_path / "run"), "--epoch", "2",
                    "--resume", str(tmp_path / "nope.pth"), *TINY])


# ----------------------------------------------------------------------------- 6. output paths

def script_mains(tmp_path: Path, data: str, save_path: str) -> list:
    """Each script's main with a --save_path (the data arguments never get read when it is bad)."""
    return [
        (train.main, ["--train_data_path", data, "--save_path", save_path, *TINY]),
        (test_script.main, ["--data_path", data, "--save_path", save_path, *BASELINE]),
        (test_one_example.main, ["--image_path", data, "--save_path", save_path, *BASELINE]),
        (demo.main, ["--save_path", save_path]),
        (brats2021.main, ["--raw_path", str(tmp_path), "--save_path", save_path]),
        (liverct.main, ["--btcv_path", str(tmp_path), "--lits_path", str(tmp_path), "--save_path", save_path]),
        (folder.main, ["--normal", str(Path(data) / "train/good/img"), "--save_path", save_path + "/meta.json"]),
    ]


@pytest.mark.parametrize("where, fragment", [("file", "is a file, not a folder"),
                                             ("under", "lies under .*blocker, which is a file")])
def test_save_path_that_is_or_lies_under_a_file_is_refused(tmp_path, data, where, fragment):
    (tmp_path / "blocker").write_text("a file")
    save_path = str(tmp_path / "blocker") + ("/out" if where == "under" else "")
    for main, argv in script_mains(tmp_path, data, save_path):
        with pytest.raises(InputError, match=fragment):
            main(argv)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_save_path_that_is_not_writable_is_refused(tmp_path, data):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    for main, argv in script_mains(tmp_path, data, str(locked / "out"))[:3]:
        with pytest.raises(InputError, match="cannot create the folder"):
            main(argv)


def test_result_names_taken_by_folders_are_refused_before_the_work(tmp_path):
    (tmp_path / "out" / "results.json").mkdir(parents=True)
    # The data path does not exist: the output check comes first.
    with pytest.raises(InputError, match="--save_path .*out: results.json is taken by a folder"):
        test_script.main(["--data_path", str(tmp_path / "missing"), "--save_path", str(tmp_path / "out"), *BASELINE])
    (tmp_path / "one" / "predictions.jsonl").mkdir(parents=True)
    with pytest.raises(InputError, match="predictions.jsonl is taken by a folder"):
        test_one_example.main(["--image_path", str(tmp_path), "--save_path", str(tmp_path / "one"), *BASELINE])


def test_run_cli_reports_an_output_path_error_on_one_line(tmp_path):
    (tmp_path / "blocker").write_text("a file")
    done = run_script("-m", "generate_dataset.demo", "--save_path", str(tmp_path / "blocker" / "demo"))
    assert_one_line_error(done, "lies under")
    assert done.stderr.strip().count("\n") == 0


# ----------------------------------------------------------------------------- 7. runs that overwrite each other

def test_a_used_folder_is_refused_and_overwrite_clears_the_old_run(tmp_path, data):
    run = tmp_path / "run"
    train.main(["--train_data_path", data, "--save_path", str(run), "--epoch", "1", *TINY])
    first = (run / "best.pth").read_bytes()
    with pytest.raises(InputError, match="holds another run .*--resume.*--overwrite"):
        train.main(["--train_data_path", data, "--save_path", str(run), "--epoch", "1", *TINY])
    assert (run / "best.pth").read_bytes() == first  # untouched
    (run / "epoch_7.pth").write_bytes(first)  # a checkpoint the new run would never write
    train.main(["--train_data_path", data, "--save_path", str(run), "--epoch", "1", "--overwrite",
                "--seed", "5", *TINY])
    assert sorted(p.name for p in run.glob("*.pth")) == ["best.pth", "epoch_1.pth"]
    assert json.loads((run / "args.json").read_text())["args"]["seed"] == 5
    log = (run / "train_log.txt").read_text()
    assert "--overwrite: deleted the previous run's" in log and log.count("model tiny") == 1


def test_a_folder_in_use_by_a_live_run_is_refused(tmp_path, data):
    run = tmp_path / "run"
    run.mkdir()
    with locked_folder(run):  # as a concurrent training holds it
        with pytest.raises(InputError, match="is in use by another running process"):
            train.main(["--train_data_path", data, "--save_path", str(run), "--epoch", "1", *TINY])
        with pytest.raises(InputError, match="is in use by another running process"):
            test_script.main(["--data_path", data, "--save_path", str(run), *BASELINE])
    assert not (run / "args.json").exists()


def test_a_lock_is_released_when_its_process_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.'); "
                               "from utils import locked_folder\n"
                               f"with locked_folder({str(tmp_path)!r}):\n print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match="in use"):
            with locked_folder(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with locked_folder(tmp_path):  # kill -9 leaves no stale lock
        pass


def test_stale_temp_files_of_interrupted_saves_are_removed_under_the_lock(tmp_path):
    stale = [tmp_path / ".best.pth.k2j_x9a1.tmp", tmp_path / ".results.json.abcd1234.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / "best.pth"]
    for path in stale + kept:
        path.write_text("x")
    with locked_folder(tmp_path):
        pass
    assert [p.exists() for p in stale] == [False, False] and all(p.exists() for p in kept)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask_not_mkstemp(tmp_path, umask, mode, checkpoint):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "results.json", "{}")
        save_checkpoint(tmp_path / "best.pth", MedVMAD(tiny_config()), epoch=1)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "best.pth").stat().st_mode) == mode


def test_result_files_are_written_as_one_unit(tmp_path, monkeypatch):
    write_result_files(tmp_path, {"results.json": "{}\n", "results.csv": "a,b\n"})
    assert read_manifest(tmp_path) == ["results.json", "results.csv"]

    import utils
    real = utils.atomic_write_text

    def killed_after_the_first(path, text):
        if Path(path).name == "results.csv":
            raise KeyboardInterrupt  # the run is stopped between two files
        real(path, text)

    monkeypatch.setattr(utils, "atomic_write_text", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        write_result_files(tmp_path, {"results.json": '{"new": 1}\n', "results.csv": "c,d\n"})
    with pytest.raises(InputError, match="no valid manifest.json; the run that wrote it was interrupted"):
        read_manifest(tmp_path)
    monkeypatch.undo()
    write_result_files(tmp_path, {"results.json": "{}\n", "results.csv": "a,b\n"})
    (tmp_path / "results.csv").write_text("from another run\n")
    with pytest.raises(InputError, match="results.csv does not match .*files of two runs are mixed"):
        read_manifest(tmp_path)
    # an optional file of an older run that this run does not write is removed, not left beside it
    write_result_files(tmp_path, {"results.json": "{}\n", "results_per_class.csv": "x\n"})
    write_result_files(tmp_path, {"results.json": "{}\n"}, stale=("results.json", "results_per_class.csv"))
    assert not (tmp_path / "results_per_class.csv").exists() and read_manifest(tmp_path) == ["results.json"]


# ----------------------------------------------------------------------------- 8. one line with the path

@pytest.mark.parametrize("message, line", [
    ("a.dcm: unreadable DICOM (RuntimeError: Unable to decode:\n  pillow: cannot identify image file)",
     "error: a.dcm: unreadable DICOM (RuntimeError: Unable to decode: | pillow: cannot identify image file)"),
    ("Caught InputError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
     '  File "dataset.py", line 3, in load\nutils.InputError: cannot read image /d/x.png (corrupt)\n',
     "error: cannot read image /d/x.png (corrupt)"),
    ("", "error: bad input"),
])
def test_run_cli_keeps_the_whole_message_on_one_line(capsys, message, line):
    def main():
        raise InputError(message)

    with pytest.raises(SystemExit) as caught:
        run_cli(main)
    assert caught.value.code == 2 and capsys.readouterr().err == line + "\n"


def test_compressed_dicom_without_a_decoder_keeps_its_path(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import JPEG2000Lossless

    meta = FileMetaDataset()
    meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = \
        JPEG2000Lossless, "1.2.840.10008.5.1.4.1.1.2", "1.2.3"
    scan = Dataset()
    scan.file_meta = meta
    scan.Rows = scan.Columns = 8
    scan.BitsAllocated = scan.BitsStored = 16
    scan.HighBit, scan.PixelRepresentation, scan.SamplesPerPixel = 15, 0, 1
    scan.PhotometricInterpretation = "MONOCHROME2"
    scan.PixelData = pydicom.encaps.encapsulate([b"\x00" * 20])
    path = tmp_path / "compressed.dcm"
    scan.save_as(str(path), enforce_file_format=True)
    done = run_script("test_one_example.py", "--image_path", str(path), "--save_path", str(tmp_path / "out"),
                      *BASELINE)
    assert_one_line_error(done, f"{path}: unreadable DICOM")
