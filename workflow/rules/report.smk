# Tables and plots: cheap, so they run on the submitting machine.


localrules:
    select_run,
    aggregate_tables,
    summary_table,
    tidy_runs,
    plot_id_vs_ood,


rule aggregate_tables:
    input:
        get_table_files,
        data_checks=lambda wildcards: list(get_data_checks(wildcards).values()),
    output:
        csv=report(
            "results/tables/{dataset}.csv",
            caption="../report/dataset_table.rst",
            category="{dataset}",
            subcategory="Accuracy",
        ),
        md="results/tables/{dataset}.md",
    log:
        f"{LOGS}/aggregate_tables/{{dataset}}.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        sources=get_table_inputs,
        ood_splits=lambda wildcards: get_ood_splits(wildcards.dataset),
        data_checks=get_data_checks,
        check_splits=get_check_splits,
    script:
        "../scripts/aggregate_tables.py"


rule summary_table:
    input:
        expand("results/tables/{dataset}.csv", dataset=config["datasets"]),
    output:
        csv=report(
            "results/tables/summary.csv",
            caption="../report/summary_table.rst",
            category="Summary",
        ),
        md="results/tables/summary.md",
    log:
        f"{LOGS}/summary_table.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/summary_table.py"


# One row per run × epoch × split (docs/tidy-table.md).
rule tidy_runs:
    input:
        get_tidy_files,
    output:
        parquet="results/tables/runs.parquet",
        csv="results/tables/runs.csv",
    log:
        f"{LOGS}/tidy_runs.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        sources=get_tidy_inputs(),
    script:
        "../scripts/tidy_runs.py"


rule plot_id_vs_ood:
    input:
        "results/tables/summary.csv",
    output:
        png=report(
            "results/plots/id_vs_ood.png",
            caption="../report/id_vs_ood.rst",
            category="Summary",
        ),
        svg="results/plots/id_vs_ood.svg",
    log:
        f"{LOGS}/plot_id_vs_ood.log",
    conda:
        "../../envs/analysis.yaml"
    script:
        "../scripts/plot_id_vs_ood.py"
