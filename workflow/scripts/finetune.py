from pathlib import Path

from robustft.config import parse_hparam_folder
from robustft.distributed import resolve_processes
from robustft.provenance import read_data_fingerprint
from robustft.runtime import job, resolve_device
from robustft.stages import run_finetune
from robustft.tracking import TrackingSettings

with job(log_path=snakemake.log[0], threads=snakemake.threads):
    probe_head = snakemake.input.get("probe_head")
    hparams = parse_hparam_folder(snakemake.wildcards.run)
    run_finetune(
        method=snakemake.wildcards.method,
        dataset=snakemake.wildcards.dataset,
        data_root=snakemake.params.data_root,
        data_options=snakemake.params.data_options,
        model_dir=Path(snakemake.input.meta).parent,
        probe_dir=Path(probe_head).parent if probe_head else None,
        out_dir=Path(snakemake.output.metrics).parent,
        state_dir=snakemake.params.state_dir,
        # Read here, not a param: how often state is saved must not rerun finished runs.
        checkpoint_minutes=snakemake.config["finetune"]["checkpoint_minutes"],
        # One process per GPU the job asked for, unless finetune.processes says otherwise.
        processes=resolve_processes(
            processes=snakemake.config["finetune"]["processes"],
            gpus=snakemake.resources.get("gpu", 0),
        ),
        ood_splits=snakemake.params.ood_splits,
        lr=hparams.pop("lr"),
        hparams=hparams,
        seed=int(snakemake.wildcards.seed),
        device=resolve_device(snakemake.params.device),
        progress=snakemake.params.progress,
        resolved_config=snakemake.params.settings,
        preprocess_overrides=snakemake.params.preprocess,
        backbone_kwargs=snakemake.params.backbone_kwargs,
        data_fingerprint=read_data_fingerprint(snakemake.input.get("data_manifest")),
        text_cache=snakemake.params.text_cache,  # read only by a method that trains a text tower
        prepared=snakemake.params.prepared,
        # Read here, not a param: where a run is logged must not rerun finished runs.
        tracking=TrackingSettings.from_config(snakemake.config.get("tracking")),
        **snakemake.params.settings,
    )
