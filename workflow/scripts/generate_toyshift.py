from robustft.data.toyshift import write_toyshift
from robustft.runtime import job

with job(log_path=snakemake.log[0]):
    write_toyshift(
        pretrain_path=snakemake.output.pretrain,
        task_path=snakemake.output.task,
        progress=snakemake.params.progress,
        **snakemake.params.settings,
    )
