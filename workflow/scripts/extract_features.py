from pathlib import Path

from robustft.provenance import read_data_fingerprint
from robustft.runtime import job, resolve_device
from robustft.stages import extract_split

with job(log_path=snakemake.log[0], threads=snakemake.threads):
    extract_split(
        dataset=snakemake.wildcards.dataset,
        split=snakemake.wildcards.split,
        data_root=snakemake.params.data_root,
        data_options=snakemake.params.data_options,
        preprocess_overrides=snakemake.params.preprocess,
        model_dir=Path(snakemake.input.meta).parent,
        out_path=snakemake.output[0],
        backbone_name=snakemake.wildcards.backbone,
        batch_size=snakemake.params.batch_size,
        num_workers=snakemake.params.num_workers,
        precision=snakemake.params.precision,
        threads=snakemake.threads,
        device=resolve_device(snakemake.params.device),
        progress=snakemake.params.progress,
        data_fingerprint=read_data_fingerprint(snakemake.input.get("data_manifest")),
        prepared=snakemake.params.prepared,
    )
