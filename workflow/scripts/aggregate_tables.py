from robustft.report import aggregate_dataset
from robustft.runtime import job

with job(log_path=snakemake.log[0]):
    aggregate_dataset(
        dataset=snakemake.wildcards.dataset,
        sources=snakemake.params.sources,
        ood_splits=snakemake.params.ood_splits,
        csv_path=snakemake.output.csv,
        md_path=snakemake.output.md,
        data_checks=snakemake.params.data_checks,
        check_splits=snakemake.params.check_splits,
    )
