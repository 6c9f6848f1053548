"""Effective robustness against the pretraining data (Andreassen et al. 2022).

Andreassen et al. find that a model's ER grows with the size and diversity of the data it was
pretrained on. On the toy, that data is the toyshift pretraining pool: `select_pool` takes a
subset of it (a fraction of each class's images in each of some domains), the toy backbone is
pretrained on that subset (`robustft.stages.pretrain_toy_backbone`), fine-tuned like the default
backbone, and `er_pretraining_table` puts the ER of those runs side by side, read off the
baseline line of the ER table (results/analysis/er/{dataset}_line.json).

Parsing the workflow imports this module (backbone names): it imports numpy only at the top.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from robustft.config import format_hparam
from robustft.data.toyshift_format import DOMAINS, ImageSplit

if TYPE_CHECKING:
    import pandas as pd

MEAN = "mean"  # the key of the mean-OOD line in the ER rule's line file


def ordered_domains(domains: Sequence[str]) -> list[str]:
    """The domains in toyshift's own order (one spelling per set); unknown ones raise."""
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown:
        raise ValueError(f"unknown toyshift domain(s) {unknown}; use {list(DOMAINS)}")
    if not domains:
        raise ValueError("a pretraining pool needs at least one domain")
    return [domain for domain in DOMAINS if domain in set(domains)]


def pool_backbone_name(*, base: str, fraction: float, domains: Sequence[str]) -> str:
    """The backbone (and resources/models/ folder) name of a pool, spelled from its settings:
    toyresnet-pool0.25-all, toyresnet-pool0.6-real, toyresnet-pool1-clipart-sketch."""
    chosen = ordered_domains(domains)
    spelled = "all" if len(chosen) == len(DOMAINS) else "-".join(chosen)
    return f"{base}-pool{format_hparam(fraction)}-{spelled}"


