# Helpers shared by the rules: config validation, wildcard values, inputs and resources.
# Parsing must stay cheap: nothing here imports torch, timm or scikit-learn.
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

SRC = str(Path(workflow.basedir) / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
# Jobs import the library too, also when it is not pip-installed in their environment.
os.environ.update(
    PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.getenv("PYTHONPATH")]))
)

from robustft.config import (
    grid_keys,
    ConfigError,
    format_hparam,
    hparam_folder,
    load_schema,
    parse_hparam_folder,
    validate_config,
)
from robustft.data.registry import (
    BUILTIN_SETTINGS,
    GENERATED,
    ID_SPLITS,
    TRANSFORMS,
    dataset_options,
    dataset_sources,
)
from robustft.data.fingerprint import cache_name as fingerprint_cache_name
from robustft.data.fingerprint import tree_fingerprint
from robustft.data.splits import TRAIN_PER_CLASS_KEY
from robustft.data.sources import SOURCES, source_root
from robustft.methods import method_table
from robustft.zeroshot import CLIP_TEXT_TOWERS

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


# Tracking never fails a job (robustft.tracking); say once, before any job, when it cannot log.
_TRACKER = config["tracking"]["backend"]
if _TRACKER != "none":
    from importlib.util import find_spec

    if find_spec(_TRACKER) is None:
        print(
            f"robustft: warning: tracking.backend is {_TRACKER}, which is not installed "
            f"(pip install 'robustft[{_TRACKER}]'): runs will not be logged",
            file=sys.stderr,
        )


try:
    # Per-dataset settings (registry defaults under `dataset_settings`), resolved once.
    DATASET_OPTIONS = {
        dataset: dataset_options(config, dataset) for dataset in config["datasets"]
    }
except ValueError as error:
    sys.exit(f"robustft: {error}")
for _dataset, _options in DATASET_OPTIONS.items():
    for _source in dataset_sources(_dataset, ood_splits=_options["ood_splits"] or []):
        if not SOURCES[_source].downloads and not config["paths"].get(_source):
            sys.exit(
                f"robustft: config key 'paths.{_source}' is required by dataset "
                f"{_dataset!r} ({SOURCES[_source].how_to_get})"
            )

# The fine-tuning methods this config runs, from the method table (robustft.methods): lp,
# wiseft and zeroshot have rules of their own. Nothing here names a fine-tuning method.
METHOD_TABLE = method_table(config["finetune"])
FINETUNE_METHODS = [name for name in config["methods"] if name in METHOD_TABLE]
WISEFT_METHODS = [m for m in config["wiseft"]["methods"] if m in FINETUNE_METHODS]
# Methods whose runs are souped (rule soups), and the two kinds of soup (robustft.soups).
SOUP_METHODS = (
    [m for m in config["soups"]["methods"] if m in FINETUNE_METHODS]
    if "soups" in config["methods"]
    else []
)
SOUP_KINDS = ("uniform", "greedy")
LOGS = "results/logs"
# One manifest per dataset (rule fingerprint_dataset); listings cached between runs.
DATA_MANIFESTS = "results/data"
FINGERPRINT_CACHE = f"{DATA_MANIFESTS}/.cache"
MODELS = "resources/models"
# Downloaded weights, in the Hugging Face cache layout (HF_HUB_CACHE=resources/models/hub).
HF_CACHE = f"{MODELS}/hub"
TOY_BACKBONE = "toyresnet"
BENCHMARKS = "results/benchmarks"


def _alternatives(values):
    return "|".join(re.escape(str(value)) for value in values) or "(?!x)x"


def get_ood_splits(dataset):
    """OOD test splits of a dataset, named after their domain or source."""
    return list(DATASET_OPTIONS[dataset]["ood_splits"])


def get_splits(dataset):
    return [*ID_SPLITS, *get_ood_splits(dataset)]


def get_sources(dataset):
    """The data sources (download units) a dataset reads; none for generated settings
    (toyshift) and imagefolder."""
    options = DATASET_OPTIONS[dataset]
    if options["type"] != "builtin":
        return []
    return dataset_sources(dataset, ood_splits=options["ood_splits"] or [])


def get_source_input(source):
    """A downloaded source is its folder (rule download_dataset); an existing copy named
    under `paths:` is its layout check (rule check_dataset)."""
    if config["paths"].get(source):
        return f"results/data_checks/{source}.json"
    return f"resources/datasets/{source}"


def get_data_sources(wildcards):
    """The prepared files or folders a dataset's reader loads (downloads, layout checks)."""
    generated = GENERATED.get(wildcards.dataset)
    if generated:
        return {"task": generated.task_file}
    return {
        f"source_{source}": get_source_input(source)
        for source in get_sources(wildcards.dataset)
    }


def get_dataset_files(wildcards):
    """What every job reading a dataset's images depends on: its data manifest (rule
    fingerprint_dataset), which changes exactly when the data does. Not the sources too:
    the manifest is made from them (a changed source reruns it, and so what follows), and
    one input less per job keeps the paper DAG's dry run short."""
    return {"data_manifest": f"{DATA_MANIFESTS}/{wildcards.dataset}.json"}


