from robustft.data.sources import describe_copy
from robustft.io import write_json
from robustft.runtime import job

with job(log_path=snakemake.log[0]):
    write_json(
        snakemake.output[0],
        describe_copy(
            source=snakemake.wildcards.source,
            root=snakemake.params.root,
            allow_subset=snakemake.params.allow_subset,
        ),
    )
