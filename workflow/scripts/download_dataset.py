from robustft.data.download import build_breeds_class_maps, fetch_source
from robustft.runtime import job

with job(log_path=snakemake.log[0]):
    source = snakemake.wildcards.source
    settings = snakemake.config["download"]
    fetch_source(
        source=source,
        out_dir=snakemake.output[0],
        cache_dir=f"{settings['cache']}/{source}",
        urls=settings["urls"],
        after_unpack=build_breeds_class_maps if source == "breeds" else None,
        # Read here, not a param: listing a source must not download a verified copy again.
        allow_subset=source in snakemake.config["allow_subset"],
    )
