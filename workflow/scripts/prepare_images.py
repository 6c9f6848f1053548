from pathlib import Path

from robustft.provenance import read_data_fingerprint
from robustft.runtime import job
from robustft.stages import prepare_images

with job(log_path=snakemake.log[0], threads=snakemake.threads):
    prepare_images(
        dataset=snakemake.wildcards.dataset,
        split=snakemake.wildcards.split,
        transform=snakemake.wildcards.transform,
        data_root=snakemake.params.data_root,
        data_options=snakemake.params.data_options,
        preprocess_overrides=snakemake.params.preprocess,
        model_dir=Path(snakemake.input.meta).parent,
        out_path=snakemake.output[0],
        shorter_side=snakemake.params.shorter_side,
        compression=snakemake.params.compression,
        threads=snakemake.threads,
        # Read here, not a param: showing a progress bar must not rebuild a cache.
        progress=snakemake.config["progress"],
        data_fingerprint=read_data_fingerprint(snakemake.input.data_manifest),
    )
