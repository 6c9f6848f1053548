# Model soups (Wortsman et al. 2022): per seed, the uniform and the greedy soup of every run
# of a method's sweep (the runs of one seed share its initialisation), with no training.


rule soups:
    input:
        unpack(get_dataset_files),
        unpack(get_backbone_files),
        # Each run's model.safetensors is written beside its metrics.json (one job): the
        # metrics alone order and rerun the soups.
        metrics=get_run_metrics,
    output:
        summary="results/soups/{method}/{backbone}/{dataset}.json",
        weights=directory("results/soups/{method}/{backbone}/{dataset}"),
        uniform="results/predictions/{method}_soup_uniform/{backbone}/{dataset}.h5",
        greedy="results/predictions/{method}_soup_greedy/{backbone}/{dataset}.h5",
    log:
        f"{LOGS}/soups/{{method}}/{{backbone}}/{{dataset}}.log",
    benchmark:
        f"{BENCHMARKS}/soups/{{method}}/{{backbone}}/{{dataset}}.tsv"
    priority: PRIORITY["after_selection"]
    conda:
        "../../envs/torch.yaml"
    threads: get_threads("features")
    resources:
        **get_stage_resources("features"),
    params:
        seeds=config["seeds"],
        ood_splits=lambda wildcards: get_ood_splits(wildcards.dataset),
        data_root=get_data_root,
        data_options=get_data_options("features"),
        preprocess=get_preprocess_params,
        batch_size=config["features"]["batch_size"],
        device=config["device"],
    script:
        "../scripts/soups.py"
