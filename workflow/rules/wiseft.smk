# WiSE-FT: interpolate the weights of each selected FT / LP-FT run with the pretrained backbone
# plus the LP head of the same seed, along an α grid; a curve per seed and a plot per dataset.


localrules:
    plot_wiseft,


rule wiseft:
    input:
        unpack(get_dataset_files),
        unpack(get_backbone_files),
        unpack(get_wiseft_inputs),
        prepared=get_prepared_inputs("evaluate"),
    output:
        curve="results/wiseft/{backbone}/{dataset}/seed{seed}/curve.csv",
    log:
        f"{LOGS}/wiseft/{{backbone}}/{{dataset}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/wiseft/{{backbone}}/{{dataset}}/seed{{seed}}.tsv"
    priority: PRIORITY["after_selection"]
    conda:
        "../../envs/torch.yaml"
    threads: get_threads("features")
    resources:
        **get_stage_resources("features"),
    params:
        alphas=[float(format_hparam(alpha)) for alpha in config["wiseft"]["alpha_grid"]],
        methods=WISEFT_METHODS,
        ood_splits=lambda wildcards: get_ood_splits(wildcards.dataset),
        data_root=get_data_root,
        data_options=get_data_options("features"),
        preprocess=get_preprocess_params,
        batch_size=config["features"]["batch_size"],
        device=config["device"],
        prepared=get_prepared("evaluate"),
    script:
        "../scripts/wiseft.py"


rule plot_wiseft:
    input:
        lambda wildcards: [
            curve
            for backbone in get_backbones(wildcards.dataset)
            for curve in get_wiseft_curves(backbone, wildcards.dataset)
        ],
    output:
        report(
            "results/plots/wiseft_{dataset}.png",
            caption="../report/wiseft.rst",
            category="{dataset}",
            subcategory="WiSE-FT",
        ),
    log:
        f"{LOGS}/plot_wiseft/{{dataset}}.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/plot_wiseft.py"
