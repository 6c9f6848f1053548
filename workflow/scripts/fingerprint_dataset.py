from robustft.data.fingerprint import dataset_manifest
from robustft.io import write_json
from robustft.runtime import job

with job(log_path=snakemake.log[0]):
    write_json(
        snakemake.output[0],
        dataset_manifest(
            dataset=snakemake.wildcards.dataset,
            trees=snakemake.params.trees,
            cache_dir=snakemake.params.cache_dir,
        ),
    )
