from pathlib import Path

from robustft.provenance import read_data_fingerprint
from robustft.runtime import job, resolve_device
from robustft.stages import run_soups

with job(log_path=snakemake.log[0], threads=snakemake.threads):
    run_soups(
        method=snakemake.wildcards.method,
        dataset=snakemake.wildcards.dataset,
        data_root=snakemake.params.data_root,
        data_options=snakemake.params.data_options,
        preprocess_overrides=snakemake.params.preprocess,
        model_dir=Path(snakemake.input.meta).parent,
        metrics_files=list(snakemake.input.metrics),
        ood_splits=snakemake.params.ood_splits,
        seeds=snakemake.params.seeds,
        out_path=snakemake.output.summary,
        weights_dir=snakemake.output.weights,
        predictions_paths={"uniform": snakemake.output.uniform, "greedy": snakemake.output.greedy},
        batch_size=snakemake.params.batch_size,
        device=resolve_device(snakemake.params.device),
        data_fingerprint=read_data_fingerprint(snakemake.input.get("data_manifest")),
    )
