from robustft.pretraining_pools import (
    describe_pool,
    er_pretraining_table,
    write_er_pretraining,
)
from robustft.runtime import job

with job(log_path=snakemake.log[0]):
    runs = {
        backbone: {
            "run_dir": entry["run_dir"],
            "pool": describe_pool(
                pretrain_file=snakemake.input.pretrain,
                fraction=entry["pool"]["fraction"],
                domains=entry["pool"]["domains"],
                seed=snakemake.params.pool_seed,
            ),
        }
        for backbone, entry in snakemake.params.plan.items()
    }
    table = er_pretraining_table(
        dataset=snakemake.wildcards.dataset,
        ood_splits=snakemake.params.ood_splits,
        line_file=snakemake.input.line,
        runs=runs,
    )
    write_er_pretraining(
        table=table, csv_path=snakemake.output.csv, plot_path=snakemake.output.plot
    )
