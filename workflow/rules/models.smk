# Backbones: the toy ResNet is pretrained inside the workflow on the toyshift pool; every
# other backbone is fetched once, on the machine Snakemake runs on (a login node with internet
# access), into resources/models/, from where GPU jobs load it offline.


localrules:
    fetch_backbone,
    fetch_backbones,


# The toy, and one variant of it per er_pretraining pool (toyresnet-pool0.25-all, ...),
# pretrained on that part of the pool.
rule pretrain_backbone:
    input:
        pretrain="resources/datasets/toyshift/pretrain.h5",
    output:
        weights=f"{MODELS}/{{backbone}}/model.safetensors",
        meta=f"{MODELS}/{{backbone}}/meta.json",
        history=f"{MODELS}/{{backbone}}/history.csv",
    log:
        f"{LOGS}/pretrain_backbone/{{backbone}}.log",
    benchmark:
        f"{BENCHMARKS}/pretrain_backbone/{{backbone}}.tsv"
    wildcard_constraints:
        backbone=_alternatives(TOY_BACKBONES),
    priority: get_pretrain_priority
    conda:
        "../../envs/torch.yaml"
    threads: get_pretrain_threads
    resources:
        **get_stage_resources("pretrain"),
    params:
        settings=get_pretrain_settings,
        device=config["device"],
        progress=config["progress"],
    script:
        "../scripts/pretrain_backbone.py"


rule fetch_backbone:
    output:
        meta=f"{MODELS}/{{backbone}}/meta.json",
    log:
        f"{LOGS}/fetch_backbone/{{backbone}}.log",
    wildcard_constraints:
        backbone=_alternatives(FETCHED_BACKBONES),
    conda:
        "../../envs/torch.yaml"
    params:
        options=lambda wildcards: get_fetch_options(wildcards.backbone),
        cache_dir=HF_CACHE,
        progress=config["progress"],
    script:
        "../scripts/fetch_backbone.py"


rule fetch_backbones:
    # The one command for a login node: snakemake fetch_backbones --cores 1
    input:
        expand(f"{MODELS}/{{backbone}}/meta.json", backbone=FETCHED_BACKBONES),