def get_data_trees(dataset):
    """{name: (folder or file, whether the user owns it)} of the files a dataset is made of:
    a generated task file, the sources, or an imagefolder root. User-owned ones (`paths:`
    copies, imagefolder roots) are fingerprinted when the DAG is built; the workflow's own
    (downloads, generated tasks) when they are made."""
    options = DATASET_OPTIONS[dataset]
    generated = GENERATED.get(dataset)
    if generated:
        return {"task": (generated.task_file, False)}
    if options["type"] == "imagefolder":
        return {"root": (options["root"], True)}
    return {
        source: (
            source_root(source, paths=config["paths"]),
            bool(config["paths"].get(source)),
        )
        for source in get_sources(dataset)
    }


_FINGERPRINTS = {}


def get_tree_fingerprint(name, root):
    """The fingerprint of a user-owned folder (a `paths:` copy or an imagefolder root), taken
    once per DAG build; listings are cached under FINGERPRINT_CACHE between runs."""
    if (name, root) not in _FINGERPRINTS:
        _FINGERPRINTS[name, root] = tree_fingerprint(
            root=root,
            cache_file=f"{FINGERPRINT_CACHE}/{fingerprint_cache_name(name, root)}",
        ).fingerprint
    return _FINGERPRINTS[name, root]


def get_user_data_fingerprints(wildcards):
    """{name: fingerprint} of the user-owned trees of a dataset (rule fingerprint_dataset's
    params): a changed image or list file changes them, so `--rerun-triggers params` reruns
    the manifest and everything made from the data; a touched file does not."""
    return {
        name: get_tree_fingerprint(name, root)
        for name, (root, user_owned) in get_data_trees(wildcards.dataset).items()
        if user_owned
    }


def get_data_root(wildcards):
    """A generated setting's folder, or {source: folder} for the real settings."""
    generated = GENERATED.get(wildcards.dataset)
    if generated:
        return generated.folder
    return {
        source: source_root(source, paths=config["paths"])
        for source in get_sources(wildcards.dataset)
    }


def get_data_options(stage):
    """The per-dataset settings that shape a stage's input images (Snakemake `params`):
    features never depend on the OOD split list or the training transform."""
    drop = {"ood_splits", "backbones", "finetune"}
    if stage == "features":
        drop.add("train_transform")
    if stage == "prepare":  # the transform is in the cache file's path
        drop.update({"train_transform", "eval_transform"})

    def options(wildcards):
        return {
            key: value
            for key, value in DATASET_OPTIONS[wildcards.dataset].items()
            if key not in drop
        }

    return options


def get_backbones(dataset):
    """Backbones of one dataset: its own `dataset_settings.<dataset>.backbones`, else all."""
    own = (config["dataset_settings"].get(dataset) or {}).get("backbones")
    return list(own) if own else list(config["backbones"])


def all_backbones():
    names = [b for dataset in config["datasets"] for b in get_backbones(dataset)]
    return list(dict.fromkeys(names))


# Backbones that fetch_backbone downloads (all but the toy, which is trained here).
FETCHED_BACKBONES = [name for name in all_backbones() if name != TOY_BACKBONE]


def get_finetune_overrides(dataset):
    return (config["dataset_settings"].get(dataset) or {}).get("finetune") or {}


def get_backbone_files(wildcards):
    """The toy's files (pretrain_backbone), or the meta.json that fetch_backbone writes last;
    jobs find the weights file through meta.json either way."""
    folder = f"{MODELS}/{wildcards.backbone}"
    if wildcards.backbone in TOY_BACKBONES:
        return {"weights": f"{folder}/model.safetensors", "meta": f"{folder}/meta.json"}
    return {"meta": f"{folder}/meta.json"}


# backbone_options keys that shape the fetch (fetch_backbone's params); the others
# (preprocess, drop_rate, drop_path_rate) are applied by the jobs that load the backbone.
FETCH_OPTIONS = ("weights", "url", "sha256", "embedding")
FETCH_MAPS = (
    "key_map",
    "drop_keys",
)  # in the params only when set: old caches stay valid


def get_fetch_options(backbone):
    """The `backbone_options` keys of a backbone that shape its fetched weights."""
    own = config["backbone_options"].get(backbone) or {}
    options = {key: own[key] for key in FETCH_OPTIONS if key in own}
    options.update({key: own[key] for key in FETCH_MAPS if own.get(key)})
    return options


def get_preprocess(backbone, dataset):
    """Config overrides of a backbone's pretrained preprocessing (meta.json) on a dataset:
    `backbone_options.<b>.preprocess`, then `dataset_settings.<d>.preprocess`, null keys
    inheriting. A `params` entry of every rule that feeds images to the backbone, so that
    changing it reruns those and nothing else; the job resolves it over meta.json."""
    layers = [
        (config["backbone_options"].get(options_backbone(backbone)) or {}).get(
            "preprocess"
        ),
        (config["dataset_settings"].get(dataset) or {}).get("preprocess"),
    ]
    merged = {}
    for layer in layers:
        merged.update({k: v for k, v in (layer or {}).items() if v is not None})
    return dict(sorted(merged.items()))


