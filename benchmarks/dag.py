"""Dry-run time of the whole paper DAG: `snakemake -n --configfile configs/paper.yaml`.

The Snakefile and the rules import nothing heavy, so a dry run should cost what Snakemake
itself costs (target: at most 5 s). Each repeat is a fresh process, as a user's dry run is;
the first also pays for a cold file cache. Besides the wall time, the CPU time the process
used (user + system): on a machine that others load, compare that one.

    python benchmarks/dag.py
    python benchmarks/dag.py --repeats 9 --configfile configs/paper.yaml
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def dry_run(configfile: str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, jobs) of one dry run; a failed run stops the benchmark
    with its output."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    cpu = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", configfile],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    cpu = _children_cpu() - cpu
    if done.returncode != 0:
        sys.exit(f"snakemake -n --configfile {configfile} failed:\n{done.stdout}{done.stderr}")
    total = re.search(r"^total\s+(\d+)", done.stdout + done.stderr, flags=re.MULTILINE)
    return seconds, cpu, int(total.group(1)) if total else -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", default="configs/paper.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target", type=float, default=5.0, help="seconds")
    args = parser.parse_args()
    runs = [dry_run(args.configfile) for _ in range(args.repeats)]
    median = statistics.median(wall for wall, _, _ in runs)
    median_cpu = statistics.median(cpu for _, cpu, _ in runs)
    print(f"snakemake -n --configfile {args.configfile}: {runs[0][2]} jobs, {args.repeats} runs")
    print()
    print("| run | seconds | CPU seconds |")
    print("|---|---:|---:|")
    for i, (wall, cpu, _) in enumerate(runs, 1):
        print(f"| {i} | {wall:.2f} | {cpu:.2f} |")
    print(f"| median | {median:.2f} | {median_cpu:.2f} |")
    print(f"| target | ≤ {args.target:.1f} ({'met' if median <= args.target else 'missed'}) | |")


if __name__ == "__main__":
    main()
