import pandas as pd

from robustft.report import plot_id_vs_ood
from robustft.runtime import job

with job(log_path=snakemake.log[0]):
    plot_id_vs_ood(
        pd.read_csv(snakemake.input[0]),
        out_path=snakemake.output.png,
        svg_path=snakemake.output.svg,
    )