def get_preprocess_params(wildcards):
    return get_preprocess(wildcards.backbone, wildcards.dataset)


def get_backbone_kwargs(backbone):
    """drop_rate, drop_path_rate of a backbone (set ones only): fine-tuning's params, never
    the features' (eval mode turns them off)."""
    own = config["backbone_options"].get(options_backbone(backbone)) or {}
    return {
        key: own[key]
        for key in ("drop_rate", "drop_path_rate")
        if own.get(key) is not None
    }


def _check_backbone_options():
    """What the schema cannot say, before any job: regexes compile, the toy has no
    stochastic depth."""
    for name, own in config["backbone_options"].items():
        own = own or {}
        where = f"backbone_options.{name}"
        if name == TOY_BACKBONE and own.get("drop_path_rate") is not None:
            sys.exit(
                f"robustft: config key '{where}.drop_path_rate': the toy backbone has no "
                "stochastic depth (drop_rate works)"
            )
        for field in FETCH_MAPS:
            for index, item in enumerate(own.get(field) or []):
                pattern, replacement = item if field == "key_map" else (item, "")
                try:
                    re.compile(pattern).sub(replacement, "")
                except re.error as error:
                    sys.exit(
                        f"robustft: config key '{where}.{field}[{index}]': {error} "
                        f"in {item!r}"
                    )
            if own.get(field) and not own.get("weights"):
                sys.exit(
                    f"robustft: config key '{where}.{field}' renames the keys of a local "
                    f"file: set {where}.weights"
                )


_check_backbone_options()


def get_lr_grid(method, dataset):
    """Learning rates of a method on a dataset in their one canonical spelling (folder
    names): the dataset's own grid where it has one, else the global one."""
    own = (get_finetune_overrides(dataset).get(method) or {}).get("lr_grid")
    return [format_hparam(lr) for lr in own or config["finetune"][method]["lr_grid"]]


def get_run_grid(method, dataset):
    """Run folder names of a method's sweep: lr × its own swept hyper-parameter (α, λ or
    rank), each value in its one canonical spelling, e.g. lr0.01-alpha0.1."""
    from itertools import product

    swept = METHOD_TABLE[method].swept
    names = list(swept)
    grids = [config["finetune"][method][swept[name]] for name in names]
    return [
        hparam_folder({"lr": lr, **dict(zip(names, values))})
        for lr in get_lr_grid(method, dataset)
        for values in product(*grids)
    ]


def get_c_grid():
    import numpy as np

    grid = config["probe"]["c_grid"]
    values = np.logspace(grid["log10_min"], grid["log10_max"], grid["num"])
    return [float(format_hparam(value)) for value in values]


def get_finetune_settings(method, dataset):
    """The config keys that shape one fine-tuning run (Snakemake `params`, so that changing
    one of them reruns exactly the runs it affects); a dataset's own values win."""
    shared = {
        key: value
        for key, value in config["finetune"].items()
        # Not params: how often state is saved, and how many processes share a run
        # (`processes`: the same result up to float rounding; docs/multi-gpu.md).
        if key not in {*METHOD_TABLE, "checkpoint_minutes", "processes"}
    }
    own = config["finetune"][method]
    # The method's fixed settings (β, temperature, LoRA alpha and target); the swept ones
    # come from the run folder name, the training-loop ones are arguments of their own.
    loop_keys = ("bn", "clip_grad_norm")
    method_options = {
        key: value
        for key, value in own.items()
        if key not in grid_keys(METHOD_TABLE[method]) and key not in loop_keys
    }
    dataset_own = get_finetune_overrides(dataset)
    overrides = {
        key: value
        for key, value in dataset_own.items()
        if key not in METHOD_TABLE and value is not None
    }
    method_own = dataset_own.get(method) or {}
    loop = {
        key: method_own[key] if method_own.get(key) is not None else own[key]
        for key in loop_keys
    }
    loop["clip_grad_norm"] = loop["clip_grad_norm"] or None  # 0 = no clipping
    return {**shared, **loop, "method_options": method_options, **overrides}


STATE_ROOT = "results/resume/finetune"


def get_methods(backbone):
    """The fine-tuning methods that run on a backbone: a method that needs a CLIP text tower
    (FLYP) only on the backbones that have one, as the zero-shot rows."""
    return [
        method
        for method in FINETUNE_METHODS
        if not METHOD_TABLE[method].text_tower or backbone in CLIP_TEXT_TOWERS
    ]


def get_text_tower_files(wildcards):
    """The text tower a method trains (FLYP), fetched by fetch_text_tower."""
    if METHOD_TABLE[wildcards.method].text_tower:
        return {"text_tower": f"{MODELS}/{wildcards.backbone}/text_tower.json"}
    return {}


