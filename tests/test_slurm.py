"""The workflow on a real SLURM, through profiles/slurm and the SLURM executor plugin.

The SLURM tests need the single-node SLURM of .ci/setup-slurm.sh. With ROBUSTFT_SLURM_TEST=1 (CI
sets it; root on Debian 12) they run that script, which installs and starts it; without the
variable they run it only where `sinfo` already answers (it then returns at once, or refuses a
SLURM it did not set up). Where there is no SLURM they are skipped with the reason. Every
Snakemake run is bounded by `timeout -s KILL`: a plugin that loses track of its jobs waits
forever and ignores SIGTERM.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"
SETUP = ROOT / ".ci" / "setup-slurm.sh"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]

SETUP_TIMEOUT = 900  # s: apt-get install included
RUN_TIMEOUT = 900  # s: the whole tiny workflow on SLURM, retry included
# First status check of a job after this many seconds (the profile's 40 s is for clusters).
STATUS_DELAY = 5
# Snakemake under a hard bound: SIGKILL, because a waiting Snakemake ignores SIGTERM.
BOUNDED_SNAKEMAKE = ["timeout", "-s", "KILL", str(RUN_TIMEOUT), *SNAKEMAKE]
# The stages that ask for a GPU when the config says so, and their rules.
# Stage of the config's `resources:` → the rules that take their resources from it.
GPU_RULES = {
    "features": (
        "extract_features",
        "feature_distortion",
        "wiseft",
        "zeroshot",
        "soups",
        "store_predictions",
    ),
    "finetune": ("finetune", "train_baseline"),
}
GPU_RULE_NAMES = {rule for rules in GPU_RULES.values() for rule in rules}
PAPER = ROOT / "configs" / "paper.yaml"


def _run(command, timeout=60, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def _works(*command):
    try:
        return _run(list(command), timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _min_job_age():
    """MinJobAge of the running slurmctld, in seconds (None when unknown)."""
    output = _run(["scontrol", "show", "config"], timeout=30).stdout
    match = re.search(r"^MinJobAge\s*=\s*(\d+)", output, re.M)
    return int(match.group(1)) if match else None


@pytest.fixture(scope="module")
def slurm():
    """How to reach the SLURM the tests use: {"partition": ..., "status_command": ...}."""
    requested = os.environ.get("ROBUSTFT_SLURM_TEST") == "1"
    if not requested and not (shutil.which("sinfo") and _works("sinfo", "--noheader")):
        pytest.skip(
            "no SLURM here (sinfo fails); ROBUSTFT_SLURM_TEST=1 installs and starts a "
            "single-node SLURM with .ci/setup-slurm.sh (root, Debian 12)"
        )
    # Also where sinfo answers: the script returns at once for the SLURM it set up itself and
    # refuses any other (a real cluster is never the test's to use or to reconfigure).
    try:
        result = _run(
            ["timeout", "-s", "KILL", str(SETUP_TIMEOUT), str(SETUP)],
            timeout=SETUP_TIMEOUT + 30,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"SLURM could not be started: {error}")
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"{SETUP.name} exited with {result.returncode}"
        pytest.skip(f"SLURM could not be started: {reason}")
    for program in ("sbatch", "squeue", "scancel", "timeout"):
        if shutil.which(program) is None:
            pytest.skip(f"SLURM is incomplete: {program} not found")
    partitions = _run(["sinfo", "--noheader", "--format=%P"], timeout=30).stdout.split()
    default = [name.rstrip("*") for name in partitions if name.endswith("*")]
    # Without accounting (no slurmdbd) sacct fails and jobs are followed with squeue, which
    # sees finished jobs for MinJobAge seconds only: longer than the plugin's longest poll.
    status_command = "sacct" if _works("sacct", "--noheader", "-X") else "squeue"
    if status_command == "squeue":
        min_job_age = _min_job_age()
        if min_job_age is None or min_job_age < 3 * STATUS_DELAY + 180:
            pytest.skip(f"no accounting and MinJobAge={min_job_age}: squeue would lose jobs")
    return {"partition": default[0] if default else None, "status_command": status_command}


def _test_profile(folder, slurm, prefix):
    """profiles/slurm with the test machine's names, in `folder`; returns its settings."""
    profile = yaml.safe_load(PROFILE.read_text())
    resources = profile["default-resources"]
    # The placeholders a user edits: replaced here, so nothing cluster-specific is needed.
    assert str(resources.pop("slurm_account")).startswith("EDIT_ME")
    assert str(resources.pop("slurm_partition")).startswith("EDIT_ME")
    if slurm["partition"]:
        resources["slurm_partition"] = slurm["partition"]
    profile.update(
        {
            "slurm-status-command": slurm["status_command"],
            "slurm-init-seconds-before-status-checks": STATUS_DELAY,
            "slurm-jobname-prefix": prefix,
            "latency-wait": 5,
        }
    )
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return profile


