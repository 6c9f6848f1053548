from pathlib import Path

from robustft.runtime import job, resolve_device
from robustft.stages import pretrain_toy_backbone

with job(log_path=snakemake.log[0], threads=snakemake.threads):
    pretrain_toy_backbone(
        pretrain_file=snakemake.input.pretrain,
        out_dir=Path(snakemake.output.weights).parent,
        device=resolve_device(snakemake.params.device),
        progress=snakemake.params.progress,
        **snakemake.params.settings,
    )
