"""GPUS=... bash train.sh/test.sh: a protocol's jobs run in parallel, one per GPU, queued
(run_jobs.py); a failed job is reported with its log and the others finish; the summary tables
equal a sequential run's."""
from __future__ import annotations

import os
import subprocess
import sys

import run_jobs
from generate_dataset.demo import build_demo
from tests.helpers import ROOT


def test_jobs_take_one_gpu_each_and_a_failure_is_reported_while_the_rest_finish(tmp_path, capsys):
    """Six jobs on GPUs a and b: each runs once, with CUDA_VISIBLE_DEVICES set to its GPU; never more
    than one job on a GPU at a time; the failing second job is listed with its log at the end and
    the exit status is 1, while the jobs queued after it still ran."""
    marks = tmp_path / "marks"
    marks.mkdir()
    commands = []
    for number in range(1, 7):
        status = 3 if number == 2 else 0
        commands.append(f"echo start $(date +%s.%N) $CUDA_VISIBLE_DEVICES > {marks}/{number}; sleep 0.3; "
                        f"echo end $(date +%s.%N) >> {marks}/{number}; echo job {number} says hi; exit {status}")
    jobs_file = tmp_path / "jobs.txt"
    jobs_file.write_text("\n".join(commands) + "\n")
    status = run_jobs.main(["--gpus", "a,b", "--jobs", str(jobs_file), "--log_dir", str(tmp_path / "logs")])
    output = capsys.readouterr().out
    assert status == 1
    spans = {}
    for number in range(1, 7):
        start, end = (marks / str(number)).read_text().split("\n")[:2]
        spans[number] = (float(start.split()[1]), float(end.split()[1]), start.split()[2])
    assert {gpu for _, _, gpu in spans.values()} == {"a", "b"}
    for gpu in "ab":  # one job at a time per GPU
        ordered = sorted((s, e) for s, e, g in spans.values() if g == gpu)
        assert all(next_start >= end for (_, end), (next_start, _) in zip(ordered, ordered[1:]))
    assert any(s1 < e2 and s2 < e1 for n1, (s1, e1, _) in spans.items() for n2, (s2, e2, _) in spans.items()
               if n1 < n2)  # and the two GPUs worked at the same time
    log = tmp_path / "logs" / "002.log"
    assert log.read_text().strip() == "job 2 says hi"
    failed = [line for line in output.splitlines() if line.startswith("failed:")]
    assert failed == [f"failed: job 2 (exit 3), see {log}: {commands[1]}"]


def test_log_names_come_from_the_save_path():
    command = "python train.py --k_shot 2 --save_path 'checkpoint/fewshot/Brain/2shot seed1' --epoch 3"
    assert run_jobs.log_name(7, command) == "007_checkpoint_fewshot_Brain_2shot_seed1.log"
    assert run_jobs.log_name(8, "echo hi") == "008.log"


def bash(script: str, protocol: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", script, protocol], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_the_parallel_fewshot_protocol_gives_the_sequential_tables(tmp_path):
    """GPUS=0,1 bash train.sh fewshot trains both seeds (queued on two GPU slots); bash test.sh
    fewshot, one job after another and with GPUS=0,1, writes the same summary table."""
    data = tmp_path / "data"
    build_demo(str(data), n_train=2, n_valid=(4, 4), n_test=(3, 3), image_size=64)
    env = {"DATA_ROOT": str(data), "TARGETS": "Brain", "K_SHOTS": "2", "SEEDS": "1 2", "DEVICE": "cpu",
           "BATCH_SIZE": "4", "SAVE_ROOT": str(tmp_path / "checkpoint"), "BOOTSTRAP": "20", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    trained = bash("train.sh", "fewshot", {**env, "GPUS": "0,1", "MODEL_NAME": "tiny", "PRETRAINED": "none",
                                           "IMAGE_SIZE": "64", "FEWSHOT_EPOCH": "1",
                                           "EXTRA": "--n_ctx 4 --depth 2 --t_n_ctx 2 --num_workers 0"})
    assert "2 job(s) on GPU(s) 0, 1" in trained.stdout
    for seed in (1, 2):
        assert (tmp_path / "checkpoint" / "fewshot" / "Brain" / f"2shot_seed{seed}" / "best.pth").is_file()
    assert len(list((tmp_path / "checkpoint" / "logs").rglob("*.log"))) == 2

    tables = {}
    for mode, extra in (("sequential", {}), ("parallel", {"GPUS": "0,1"})):
        results = tmp_path / mode
        bash("test.sh", "fewshot", {**env, **extra, "RESULTS": str(results), "EXTRA": "--num_workers 0"})
        tables[mode] = (results / "fewshot" / "Brain" / "summary.csv").read_text()
    assert tables["parallel"] == tables["sequential"] and "Brain" in tables["sequential"]
    assert len(list((tmp_path / "parallel" / "logs").rglob("*.log"))) == 2
    assert not (tmp_path / "sequential" / "logs").exists()


def test_a_failed_queued_job_stops_the_script_after_the_others_ran(tmp_path):
    """jobs.sh with GPUS: the queue runs whole, then the script stops non-zero before the next step
    (a summary that would read the failed job's results); LAUNCH=torchrun with GPUS is refused."""
    script = (f"set -euo pipefail; cd {ROOT}; source jobs.sh; LOG_DIR={tmp_path}/logs\n"
              f"job python -c 'open(\"{tmp_path}/first\", \"w\")'\n"
              f"job python -c 'raise SystemExit(4)'\n"
              f"job {sys.executable} -c 'open(\"{tmp_path}/third\", \"w\")'\n"  # any python launcher
              f"run_queued\necho summary > {tmp_path}/summary\n")
    done = subprocess.run(["bash", "-c", script], env={**os.environ, "GPUS": "0,1"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert (tmp_path / "first").exists() and (tmp_path / "third").exists() and not (tmp_path / "summary").exists()
    assert "failed: job 2 (exit 4), see " in done.stdout
    refused = subprocess.run(["bash", "-c", f"cd {ROOT}; source jobs.sh; job torchrun --nproc_per_node 2 train.py"],
                             env={**os.environ, "GPUS": "0,1"}, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "cannot spread a job over several" in refused.stderr
