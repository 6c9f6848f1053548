# Datasets: the embedded toyshift benchmark is generated from a seed; the real ones are
# downloaded (login nodes have internet, compute nodes often do not: local rules) or read
# from an existing copy named under `paths:`.


localrules:
    download_dataset,
    check_dataset,


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
    script:
        "../scripts/check_dataset.py"
