# Backbones: the toy ResNet is pretrained inside the workflow on the toyshift pool.


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
