from robustft.analysis import write_distortion
from robustft.provenance import read_data_fingerprint
from robustft.runtime import job, resolve_device
from robustft.stages import distortion_rows

with job(log_path=snakemake.log[0], threads=snakemake.threads):
    rows = distortion_rows(
        dataset=snakemake.wildcards.dataset,
        data_root=snakemake.params.data_root,
        plan=snakemake.params.plan,
        preprocess=snakemake.params.preprocess,
        data_options=snakemake.params.data_options,
        batch_size=snakemake.params.batch_size,
        num_workers=snakemake.params.num_workers,
        precision=snakemake.params.precision,
        threads=snakemake.threads,
        device=resolve_device(snakemake.params.device),
        progress=snakemake.params.progress,
        data_fingerprint=read_data_fingerprint(snakemake.input.get("data_manifest")),
        prepared=snakemake.params.prepared,
    )
    write_distortion(rows=rows, csv_path=snakemake.output.csv, plot_path=snakemake.output.plot)