def _our_jobs(prefix):
    """[(slurm id, comment, state)] of every job of this test's run that SLURM still lists."""
    output = _run(
        ["squeue", "--noheader", "--states=all", "--format=%i|%j|%k|%T"], timeout=30
    ).stdout
    jobs = []
    for line in output.splitlines():
        job_id, name, comment, state = line.strip().split("|", 3)
        if name.startswith(f"{prefix}_"):
            jobs.append((job_id, comment, state))
    return jobs


def _state(prefix, job_id):
    return {i: state for i, _, state in _our_jobs(prefix)}.get(job_id)


def _finetune_files(workdir, comment):
    """(run folder, log file, resumable state) of the fine-tuning job with SLURM `comment`."""
    # The plugin's comment names the wildcard values:
    # rule_finetune_wildcards_<method>_<backbone>_<dataset>_<run>_<seed> (run: lr0.01-alpha0.1)
    method, backbone, dataset, folder, seed = comment.split("_wildcards_")[1].split("_")
    run = Path(method, backbone, dataset, folder)
    return (
        workdir / "results" / "finetune" / run / f"seed{seed}",
        workdir / "results" / "logs" / "finetune" / run / f"seed{seed}.log",
        workdir / "results" / "resume" / "finetune" / run / f"seed{seed}" / "last.pt",
    )


def _cancel_a_finetune_job_mid_run(process, workdir, prefix, deadline):
    """scancel a fine-tuning job once its script runs; returns the job's comment and SLURM id."""
    tried = set()
    while time.monotonic() < deadline and process.poll() is None:
        for job_id, comment, state in _our_jobs(prefix):
            if not comment.startswith("rule_finetune_") or state != "RUNNING" or job_id in tried:
                continue
            tried.add(job_id)
            # Kill it once it has saved resumable state, so that the retry must resume.
            state = _finetune_files(workdir, comment)[2]
            while not state.exists() and _state(prefix, job_id) == "RUNNING":
                time.sleep(0.05)
            if _run(["scancel", job_id], timeout=30).returncode != 0:
                continue  # it has just finished: take the next one
            for _ in range(60):
                if _state(prefix, job_id) not in {"RUNNING", "COMPLETING"}:
                    break
                time.sleep(0.5)
            if _state(prefix, job_id) == "CANCELLED":
                return comment, job_id
        time.sleep(0.25)
    raise AssertionError("no fine-tuning job could be cancelled while it ran")


