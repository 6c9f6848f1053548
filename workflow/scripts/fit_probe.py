from pathlib import Path

from robustft.runtime import job, resolve_device
from robustft.stages import run_probe
from robustft.tracking import TrackingSettings

with job(log_path=snakemake.log[0], threads=snakemake.threads):
    run_probe(
        feature_files=dict(zip(snakemake.params.splits, snakemake.input.features, strict=True)),
        out_dir=Path(snakemake.output.metrics).parent,
        c_grid=snakemake.params.c_grid,
        max_iter=snakemake.params.max_iter,
        progress=snakemake.params.progress,
        solver=snakemake.params.solver,
        device=resolve_device(snakemake.params.device),
        backbone_meta=snakemake.input.meta,
        backbone_name=snakemake.wildcards.backbone,
        # Read here, not a param: where a probe is logged must not rerun finished probes.
        tracking=TrackingSettings.from_config(snakemake.config.get("tracking")),
        dataset=snakemake.wildcards.dataset,
        seed=int(snakemake.wildcards.seed),
    )
