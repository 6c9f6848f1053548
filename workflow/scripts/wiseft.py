from pathlib import Path

from robustft.provenance import read_data_fingerprint
from robustft.runtime import job, resolve_device
from robustft.stages import run_wiseft

with job(log_path=snakemake.log[0], threads=snakemake.threads):
    run_wiseft(
        dataset=snakemake.wildcards.dataset,
        data_root=snakemake.params.data_root,
        data_options=snakemake.params.data_options,
        preprocess_overrides=snakemake.params.preprocess,
        model_dir=Path(snakemake.input.meta).parent,
        probe_dir=Path(snakemake.input.probe_head).parent,
        selection_files={
            method: snakemake.input[f"selected_{method}"] for method in snakemake.params.methods
        },
        seed=int(snakemake.wildcards.seed),
        alphas=snakemake.params.alphas,
        ood_splits=snakemake.params.ood_splits,
        out_path=snakemake.output.curve,
        batch_size=snakemake.params.batch_size,
        device=resolve_device(snakemake.params.device),
        data_fingerprint=read_data_fingerprint(snakemake.input.get("data_manifest")),
        prepared=snakemake.params.prepared,
    )
