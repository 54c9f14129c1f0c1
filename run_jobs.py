"""Run a protocol's independent jobs in parallel, one per GPU, queued: what train.sh and test.sh do
with GPUS=0,1,2,3 (see jobs.sh).

    python run_jobs.py --gpus 0,1,2,3 --jobs jobs.txt --log_dir checkpoint/logs

Each line of --jobs is one shell command. Whenever a GPU is free it takes the next command, which
runs with CUDA_VISIBLE_DEVICES set to that GPU (so --device auto or cuda finds it as cuda:0) and its
output in LOG_DIR/<line>_<save_path>.log. A failed job does not stop the others. At the end a table
lists every job (GPU, minutes, exit status, log); the exit status is 1 when any job failed.
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from utils import ArgumentParser, InputError, prepare_output_dir, run_cli


@dataclass
class Job:
    number: int            # 1-based line of the jobs file
    command: str
    log: Path
    gpu: str = ""
    seconds: float = 0.0
    status: int | None = None   # exit status; None while queued or running


def log_name(number: int, command: str) -> str:
    """``<number>_<the command's --save_path, as a file name>.log`` (or just the number)."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = []
    target = next((words[i + 1] for i, word in enumerate(words[:-1]) if word == "--save_path"), "")
    return f"{number:03d}" + (f"_{re.sub(r'[^A-Za-z0-9._-]+', '_', target).strip('_')}" if target else "") + ".log"


def run_jobs(commands: list[str], gpus: list[str], log_dir: Path) -> list[Job]:
    """Run ``commands`` with one worker thread per GPU taking the next queued command; returns the
    jobs, finished, in command order."""
    log_dir.mkdir(parents=True, exist_ok=True)
    jobs = [Job(number, command, log_dir / log_name(number, command)) for number, command in enumerate(commands, 1)]
    waiting: queue.Queue[Job] = queue.Queue()
    for job in jobs:
        waiting.put(job)
    print_lock = threading.Lock()

    def worker(gpu: str) -> None:
        while True:
            try:
                job = waiting.get_nowait()
            except queue.Empty:
                return
            job.gpu, started = gpu, time.time()
            with open(job.log, "w", encoding="utf-8") as log:
                job.status = subprocess.run(["bash", "-c", job.command], stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}).returncode
            job.seconds = time.time() - started
            with print_lock:
                done = sum(j.status is not None for j in jobs)
                print(f"[{done}/{len(jobs)}] GPU {gpu}: {'done' if job.status == 0 else 'FAILED'} in "
                      f"{job.seconds / 60:.1f} min: {job.log}", flush=True)

    threads = [threading.Thread(target=worker, args=(gpu,), daemon=True) for gpu in gpus]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", required=True, help="comma-separated GPU ids, one job at a time on each: 0,1,2,3")
    parser.add_argument("--jobs", required=True, help="file with one shell command per line")
    parser.add_argument("--log_dir", required=True, help="folder for one log file per job")
    args = parser.parse_args(argv)
    gpus = [gpu.strip() for gpu in args.gpus.split(",") if gpu.strip()]
    if not gpus:
        raise InputError(f"--gpus {args.gpus!r}: give GPU ids such as 0,1,2,3")
    try:
        commands = [line.strip() for line in Path(args.jobs).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as error:
        raise InputError(f"--jobs {args.jobs}: cannot read it ({error.strerror})") from None
    prepare_output_dir(args.log_dir, "--log_dir (LOG_DIR)")  # before any job runs
    print(f"{len(commands)} job(s) on GPU(s) {', '.join(gpus)}; logs in {args.log_dir}", flush=True)
    jobs = run_jobs(commands, gpus, Path(args.log_dir))
    failed = [job for job in jobs if job.status != 0]
    print(tabulate([[job.number, job.gpu, f"{job.seconds / 60:.1f}",
                     "ok" if job.status == 0 else f"FAILED ({job.status})", job.log] for job in jobs],
                   headers=["job", "GPU", "min", "status", "log"], tablefmt="github"))
    for job in failed:
        print(f"failed: job {job.number} (exit {job.status}), see {job.log}: {job.command}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
