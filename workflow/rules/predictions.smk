# Stored predictions: per-example logits (float16) and labels of every evaluation split for
# the selected run of each seed, one HDF5 file per method (layout: robustft.predictions).


rule store_predictions:
    input:
        unpack(get_dataset_files),
        unpack(get_backbone_files),
        selection="results/selected/{method}/{backbone}/{dataset}.json",
    output:
        "results/predictions/{method}/{backbone}/{dataset}.h5",
    log:
        f"{LOGS}/store_predictions/{{method}}/{{backbone}}/{{dataset}}.log",
    benchmark:
        f"{BENCHMARKS}/store_predictions/{{method}}/{{backbone}}/{{dataset}}.tsv"
    priority: PRIORITY["after_selection"]
    conda:
        "../../envs/torch.yaml"
    threads: get_threads("features")
    resources:
        **get_stage_resources("features"),
    params:
        ood_splits=lambda wildcards: get_ood_splits(wildcards.dataset),
        data_root=get_data_root,
        data_options=get_data_options("features"),
        preprocess=get_preprocess_params,
        batch_size=config["features"]["batch_size"],
        device=config["device"],
    script:
        "../scripts/store_predictions.py"
