from robustft.runtime import job
from robustft.selection import select_run

with job(log_path=snakemake.log[0]):
    select_run(metrics_files=list(snakemake.input), out_path=snakemake.output[0])
