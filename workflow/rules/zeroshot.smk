# Zero-shot CLIP heads (optional extra `clip`, open_clip): the text tower is fetched once on the
# submitting machine (internet), then the zero-shot model is evaluated offline like any model.


localrules:
    fetch_text_tower,


rule fetch_text_tower:
    output:
        f"{MODELS}/{{backbone}}/text_tower.json",
    log:
        f"{LOGS}/fetch_text_tower/{{backbone}}.log",
    conda:
        "../../envs/torch.yaml"
    params:
        cache_dir=HF_CACHE,
    script:
        "../scripts/fetch_text_tower.py"


rule zeroshot:
    input:
        unpack(get_dataset_files),
        unpack(get_backbone_files),
        text_tower=f"{MODELS}/{{backbone}}/text_tower.json",
        prepared=get_prepared_inputs("evaluate"),
    output:
        head="results/zeroshot/{backbone}/{dataset}/head.safetensors",
        metrics="results/zeroshot/{backbone}/{dataset}/metrics.json",
    log:
        f"{LOGS}/zeroshot/{{backbone}}/{{dataset}}.log",
    conda:
        "../../envs/torch.yaml"
    threads: get_threads("features")
    resources:
        **get_stage_resources("features"),
    params:
        cache_dir=HF_CACHE,
        ood_splits=lambda wildcards: get_ood_splits(wildcards.dataset),
        data_root=get_data_root,
        data_options=get_data_options("features"),
        preprocess=get_preprocess_params,
        batch_size=config["features"]["batch_size"],
        device=config["device"],
        prepared=get_prepared("evaluate"),
    script:
        "../scripts/zeroshot.py"
