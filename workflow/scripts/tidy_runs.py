from robustft.runtime import job
from robustft.tidy import runs_table, write_runs_table

with job(log_path=snakemake.log[0]):
    write_runs_table(
        runs_table(datasets=snakemake.params.sources),
        parquet_path=snakemake.output.parquet,
        csv_path=snakemake.output.csv,
    )
