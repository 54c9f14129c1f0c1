"""train.sh and test.sh as a first user meets them (#22 items 2, 4): a second run is refused before
any training with the scripts' own ways on, the demo set keeps the settings the README says are
settable, and the paper protocol reuses the in-domain run when it is the same training (only then)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import reuse_run
from generate_dataset.demo import build_demo
from tests.helpers import ROOT, TINY_SIZE

# the tiny model as train.sh/test.sh take it: their environment variables, not helpers' TINY flags
TINY_ENV = {"MODEL_NAME": "tiny", "PRETRAINED": "none", "IMAGE_SIZE": str(TINY_SIZE), "EPOCH": "1",
            "BATCH_SIZE": "8", "DEVICE": "cpu", "EXTRA": "--num_workers 0 --n_ctx 4 --depth 2 --t_n_ctx 2"}


def bash(script: str, protocol: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script), protocol], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def launched(done: subprocess.CompletedProcess, script: str = "train.py") -> list[list[str]]:
    """The command lines a LAUNCH=echo run printed for ``script``, as words."""
    return [line.split() for line in done.stdout.splitlines() if line.startswith(script)]


def flag(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """A small demo set (both views) where DEMO_ROOT points: the scripts find it built."""
    root = tmp_path_factory.mktemp("demo")
    for view in ("axial", "coronal"):
        build_demo(str(root), n_train=1, n_valid=(4, 4), n_test=(2, 2), image_size=64, view=view)
    return root


@pytest.mark.parametrize("protocol, folder", [("indomain", "indomain/Liver"), ("fewshot", "fewshot/Brain/4shot_seed2"),
                                              ("paper", "paper/mvfa")])
@pytest.mark.parametrize("marker", ["args.json", "best.pth", "epoch_3.pth"])
def test_a_second_run_is_refused_before_any_training_with_the_scripts_ways(tmp_path, protocol, folder, marker):
    (tmp_path / "BMAD" / "Brain").mkdir(parents=True)
    (tmp_path / "BMAD" / "Liver").mkdir()
    taken = tmp_path / "ck" / folder
    taken.mkdir(parents=True)
    (taken / marker).write_text("x")
    env = dict(DATA_ROOT=str(tmp_path / "BMAD"), SAVE_ROOT=str(tmp_path / "ck"), LAUNCH="echo")
    done = bash("train.sh", protocol, **env)
    assert done.returncode == 2 and launched(done) == []
    assert done.stderr == (f"error: {taken} already holds a training run: bash test.sh {protocol} alone re-tests "
                           f"those checkpoints; OVERWRITE=1 bash train.sh {protocol} trains again, replacing them\n")
    assert "--resume" not in done.stderr and "--overwrite" not in done.stderr
    again = bash("train.sh", protocol, OVERWRITE="1", **env)
    lines = launched(again)
    assert again.returncode == 0 and str(taken) in [flag(words, "--save_path") for words in lines]
    assert all("--overwrite" in words for words in lines)


def test_many_runs_taken_are_counted(tmp_path):
    (tmp_path / "BMAD" / "Brain").mkdir(parents=True)
    for k in (2, 4):
        for seed in (1, 2, 3):
            (tmp_path / "ck" / "fewshot" / "Brain" / f"{k}shot_seed{seed}").mkdir(parents=True)
            (tmp_path / "ck" / "fewshot" / "Brain" / f"{k}shot_seed{seed}" / "best.pth").write_text("x")
    done = bash("train.sh", "fewshot", DATA_ROOT=str(tmp_path / "BMAD"), SAVE_ROOT=str(tmp_path / "ck"),
                LAUNCH="echo", TARGETS="Brain", K_SHOTS="2 4")
    runs = tmp_path / "ck" / "fewshot" / "Brain"
    assert done.returncode == 2 and done.stderr.startswith(
        f"error: {runs}/2shot_seed1, {runs}/2shot_seed2, {runs}/2shot_seed3 and 3 more already hold training runs: "
        f"bash test.sh fewshot alone re-tests")


def test_the_demo_set_keeps_the_settings_given(tmp_path, demo_root):
    env = dict(DATA_ROOT=str(tmp_path / "no-bmad"), DEMO_ROOT=str(demo_root), SAVE_ROOT=str(tmp_path / "ck"),
               RESULTS=str(tmp_path / "res"), LAUNCH="echo")
    default = bash("train.sh", "indomain", **env)
    assert ("the demo set in {0} (Brain BrainCoronal) with the tiny model, epochs 15 (few-shot 3), image size 224"
            .format(demo_root)) in default.stdout
    lines = launched(default)
    assert [flag(words, "--train_data_path") for words in lines] == [f"{demo_root}/Brain", f"{demo_root}/BrainCoronal"]
    assert all((flag(w, "--model_name"), flag(w, "--pretrained"), flag(w, "--epoch"), flag(w, "--image_size"))
               == ("tiny", "none", "15", "224") for w in lines)
    given = launched(bash("train.sh", "indomain", MODEL_NAME="ViT-B-16", EPOCH="3", IMAGE_SIZE="112", **env))
    assert all((flag(w, "--model_name"), flag(w, "--pretrained"), flag(w, "--epoch"), flag(w, "--image_size"))
               == ("ViT-B-16", "openai", "3", "112") for w in given) and len(given) == 2
    paper = launched(bash("train.sh", "paper", **env))  # each row its own recipe: no epoch or size given
    assert [flag(w, "--variant") for w in paper] == ["medvmad", "text_only", "anomalyclip", "mvfa"]
    assert all(flag(w, "--epoch") is None and flag(w, "--image_size") is None for w in paper)
    small = launched(bash("train.sh", "paper", EPOCH="2", IMAGE_SIZE="224", **env))
    assert len(small) == 4 and all(flag(w, "--epoch") == "2" and flag(w, "--image_size") == "224" for w in small)
    tested = launched(bash("test.sh", "indomain", MODEL_NAME="local-dir:/models/x", **env), "test.py")
    assert [flag(w, "--data_path") for w in tested] == [f"{demo_root}/Brain", f"{demo_root}/BrainCoronal"]
    assert all(flag(w, "--model_name") == "local-dir:/models/x" for w in tested)


@pytest.fixture(scope="module")
def indomain(tmp_path_factory) -> dict:
    """``bash train.sh indomain`` (real, tiny, one epoch) on a BMAD-like root holding a small Brain set."""
    root = tmp_path_factory.mktemp("bmad")
    build_demo(str(root / "BMAD"), n_train=1, n_valid=(4, 4), n_test=(1, 1), image_size=TINY_SIZE)
    env = dict(DATA_ROOT=str(root / "BMAD"), SAVE_ROOT=str(root / "ck"), TARGETS="Brain", **TINY_ENV)
    done = bash("train.sh", "indomain", **env)
    assert done.returncode == 0, done.stderr
    return {"env": env, "run": root / "ck" / "indomain" / "Brain", "paper": root / "ck" / "paper"}


def test_paper_reuses_the_in_domain_run_of_the_same_training(indomain):
    done = bash("train.sh", "paper", LAUNCH="echo", VARIANTS="medvmad text_only", **indomain["env"])
    assert done.returncode == 0, done.stderr
    reused, run = indomain["paper"] / "medvmad", indomain["run"]
    assert f"{reused}: reusing {run}, the same training (data, variant, recipe and flags)" in done.stdout
    assert [flag(w, "--variant") for w in launched(done)] == ["text_only"]  # trained: only the other row
    [why] = [line for line in done.stdout.splitlines() if line.startswith(f"{indomain['paper'] / 'text_only'}: ")]
    assert why.startswith(f"{indomain['paper'] / 'text_only'}: training it (not reusing {run}: another training (")
    assert "--recipe medvmad there, text_only here; --variant medvmad there, text_only here" in why
    for name in ("best.pth", "args.json", "metrics.csv", "train_log.txt"):
        assert (reused / name).read_bytes() == (run / name).read_bytes(), name
    assert not list(reused.glob("epoch_*.pth"))
    # another epoch count is another training: trained (with OVERWRITE=1, since paper/medvmad now holds a run)
    longer = bash("train.sh", "paper", LAUNCH="echo", VARIANTS="medvmad", OVERWRITE="1",
                  **{**indomain["env"], "EPOCH": "2"})
    assert f"{reused}: training it (not reusing {run}: another training (--epoch 1 there, 2 here))" in longer.stdout
    assert [flag(w, "--variant") for w in launched(longer)] == ["medvmad"]


def test_reuse_needs_a_finished_run_and_compares_resolved_paths(indomain, tmp_path, monkeypatch, capsys):
    stored = json.loads((indomain["run"] / "args.json").read_text())["args"]
    argv = ["--train_data_path", os.path.relpath(stored["train_data_path"][0]), "--train_split", "valid",
            "--epoch", "1", "--model_name", "tiny", "--pretrained", "none", "--image_size", "64", "--batch_size", "8",
            "--device", "cpu", "--precision", "fp32", "--num_workers", "0", "--n_ctx", "4", "--depth", "2",
            "--t_n_ctx", "2", "--variant", "medvmad", "--save_path", str(tmp_path / "copy")]
    unfinished = tmp_path / "unfinished"
    shutil.copytree(indomain["run"], unfinished)
    (unfinished / "epoch_1.pth").unlink()
    assert reuse_run.main([str(unfinished), *argv]) is False
    assert f"(not reusing {unfinished}: {unfinished} has not finished its 1 epochs)" in capsys.readouterr().out
    assert not (tmp_path / "copy").exists()
    assert reuse_run.main([str(indomain["run"]), *argv]) is True  # a relative data path, the same folder
    assert (tmp_path / "copy" / "best.pth").read_bytes() == (indomain["run"] / "best.pth").read_bytes()
    assert reuse_run.main([str(indomain["run"]), *argv[:-2], "--seed", "7", "--save_path", str(tmp_path / "b")]) \
        is False
    assert "another training (--seed 111 there, 7 here)" in capsys.readouterr().out


def test_first_hour_measures_the_commands_the_readme_times():
    """bench/first_hour.sh times what the README says it timed, and the README's times are measured
    (no MEASURE marker left) and say how to measure them again."""
    readme, bench = (ROOT / "README.md").read_text(), (ROOT / "bench" / "first_hour.sh").read_text()
    for command in ("bash train.sh indomain && bash test.sh indomain",
                    "EPOCH=2 IMAGE_SIZE=224 bash train.sh paper && BOOTSTRAP=100 bash test.sh paper",
                    "bash train.sh paper && bash test.sh paper", "python -m pytest -q"):
        assert command in readme and f'{command}"' in bench, command
    assert "MEASURE" not in readme and "`bash bench/first_hour.sh`" in readme
    done = subprocess.run(["bash", str(ROOT / "bench" / "first_hour.sh"), "frobnicate"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown step 'frobnicate'" in done.stderr