def get_state_dirs():
    """The resumable-state folders of every fine-tuning run this config asks for (the
    finetune rule's `state_dir`), the pools' runs (er_pretraining) and the large-ID run
    (analysis.er_large_id) too; `clean_state` removes the others."""
    sweeps = {
        f"{STATE_ROOT}/{method}/{backbone}/{dataset}/{run}/seed{seed}"
        for dataset in config["datasets"]
        for backbone in get_backbones(dataset)
        for method in get_methods(backbone)
        for run in get_run_grid(method, dataset)
        for seed in config["seeds"]
    }
    pools = {
        f"{STATE_ROOT}/{run_dir.removeprefix('results/finetune/')}"
        for dataset in ER_PRETRAINING_DATASETS
        for run_dir in get_er_pretraining_runs(dataset).values()
    }
    large_id = {
        f"{STATE_ROOT}/{run.method}/{run.backbone}/{run.dataset}/{run.run}/seed{run.seed}"
        for run in map(get_large_id_run, config["datasets"])
        if run is not None
    }
    return sorted(sweeps | pools | large_id)


def get_probe_files(wildcards):
    folder = (
        f"results/probe/{wildcards.backbone}/{wildcards.dataset}/seed{wildcards.seed}"
    )
    if METHOD_TABLE[wildcards.method].needs_probe_head:  # LP-FT's start, KD's teacher
        return {"probe_head": f"{folder}/head.safetensors"}
    return {}


def get_run_files(name):
    """The file `name` of every run (sweep point × seed) of a method on a backbone and dataset."""

    def files(wildcards):
        return expand(
            "results/finetune/{method}/{backbone}/{dataset}/{run}/seed{seed}/{name}",
            method=wildcards.method,
            backbone=wildcards.backbone,
            dataset=wildcards.dataset,
            run=get_run_grid(wildcards.method, wildcards.dataset),
            seed=config["seeds"],
            name=name,
        )

    return files


get_run_metrics = get_run_files("metrics.json")


def get_table_inputs(wildcards):
    """{(method, backbone) as "method/backbone": the files its table row is made from}."""
    inputs = {}
    for backbone in get_backbones(wildcards.dataset):
        if "lp" in config["methods"]:
            inputs[f"lp/{backbone}"] = expand(
                "results/probe/{backbone}/{dataset}/seed{seed}/metrics.json",
                backbone=backbone,
                dataset=wildcards.dataset,
                seed=config["seeds"],
            )
        for method in get_methods(backbone):
            inputs[f"{method}/{backbone}"] = (
                f"results/selected/{method}/{backbone}/{wildcards.dataset}.json"
            )
        if "zeroshot" in config["methods"] and backbone in CLIP_TEXT_TOWERS:
            inputs[f"zeroshot/{backbone}"] = (
                f"results/zeroshot/{backbone}/{wildcards.dataset}/metrics.json"
            )
        if "wiseft" in config["methods"]:
            inputs[f"wiseft/{backbone}"] = {
                "curves": get_wiseft_curves(backbone, wildcards.dataset),
                "alpha": config["wiseft"]["report_alpha"],
                "endpoint": WISEFT_METHODS[0],
            }
        for method in SOUP_METHODS:
            for kind in SOUP_KINDS:
                inputs[f"{method}_soup_{kind}/{backbone}"] = {
                    "soups": f"results/soups/{method}/{backbone}/{wildcards.dataset}.json",
                    "kind": kind,
                }
    return inputs


def get_wiseft_curves(backbone, dataset):
    return expand(
        "results/wiseft/{backbone}/{dataset}/seed{seed}/curve.csv",
        backbone=backbone,
        dataset=dataset,
        seed=config["seeds"],
    )


def get_wiseft_inputs(wildcards):
    """The probe head (θ₀'s head) of the seed and the selections of the θ₁ runs."""
    return {
        "probe_head": (
            f"results/probe/{wildcards.backbone}/{wildcards.dataset}/"
            f"seed{wildcards.seed}/head.safetensors"
        ),
        **{
            f"selected_{method}": (
                f"results/selected/{method}/{wildcards.backbone}/{wildcards.dataset}.json"
            )
            for method in WISEFT_METHODS
        },
    }


def get_table_files(wildcards):
    files = []
    for value in get_table_inputs(wildcards).values():
        if isinstance(value, str):
            files.append(value)
        elif isinstance(value, dict) and "soups" in value:
            files.append(value["soups"])
        elif isinstance(value, dict):
            files += list(value["curves"])
        else:
            files += list(value)
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


# Which ready job runs first when cores are scarce: the critical path. The backbone gates
# every run, features and the probe gate LP-FT, the runs WiSE-FT interpolates gate it, and the
# baseline models only feed the last table, so they fill idle cores. Order only: no output
# depends on it.
PRIORITY = {
    "data": 100,
    "pretrain": 100,
    "features": 90,
    "probe": 90,
    "selection": 80,
    "after_selection": 70,
    "finetune_gating": 50,
    "finetune": 40,
    "baseline": 10,
}


def get_finetune_priority(wildcards):
    # A pool backbone's run feeds one table only (er_pretraining): the second link of the
    # longest chain among the jobs that fill idle cores (get_pretrain_priority).
    if wildcards.backbone in POOL_BACKBONES:
        return PRIORITY["baseline"] + 3
    if wildcards.method in WISEFT_METHODS:
        return PRIORITY["finetune_gating"]
    return PRIORITY["finetune"]


