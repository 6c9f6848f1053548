# Frozen, eval-mode penultimate features of every split, one HDF5 file per split.


rule extract_features:
    input:
        unpack(get_dataset_files),
        unpack(get_backbone_files),
        prepared=get_prepared_inputs("features"),
    output:
        "results/features/{backbone}/{dataset}/{split}.h5",
    log:
        f"{LOGS}/extract_features/{{backbone}}/{{dataset}}/{{split}}.log",
    benchmark:
        f"{BENCHMARKS}/extract_features/{{backbone}}/{{dataset}}/{{split}}.tsv"
    priority: PRIORITY["features"]
    conda:
        "../../envs/torch.yaml"
    threads: get_threads("features")
    resources:
        **get_stage_resources("features"),
    params:
        data_root=get_data_root,
        data_options=get_data_options("features"),
        # Not drop_rate / drop_path_rate: eval mode turns them off.
        preprocess=get_preprocess_params,
        batch_size=config["features"]["batch_size"],
        num_workers=config["features"]["num_workers"],
        precision=config["features"]["precision"],
        device=config["device"],
        progress=config["progress"],
        prepared=lambda wildcards: get_prepared("features")(wildcards).get(
            wildcards.split
        ),
    script:
        "../scripts/extract_features.py"
