from robustft.analysis import effective_robustness_table, write_effective_robustness
from robustft.runtime import job

with job(log_path=snakemake.log[0]):
    inputs = snakemake.params.inputs
    table, lines = effective_robustness_table(
        dataset=snakemake.wildcards.dataset,
        ood_splits=snakemake.params.ood_splits,
        baseline_files=inputs["baseline"],
        probe_files=inputs["probes"],
        selection_files=inputs["selections"],
        published_line=snakemake.params.published_line,
        large_id_files=inputs.get("large_id"),
    )
    write_effective_robustness(
        table=table,
        lines=lines,
        csv_path=snakemake.output.csv,
        line_path=snakemake.output.line,
        er_plot=snakemake.output.er_plot,
        scatter_plot=snakemake.output.scatter,
    )