def select_pool(
    *, split: ImageSplit, fraction: float, domains: Sequence[str], seed: int
) -> ImageSplit:
    """A pretraining pool's subset of a toyshift pretraining split.

    Of every (class, domain) group in `domains`, round(`fraction` · its size) images are drawn
    with `seed`, at least one of a non-empty group (the small validation split keeps every
    class); other domains are dropped. The kept images stay in the split's own order.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"pool fraction must be in (0, 1], got {fraction}")
    wanted = [DOMAINS.index(domain) for domain in ordered_domains(domains)]
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for label in np.unique(split.labels):
        for domain in wanted:
            group = np.flatnonzero((split.labels == label) & (split.domains == domain))
            if len(group) == 0:
                continue
            count = max(1, round(fraction * len(group)))
            keep.append(rng.permutation(group)[:count])
    if not keep:
        raise ValueError(f"no pretraining images in domain(s) {list(domains)}")
    index = np.sort(np.concatenate(keep))
    return ImageSplit(
        images=split.images[index], labels=split.labels[index], domains=split.domains[index]
    )


def pool_summary(*, split: ImageSplit, classes: int) -> dict[str, Any]:
    """What a pool is made of: images, images per class, and the domains it holds."""
    present = sorted({int(d) for d in np.unique(split.domains)})
    return {
        "images": len(split),
        "images_per_class": len(split) / max(classes, 1),
        "domains": [DOMAINS[d] for d in present],
    }


def describe_pool(
    *, pretrain_file: str | Path, fraction: float, domains: Sequence[str], seed: int
) -> dict[str, Any]:
    """The training images of a pool, counted by drawing it as its pretraining does."""
    from robustft.data import toyshift

    train = select_pool(
        split=toyshift.read_split(pretrain_file, "train"),
        fraction=fraction,
        domains=domains,
        seed=seed,
    )
    classes = len(toyshift.class_names(pretrain_file))
    return {"fraction": fraction, **pool_summary(split=train, classes=classes)}


def _line(settings: Mapping[str, Any]) -> Any:
    from robustft.robustness import BaselineLine

    id_range = settings.get("id_range")
    return BaselineLine(
        slope=float(settings["slope"]),
        intercept=float(settings["intercept"]),
        r_value=float(settings.get("r_value", float("nan"))),
        models=int(settings.get("models", 0)),
        id_range=tuple(map(float, id_range)) if id_range is not None else None,
    )


def _er_points(
    record: Mapping[str, Any], *, lines: Mapping[str, Any], ood_splits: Sequence[str]
) -> tuple[float, float, float, bool]:
    """(ID, mean OOD, ER in points of the mean OOD, outside the line's ID range) of one
    scored epoch; as the ER table: the mean's line, else the mean of the splits' ERs."""
    from robustft.robustness import effective_robustness

    id_accuracy = float(record["id_test"])
    ood = [float(record[f"ood_{split}"]) for split in ood_splits]
    if MEAN in lines:
        er = effective_robustness(
            id_accuracy=id_accuracy, ood_accuracy=float(np.mean(ood)), line=lines[MEAN]
        )
    else:
        er = np.mean(
            [
                effective_robustness(id_accuracy=id_accuracy, ood_accuracy=acc, line=lines[split])
                for split, acc in zip(ood_splits, ood, strict=True)
            ]
        )
    outside = any(bool(line.outside_range(id_accuracy)) for line in lines.values())
    return id_accuracy, float(np.mean(ood)), 100 * float(er), outside


def er_pretraining_table(
    *,
    dataset: str,
    ood_splits: Sequence[str],
    line_file: str | Path,
    runs: Mapping[str, Mapping[str, Any]],
) -> pd.DataFrame:
    """One row per backbone: its pretraining pool, its fine-tuning run's ID, mean OOD and ER
    (points) at the best epoch by ID val (with each OOD split's accuracy) and at the last scored
    epoch, and the ER of every scored epoch (columns er_pts_epoch{e}).

    `runs` maps a backbone to {"run_dir": the run's folder (metrics.json, history.csv),
    "pool": {"fraction", "domains", "images", "images_per_class"}}. The line is the ER rule's,
    so these ERs are those of the ER table.
    """
    import pandas as pd

    from robustft.io import read_json
    from robustft.provenance import DATA_FINGERPRINT, check_same

    lines = {key: _line(value) for key, value in read_json(line_file).items()}
    rows: list[dict[str, Any]] = []
    origins: list[tuple[str | Path, Mapping[str, Any]]] = []
    for backbone, source in runs.items():
        run_dir = Path(source["run_dir"])
        metrics = read_json(run_dir / "metrics.json")
        origins.append((run_dir / "metrics.json", metrics))
        history = pd.read_csv(run_dir / "history.csv")
        scored_columns = ["id_test", *(f"ood_{split}" for split in ood_splits)]
        missing = [column for column in scored_columns if column not in history]
        if missing:
            raise ValueError(f"{run_dir / 'history.csv'}: no {missing}")
        # Epochs between scored ones (finetune.eval_every) have no test/OOD values.
        scored = history.dropna(subset=scored_columns)
        per_epoch = {
            int(record["epoch"]): _er_points(record, lines=lines, ood_splits=ood_splits)
            for record in scored.to_dict("records")
        }
        best_epoch = int(metrics["best_epoch"])
        best = _er_points(metrics, lines=lines, ood_splits=ood_splits)
        final_epoch = max(per_epoch)
        final = per_epoch[final_epoch]
        pool = source["pool"]
        rows.append(
            {
                "dataset": dataset,
                "backbone": backbone,
                "pool_fraction": float(pool["fraction"]),
                "domains": "+".join(pool["domains"]),
                "n_domains": len(pool["domains"]),
                "pool_images": int(pool["images"]),
                "pool_images_per_class": float(pool["images_per_class"]),
                "method": metrics.get("method", ""),
                "run": metrics.get("run", run_dir.parent.name),
                "seed": metrics.get("seed"),
                "best_epoch": best_epoch,
                "id_best": best[0],
                "ood_best": best[1],
                "er_pts_best": best[2],
                **{f"ood_{split}_best": float(metrics[f"ood_{split}"]) for split in ood_splits},
                "final_epoch": final_epoch,
                "id_final": final[0],
                "ood_final": final[1],
                "er_pts_final": final[2],
                "outside_line_range": best[3] or final[3],
                **{f"er_pts_epoch{epoch}": values[2] for epoch, values in per_epoch.items()},
            }
        )
    check_same(records=origins, name=DATA_FINGERPRINT, rerun="finetune")
    table = pd.DataFrame(rows)
    return table.sort_values(["pool_images", "n_domains"], kind="stable").reset_index(drop=True)


def plot_er_pretraining(table: pd.DataFrame, *, out_path: str | Path) -> None:
    """ER against the pretraining pool's images per class (left: best and last epoch, one
    marker per backbone) and ER along fine-tuning per backbone (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from robustft.io import atomic_path

    fig, (by_pool, by_epoch) = plt.subplots(1, 2, figsize=(10, 4.2))
    epoch_columns = sorted(
        (c for c in table if c.startswith("er_pts_epoch")),
        key=lambda c: int(c.removeprefix("er_pts_epoch")),
    )
    for axis in (by_pool, by_epoch):
        axis.axhline(0, color="0.5", linewidth=0.8, linestyle="--", label="baseline line (ER = 0)")
    for _, row in table.iterrows():
        domains = "all" if row["n_domains"] == len(DOMAINS) else row["domains"]
        label = f"{domains} ×{row['pool_fraction']:g} ({row['pool_images_per_class']:.0f}/class)"
        # An epoch scored in another run only (its best epoch) is not drawn.
        scored = [c for c in epoch_columns if pd.notna(row[c])]
        (drawn,) = by_epoch.plot(
            [int(c.removeprefix("er_pts_epoch")) for c in scored],
            [row[c] for c in scored],
            marker="o",
            markersize=4,
            label=label,
        )
        color = drawn.get_color()
        by_pool.scatter(row["pool_images_per_class"], row["er_pts_best"], color=color, s=50)
        by_pool.scatter(
            row["pool_images_per_class"], row["er_pts_final"], color=color, s=50, marker="x"
        )
        by_pool.annotate(
            label,
            (row["pool_images_per_class"], row["er_pts_best"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7,
            color=color,
        )
    by_pool.scatter([], [], color="0.3", s=50, label="best epoch (ID val)")
    by_pool.scatter([], [], color="0.3", s=50, marker="x", label="last epoch")
    by_pool.set_xscale("log")
    by_pool.margins(x=0.3, y=0.15)  # room for the labels
    by_pool.set_xlabel("pretraining images per class (log scale)")
    by_epoch.set_xlabel("fine-tuning epoch (0 = new head, before training)")
    for axis in (by_pool, by_epoch):
        axis.set_ylabel("effective robustness (points, mean OOD)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(f"{table['dataset'].iloc[0]}: ER against the pretraining pool (FT)")
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_er_pretraining(
    *, table: pd.DataFrame, csv_path: str | Path, plot_path: str | Path
) -> None:
    from robustft.io import atomic_path

    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    plot_er_pretraining(table, out_path=plot_path)
