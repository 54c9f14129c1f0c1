"""torchrun on CPU: 2 gloo processes, the tiny model. DDP training ends where one process ends, a
killed run resumes to the same weights, sharded test.py writes what one process writes, and a
failing rank stops the run with one clear line instead of a hang."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from CLIP.checkpoint import load_model
from distributed import SINGLE, Distributed, GlobalBatchSampler, ShardedBatches, launched_world
from generate_dataset.demo import build_demo
from evaluation.maps_io import load_maps
from tests.helpers import ROOT, TINY, TINY_SIZE, free_port
from utils import InputError

# each run gives its global batch after helpers' TINY (which says --batch_size 4): argparse keeps the last
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
EPOCHS = 3


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """The demo Brain set, and a copy whose abnormal images have no masks: trained together, the two
    processes' batches hold different numbers of masked images."""
    root = tmp_path_factory.mktemp("ddp_data")
    brain = build_demo(str(root), n_train=4, n_valid=(8, 8), n_test=(6, 6), image_size=TINY_SIZE)
    unmasked = root / "Unmasked"
    shutil.copytree(brain, unmasked)
    for split in ("valid", "test"):
        shutil.rmtree(unmasked / split / "Ungood" / "anomaly_mask")
    return {"brain": brain, "unmasked": str(unmasked)}


