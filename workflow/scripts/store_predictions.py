from pathlib import Path

from robustft.provenance import read_data_fingerprint
from robustft.runtime import job, resolve_device
from robustft.stages import store_predictions

with job(log_path=snakemake.log[0], threads=snakemake.threads):
    store_predictions(
        method=snakemake.wildcards.method,
        dataset=snakemake.wildcards.dataset,
        data_root=snakemake.params.data_root,
        data_options=snakemake.params.data_options,
        preprocess_overrides=snakemake.params.preprocess,
        model_dir=Path(snakemake.input.meta).parent,
        selection_file=snakemake.input.selection,
        ood_splits=snakemake.params.ood_splits,
        out_path=snakemake.output[0],
        batch_size=snakemake.params.batch_size,
        device=resolve_device(snakemake.params.device),
        data_fingerprint=read_data_fingerprint(snakemake.input.get("data_manifest")),
    )
