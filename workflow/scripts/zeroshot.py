from pathlib import Path

from robustft.provenance import read_data_fingerprint
from robustft.runtime import job, resolve_device
from robustft.stages import run_zeroshot

with job(log_path=snakemake.log[0], threads=snakemake.threads):
    run_zeroshot(
        backbone_name=snakemake.wildcards.backbone,
        dataset=snakemake.wildcards.dataset,
        data_root=snakemake.params.data_root,
        data_options=snakemake.params.data_options,
        preprocess_overrides=snakemake.params.preprocess,
        model_dir=Path(snakemake.input.meta).parent,
        text_cache=snakemake.params.cache_dir,
        ood_splits=snakemake.params.ood_splits,
        out_dir=Path(snakemake.output.metrics).parent,
        batch_size=snakemake.params.batch_size,
        device=resolve_device(snakemake.params.device),
        data_fingerprint=read_data_fingerprint(snakemake.input.get("data_manifest")),
        prepared=snakemake.params.prepared,
    )