def get_baseline_priority(wildcards):
    """Among the jobs that fill idle cores, the longest first (epochs × fraction of the
    pool), so that the run does not end on one long baseline model while a core idles.
    """
    model = get_baseline_settings(wildcards.baseline)
    return PRIORITY["baseline"] + min(4, int(model["epochs"] * model["fraction"] + 0.5))


def baseline_name(model):
    fraction = format_hparam(model["fraction"])
    return f"w{model['width']}-e{model['epochs']}-f{fraction}"


# Settings held in memory at their own small image size: baseline models train on these.
# The others need a published line (baseline.lines) for effective robustness.
BASELINE_DATASETS = tuple(
    name for name, setting in BUILTIN_SETTINGS.items() if setting.in_memory
)


def get_baseline_models(dataset):
    """{name: settings} of the baseline models of a dataset; none with a published line."""
    if dataset in config["baseline"]["lines"] or dataset not in BASELINE_DATASETS:
        return {}
    return {baseline_name(model): model for model in config["baseline"]["models"]}


def has_effective_robustness(dataset):
    return dataset in config["baseline"]["lines"] or dataset in BASELINE_DATASETS


def get_baseline_settings(name):
    shared = {key: value for key, value in config["baseline"].items()}
    for key in ("models", "lines"):
        shared.pop(key)
    model = next(
        model for model in config["baseline"]["models"] if baseline_name(model) == name
    )
    return {**shared, **model}


def get_er_inputs(wildcards):
    """What the ER table of a dataset is made of: baseline models, probes, selections."""
    dataset = wildcards.dataset
    table = get_table_inputs(wildcards)
    return {
        "baseline": expand(
            "results/baseline/{dataset}/{model}/metrics.json",
            dataset=dataset,
            model=list(get_baseline_models(dataset)),
        ),
        "probes": {
            key.split("/", 1)[1]: files
            for key, files in table.items()
            if key.startswith("lp/")
        },
        "selections": {
            key: file
            for key, file in table.items()
            if isinstance(file, str) and not key.startswith(("lp/", "zeroshot/"))
        },
        "large_id": get_large_id_files(dataset),
    }


def get_er_files(wildcards):
    inputs = get_er_inputs(wildcards)
    files = list(inputs["baseline"]) + list(inputs["selections"].values())
    files += list(inputs["large_id"].values())
    for probe_files in inputs["probes"].values():
        files += probe_files
    return files


# --- ER with a large ID training set (analysis.er_large_id, docs/results.md) ---------------

LARGE_ID = config["analysis"]["er_large_id"]


def get_large_id_run(dataset):
    """The dataset's run trained on a large ID training set (its wildcards), or None. Only
    generated settings (toyshift) offer more ID images than `train`: its pool of extra ID
    training images (`toyshift.baseline_per_class`), which the baseline models train on too.
    The folder spells the images per class (lr0.03-trainpc1150), so a cached run traces to
    the size it was trained on."""
    if not (LARGE_ID["enabled"] and config["analysis"]["effective_robustness"]):
        return None
    if dataset not in GENERATED or not has_effective_robustness(dataset):
        return None
    toy = config["toyshift"]
    available = toy["train_per_class"] + toy["baseline_per_class"]
    per_class = LARGE_ID["train_per_class"] or available
    if per_class > available:
        sys.exit(
            f"robustft: config key 'analysis.er_large_id.train_per_class': {per_class} > "
            f"the {available} ID training images per class toyshift has "
            "(train_per_class + baseline_per_class)"
        )
    backbone = get_backbones(dataset)[0]
    if LARGE_ID["method"] not in get_methods(backbone):
        sys.exit(
            f"robustft: config key 'analysis.er_large_id.method': {LARGE_ID['method']!r} is "
            f"not a fine-tuning method this config runs on {backbone}"
        )
    return SimpleNamespace(
        method=LARGE_ID["method"],
        backbone=backbone,
        dataset=dataset,
        run=hparam_folder({"lr": LARGE_ID["lr"], TRAIN_PER_CLASS_KEY: per_class}),
        seed=LARGE_ID["seed"],
    )


def get_large_id_files(dataset):
    """{"method/backbone": metrics.json} of the dataset's large-ID run (none when off); the
    ER table reads the history.csv beside it."""
    run = get_large_id_run(dataset)
    if run is None:
        return {}
    return {
        f"{run.method}/{run.backbone}": (
            f"results/finetune/{run.method}/{run.backbone}/{run.dataset}/{run.run}/"
            f"seed{run.seed}/metrics.json"
        )
    }


def get_run_settings(wildcards):
    """The finetune rule's settings: the method's on the dataset; a run trained on a larger
    ID set (its folder names TRAIN_PER_CLASS_KEY) takes analysis.er_large_id's epochs and
    eval_every (every epoch scored, to see ER's early rise)."""
    settings = get_finetune_settings(wildcards.method, wildcards.dataset)
    if TRAIN_PER_CLASS_KEY in parse_hparam_folder(wildcards.run):
        settings = {
            **settings,
            "epochs": LARGE_ID["epochs"],
            "eval_every": LARGE_ID["eval_every"],
        }
    return settings


