# Linear probe on frozen features, C chosen on ID val.


rule fit_probe:
    input:
        features=lambda wildcards: expand(
            "results/features/{backbone}/{dataset}/{split}.h5",
            backbone=wildcards.backbone,
            dataset=wildcards.dataset,
            split=get_splits(wildcards.dataset),
        ),
        # The features must be of these weights (the probe checks their weights_sha256).
        meta=lambda wildcards: get_backbone_files(wildcards)["meta"],
    output:
        metrics="results/probe/{backbone}/{dataset}/seed{seed}/metrics.json",
        head="results/probe/{backbone}/{dataset}/seed{seed}/head.safetensors",
        sweep="results/probe/{backbone}/{dataset}/seed{seed}/sweep.csv",
    log:
        f"{LOGS}/fit_probe/{{backbone}}/{{dataset}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/fit_probe/{{backbone}}/{{dataset}}/seed{{seed}}.tsv"
    priority: PRIORITY["probe"]
    conda:
        "../../envs/analysis.yaml"
    threads: get_threads("probe")
    resources:
        **get_stage_resources("probe"),
    params:
        splits=lambda wildcards: get_splits(wildcards.dataset),
        c_grid=get_c_grid(),
        max_iter=config["probe"]["max_iter"],
        solver=config["probe"]["solver"],
        device=config["device"],
        progress=config["progress"],
    script:
        "../scripts/fit_probe.py"
