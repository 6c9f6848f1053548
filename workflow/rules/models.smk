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


# fetch_backbone: issue 5. A placeholder with that rule's outputs, so that DAGs with other
# backbones (configs/paper.yaml) plan; issue 5's rule (timm/HF weights into an offline
# cache) replaces it. Run, it fails with one line instead of writing fake weights.
localrules:
    fetch_backbone,


rule fetch_backbone:
    output:
        weights="resources/models/{backbone}/model.safetensors",
        meta="resources/models/{backbone}/meta.json",
    log:
        f"{LOGS}/fetch_backbone/{{backbone}}.log",
    wildcard_constraints:
        backbone=_alternatives([b for b in all_backbones() if b != "toyresnet"]),
    conda:
        "../../envs/torch.yaml"
    shell:
        "echo 'robustft: backbone {wildcards.backbone}: weights are fetched by rule "
        "fetch_backbone (issue 5), not in this branch' | tee {log} >&2; exit 1"