def get_distortion_splits(dataset):
    """ID train and test, and every OOD split (ID val adds nothing)."""
    return [split for split in get_splits(dataset) if split != "val"]


def get_distortion_plan(wildcards):
    """Per backbone: its folder, its pretrained features per split, the selected runs."""
    dataset = wildcards.dataset
    return {
        backbone: {
            "model_dir": f"resources/models/{backbone}",
            "features": {
                split: f"results/features/{backbone}/{dataset}/{split}.h5"
                for split in get_distortion_splits(dataset)
            },
            "selections": {
                method: f"results/selected/{method}/{backbone}/{dataset}.json"
                for method in get_methods(backbone)
            },
        }
        for backbone in get_backbones(dataset)
    }


def get_distortion_preprocess(wildcards):
    """{backbone: its preprocessing overrides on the dataset} (feature_distortion's params)."""
    return {
        backbone: get_preprocess(backbone, wildcards.dataset)
        for backbone in get_backbones(wildcards.dataset)
    }


def get_distortion_inputs(wildcards):
    files = list(get_dataset_files(wildcards).values())
    for plan in get_distortion_plan(wildcards).values():
        files.append(f"{plan['model_dir']}/meta.json")
        files += list(plan["features"].values()) + list(plan["selections"].values())
    return files


# --- the prepared-image cache (rule prepare_images, docs/prepared-cache.md) ----------------

PREPARED = "results/prepared"


def uses_prepared_cache(dataset):
    """Whether a dataset's jobs read its images from the prepared-image cache:
    `dataset_settings.<d>.prepared_cache` where set, else `prepared_cache.enabled` for
    datasets of image files (in-memory ones, the toy and CIFAR, need none)."""
    own = (config["dataset_settings"].get(dataset) or {}).get("prepared_cache")
    if own is not None:
        return bool(own)
    options = DATASET_OPTIONS[dataset]
    in_memory = options["type"] == "builtin" and BUILTIN_SETTINGS[dataset].in_memory
    return bool(config["prepared_cache"]["enabled"]) and not in_memory


def get_prepared_file(backbone, dataset, split, transform):
    return f"{PREPARED}/{backbone}/{dataset}/{split}/{transform}.h5"


def get_prepared_splits(dataset, backbone, splits, *, train_transform=False):
    """{split: its cache file} (the eval transform; the train transform for train when
    `train_transform`), or {} where the dataset has no cache."""
    if not uses_prepared_cache(dataset):
        return {}
    options = DATASET_OPTIONS[dataset]

    def transform(split):
        if train_transform and split == "train":
            return options["train_transform"]
        return options["eval_transform"]

    return {
        split: get_prepared_file(backbone, dataset, split, transform(split))
        for split in splits
    }


def get_prepared(stage):
    """{split: cache file} that a job of `stage` reads (its `prepared` param): finetune
    every split, features its own, evaluate (wiseft, zeroshot) all but train; distortion
    {backbone: {split: cache file}}."""

    def prepared(wildcards):
        dataset = wildcards.dataset
        if stage == "distortion":
            return {
                backbone: get_prepared_splits(
                    dataset, backbone, get_distortion_splits(dataset)
                )
                for backbone in get_backbones(dataset)
            }
        splits = {
            "finetune": get_splits(dataset),
            "features": [getattr(wildcards, "split", None)],
            "evaluate": [split for split in get_splits(dataset) if split != "train"],
        }[stage]
        return get_prepared_splits(
            dataset, wildcards.backbone, splits, train_transform=stage == "finetune"
        )

    return prepared


def get_prepared_inputs(stage):
    """The cache files of `get_prepared(stage)`, as a job's input list."""

    def inputs(wildcards):
        files = get_prepared(stage)(wildcards)
        if stage == "distortion":
            return [path for own in files.values() for path in own.values()]
        return list(files.values())

    return inputs


def get_finetune_inputs(wildcards):
    """Every input of a fine-tuning run from one function, in the order and under the names
    of the four it is made of: Snakemake's cost per input function and job adds up over
    the paper DAG's 1,458 runs."""
    return {
        **get_dataset_files(wildcards),
        **get_backbone_files(wildcards),
        **get_probe_files(wildcards),
        **get_text_tower_files(wildcards),
        "prepared": _get_finetune_prepared(wildcards),
    }


_get_finetune_prepared = get_prepared_inputs("finetune")


def get_shorter_side(wildcards):
    """prepared_cache.shorter_side for random_resized_crop caches, None for the others (so
    that changing it rebuilds only those)."""
    if wildcards.transform != "random_resized_crop":
        return None
    return config["prepared_cache"]["shorter_side"]


# --- the tidy table of every run (rule tidy_runs) ----------------------------------------


