from robustft.report import plot_wiseft
from robustft.runtime import job

with job(log_path=snakemake.log[0]):
    plot_wiseft(curve_files=list(snakemake.input), out_path=snakemake.output[0])