def train_args(data: dict[str, str], save_path: Path, *extra: str) -> list[str]:
    return ["--train_data_path", data["brain"], data["unmasked"], "--save_path", str(save_path),
            "--epoch", str(EPOCHS), "--learning_rate", "1e-3", *TINY, "--batch_size", "4", *extra]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """Three training runs: one process; two processes; two processes SIGKILLed once epoch 1 was
    written, then resumed from it."""
    root = tmp_path_factory.mktemp("ddp_runs")
    torch.manual_seed(0)
    train.main(train_args(data, root / "one"))
    done = run(TORCHRUN + ["train.py"] + train_args(data, root / "two"))
    assert done.returncode == 0, done.stderr[-3000:]

    killed = root / "killed"
    process = subprocess.Popen(TORCHRUN + ["train.py"] + train_args(data, killed), cwd=ROOT, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "epoch_1.pth").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (killed / "epoch_1.pth").exists()
    for later in range(2, EPOCHS + 1):  # whatever the kill let through: resume from epoch 1
        (killed / f"epoch_{later}.pth").unlink(missing_ok=True)
    resumed = run(TORCHRUN + ["train.py"] + train_args(data, killed, "--resume", str(killed / "epoch_1.pth")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"one": root / "one", "two": root / "two", "killed": killed}


def last_epoch(run_path: Path) -> dict:
    return torch.load(run_path / f"epoch_{EPOCHS}.pth", weights_only=True)


def test_two_processes_train_to_the_weights_of_one(runs):
    """Global batch 4 over 2 processes = batch 4 in one process, to 1e-5, after 3 epochs of steps whose
    halves hold different numbers of masked images; the checkpoints have one format."""
    one, two = last_epoch(runs["one"]), last_epoch(runs["two"])
    assert set(one) == set(two) and set(one["trainable"]) == set(two["trainable"])
    initial = torch.load(runs["two"] / "epoch_1.pth", weights_only=True)["trainable"]
    moved = max(float((two["trainable"][k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-3  # training went on after epoch 1
    for key, weight in one["trainable"].items():
        torch.testing.assert_close(two["trainable"][key], weight, atol=1e-5, rtol=0, msg=key)
    for key, value in one["train_loss"].items():
        assert two["train_loss"][key] == pytest.approx(value, rel=1e-5), key
    assert len(one["rng"]) == 1 and len(two["rng"]) == 2
    assert not torch.equal(two["rng"][0]["torch"], two["rng"][1]["torch"])  # each rank its own seed
    assert json.loads((runs["two"] / "args.json").read_text())["world_size"] == 2
    model, _ = load_model(runs["two"] / "best.pth", torch.device("cpu"))  # a DDP checkpoint in one process
    assert not any(key.startswith("module.") for key in model.trainable_state_dict())
    # process 0 alone writes: the same files as one process, and only its own log lines
    assert sorted(p.name for p in runs["two"].iterdir()) == sorted(p.name for p in runs["one"].iterdir())
    assert "[rank 1]" not in (runs["two"] / "train_log.txt").read_text()


def test_a_killed_two_process_run_resumes_to_the_same_weights(runs):
    """Weights, optimizer moments and every rank's RNG state after the resumed run equal the
    uninterrupted run's (the data loaders draw from the global RNG each epoch)."""
    uninterrupted, resumed = last_epoch(runs["two"]), last_epoch(runs["killed"])
    for key, weight in uninterrupted["trainable"].items():
        torch.testing.assert_close(resumed["trainable"][key], weight, atol=1e-6, rtol=0, msg=key)
    for moments, reference in zip(resumed["optimizer"]["state"].values(), uninterrupted["optimizer"]["state"].values()):
        torch.testing.assert_close(moments["exp_avg_sq"], reference["exp_avg_sq"], atol=1e-9, rtol=1e-5)
    for rank in range(2):
        assert torch.equal(resumed["rng"][rank]["torch"], uninterrupted["rng"][rank]["torch"]), rank
        assert resumed["rng"][rank]["numpy"][1] == uninterrupted["rng"][rank]["numpy"][1]


def test_sharded_test_writes_what_one_process_writes(runs, data, tmp_path):
    """5-image batches over 12 test images: 3 batches, so process 1 has one batch fewer. With a
    few-shot memory bank (built on every process, its support file written once) and a dataset
    without masks: metrics with bootstrap intervals, patient figures, scores.csv and the saved maps
    equal a single process's, and so do the files written."""
    args = ["--data_path", data["brain"], data["unmasked"], "--checkpoint_path", str(runs["two"] / "best.pth"),
            "--num_workers", "0", "--device", "cpu", "--batch_size", "5", "--save_maps", "--bootstrap", "30",
            "--k_shot", "2"]
    one_process = run([sys.executable, "test.py"] + args + ["--save_path", str(tmp_path / "one")])  # same threads
    assert one_process.returncode == 0, one_process.stderr[-3000:]
    single = json.loads((tmp_path / "one" / "results.json").read_text())
    sharded = run(TORCHRUN + ["test.py"] + args + ["--save_path", str(tmp_path / "two")])
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    written = json.loads((tmp_path / "two" / "results.json").read_text())
    assert "pixel_auroc" in written["datasets"]["Brain"] and "pixel_auroc" not in written["datasets"]["Unmasked"]
    assert written["datasets"] == single["datasets"]
    names = lambda folder: sorted(p.name for p in (tmp_path / folder).rglob("*"))  # noqa: E731
    assert names("two") == names("one")
    assert written["patients"] == single["patients"]
    assert (tmp_path / "two" / "scores.csv").read_text() == (tmp_path / "one" / "scores.csv").read_text()
    one, two = load_maps(tmp_path / "one" / "maps", "Brain"), load_maps(tmp_path / "two" / "maps", "Brain")
    assert two.paths == one.paths and len(set(two.paths)) == 12
    np.testing.assert_array_equal(two.maps, one.maps)
    np.testing.assert_array_equal(two.masks, one.masks)
    np.testing.assert_array_equal(two.scores, one.scores)


def test_global_batches_are_one_permutation_per_seed_and_epoch_dealt_to_the_processes():
    """One process: randperm of (seed * 1000 + epoch) cut into batches of 4, the partial last one
    dropped, a new order each epoch. Two processes: their k-th batches together are the
    one process's k-th batch. A set smaller than a batch is used whole, in shares differing by one."""
    dataset = list(range(11))

    def batches(world: int, epoch: int, size: int = 4, data=dataset) -> list[list[list[int]]]:
        per_rank = []
        for rank in range(world):
            sampler = GlobalBatchSampler(data, size, seed=7, where=Distributed(rank, world))
            sampler.set_epoch(epoch)
            order = list(sampler)
            assert len(sampler) == len(order)
            share = size // world
            per_rank.append([order[i:i + share] for i in range(0, len(order), share)])
        return per_rank

    for epoch in (1, 2):
        reference = torch.randperm(11, generator=torch.Generator().manual_seed(7 * 1000 + epoch)).tolist()
        assert batches(1, epoch) == [[reference[0:4], reference[4:8]]]
        two = batches(2, epoch)
        assert [sorted(a + b) for a, b in zip(*two)] == [sorted(reference[0:4]), sorted(reference[4:8])]
    assert batches(1, 1) != batches(1, 2)
    small = batches(2, 1, size=8, data=list(range(5)))
    assert sorted(small[0][0] + small[1][0]) == [0, 1, 2, 3, 4] and {len(small[0][0]), len(small[1][0])} == {2, 3}


def test_a_world_without_a_rank_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(InputError, match="RANK is not set: start the processes with torchrun"):
        launched_world()


def test_sharded_batches_deal_every_image_once_in_single_process_batches():
    """Process r gets batches r, r+W, ...: their union is the single process's batches, each once."""
    single = list(ShardedBatches(11, 3, SINGLE))
    assert single == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    shards = [list(ShardedBatches(11, 3, Distributed(rank, 3))) for rank in range(3)]
    assert shards == [[[0, 1, 2], [9, 10]], [[3, 4, 5]], [[6, 7, 8]]]
    assert {ShardedBatches(11, 3, Distributed(rank, 3)).rounds for rank in range(3)} == {2}


def corrupt_copy(data: dict[str, str], where: Path) -> Path:
    """A copy of the demo set with one unreadable training image."""
    copy = where / "Corrupt"
    shutil.copytree(data["brain"], copy)
    bad = sorted((copy / "valid" / "good" / "img").iterdir())[0]
    bad.write_bytes(b"not an image")
    return bad


def test_a_failing_rank_stops_the_run_with_one_line(data, tmp_path):
    """An unreadable image read by one rank: that rank names it in one line and torchrun stops the
    other, well within the collective timeout."""
    bad = corrupt_copy(data, tmp_path)
    started = time.time()
    failed = run(TORCHRUN + ["train.py", "--train_data_path", str(tmp_path / "Corrupt"), "--valid_data_path",
                             data["brain"], "--save_path", str(tmp_path / "run"), "--epoch", "2",
                             "--dist_timeout", "120", *TINY, "--batch_size", "4"], timeout=200)
    assert failed.returncode != 0 and time.time() - started < 100
    lines = error_lines(failed.stderr)
    naming = [line for line in lines if str(bad) in line]
    # the other rank is stopped by torchrun, or first sees the lost connection and says so
    assert len(naming) == 1 and all(line in naming or "lost the other processes" in line for line in lines), \
        failed.stderr[-3000:]


def error_lines(stderr: str) -> list[str]:
    """Our one-line errors in a run's stderr (a line may start with another rank's progress bar)."""
    return re.findall(r"error: \[rank \d\] .*", stderr)


def test_without_the_launcher_the_survivor_stops_instead_of_hanging(data, tmp_path):
    """Two processes started by hand (no torchrun agent to kill the survivor): the one reading the bad
    image stops with its line, the other loses contact and stops with its own, both non-zero."""
    corrupt_copy(data, tmp_path)
    port = free_port()
    command = [sys.executable, "train.py", "--train_data_path", str(tmp_path / "Corrupt"), "--valid_data_path",
               data["brain"], "--save_path", str(tmp_path / "run"), "--epoch", "2",
               "--dist_timeout", "30", *TINY, "--batch_size", "4"]
    processes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env={**environment(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                       "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)})
                 for rank in range(2)]
    outputs = [process.communicate(timeout=150)[1] for process in processes]
    assert all(process.returncode == 2 for process in processes), outputs
    errors = [error_lines(output) for output in outputs]
    assert all(len(found) == 1 for found in errors), outputs
    assert sum("lost the other processes" in found[0] for found in errors) == 1, errors


def test_a_global_batch_that_does_not_divide_over_the_processes_is_refused(data, tmp_path):
    """Checked first, before any collective: process 0 of 2 refuses --batch_size 3 with one line."""
    args = train.parse_args(["--train_data_path", data["brain"], "--save_path", str(tmp_path / "run"),
                             *TINY, "--batch_size", "3"])
    with pytest.raises(InputError, match="^--batch_size 3 is the global batch: it must divide evenly over the 2 "
                                         "processes$"):
        train.train(args, [], torch.device("cpu"), Distributed(0, 2))


def test_a_set_smaller_than_a_batch_with_unused_weights_recomputed_blocks_and_bf16(data, tmp_path):
    """5 training images, global batch 8: one step an epoch, shares of 3 and 2 images (the image
    loss is divided by the global count). mvfa (weights without gradient: DDP must look for them)
    with recomputed blocks: the weights equal one process's to 1e-5. Under bf16 autocast the two
    processes train too, to a loss within bf16 rounding of fp32's."""
    small = build_demo(str(tmp_path / "small"), n_train=1, n_valid=(3, 2), n_test=(1, 1), image_size=TINY_SIZE)
    args = ["--train_data_path", small, "--valid_data_path", data["brain"], "--holdout_fraction", "0", "--epoch", "2",
            "--variant", "mvfa", "--grad_checkpointing", "--learning_rate", "1e-3", *TINY, "--batch_size", "8"]
    for name, extra in (("two", []), ("two_bf16", ["--precision", "bf16"])):
        done = run(TORCHRUN + ["train.py", *args, *extra, "--save_path", str(tmp_path / name)])
        assert done.returncode == 0, done.stderr[-3000:]
    train.main([*args, "--save_path", str(tmp_path / "one")])
    one, two, bf16 = (torch.load(tmp_path / name / "epoch_2.pth", weights_only=True)
                      for name in ("one", "two", "two_bf16"))
    # 5e-5 (a twentieth of one Adam step of lr 1e-3): Adam divides by the gradients' own size, so
    # where a weight's two steps' gradients nearly cancel (betas 0.5, 0.999), the summation order of
    # 1 vs 2 processes (1e-7 relative) moves its update by a few percent of a step; a wrong divisor or
    # a skipped weight moves whole steps
    for key, weight in one["trainable"].items():
        torch.testing.assert_close(two["trainable"][key], weight, atol=5e-5, rtol=0, msg=key)
    assert bf16["train_loss"]["loss"] == pytest.approx(two["train_loss"]["loss"], rel=2e-2)
