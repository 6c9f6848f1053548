from pathlib import Path

from robustft.models.fetch import fetch_backbone
from robustft.runtime import job

# offline=False: this local rule is the one job that may download.
with job(log_path=snakemake.log[0], offline=False):
    fetch_backbone(
        name=snakemake.wildcards.backbone,
        out_dir=Path(snakemake.output.meta).parent,
        cache_dir=snakemake.params.cache_dir,
        options=snakemake.params.options,
        progress=snakemake.params.progress,
    )
