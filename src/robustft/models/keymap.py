"""Foreign weights files: reading a state dict, renaming its keys, and saying what does not fit.

A checkpoint from another code base (a SimCLR, DINO or MoCo training script, a DataParallel
wrapper) names the same tensors differently from timm: `module.encoder.layer1.0.conv1.weight`
for timm's `layer1.0.conv1.weight`. `backbone_options.<b>.key_map` is an ordered list of
[regex, replacement] pairs applied with `re.sub` to every key, after `drop_keys` (regexes,
`re.search` on the file's own key names) removed the keys that have no place in the backbone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# Top-level entries under which training scripts nest the state dict (MoCo, DINO, timm's
# train.py checkpoints), tried in this order.
WRAPPER_KEYS = ("state_dict", "model")
SHOWN_KEYS = 5  # how many key names a mismatch error lists per kind


def compile_key_map(
    key_map: Sequence[Sequence[str]] | None, *, key: str = "key_map"
) -> list[tuple[re.Pattern[str], str]]:
    """[(compiled regex, replacement)], each checked; errors are one line naming `key`[i]."""
    compiled = []
    for index, pair in enumerate(key_map or ()):
        if (
            isinstance(pair, str | bytes)
            or not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(isinstance(part, str) for part in pair)
        ):
            raise ValueError(f"{key}[{index}]: expected a [regex, replacement] pair, got {pair!r}")
        pattern, replacement = pair
        try:
            regex = re.compile(pattern)
            regex.sub(replacement, "")  # a bad group reference raises even without a match
        except re.error as error:
            raise ValueError(f"{key}[{index}]: {error} in {list(pair)!r}") from None
        compiled.append((regex, replacement))
    return compiled


def compile_drop_keys(
    drop_keys: Sequence[str] | None, *, key: str = "drop_keys"
) -> list[re.Pattern[str]]:
    compiled = []
    for index, pattern in enumerate(drop_keys or ()):
        if not isinstance(pattern, str):
            raise ValueError(f"{key}[{index}]: expected a regex string, got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"{key}[{index}]: {error} in {pattern!r}") from None
    return compiled


def rename_keys(
    state: Mapping[str, Any],
    *,
    key_map: Sequence[Sequence[str]] | None = None,
    drop_keys: Sequence[str] | None = None,
    source: str | Path = "weights",
    key: str = "backbone_options",
) -> dict[str, Any]:
    """`state` without the keys any `drop_keys` regex finds, the rest renamed by `key_map`
    (each pair in order, `re.sub` on the whole key). A key renamed to the empty string, or two
    keys renamed to one name, is an error (one line naming the file): dropping is `drop_keys`'s.
    """
    pairs = compile_key_map(key_map, key=f"{key}.key_map")
    drops = compile_drop_keys(drop_keys, key=f"{key}.drop_keys")
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, value in state.items():
        if any(regex.search(name) for regex in drops):
            continue
        new = name
        for regex, replacement in pairs:
            new = regex.sub(replacement, new)
        if not new:
            raise ValueError(
                f"{source}: {key}.key_map renames {name!r} to the empty string "
                f"(to leave a key out, list a regex under {key}.drop_keys)"
            )
        if new in out:
            raise ValueError(
                f"{source}: {key}.key_map renames both {origin[new]!r} and {name!r} to {new!r}"
            )
        out[new], origin[new] = value, name
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or a torch file read with
    `weights_only=True`; a dict nesting them under `state_dict` or `model` is unwrapped."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip, weights_only and safetensors errors differ
        text = " ".join(str(error).split())[:200]
        raise ValueError(
            f"{path}: not a readable weights file ({type(error).__name__}: {text})"
        ) from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    for wrapper in WRAPPER_KEYS:
        inner = data.get(wrapper)
        if isinstance(inner, Mapping):
            data = inner
            break
    tensors = {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: no tensors found (top-level keys: {first(data)})")
    return tensors


def first(names: Iterable[Any], count: int = SHOWN_KEYS) -> str:
    """`['a', 'b', ...]`: the first `count` names, and how many more."""
    names = list(names)
    shown = ", ".join(repr(str(name)) for name in names[:count])
    more = f", … {len(names) - count} more" if len(names) > count else ""
    return f"[{shown}{more}]"


def describe_mismatch(
    *,
    missing: Sequence[str],
    unexpected: Sequence[str],
    shapes: Sequence[str] = (),
    file_keys: Sequence[str] = (),
    model_keys: Sequence[str] = (),
) -> str:
    """One line: counts and the first names of the model's keys the file lacks (missing), the
    file's keys the model lacks (unexpected), tensors of another shape, and, when given, the
    first keys of each side (the hint for a key_map)."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (in the model, not the file): {first(missing)}")
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected (in the file, not the model): {first(unexpected)}"
        )
    if shapes:
        parts.append(f"{len(shapes)} of another shape: {first(shapes, 3)}")
    if file_keys:
        parts.append(f"file keys start {first(file_keys, 3)}")
    if model_keys:
        parts.append(f"model keys start {first(model_keys, 3)}")
    return "; ".join(parts)


_TORCH_KEYS = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: (.*?)\.?\s*$")
_TORCH_SHAPE = re.compile(r"size mismatch for ([^:]+): (.*?)\.?\s*$")


def parse_load_error(text: str) -> str | None:
    """`describe_mismatch` of torch's multi-line `load_state_dict` error; None if it is not one."""
    missing: list[str] = []
    unexpected: list[str] = []
    shapes: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if match := _TORCH_KEYS.match(line):
            names = re.findall(r'"([^"]*)"', match.group(2))
            (missing if match.group(1) == "Missing" else unexpected).extend(names)
        elif match := _TORCH_SHAPE.match(line):
            detail = match.group(2).replace("torch.Size(", "(").replace("])", "]")
            shapes.append(f"{match.group(1)}: {detail}")
    if not (missing or unexpected or shapes):
        return None
    return describe_mismatch(missing=missing, unexpected=unexpected, shapes=shapes)
