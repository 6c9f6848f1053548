"""Model soups of a method's runs: per seed, the uniform and the greedy soup of every run of the
sweep (they share the seed's initialisation), scored on every split, their weights and their
stored predictions written."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustft import provenance
from robustft.data.registry import split_column
from robustft.io import read_json, sha256_file, write_json
from robustft.models import save_model
from robustft.predictions import SeedPredictions, write_predictions
from robustft.robustness import CHANCE_KEYS
from robustft.soups import greedy_soup, uniform_soup
from robustft.stages.predictions import Evaluation

log = logging.getLogger("robustft.stages")

SOUPS = ("uniform", "greedy")


def soup_row_name(method: str, kind: str) -> str:
    """The table row (and predictions folder) of a method's soup: lpft_soup_greedy."""
    return f"{method}_soup_{kind}"


def runs_by_seed(
    metrics_files: Sequence[str | Path],
) -> dict[int, list[dict[str, Any]]]:
    """{seed: the metrics of its runs, each with its `path`}, in the given order."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for path in metrics_files:
        metrics = read_json(path)
        missing = [key for key in ("seed", "run", "id_val") if key not in metrics]
        if missing:
            raise ValueError(f"{path}: run metrics lack {missing}")
        by_seed.setdefault(int(metrics["seed"]), []).append({**metrics, "path": str(path)})
    return by_seed


def check_shared_initialisation(*, method: str, runs: Sequence[Mapping[str, Any]]) -> str:
    """The runs' common `init_sha256` (the hash of the model each run started from); refuse
    runs that started from different models, which do not average well.

    Runs written before the hash existed record none: then the runs of one seed are taken to
    share their start, as the method table says (a head seeded by the seed, or the seed's
    probe head, whose `probe_head_sha256` must then agree), with a warning; "" is returned.
    A mixture of both kinds is refused (stale runs beside new ones).
    """
    recorded = [run for run in runs if run.get(provenance.INIT_SHA256)]
    if not recorded:
        log.warning(
            "%s seed %s: runs record no %s (written by an older robustft); taking them to share "
            "the seed's start",
            method,
            runs[0]["seed"] if runs else "?",
            provenance.INIT_SHA256,
        )
        provenance.check_same(
            records=[(run["path"], run) for run in runs],
            name=provenance.PROBE_HEAD_SHA256,
            rerun="finetune",
        )
        return ""
    if len(recorded) != len(runs):
        stale = next(run for run in runs if not run.get(provenance.INIT_SHA256))
        raise ValueError(
            f"{stale['path']}: no {provenance.INIT_SHA256} (written by an older robustft), "
            f"unlike {recorded[0]['path']}; rerun it: snakemake --forcerun finetune"
        )
    first = recorded[0]
    for run in recorded[1:]:
        value = run[provenance.INIT_SHA256]
        if value != first[provenance.INIT_SHA256]:
            raise ValueError(
                f"{run['path']}: method {method!r} run {run['run']} starts from another model "
                f"({provenance.short(value)}) than run {first['run']} "
                f"({provenance.short(first[provenance.INIT_SHA256])}) of seed {run['seed']}; a "
                f"soup averages only runs that share an initialisation: take {method} out of "
                "config key 'soups.methods'"
            )
    return str(first[provenance.INIT_SHA256])


def run_soups(
    *,
    method: str,
    dataset: str,
    data_root: str | Path | Mapping[str, str | Path],
    model_dir: str | Path,
    metrics_files: Sequence[str | Path],
    ood_splits: Sequence[str],
    seeds: Sequence[int],
    out_path: str | Path,
    weights_dir: str | Path,
    predictions_paths: Mapping[str, str | Path],
    batch_size: int = 512,
    device: str = "cpu",
    data_options: Mapping[str, Any] | None = None,
    num_workers: int = 0,
    preprocess_overrides: Mapping[str, Any] | None = None,
    data_fingerprint: str | None = None,
) -> dict[str, Any]:
    """For each seed, the uniform and the greedy soup (`robustft.soups`) of `method`'s runs of
    that seed (`metrics_files`: every run's metrics.json; the model is beside it), ordered
    and judged by ID val. Diverged runs are left out (a seed whose every run diverged has no
    soup). Writes `out_path` (JSON: per soup kind, one record per seed with its runs and its
    scores on every split, like a selection file's `runs`), the soups' weights
    (`weights_dir`/seed<s>/<kind>.safetensors) and their predictions (`predictions_paths[kind]`,
    as `store_predictions` writes them)."""
    from safetensors.torch import load_file

    evaluation = Evaluation(
        dataset=dataset,
        data_root=data_root,
        model_dir=model_dir,
        ood_splits=ood_splits,
        data_options=data_options,
        preprocess_overrides=preprocess_overrides,
    )
    by_seed = runs_by_seed(metrics_files)
    missing = sorted(set(seeds) - set(by_seed))
    if missing:
        raise ValueError(f"no runs of {method!r} with seed {missing[0]} among the metrics files")
    records: dict[str, list[dict[str, Any]]] = {kind: [] for kind in SOUPS}
    predictions: dict[str, list[SeedPredictions]] = {kind: [] for kind in SOUPS}
    all_diverged: list[int] = []
    for seed in sorted(seeds):
        runs = by_seed[seed]
        for run in runs:
            evaluation.check(path=run["path"], recorded=run, data_fingerprint=data_fingerprint)
        init_sha256 = check_shared_initialisation(method=method, runs=runs)
        healthy = {run["run"]: run for run in runs if not run.get("diverged")}
        diverged = sorted(run["run"] for run in runs if run.get("diverged"))
        if not healthy:
            log.warning("%s seed %d: every run diverged; no soup", method, seed)
            all_diverged.append(seed)
            continue
        first = next(iter(healthy.values()))

        def load(name: str, healthy: Mapping[str, Mapping[str, Any]] = healthy):
            return load_file(str(Path(healthy[name]["path"]).parent / "model.safetensors"))

        def id_val(state: Mapping[str, Any]) -> float:
            # Only ID val decides: the other splits are scored once, on the final soups.
            column = split_column("val")
            splits = evaluation.predict(
                state,
                batch_size=batch_size,
                device=device,
                num_workers=num_workers,
                columns=[column],
            )
            return splits[column].scores().accuracy

        soups = {
            "uniform": (uniform_soup(state_dicts=(load(name) for name in healthy)), list(healthy)),
        }
        greedy = greedy_soup(
            val_accuracy={name: float(run["id_val"]) for name, run in healthy.items()},
            load=load,
            evaluate=id_val,
        )
        soups["greedy"] = (greedy.state_dict, greedy.ingredients)
        for kind, (state, ingredients) in soups.items():
            path = Path(weights_dir) / f"seed{seed}" / f"{kind}.safetensors"
            evaluation.model.load_state_dict(state)
            save_model(evaluation.model, path)
            splits = evaluation.predict(
                state, batch_size=batch_size, device=device, num_workers=num_workers
            )
            scores = {name: split.scores() for name, split in splits.items()}
            record: dict[str, Any] = {
                "seed": seed,
                "ingredients": ingredients,
                "candidates": len(healthy),
                "diverged_runs": diverged,
                "weights": str(path),
                provenance.INIT_SHA256: init_sha256,
                **{name: value.accuracy for name, value in scores.items()},
                **{f"ece_{name}": value.ece for name, value in scores.items()},
                # The members' (one ID val set): so that a table can flag a soup at chance.
                **{key: value for key, value in first.items() if key in CHANCE_KEYS},
            }
            if kind == "greedy":
                record["steps"] = greedy.steps
            records[kind].append(record)
            predictions[kind].append(
                SeedPredictions(
                    seed=seed, source=str(path), model_sha256=sha256_file(path), splits=splits
                )
            )
            ood = [record[split_column(split)] for split in ood_splits]
            log.info(
                "%s seed %d %s soup of %s: ID val %.4f, ID test %.4f, OOD %.4f",
                method,
                seed,
                kind,
                ingredients,
                record["id_val"],
                record["id_test"],
                float(np.mean(ood)) if ood else float("nan"),
            )
    recorded = provenance.record(
        backbone=Path(model_dir).name,
        weights_sha256=evaluation.meta["sha256"],
        data_fingerprint=data_fingerprint,
    )
    for kind in SOUPS:
        write_predictions(
            predictions_paths[kind],
            seeds=predictions[kind],
            attrs=evaluation.file_attrs(
                method=soup_row_name(method, kind),
                dataset=dataset,
                run="",
                all_diverged=not predictions[kind],
                data_fingerprint=data_fingerprint,
            ),
        )
    Path(weights_dir).mkdir(parents=True, exist_ok=True)  # also when no seed has a soup
    summary = {
        "method": method,
        "dataset": dataset,
        "soups": records,
        "all_diverged_seeds": all_diverged,
        **recorded,
    }
    write_json(out_path, summary)
    return summary
