"""Where results meet, check that they come from the same backbone weights and the same data.

Every output records what it was made from: feature files (HDF5 attrs), the probe head
(safetensors metadata) and metrics.json files carry `backbone`, `weights_sha256` (the
pretrained weights, as in the backbone's meta.json) and `data_fingerprint` (the data manifest's
fingerprint; "" when the producing job was given none). A consumer compares what it reads with
what it knows, and refuses a mismatch in one line naming the file, the attribute, and both
values. An attribute that is absent altogether was written by an older robustft: the message
names the rule to rerun.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robustft.io import read_json

# The names, the same in feature attrs, head metadata and metrics.json.
BACKBONE = "backbone"
WEIGHTS_SHA256 = "weights_sha256"
DATA_FINGERPRINT = "data_fingerprint"
PROBE_HEAD_SHA256 = "probe_head_sha256"
# A fine-tuning run's start (backbone and head before training): runs that record the same
# value share an initialisation, which a model soup needs.
INIT_SHA256 = "init_sha256"

# Value recorded when the producing job had no data manifest.
UNKNOWN = ""


def short(value: Any) -> str:
    """A hash cut to 12 characters (enough to tell two apart in a message); others as given."""
    text = str(value)
    if len(text) > 16 and all(c in "0123456789abcdef" for c in text):
        return text[:12]
    return repr(text) if isinstance(value, str) else text


def read_data_fingerprint(manifest: str | Path | None) -> str | None:
    """The `fingerprint` of a data manifest (JSON), or None without one."""
    if manifest is None:
        return None
    data = read_json(manifest)
    value = data.get("fingerprint") if isinstance(data, dict) else None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{manifest}: no 'fingerprint' string in the data manifest")
    return value


def check(
    *,
    path: str | Path,
    recorded: Mapping[str, Any],
    name: str,
    expected: Any,
    source: str,
    rerun: str,
) -> None:
    """Refuse `path` unless `recorded[name]` equals `expected` (which `source` gave).

    `expected` None: nothing to compare against, no check. An absent entry: the file predates
    provenance; an UNKNOWN one: its job had no data manifest. Both name the rule to rerun.
    """
    if expected is None:
        return
    require(path=path, recorded=recorded, name=name, rerun=rerun)
    found = recorded[name]
    if found == expected:
        return
    if found == UNKNOWN:
        raise ValueError(
            f"{path}: {name} unknown (made without a data manifest), expected "
            f"{short(expected)} from {source}; rerun it: snakemake --forcerun {rerun}"
        )
    raise ValueError(
        f"{path}: {name} {short(found)} differs from {short(expected)} expected from {source}"
    )


def require(*, path: str | Path, recorded: Mapping[str, Any], name: str, rerun: str) -> None:
    """Refuse a file that predates `name` (written by an older robustft)."""
    if name not in recorded:
        raise ValueError(
            f"{path}: no {name} recorded (written by an older robustft); "
            f"rerun it: snakemake --forcerun {rerun}"
        )


def check_backbone(
    *,
    path: str | Path,
    recorded: Mapping[str, Any],
    meta: Mapping[str, Any],
    meta_path: str | Path,
    backbone_name: str | None,
    data_fingerprint: str | None,
    data_source: str,
    rerun: str,
) -> None:
    """The usual three checks: backbone name, its weights' SHA-256 (meta.json), the data."""
    if backbone_name is not None:
        check(
            path=path,
            recorded=recorded,
            name=BACKBONE,
            expected=backbone_name,
            source="the backbone this job uses",
            rerun=rerun,
        )
    check(
        path=path,
        recorded=recorded,
        name=WEIGHTS_SHA256,
        expected=meta["sha256"],
        source=str(meta_path),
        rerun=rerun,
    )
    check(
        path=path,
        recorded=recorded,
        name=DATA_FINGERPRINT,
        expected=data_fingerprint,
        source=data_source,
        rerun=rerun,
    )


def record(
    *, backbone: str | None, weights_sha256: str, data_fingerprint: str | None
) -> dict[str, str]:
    """The provenance entries an output records (all strings: safetensors metadata)."""
    return {
        BACKBONE: backbone or UNKNOWN,
        WEIGHTS_SHA256: weights_sha256,
        DATA_FINGERPRINT: data_fingerprint or UNKNOWN,
    }


def check_same(
    *, records: list[tuple[str | Path, Mapping[str, Any]]], name: str, rerun: str
) -> None:
    """Refuse results that meet in one table but record different values of `name` (made
    from other data or weights); records without the entry are not compared."""
    first: tuple[str | Path, Any] | None = None
    for path, recorded in records:
        value = recorded.get(name)
        if value is None or value == UNKNOWN:
            continue
        if first is None:
            first = (path, value)
        elif value != first[1]:
            raise ValueError(
                f"{path}: {name} {short(value)} differs from {short(first[1])} of {first[0]}; "
                f"rerun the stale one: snakemake --forcerun {rerun}"
            )