@pytest.fixture(scope="module")
def local_table(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("local")
    start = time.monotonic()
    result = _run(
        [*BOUNDED_SNAKEMAKE, "--cores", "2", "--configfile", str(TINY)],
        timeout=RUN_TIMEOUT + 30,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    print(f"local tiny run: {time.monotonic() - start:.0f} s")
    return pd.read_csv(workdir / "results" / "tables" / "summary.csv")


@pytest.fixture(scope="module")
def slurm_run(slurm, tmp_path_factory):
    """The tiny config through the SLURM profile; one fine-tuning job is scancelled mid-run."""
    workdir = tmp_path_factory.mktemp("slurm")
    prefix = f"robustfttest{os.getpid()}"
    profile = _test_profile(workdir / "profile", slurm, prefix)
    log_path = workdir / "snakemake.log"
    command = [*BOUNDED_SNAKEMAKE, "--profile", str(workdir / "profile"), "--configfile", str(TINY)]
    start = time.monotonic()
    with open(log_path, "w") as log:
        # Its own process group: on a failure here, Snakemake goes too, not only `timeout`.
        process = subprocess.Popen(
            command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            cancelled, cancelled_id = _cancel_a_finetune_job_mid_run(
                process, workdir, prefix, deadline=start + RUN_TIMEOUT
            )
            returncode = process.wait(timeout=RUN_TIMEOUT + 30)
        except (AssertionError, subprocess.TimeoutExpired) as error:
            raise AssertionError(f"{error}\n{log_path.read_text()[-8000:]}") from None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            jobs = _our_jobs(prefix)
            leftover = [i for i, _, state in jobs if state in {"PENDING", "RUNNING"}]
            if leftover:
                _run(["scancel", *leftover], timeout=30)
    elapsed = time.monotonic() - start
    print(f"SLURM tiny run ({slurm['status_command']} status checks): {elapsed:.0f} s")
    output = log_path.read_text()
    assert returncode == 0, f"snakemake on SLURM exited with {returncode}:\n{output[-8000:]}"
    return {
        "workdir": workdir,
        "profile": profile,
        "output": output,
        "jobs": jobs,
        "cancelled": cancelled,
        "cancelled_id": cancelled_id,
    }


@pytest.fixture(scope="module")
def planned_cluster_jobs(tmp_path_factory):
    """{rule: count} of the tiny config's jobs that go to SLURM: a dry run's jobs minus the
    rules the workflow declares `localrules`."""
    local = {"all"}
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for block in re.findall(r"^localrules:\n((?:[ \t]+\w+,?\n)+)", smk.read_text(), re.M):
            local |= set(re.findall(r"\w+", block))
    result = _run(
        [*SNAKEMAKE, "-n", "--configfile", str(TINY)], cwd=tmp_path_factory.mktemp("plan")
    )
    assert result.returncode == 0, result.stderr[-5000:]
    counts = Counter(re.findall(r"^rule (\w+):$", result.stdout, re.M))
    return {rule: count for rule, count in counts.items() if rule not in local}


@pytest.mark.slurm
def test_slurm_run_gives_the_same_table_as_a_local_run(
    slurm_run, local_table, planned_cluster_jobs
):
    table = pd.read_csv(slurm_run["workdir"] / "results" / "tables" / "summary.csv")
    assert list(table.columns) == list(local_table.columns)
    tiny = yaml.safe_load(TINY.read_text())
    # One row per method, and a uniform and a greedy soup of each souped method.
    rows = len(tiny["methods"]) - 1 + 2 * len(tiny["soups"]["methods"])
    assert "soups" in tiny["methods"]
    assert len(table) == len(local_table) == rows
    numeric = local_table.select_dtypes("number").columns
    others = [column for column in table.columns if column not in numeric]
    pd.testing.assert_frame_equal(table[others], local_table[others])
    pd.testing.assert_frame_equal(
        table[numeric], local_table[numeric], check_exact=False, rtol=0, atol=1e-9
    )
    # The heavy rules ran as SLURM jobs, the local rules did not.
    rules = {comment.split("_wildcards_")[0] for _, comment, _ in slurm_run["jobs"]}
    assert rules == {f"rule_{rule}" for rule in planned_cluster_jobs}
    assert {"rule_finetune", "rule_extract_features", "rule_pretrain_backbone"} <= rules


@pytest.mark.slurm
def test_a_cancelled_job_is_retried_and_nothing_is_lost(slurm_run, planned_cluster_jobs):
    assert slurm_run["profile"]["retries"] >= 1
    attempts = {}
    for job_id, comment, state in slurm_run["jobs"]:
        attempts.setdefault(comment, []).append((int(job_id), state))
    cancelled = sorted(attempts.pop(slurm_run["cancelled"]))
    # The cancelled job, then one resubmission that completed.
    assert [state for _, state in cancelled] == ["CANCELLED", "COMPLETED"], cancelled
    assert cancelled[0][0] == int(slurm_run["cancelled_id"])
    # Every other job ran once: nothing finished was redone.
    assert all(len(runs) == 1 and runs[0][1] == "COMPLETED" for runs in attempts.values()), attempts
    assert len(attempts) + 1 == sum(planned_cluster_jobs.values())
    assert f"SLURM-job '{slurm_run['cancelled_id']}' failed" in slurm_run["output"]
    assert "CANCELLED" in slurm_run["output"]
    # The fine-tuning run that was killed has all its outputs.
    run_dir, log, state = _finetune_files(slurm_run["workdir"], slurm_run["cancelled"])
    for name in ("model.safetensors", "history.csv", "metrics.json", "config.json"):
        assert (run_dir / name).stat().st_size > 0, name
    # The retry continued from the state the cancelled job had saved, then deleted it.
    assert "resuming from" in log.read_text()
    assert not state.exists()


def _dry_run_resources(output):
    """[(rule, {resource: value})] of every job in a dry run's listing."""
    jobs, rule = [], None
    for line in output.splitlines():
        match = re.match(r"(?:local)?rule (\w+):$", line.strip())
        if match:
            rule = match.group(1)
        elif line.strip().startswith("resources:") and rule:
            items = line.split(":", 1)[1].strip().split(", ")
            jobs.append((rule, dict(item.split("=", 1) for item in items)))
            rule = None
    return jobs


@pytest.mark.workflow
@pytest.mark.parametrize("gpu", [0, 1])
def test_slurm_dry_run_asks_for_gpus_on_the_gpu_rules_only(tmp_path, gpu):
    override = "resources={" + ", ".join(f"'{s}': {{'gpu': {gpu}}}" for s in GPU_RULES) + "}"
    result = _run(
        [
            *SNAKEMAKE,
            "-n",
            "--profile",
            str(PROFILE.parent),
            "--configfile",
            str(TINY),
            "--config",
            override,
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    jobs = _dry_run_resources(result.stdout)
    # Every GPU rule but zeroshot, which needs a CLIP backbone (not in tiny.yaml).
    assert {rule for rule, _ in jobs} >= {
        *GPU_RULE_NAMES - {"zeroshot"},
        "fit_probe",
        "summary_table",
    }
    for rule, resources in jobs:
        wanted = str(gpu) if gpu and rule in GPU_RULE_NAMES else None
        assert resources.get("gpu") == wanted, (rule, resources)
        assert "gpu_model" not in resources, (rule, resources)
        assert resources["cpus_per_task"] == "1", (rule, resources)  # = threads of tiny.yaml
        assert resources["slurm_partition"] == "EDIT_ME_partition", (rule, resources)


@pytest.mark.workflow
def test_slurm_dry_run_of_the_paper_config_asks_for_gpus_on_the_gpu_rules_only(tmp_path):
    """No data, no weights, no GPU here: the dry run still lists every job and its request."""
    result = _run(
        [*SNAKEMAKE, "-n", "--profile", str(PROFILE.parent), "--configfile", str(PAPER)],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    jobs = _dry_run_resources(result.stdout)
    rules = {rule for rule, _ in jobs}
    # soups: only where paper.yaml's `methods` lists them.
    assert rules >= {*GPU_RULE_NAMES - {"soups"}, "fit_probe", "download_dataset", "fetch_backbone"}
    for rule, resources in jobs:
        if rule in GPU_RULE_NAMES:
            assert resources.get("gpu") == "1", (rule, resources)
        else:
            assert "gpu" not in resources and "gpu_model" not in resources, (rule, resources)


class _Resources(dict):
    """A job's resources as the plugin reads them: .get() and attributes."""

    __getattr__ = dict.__getitem__


@pytest.mark.workflow
def test_a_multi_gpu_finetune_job_is_one_slurm_task_holding_all_its_gpus(tmp_path):
    """resources.finetune.gpu = 2: the profile's `tasks: 0` keeps the plugin from adding
    --ntasks-per-gpu (which would run the script twice, one GPU each): sbatch gets --gpus=2
    and one task, and the job step `srun -n1 --gpus=2` runs the one process that starts its
    two workers (docs/multi-gpu.md)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm_jobstep import get_gpu_setting

    result = _run(
        [
            *SNAKEMAKE,
            "-n",
            "--profile",
            str(PROFILE.parent),
            "--configfile",
            str(TINY),
            "--config",
            "resources={'finetune': {'gpu': 2}}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    finetune = [
        resources for rule, resources in _dry_run_resources(result.stdout) if rule == "finetune"
    ]
    assert finetune
    for planned in finetune:
        assert planned["gpu"] == "2" and planned["tasks"] == "0", planned
        resources = _Resources(
            {key: int(value) if value.isdigit() else value for key, value in planned.items()}
        )
        job = type("Job", (), {"resources": resources, "threads": resources["cpus_per_task"]})
        params = {
            "run_uuid": "u",
            "slurm_logfile": "log",
            "comment_str": "c",
            "account": "",
            "partition": "",
            "workdir": "",
        }
        sbatch = get_submit_command(job, params)
        assert "--ntasks-per-gpu" not in sbatch and "--ntasks=" not in sbatch, sbatch
        assert set_gres_string(job).strip() == "--gpus=2"
        assert get_gpu_setting(job) == "--gpus=2"
