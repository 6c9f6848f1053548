# Datasets: the embedded toyshift benchmark is generated from a seed.


rule generate_toyshift:
    output:
        pretrain="resources/datasets/toyshift/pretrain.h5",
        task="resources/datasets/toyshift/task.h5",
    log:
        f"{LOGS}/generate_toyshift.log",
    benchmark:
        f"{BENCHMARKS}/generate_toyshift.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        settings=config["toyshift"],
        progress=config["progress"],
    script:
        "../scripts/generate_toyshift.py"
