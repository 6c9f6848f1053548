from robustft.analysis import write_distortion
from robustft.io import read_json
from robustft.provenance import read_data_fingerprint
from robustft.runtime import job, resolve_device
from robustft.stages import feature_distortion

with job(log_path=snakemake.log[0], threads=snakemake.threads):
    dataset = snakemake.wildcards.dataset
    data_fingerprint = read_data_fingerprint(snakemake.input.get("data_manifest"))
    rows = []
    for backbone, plan in snakemake.params.plan.items():
        runs = [
            {**run, "method": method}
            for method, path in plan["selections"].items()
            for run in read_json(path)["runs"]
        ]
        for row in feature_distortion(
            dataset=dataset,
            data_root=snakemake.params.data_root,
            model_dir=plan["model_dir"],
            pretrained_features=plan["features"],
            runs=runs,
            data_options=snakemake.params.data_options,
            preprocess_overrides=snakemake.params.preprocess[backbone],
            batch_size=snakemake.params.batch_size,
            num_workers=snakemake.params.num_workers,
            precision=snakemake.params.precision,
            threads=snakemake.threads,
            device=resolve_device(snakemake.params.device),
            progress=snakemake.params.progress,
            backbone_name=backbone,
            data_fingerprint=data_fingerprint,
        ):
            rows.append({"dataset": dataset, "backbone": backbone, **row})
    write_distortion(rows=rows, csv_path=snakemake.output.csv, plot_path=snakemake.output.plot)
