# Datasets: the embedded toyshift benchmark is generated from a seed; the real ones are
# downloaded (login nodes have internet, compute nodes often do not: local rules) or read
# from an existing copy named under `paths:`.


localrules:
    download_dataset,
    check_dataset,
    fingerprint_dataset,


rule generate_toyshift:
    output:
        pretrain="resources/datasets/toyshift/pretrain.h5",
        task="resources/datasets/toyshift/task.h5",
    log:
        f"{LOGS}/generate_toyshift.log",
    benchmark:
        f"{BENCHMARKS}/generate_toyshift.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        settings=config["toyshift"],
        progress=config["progress"],
    script:
        "../scripts/generate_toyshift.py"


rule download_dataset:
    output:
        directory("resources/datasets/{source}"),
    log:
        f"{LOGS}/download_dataset/{{source}}.log",
    conda:
        "../../envs/torch.yaml"
    # The cache folder and mirror URLs are read from the config in the script, not passed as
    # params: changing a mirror must not make Snakemake download a verified dataset again.
    script:
        "../scripts/download_dataset.py"


rule check_dataset:
    output:
        "results/data_checks/{source}.json",
    log:
        f"{LOGS}/check_dataset/{{source}}.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        root=lambda wildcards: config["paths"][wildcards.source],
        # A param: listing or unlisting a source redoes its (cheap) check.
        allow_subset=lambda wildcards: wildcards.source in config["allow_subset"],
        # A changed copy is counted again.
        fingerprint=lambda wildcards: get_tree_fingerprint(
            wildcards.source, config["paths"][wildcards.source]
        ),
    script:
        "../scripts/check_dataset.py"


# The data manifest every rule that reads a dataset's images depends on. User-owned data is
# fingerprinted when the DAG is built (params), so the manifest, and all that is made from the
# data, reruns exactly when a file is added, removed, renamed or edited; touching one does
# nothing. Downloads and the toyshift task are fingerprinted here, after they are made.
rule fingerprint_dataset:
    input:
        unpack(get_data_sources),
    output:
        f"{DATA_MANIFESTS}/{{dataset}}.json",
    log:
        f"{LOGS}/fingerprint_dataset/{{dataset}}.log",
    # Every job of the dataset waits for its manifest.
    priority: PRIORITY["data"]
    conda:
        "../../envs/analysis.yaml"
    params:
        fingerprints=get_user_data_fingerprints,
        trees=lambda wildcards: {
            name: root for name, (root, _) in get_data_trees(wildcards.dataset).items()
        },
        cache_dir=FINGERPRINT_CACHE,
    script:
        "../scripts/fingerprint_dataset.py"


# The prepared-image cache (docs/prepared-cache.md): each split decoded and resized once, to
# what its transform needs at the backbone's preprocessing (meta.json and the preprocess
# overrides), and read by every job of the dataset. Fine-tuning settings do not reach it.
rule prepare_images:
    input:
        unpack(get_dataset_files),
        meta=f"{MODELS}/{{backbone}}/meta.json",
    output:
        get_prepared_file("{backbone}", "{dataset}", "{split}", "{transform}"),
    log:
        f"{LOGS}/prepare_images/{{backbone}}/{{dataset}}/{{split}}/{{transform}}.log",
    benchmark:
        f"{BENCHMARKS}/prepare_images/{{backbone}}/{{dataset}}/{{split}}/{{transform}}.tsv"
    wildcard_constraints:
        transform=_alternatives(TRANSFORMS),
    priority: PRIORITY["features"]
    conda:
        "../../envs/torch.yaml"
    threads: get_threads("prepare")
    resources:
        **get_stage_resources("prepare"),
    params:
        data_root=get_data_root,
        data_options=get_data_options("prepare"),
        preprocess=get_preprocess_params,
        shorter_side=get_shorter_side,
        compression=config["prepared_cache"]["compression"],
    script:
        "../scripts/prepare_images.py"
