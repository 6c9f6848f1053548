"""The cost estimate: split sizes, the work of each kind of job, the throughput table, the DAG."""

from pathlib import Path

import pytest
import yaml

from robustft import estimate
from robustft.estimate import (
    PlannedJob,
    Throughput,
    cost_table,
    estimate_jobs,
    job_seconds,
    job_work,
    load_throughput,
    planned_jobs,
    record_throughput,
    split_sizes,
)

ROOT = Path(__file__).resolve().parents[1]


def paper_config():
    config = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    config.setdefault("allow_subset", [])
    return config


def test_published_split_sizes_with_val_carved_from_train():
    config = paper_config()
    imagenet = split_sizes(dataset="imagenet", config=config)
    assert imagenet["train"].images + imagenet["val"].images == 1_281_167
    assert imagenet["val"].images == round(0.1 * 1_281_167)
    assert imagenet["test"].images == 50_000
    assert [imagenet[s].images for s in ("v2", "r", "a", "sketch")] == [
        10_000,
        30_000,
        7500,
        50_889,
    ]
    assert all(size.exact for size in imagenet.values())
    stl = split_sizes(dataset="cifar10_stl", config=config)
    assert (stl["train"].images, stl["val"].images, stl["stl"].images) == (45_000, 5000, 7200)
    domainnet = split_sizes(dataset="domainnet", config=config)
    assert domainnet["test"].images == 2399 and domainnet["real"].images == 6943
    # BREEDS: no recorded count, approximated from the class structure.
    living = split_sizes(dataset="living17", config=config)
    assert not living["train"].exact and living["target"].images == 34 * 50


def test_toyshift_sizes_follow_the_generator_config():
    config = {
        "datasets": ["toyshift"],
        "toyshift": yaml.safe_load((ROOT / "config.yaml").read_text())["toyshift"],
    }
    sizes = split_sizes(dataset="toyshift", config=config)
    assert {k: v.images for k, v in sizes.items()} == {
        "train": 1800,
        "val": 600,
        "test": 1200,
        "real": 600,
        "clipart": 600,
        "painting": 600,
    }


def _finetune_job(method="ft", epochs=3, batch_size=64):
    settings = {"epochs": epochs, "batch_size": batch_size, "eval_every": 1, "num_workers": 0}
    return PlannedJob(
        rule="finetune",
        wildcards={"method": method, "backbone": "toyresnet", "dataset": "toyshift"},
        params={"settings": settings},
        threads=1,
        gpus=0,
    )


def _toy_config():
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config.setdefault("dataset_settings", {})
    return config


def test_finetune_counts_every_epoch_and_every_evaluation_and_the_teacher():
    config = _toy_config()
    sizes = {"toyshift": split_sizes(dataset="toyshift", config=config)}
    work = job_work(job=_finetune_job(), config=config, sizes=sizes)
    # 1800 training images in whole batches of 64: 1792 per epoch; epoch 0 and each epoch score
    # val, test and the three OOD splits (600 + 1200 + 3 × 600).
    assert work.train_images == 3 * 1792
    assert work.eval_images == 4 * 3600
    kd = job_work(job=_finetune_job(method="kd"), config=config, sizes=sizes)
    assert kd.eval_images == work.eval_images + 3 * 1792  # the teacher's forward passes


