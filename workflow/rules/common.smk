# Helpers shared by the rules: config validation, wildcard values, inputs and resources.
# Parsing must stay cheap: nothing here imports torch, timm or scikit-learn.
import os
import re
import sys
from pathlib import Path

SRC = str(Path(workflow.basedir) / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
# Jobs import the library too, also when it is not pip-installed in their environment.
os.environ.update(
    PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.getenv("PYTHONPATH")]))
)

from robustft.config import ConfigError, format_hparam, load_schema, validate_config
from robustft.data.registry import ID_SPLITS

try:
    validate_config(
        config,
        load_schema(
            Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
        ),
    )
except ConfigError as error:
    # One line naming the key, before any job starts and before anything is written.
    sys.exit(f"robustft: {error}")


TOYSHIFT_DOMAINS = ("real", "clipart", "sketch", "painting")
FINETUNE_METHODS = [method for method in config["methods"] if method != "lp"]
LOGS = "results/logs"
MODELS = "resources/models"
# Downloaded weights, in the Hugging Face cache layout (HF_HUB_CACHE=resources/models/hub).
HF_CACHE = f"{MODELS}/hub"
TOY_BACKBONE = "toyresnet"
FETCHED_BACKBONES = [name for name in config["backbones"] if name != TOY_BACKBONE]
BENCHMARKS = "results/benchmarks"


def _alternatives(values):
    return "|".join(re.escape(str(value)) for value in values) or "(?!x)x"


def get_ood_splits(dataset):
    """OOD test splits of a dataset, named after their domain or source."""
    if dataset == "toyshift":
        id_domain = config["toyshift"]["id_domain"]
        return [domain for domain in TOYSHIFT_DOMAINS if domain != id_domain]
    raise ValueError(f"unknown dataset {dataset!r}")


def get_splits(dataset):
    return [*ID_SPLITS, *get_ood_splits(dataset)]


def get_dataset_files(wildcards):
    """The prepared files a dataset's reader loads."""
    if wildcards.dataset == "toyshift":
        return {"task": "resources/datasets/toyshift/task.h5"}
    raise ValueError(f"unknown dataset {wildcards.dataset!r}")


def get_data_root(wildcards):
    return f"resources/datasets/{wildcards.dataset}"


def get_backbone_files(wildcards):
    """The toy's files (pretrain_backbone), or the meta.json that fetch_backbone writes last;
    jobs find the weights file through meta.json either way."""
    folder = f"{MODELS}/{wildcards.backbone}"
    if wildcards.backbone == TOY_BACKBONE:
        return {"weights": f"{folder}/model.safetensors", "meta": f"{folder}/meta.json"}
    return {"meta": f"{folder}/meta.json"}


def get_backbone_options(backbone):
    """The `backbone_options` entry of a backbone (fetch_backbone's params)."""
    return dict(config["backbone_options"].get(backbone) or {})


def get_lr_grid(method):
    """Learning rates of a method in their one canonical spelling (folder names)."""
    return [format_hparam(lr) for lr in config["finetune"][method]["lr_grid"]]


def get_c_grid():
    import numpy as np

    grid = config["probe"]["c_grid"]
    values = np.logspace(grid["log10_min"], grid["log10_max"], grid["num"])
    return [float(format_hparam(value)) for value in values]


def get_finetune_settings(method):
    """The config keys that shape one fine-tuning run (Snakemake `params`, so that changing
    one of them reruns exactly the runs it affects)."""
    shared = {
        key: value
        for key, value in config["finetune"].items()
        if key not in {"ft", "lpft"}
    }
    own = {
        key: value
        for key, value in config["finetune"][method].items()
        if key != "lr_grid"
    }
    return {**shared, **own}


def get_probe_files(wildcards):
    folder = (
        f"results/probe/{wildcards.backbone}/{wildcards.dataset}/seed{wildcards.seed}"
    )
    if wildcards.method == "lpft":
        return {"probe_head": f"{folder}/head.safetensors"}
    return {}


def get_run_metrics(wildcards):
    return expand(
        "results/finetune/{method}/{backbone}/{dataset}/lr{lr}/seed{seed}/metrics.json",
        method=wildcards.method,
        backbone=wildcards.backbone,
        dataset=wildcards.dataset,
        lr=get_lr_grid(wildcards.method),
        seed=config["seeds"],
    )


def get_table_inputs(wildcards):
    """{(method, backbone) as "method/backbone": the files its table row is made from}."""
    inputs = {}
    for backbone in config["backbones"]:
        if "lp" in config["methods"]:
            inputs[f"lp/{backbone}"] = expand(
                "results/probe/{backbone}/{dataset}/seed{seed}/metrics.json",
                backbone=backbone,
                dataset=wildcards.dataset,
                seed=config["seeds"],
            )
        for method in FINETUNE_METHODS:
            inputs[f"{method}/{backbone}"] = (
                f"results/selected/{method}/{backbone}/{wildcards.dataset}.json"
            )
    return inputs


def get_table_files(wildcards):
    files = []
    for value in get_table_inputs(wildcards).values():
        files += [value] if isinstance(value, str) else list(value)
    return files


def get_stage_resources(stage):
    """Snakemake resources of a stage; memory and runtime grow with the attempt."""
    settings = config["resources"][stage]
    resources = {
        "mem_mb": lambda wildcards, attempt: settings["mem_mb"] * attempt,
        "runtime": lambda wildcards, attempt: settings["runtime"] * attempt,
    }
    if settings["gpu"] > 0:
        resources["gpu"] = settings["gpu"]
    return resources


def get_threads(stage):
    return config["resources"][stage]["threads"]


def get_final_outputs():
    return [
        *expand("results/tables/{dataset}.md", dataset=config["datasets"]),
        "results/tables/summary.md",
        "results/tables/summary.csv",
        "results/plots/id_vs_ood.png",
    ]


wildcard_constraints:
    dataset=_alternatives(config["datasets"]),
    backbone=_alternatives(config["backbones"]),
    method=_alternatives(FINETUNE_METHODS),
    seed=r"\d+",
    lr=r"[0-9][0-9.e+-]*",
    split=_alternatives(
        sorted(
            {split for dataset in config["datasets"] for split in get_splits(dataset)}
        )
    ),
