# Effective robustness along fine-tuning (against from-scratch baseline models) and feature
# distortion of the selected runs.


localrules:
    effective_robustness,


rule train_baseline:
    input:
        unpack(get_dataset_files),
    output:
        metrics="results/baseline/{dataset}/{baseline}/metrics.json",
        history="results/baseline/{dataset}/{baseline}/history.csv",
    log:
        f"{LOGS}/train_baseline/{{dataset}}/{{baseline}}.log",
    benchmark:
        f"{BENCHMARKS}/train_baseline/{{dataset}}/{{baseline}}.tsv"
    priority: get_baseline_priority
    conda:
        "../../envs/torch.yaml"
    threads: get_threads("finetune")
    resources:
        **get_stage_resources("finetune"),
    params:
        settings=lambda wildcards: get_baseline_settings(wildcards.baseline),
        ood_splits=lambda wildcards: get_ood_splits(wildcards.dataset),
        data_root=get_data_root,
        data_options=get_data_options("features"),
        device=config["device"],
        progress=config["progress"],
    script:
        "../scripts/train_baseline.py"


rule effective_robustness:
    input:
        get_er_files,
    output:
        csv=report(
            "results/analysis/er/{dataset}.csv",
            caption="../report/er_table.rst",
            category="{dataset}",
            subcategory="Effective robustness",
        ),
        line="results/analysis/er/{dataset}_line.json",
        er_plot=report(
            "results/plots/er_{dataset}.png",
            caption="../report/er_along_training.rst",
            category="{dataset}",
            subcategory="Effective robustness",
        ),
        scatter=report(
            "results/plots/id_vs_ood_logit_{dataset}.png",
            caption="../report/id_vs_ood_logit.rst",
            category="{dataset}",
            subcategory="Effective robustness",
        ),
    log:
        f"{LOGS}/effective_robustness/{{dataset}}.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        inputs=get_er_inputs,
        ood_splits=lambda wildcards: get_ood_splits(wildcards.dataset),
        published_line=lambda wildcards: config["baseline"]["lines"].get(
            wildcards.dataset
        ),
    script:
        "../scripts/effective_robustness.py"


# ER against the pretraining pool (config key er_pretraining): the one FT run of the toy and
# of each pool backbone, read off the ER table's line (no refit).
rule er_pretraining:
    input:
        unpack(get_er_pretraining_inputs),
    output:
        csv=report(
            "results/analysis/er_pretraining/{dataset}.csv",
            caption="../report/er_pretraining_table.rst",
            category="{dataset}",
            subcategory="Effective robustness",
        ),
        plot=report(
            "results/plots/er_pretraining_{dataset}.png",
            caption="../report/er_pretraining.rst",
            category="{dataset}",
            subcategory="Effective robustness",
        ),
    log:
        f"{LOGS}/er_pretraining/{{dataset}}.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        plan=get_er_pretraining_plan,
        ood_splits=lambda wildcards: get_ood_splits(wildcards.dataset),
        pool_seed=config["toy_backbone"]["seed"],
    script:
        "../scripts/er_pretraining.py"


rule feature_distortion:
    input:
        get_distortion_inputs,
        data_manifest=f"{DATA_MANIFESTS}/{{dataset}}.json",
        prepared=get_prepared_inputs("distortion"),
    output:
        csv=report(
            "results/analysis/distortion/{dataset}.csv",
            caption="../report/distortion_table.rst",
            category="{dataset}",
            subcategory="Feature distortion",
        ),
        plot=report(
            "results/plots/distortion_{dataset}.png",
            caption="../report/distortion.rst",
            category="{dataset}",
            subcategory="Feature distortion",
        ),
    log:
        f"{LOGS}/feature_distortion/{{dataset}}.log",
    benchmark:
        f"{BENCHMARKS}/feature_distortion/{{dataset}}.tsv"
    priority: PRIORITY["after_selection"]
    conda:
        "../../envs/torch.yaml"
    threads: get_threads("features")
    resources:
        **get_stage_resources("features"),
    params:
        plan=get_distortion_plan,
        preprocess=get_distortion_preprocess,
        data_root=get_data_root,
        data_options=get_data_options("features"),
        batch_size=config["features"]["batch_size"],
        num_workers=config["features"]["num_workers"],
        precision=config["features"]["precision"],
        device=config["device"],
        progress=config["progress"],
        prepared=get_prepared("distortion"),
    script:
        "../scripts/feature_distortion.py"