def test_baselines_count_the_pool_and_soups_score_val_per_run():
    config = _toy_config()
    sizes = {"toyshift": split_sizes(dataset="toyshift", config=config)}
    baseline = PlannedJob(
        rule="train_baseline",
        wildcards={"dataset": "toyshift", "baseline": "w8-e2-f0.5"},
        params={"settings": {"epochs": 2, "batch_size": 64, "fraction": 0.5, "width": 8}},
        threads=1,
        gpus=0,
    )
    work = job_work(job=baseline, config=config, sizes=sizes)
    # Half of train + the baseline pool (12 classes × (150 + baseline_per_class)), whole batches.
    pool = 12 * (150 + config["toyshift"]["baseline_per_class"])
    assert work.train_images == 2 * (round(0.5 * pool) // 64 * 64)
    assert 1 < work.rate_scale < (16 / 8) ** 2  # narrower is faster, less than its MACs say
    soups = PlannedJob(
        rule="soups",
        wildcards={"method": "ft", "backbone": "toyresnet", "dataset": "toyshift"},
        params={"seeds": [0, 1]},
        threads=1,
        gpus=0,
    )
    work = job_work(
        job=soups, config=config, sizes=sizes, sweep_runs={("ft", "toyresnet", "toyshift"): 6}
    )
    # Per seed: 3 runs scored on val (600) by the greedy soup, then 2 soups on every
    # evaluation split (600 + 1200 + 3 × 600).
    assert work.eval_images == 2 * (3 * 600 + 2 * 3600)


def test_seconds_scale_with_images_and_decoding_caps_the_rate():
    table = {
        ("net", "gpu"): Throughput(backbone="net", device="gpu", train_img_s=1000, eval_img_s=4000)
    }
    work = estimate.Work(
        rule="finetune", dataset="d", backbone="net", train_images=1_000_000, eval_images=400_000
    )
    seconds, _ = job_seconds(work=work, threads=8, gpus=1, num_workers=8, throughput=table)
    assert seconds == pytest.approx(estimate.START_S["gpu"] + 1000 + 100)
    from_files = estimate.Work(**{**work.__dict__, "decodes_files": True})
    capped, _ = job_seconds(work=from_files, threads=8, gpus=1, num_workers=2, throughput=table)
    # 2 workers decode 2 × 390 img/s: slower than the model either way.
    assert capped == pytest.approx(estimate.START_S["gpu"] + 1_400_000 / 780)
    missing, why = job_seconds(work=work, threads=8, gpus=0, num_workers=8, throughput=table)
    assert missing is None and "benchmarks/finetune.py" in why


def test_measured_rows_override_the_published_ones(tmp_path):
    path = tmp_path / "throughput.csv"
    record_throughput(
        path=path,
        backbone="resnet50",
        device="gpu",
        kind="train",
        images_per_s=3000.0,
        threads=8,
        feature_dim=2048,
        device_name="H100",
    )
    record_throughput(
        path=path,
        backbone="resnet50",
        device="gpu",
        kind="train",
        images_per_s=3100.0,
        threads=8,
        feature_dim=2048,
        device_name="H100",
    )
    table = load_throughput(path)
    row = table[("resnet50", "gpu")]
    assert row.train_img_s == 3100.0  # the newer measurement replaced the older row
    assert row.eval_img_s == estimate.DEFAULT_THROUGHPUT[("resnet50", "gpu")].eval_img_s
    assert "H100" in row.source
    assert path.read_text().count("resnet50") == 1


def test_a_bad_throughput_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "throughput.csv"
    path.write_text("backbone,device,kind,images_per_s\nresnet50,gpu,train,fast\n")
    with pytest.raises(ValueError, match=r"throughput.csv: line 2: images_per_s"):
        load_throughput(path)


def test_the_paper_dag_costs_hundreds_of_gpu_hours_mostly_imagenet_finetuning(monkeypatch):
    monkeypatch.chdir(ROOT)
    jobs, config = planned_jobs(configfiles=[ROOT / "configs" / "paper.yaml"], forceall=True)
    # The count test_real_data_workflow.PAPER_JOBS explains.
    assert sum(job.rule == "finetune" for job in jobs) == 7 * (18 + 54 + 6 + 6 + 20) * 3 + 2 * 15
    costs = estimate_jobs(jobs=jobs, config=config, throughput=load_throughput(None))
    rows = cost_table(costs)
    total = rows[-1]
    assert total.rule == "total" and total.jobs == len(jobs) - 1  # rule all is no job
    assert 300 < total.gpu_hours < 3000
    imagenet = next(r for r in rows if (r.rule, r.dataset) == ("finetune", "imagenet"))
    # 327 runs (312 + FLYP's 15) × 10 epochs × ImageNet's train split (90% of 1,281,167).
    assert imagenet.train_images == 327 * 10 * (1_153_050 // 64 * 64)
    assert imagenet.gpu_hours > 0.5 * total.gpu_hours


def test_compare_sums_measured_and_estimated_seconds_per_rule(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    (tmp_path / "a.tsv").write_text(header + "10.0\t0:00:10\t1\t1\t1\t1\t0\t0\t90\t9\n")
    (tmp_path / "b.tsv").write_text(header + "30.0\t0:00:30\t1\t1\t1\t1\t0\t0\t90\t29\n")
    jobs = [
        PlannedJob(rule="finetune", wildcards={}, params={}, threads=1, gpus=0, benchmark=name)
        for name in ("a.tsv", "b.tsv", "never_ran.tsv")
    ]
    work = estimate.Work(rule="finetune", dataset="toyshift")
    costs = [estimate.JobCost(work=work, seconds=s, threads=1, gpus=0) for s in (12, 24, 99)]
    (row,) = estimate.compare_with_benchmarks(jobs=jobs, costs=costs, root=tmp_path)
    assert (row.rule, row.jobs, row.measured_s, row.estimated_s) == ("finetune", 2, 40.0, 36.0)
    assert row.ratio == pytest.approx(0.9)
    assert row.measured_cpu_s == 38.0 and row.cpu_ratio == pytest.approx(36 / 38)


def test_own_data_is_counted_from_folders_and_lists_and_missing_data_is_said(tmp_path):
    from PIL import Image

    root = tmp_path / "mine"
    for split, count in (("train", 10), ("test", 4)):
        for name in ("ant", "cow"):
            (root / split / name).mkdir(parents=True)
            for k in range(count):
                Image.new("RGB", (8, 8)).save(root / split / name / f"{k}.png")
    (root / "night.csv").write_text("path,label\ntest/ant/0.png,ant\ntest/cow/0.png,cow\n")
    own = {"type": "imagefolder", "root": str(root)}
    splits = {"train": "train", "test": "test", "night": "night.csv", "fog": "fog"}
    config = {"datasets": ["mine"], "dataset_settings": {"mine": {**own, "splits": splits}}}
    sizes = estimate.split_sizes(dataset="mine", config=config)
    assert {split: size.images for split, size in sizes.items()} == {
        "train": 18,
        "val": 2,
        "test": 8,
        "night": 2,
        "fog": 0,
    }
    assert sizes["fog"].missing == f"{root / 'fog'} missing" and not sizes["night"].missing
    # Its jobs are "not estimated", with why, rather than costing nothing.
    job = PlannedJob(
        rule="prepare_images",
        wildcards={"backbone": "net", "dataset": "mine", "split": "train"},
        params={},
        threads=2,
        gpus=0,
    )
    (cost,) = estimate.estimate_jobs(jobs=[job], config=config, throughput={})
    assert cost.seconds is None and cost.missing.endswith("fog missing")
    # With the split there: decoding every image once, on the job's threads.
    (root / "fog").symlink_to(root / "test")
    (cost,) = estimate.estimate_jobs(jobs=[job], config=config, throughput={})
    assert cost.work.prepared_images == 18
    assert cost.seconds == pytest.approx(estimate.START_S["cpu"] + 18 / (2 * estimate.DECODE_IMG_S))
