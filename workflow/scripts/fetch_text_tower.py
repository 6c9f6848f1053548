from robustft.io import write_json
from robustft.runtime import job
from robustft.zeroshot import load_text_tower, text_tower_name

# Online: this local rule downloads the text tower into the Hugging Face cache.
with job(log_path=snakemake.log[0], offline=False):
    load_text_tower(backbone=snakemake.wildcards.backbone, cache_dir=snakemake.params.cache_dir)
    name, tag = text_tower_name(snakemake.wildcards.backbone)
    write_json(snakemake.output[0], {"open_clip_model": name, "pretrained": tag})
