# Fine-tuning (every method of the method table): one run per method, point of its sweep
# ({run} = lr0.01 or lr0.01-alpha0.1, see robustft.methods) and seed; then the best point.


rule finetune:
    input:
        unpack(get_finetune_inputs),
    output:
        model="results/finetune/{method}/{backbone}/{dataset}/{run}/seed{seed}/model.safetensors",
        history="results/finetune/{method}/{backbone}/{dataset}/{run}/seed{seed}/history.csv",
        metrics="results/finetune/{method}/{backbone}/{dataset}/{run}/seed{seed}/metrics.json",
        config="results/finetune/{method}/{backbone}/{dataset}/{run}/seed{seed}/config.json",
    log:
        f"{LOGS}/finetune/{{method}}/{{backbone}}/{{dataset}}/{{run}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/finetune/{{method}}/{{backbone}}/{{dataset}}/{{run}}/seed{{seed}}.tsv"
    priority: get_finetune_priority
    conda:
        "../../envs/torch.yaml"
    threads: get_threads("finetune")
    resources:
        **get_stage_resources("finetune"),
    params:
        # The method's on the dataset; analysis.er_large_id's loop for a large-ID run.
        settings=get_run_settings,
        ood_splits=lambda wildcards: get_ood_splits(wildcards.dataset),
        data_root=get_data_root,
        # Resumable state: not an output, so that it survives the failed job it exists for.
        state_dir=f"{STATE_ROOT}/{{method}}/{{backbone}}/{{dataset}}/{{run}}/seed{{seed}}",
        data_options=get_data_options("finetune"),
        preprocess=get_preprocess_params,
        backbone_kwargs=lambda wildcards: get_backbone_kwargs(wildcards.backbone),
        device=config["device"],
        progress=config["progress"],
        text_cache=HF_CACHE,
        prepared=get_prepared("finetune"),
    script:
        "../scripts/finetune.py"


rule select_run:
    input:
        get_run_metrics,
    output:
        "results/selected/{method}/{backbone}/{dataset}.json",
    log:
        f"{LOGS}/select_run/{{method}}/{{backbone}}/{{dataset}}.log",
    priority: PRIORITY["selection"]
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/select_run.py"


# `snakemake clean_state` (make clean-state): delete resumable state that no run of this
# config owns (runs whose settings changed or left the config). Run it with the same
# --configfile and --config as the runs whose state must survive.
rule clean_state:
    log:
        f"{LOGS}/clean_state.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        root=STATE_ROOT,
        owned=get_state_dirs(),
    script:
        "../scripts/clean_state.py"
