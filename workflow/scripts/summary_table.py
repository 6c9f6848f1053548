from robustft.report import summary_table
from robustft.runtime import job

with job(log_path=snakemake.log[0]):
    summary_table(
        csv_files=list(snakemake.input), csv_path=snakemake.output.csv, md_path=snakemake.output.md
    )