def get_tidy_inputs():
    """{dataset: the files of its rows} for robustft.tidy.runs_table: every run of every
    sweep with its selection, the probes, WiSE-FT curves, zero-shot heads, the ER lines.
    """
    from types import SimpleNamespace

    inputs = {}
    for dataset in config["datasets"]:
        table = get_table_inputs(SimpleNamespace(dataset=dataset))
        by_kind = {"lp": {}, "wiseft": {}, "zeroshot": {}, "finetune": {}, "soups": {}}
        for key, files in table.items():
            method, backbone = key.split("/", 1)
            if isinstance(files, dict) and "soups" in files:
                by_kind["soups"][key] = files
            elif method in FINETUNE_METHODS:
                where = SimpleNamespace(
                    method=method, backbone=backbone, dataset=dataset
                )
                by_kind["finetune"][key] = {
                    "selection": files,
                    "metrics": get_run_metrics(where),
                }
            elif method in by_kind:
                by_kind[method][backbone] = files
        er = config["analysis"]["effective_robustness"] and has_effective_robustness(
            dataset
        )
        inputs[dataset] = {
            "ood_splits": get_ood_splits(dataset),
            "probes": by_kind["lp"],
            "finetune": by_kind["finetune"],
            "wiseft": by_kind["wiseft"],
            "zeroshot": by_kind["zeroshot"],
            "soups": by_kind["soups"],
            "er_line": f"results/analysis/er/{dataset}_line.json" if er else None,
        }
    return inputs


def get_tidy_files(wildcards):
    files = []
    for sources in get_tidy_inputs().values():
        for probe_files in sources["probes"].values():
            files += probe_files
        # A selection is made from the metrics.json of every run of its sweep, and each
        # run writes its history.csv beside them: depending on the selection alone orders
        # and reruns the table as those 3,000 files did in the paper DAG.
        files += [sweep["selection"] for sweep in sources["finetune"].values()]
        for wiseft in sources["wiseft"].values():
            files += wiseft["curves"]
        files += list(sources["zeroshot"].values())
        files += sorted({soup["soups"] for soup in sources["soups"].values()})
        files += [sources["er_line"]] if sources["er_line"] else []
    return files


# --- expected sizes: which checks mark a table's splits (allow_subset) ---------------------


def get_data_checks(wildcards):
    """{source: its size check} for a dataset's tables: the check JSON of an existing copy
    (rule check_dataset), the folder (MANIFEST.json) of a download."""
    return {
        source: get_source_input(source) for source in get_sources(wildcards.dataset)
    }


def get_check_splits(wildcards):
    """{table column: [(source, source split)]}: what each split of the dataset reads."""
    from robustft.data.registry import source_splits, split_column

    if not get_sources(wildcards.dataset):
        return {}
    return {
        split_column(split): [
            list(part) for part in source_splits(wildcards.dataset, split)
        ]
        for split in get_splits(wildcards.dataset)
    }


def get_final_outputs():
    outputs = [
        *expand("results/tables/{dataset}.md", dataset=config["datasets"]),
        "results/tables/summary.md",
        "results/tables/summary.csv",
        "results/tables/runs.parquet",
        "results/plots/id_vs_ood.png",
    ]
    if "wiseft" in config["methods"]:
        outputs += expand(
            "results/plots/wiseft_{dataset}.png", dataset=config["datasets"]
        )
    if config["analysis"]["predictions"]:
        outputs += [
            f"results/predictions/{method}/{backbone}/{dataset}.h5"
            for dataset in config["datasets"]
            for backbone in get_backbones(dataset)
            for method in get_methods(backbone)
        ]
    if config["analysis"]["effective_robustness"]:
        outputs += [
            f"results/analysis/er/{dataset}.csv"
            for dataset in config["datasets"]
            if has_effective_robustness(dataset)
        ]
    outputs += expand(
        "results/analysis/er_pretraining/{dataset}.csv", dataset=ER_PRETRAINING_DATASETS
    )
    if config["analysis"]["feature_distortion"] and FINETUNE_METHODS:
        outputs += expand(
            "results/analysis/distortion/{dataset}.csv", dataset=config["datasets"]
        )
    return outputs


def cache_signatures(rules):
    """Give every function the rules call (input, params, resources, priority) its signature
    once. Snakemake inspects a function's signature again each time it calls it, for every
    job (57,000 inspect.signature calls in the paper DAG's dry run, about a tenth of its
    time); it reads one set by overwrite_function_params instead. Call it last."""
    import inspect
    from types import FunctionType

    from snakemake.common import overwrite_function_params

    for each in rules:
        items = [*each.input, *each.params, each.priority]
        items += list((each.resources or {}).values())
        for func in items:
            # Unwrap an input file, the string unpack() flags, a Resource: to the function.
            for wrapper in ("_file", "callable", "_evaluator"):
                func = getattr(func, wrapper, None) or func
            if isinstance(func, FunctionType):
                overwrite_function_params(func, inspect.signature(func).parameters)


def tune_garbage_collection():
    """Python's cycle collector walks every live object again and again while Snakemake
    builds a large DAG: about 1 of the 7-8 CPU seconds of the paper DAG's dry run. What
    parsing made lives until Snakemake exits: frozen, the collector skips it; and it runs a
    tenth as often. Nothing a job computes depends on this. Call it last."""
    import gc

    gc.freeze()
    gc.set_threshold(7000, 10, 10)


