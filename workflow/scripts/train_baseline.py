from pathlib import Path

from robustft.provenance import read_data_fingerprint
from robustft.runtime import job, resolve_device
from robustft.stages import train_baseline

with job(log_path=snakemake.log[0], threads=snakemake.threads):
    train_baseline(
        dataset=snakemake.wildcards.dataset,
        data_root=snakemake.params.data_root,
        out_dir=Path(snakemake.output.metrics).parent,
        ood_splits=snakemake.params.ood_splits,
        data_options=snakemake.params.data_options,
        device=resolve_device(snakemake.params.device),
        data_fingerprint=read_data_fingerprint(snakemake.input.get("data_manifest")),
        progress=snakemake.params.progress,
        **snakemake.params.settings,
    )
