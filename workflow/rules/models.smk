# Backbones: the toy ResNet is pretrained inside the workflow on the toyshift pool; every
# other backbone is fetched once, on the machine Snakemake runs on (a login node with internet
# access), into resources/models/, from where GPU jobs load it offline.


localrules:
    fetch_backbone,
    fetch_backbones,


rule pretrain_backbone:
    input:
        pretrain="resources/datasets/toyshift/pretrain.h5",
    output:
        weights="resources/models/toyresnet/model.safetensors",
        meta="resources/models/toyresnet/meta.json",
        history="resources/models/toyresnet/history.csv",
    log:
        f"{LOGS}/pretrain_backbone/toyresnet.log",
    benchmark:
        f"{BENCHMARKS}/pretrain_backbone/toyresnet.tsv"
    priority: PRIORITY["pretrain"]
    conda:
        "../../envs/torch.yaml"
    threads: get_threads("pretrain")
    resources:
        **get_stage_resources("pretrain"),
    params:
        settings=config["toy_backbone"],
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
