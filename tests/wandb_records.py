"""Read back what an offline W&B run recorded (its run-<id>.wandb transaction log).

wandb ≥ 0.19 no longer ships a Python reader of this file (its Go core writes it), so the
tests read it here: LevelDB's log format (32 KiB blocks of chunks: CRC32C, length, type)
after W&B's 7-byte header, each record a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version 0
_CHUNK = struct.Struct("<IHB")  # CRC32C (masked), length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[Any]:
    """Every record of the log, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = _HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B transaction log")
    position, pending, found = _HEADER.size, b"", []
    while position + _CHUNK.size <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _CHUNK.size:  # the block's zero-filled trailer
            position += left_in_block
            continue
        _, length, kind = _CHUNK.unpack_from(data, position)
        if kind == 0:  # zero padding at the end of a block
            position += left_in_block
            continue
        payload = data[position + _CHUNK.size : position + _CHUNK.size + length]
        position += _CHUNK.size + length
        pending = payload if kind in (_FULL, _FIRST) else pending + payload
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
            pending = b""
    return found


def history(path: str | Path) -> list[dict[str, Any]]:
    """The logged history rows, each {key: value}."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def run_info(path: str | Path) -> dict[str, Any]:
    """The run record's name, group, job type, tags and config ({key: value})."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            return {
                "name": run.display_name,
                "group": run.run_group,
                "job_type": run.job_type,
                "tags": list(run.tags),
                "config": {item.key: json.loads(item.value_json) for item in run.config.update},
            }
    raise ValueError(f"{path}: no run record")