# --- ER against the pretraining pool (rule er_pretraining, docs/results.md) ---------------


def _pool_backbones():
    """{name: pool settings} of er_pretraining.pools; one line naming the key if wrong."""
    from robustft.pretraining_pools import pool_backbone_name

    pools = {}
    for index, pool in enumerate(config["er_pretraining"]["pools"]):
        name = pool_backbone_name(
            base=TOY_BACKBONE, fraction=pool["fraction"], domains=pool["domains"]
        )
        if name in pools:
            sys.exit(
                f"robustft: config key 'er_pretraining.pools[{index}]': the same pool as "
                f"another entry ({name})"
            )
        pools[name] = pool
    return pools


# Datasets whose ER table gets the pools' comparison: they fine-tune the toy and have a line.
ER_PRETRAINING_DATASETS = [
    dataset
    for dataset in config["datasets"]
    if config["er_pretraining"]["enabled"]
    and config["er_pretraining"]["pools"]
    and config["analysis"]["effective_robustness"]
    and TOY_BACKBONE in get_backbones(dataset)
    and has_effective_robustness(dataset)
]
POOL_BACKBONES = _pool_backbones() if ER_PRETRAINING_DATASETS else {}
if POOL_BACKBONES and "ft" not in FINETUNE_METHODS:
    sys.exit(
        "robustft: config key 'er_pretraining': its runs are FT runs; add ft to 'methods' "
        "or set er_pretraining.enabled: false"
    )
# Backbones pretrained here (pretrain_backbone), the toy and the pools' variants of it.
TOY_BACKBONES = [TOY_BACKBONE, *POOL_BACKBONES]


def options_backbone(backbone):
    """The backbone whose backbone_options apply: a pool's backbone is the toy."""
    return TOY_BACKBONE if backbone in POOL_BACKBONES else backbone


def get_pretrain_settings(wildcards):
    """toy_backbone's settings, and a pool backbone's subset of the pretraining pool. The
    default toy's are toy_backbone itself, so that its cached weights stay valid."""
    pool = POOL_BACKBONES.get(wildcards.backbone)
    if pool is None:
        return config["toy_backbone"]
    return {
        **config["toy_backbone"],
        "pool_fraction": float(pool["fraction"]),
        "pool_domains": list(pool["domains"]),
    }


def get_pretrain_priority(wildcards):
    """The toy gates every run; the pools' backbones feed one table, and so fill idle cores
    as the baseline models do."""
    if wildcards.backbone in POOL_BACKBONES:
        # Ahead of the baseline models: its fine-tuning run waits for it.
        return PRIORITY["baseline"] + 5
    return PRIORITY["pretrain"]


def get_pretrain_threads(wildcards):
    """resources.pretrain.threads for the toy; one job of a pool's backbone takes a
    fine-tuning run's threads (resources.finetune), so that it packs beside the other runs
    instead of waiting for all the cores the toy's own pretraining takes."""
    if wildcards.backbone in POOL_BACKBONES:
        return get_threads("finetune")
    return get_threads("pretrain")


def get_er_pretraining_runs(dataset):
    """{backbone: its one FT run folder}: the toy and every pool backbone."""
    run = hparam_folder({"lr": config["er_pretraining"]["lr"]})
    seed = config["er_pretraining"]["seed"]
    return {
        backbone: f"results/finetune/ft/{backbone}/{dataset}/{run}/seed{seed}"
        for backbone in TOY_BACKBONES
    }


def get_er_pretraining_plan(wildcards):
    """{backbone: {run_dir, pool settings}}, er_pretraining's params; the toy's pool is
    the whole one."""
    from robustft.data.toyshift_format import DOMAINS

    whole = {"fraction": 1.0, "domains": list(DOMAINS)}
    return {
        backbone: {"run_dir": run_dir, "pool": POOL_BACKBONES.get(backbone, whole)}
        for backbone, run_dir in get_er_pretraining_runs(wildcards.dataset).items()
    }


def get_er_pretraining_inputs(wildcards):
    return {
        "line": f"results/analysis/er/{wildcards.dataset}_line.json",
        "pretrain": "resources/datasets/toyshift/pretrain.h5",
        "runs": [
            f"{run_dir}/{name}"
            for run_dir in get_er_pretraining_runs(wildcards.dataset).values()
            for name in ("metrics.json", "history.csv")
        ],
    }


wildcard_constraints:
    dataset=_alternatives(config["datasets"]),
    backbone=_alternatives([*all_backbones(), *POOL_BACKBONES]),
    source=_alternatives(SOURCES),
    method=_alternatives(FINETUNE_METHODS),
    seed=r"\d+",
    baseline=_alternatives(
        sorted({name for d in config["datasets"] for name in get_baseline_models(d)})
    ),
    run=r"lr[0-9][0-9.e+-]*(-[a-z]+[0-9][0-9.e+-]*)*",
    split=_alternatives(
        sorted(
            {split for dataset in config["datasets"] for split in get_splits(dataset)}
        )
    ),
