"""Putting pretrained weights into the local cache, once, on a machine with internet access.

`fetch_backbone` writes `{out_dir}/meta.json` (architecture, preprocessing, weights file,
SHA-256) last, so its existence means the backbone is complete. timm models are downloaded by
timm itself into a Hugging Face cache folder (`HF_HUB_CACHE` layout, so `HF_HUB_OFFLINE=1`
with that cache also works outside the workflow); the MoCo-v2 checkpoint is converted once into
a safetensors state dict. Jobs then call `robustft.models.load_backbone`, which reads files only.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from robustft.io import read_json, sha256_file
from robustft.models.backbone import (
    MOCO_V2_BACKBONE,
    TOY_BACKBONE,
    TimmBackbone,
    create_timm_backbone,
    pretrained_num_classes,
)
from robustft.models.keymap import (
    compile_drop_keys,
    compile_key_map,
    first,
    read_state_dict,
    rename_keys,
)
from robustft.models.preprocess import timm_preprocess
from robustft.models.weights import FORMAT_TIMM, META_FILE, load_state, save_backbone, write_meta

log = logging.getLogger(__name__)

MOCO_V2_URL = (
    "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/"
    "moco_v2_800ep_pretrain.pth.tar"
)
MOCO_PREFIX = "module.encoder_q."
DOWNLOAD_TIMEOUT_S = 60
# MoCo-v2 trains a torchvision ResNet-50, whose key names and evaluation preprocessing
# (resize 256, centre crop 224, bilinear, ImageNet mean/std) timm's `resnet50.tv_in1k` shares.
MOCO_ARCHITECTURE = "resnet50.tv_in1k"


# Keys of `backbone_options.<name>` that jobs apply when they load the backbone, not the fetch
# (the workflow keeps them out of fetch_backbone's params, so they never refetch).
JOB_OPTIONS = ("preprocess", "drop_rate", "drop_path_rate")


@dataclass(frozen=True)
class BackboneOptions:
    """Per-backbone settings of the fetch (config key `backbone_options.<name>`)."""

    weights: str | None = None  # a local weights file instead of a download
    url: str | None = None  # moco_v2_resnet50: where its checkpoint is downloaded from
    sha256: str | None = None  # expected SHA-256 of the downloaded or local file
    embedding: str = "auto"  # timm: auto, pooled or projected
    key_map: tuple[tuple[str, str], ...] = ()  # [regex, replacement] for the keys of `weights`
    drop_keys: tuple[str, ...] = ()  # regexes: keys of `weights` left out before key_map

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> BackboneOptions:
        """The fetch's options from a config entry; the job-time keys (JOB_OPTIONS) are skipped."""
        data = {key: value for key, value in dict(data or {}).items() if key not in JOB_OPTIONS}
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown backbone option(s) {unknown}")
        key_map = data.pop("key_map", None) or ()
        drop_keys = data.pop("drop_keys", None) or ()
        return cls(
            **data,
            key_map=tuple(tuple(pair) if isinstance(pair, list) else pair for pair in key_map),
            drop_keys=tuple(drop_keys),
        )


class FetchError(RuntimeError):
    """A download failed (offline, no such file, ...). The message is one line."""


def fetch_backbone(
    *,
    name: str,
    out_dir: str | Path,
    cache_dir: str | Path,
    options: Mapping[str, Any] | BackboneOptions | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Download (or take from `options.weights`) the weights of backbone `name`, check that
    they load, and write `{out_dir}/meta.json`. Returns the meta data."""
    if not isinstance(options, BackboneOptions):
        options = BackboneOptions.from_mapping(options)
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    if name == TOY_BACKBONE:
        raise ValueError(f"{name!r} is pretrained inside the workflow (rule pretrain_backbone)")
    if name == MOCO_V2_BACKBONE:
        if options.key_map or options.drop_keys:
            raise ValueError(
                f"backbone_options.{name}: key_map and drop_keys are for timm names; "
                f"{name} converts its MoCo checkpoint itself"
            )
        return _fetch_moco_v2(
            out_dir=out_dir, cache_dir=cache_dir, options=options, progress=progress
        )
    if options.url is not None:
        raise ValueError(f"backbone option 'url' is for {MOCO_V2_BACKBONE} only, not {name!r}")
    if options.key_map or options.drop_keys:
        return _fetch_mapped(name=name, out_dir=out_dir, options=options)
    if options.weights is not None:
        path = _local_file(options.weights)
        source: dict[str, Any] = {"kind": "local", "path": str(path)}
    else:
        path, source = _download_timm(name=name, cache_dir=cache_dir)
    digest = _check_sha256(path, options.sha256)
    backbone = create_timm_backbone(name=name, embedding=options.embedding, weights_file=path)
    weights_file = Path(os.path.relpath(path, out_dir)) if source["kind"] != "local" else path
    meta = write_meta(
        out_dir,
        architecture=name,
        kwargs={"embedding": backbone.embedding},
        num_features=backbone.num_features,
        preprocess=timm_preprocess(backbone.model),
        weights_file=weights_file,
        weights_format=FORMAT_TIMM,
        sha256=digest,
        extra={"source": source, "options": asdict(options)},
    )
    log.info("%s: %d features, weights %s", name, backbone.num_features, path)
    return meta


def _fetch_mapped(*, name: str, out_dir: Path, options: BackboneOptions) -> dict[str, Any]:
    """A local weights file of another code base: its keys dropped and renamed by the config,
    loaded strictly into timm's `name`, and saved converted (safetensors state dict of the
    backbone) beside meta.json, which records the source file, its SHA-256 and the key map.

    The pretrained head: with the pooled embedding the backbone has none, so the file's
    classifier keys (timm's names for `name`, after renaming) are left out, and recorded; with
    the projected embedding the head is the projection and must be in the file.
    """
    where = f"backbone_options.{name}"
    if options.weights is None:
        raise ValueError(
            f"{where}.key_map/drop_keys rename the keys of a local file: set {where}.weights"
        )
    # Config errors first, before the (possibly large) file is read.
    compile_key_map([list(pair) for pair in options.key_map], key=f"{where}.key_map")
    compile_drop_keys(list(options.drop_keys), key=f"{where}.drop_keys")
    path = _local_file(options.weights)
    digest = _check_sha256(path, options.sha256)
    original = read_state_dict(path)
    state = rename_keys(
        original,
        key_map=options.key_map,
        drop_keys=options.drop_keys,
        source=path,
        key=where,
    )
    backbone = create_timm_backbone(name=name, embedding=options.embedding)
    dropped_head: list[str] = []
    if backbone.embedding == "pooled":
        classifier = str(backbone.pretrained_cfg.get("classifier") or "")
        heads = [part for part in classifier.split(",") if part] if classifier else []
        dropped_head = sorted(
            key for key in state if any(key == h or key.startswith(f"{h}.") for h in heads)
        )
        for key in dropped_head:
            del state[key]
    try:
        load_state(backbone.model, state, source=path)
    except ValueError as error:
        raise ValueError(
            f"{error}; before {where}.key_map the file's keys start {first(original, 3)}: "
            f"fix {where}.key_map or {where}.drop_keys"
        ) from None
    save_backbone(
        backbone=backbone,
        out_dir=out_dir,
        architecture=name,
        kwargs={"embedding": backbone.embedding},
        preprocess=timm_preprocess(backbone.model),
        extra={
            "source": {
                "kind": "local",
                "path": str(path),
                "sha256": digest,
                "key_map": [list(pair) for pair in options.key_map],
                "drop_keys": list(options.drop_keys),
                "dropped_head_keys": dropped_head,
            },
            "options": asdict(options),
        },
    )
    log.info("%s: %s converted (%d tensors)", name, path, len(state))
    return read_json(out_dir / META_FILE)


def _local_file(value: str | Path) -> Path:
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{value}: weights file not found")
    return path


def _check_sha256(path: Path, expected: str | None) -> str:
    digest = sha256_file(path)
    if expected is not None and digest != expected.lower():
        raise ValueError(f"{path}: SHA-256 {digest} differs from the configured {expected}")
    return digest


def _close_names(name: str) -> str:
    """ "; did you mean ...?" with timm's pretrained names closest to a misspelt one."""
    import difflib

    import timm

    tagged = timm.list_pretrained()
    names = [*tagged, *sorted({full.split(".")[0] for full in tagged})]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.8)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _download_timm(*, name: str, cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Let timm download `name`'s pretrained weights into `cache_dir`; return the file."""
    import timm
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._hub import _get_safe_alternatives, hf_split

    try:
        model = timm.create_model(
            name, pretrained=True, num_classes=pretrained_num_classes(name), cache_dir=cache_dir
        )
    except RuntimeError as error:
        if "Unknown model" in str(error) or "Invalid pretrained tag" in str(error):
            raise ValueError(
                f"unknown backbone {name!r} (not a timm model name with a pretrained tag"
                f"{_close_names(name)})"
            ) from None
        raise _download_error(name, error) from None
    except Exception as error:  # network errors come in many types (requests, httpx, hf_hub)
        raise _download_error(name, error) from None
    load_from, location = _resolve_pretrained_source(model.pretrained_cfg)
    if load_from == "hf-hub":
        from huggingface_hub import try_to_load_from_cache

        repo, filename = location if isinstance(location, tuple) else (location, None)
        repo_id, revision = hf_split(repo)
        # The order timm tries (timm.models._hub.load_state_dict_from_hf).
        wanted = filename or "pytorch_model.bin"
        names = [*_get_safe_alternatives(wanted), wanted]
        for candidate in names:
            found = try_to_load_from_cache(
                repo_id, candidate, cache_dir=str(cache_dir), revision=revision
            )
            if isinstance(found, str):
                path = Path(found)
                return path, {
                    "kind": "hf-hub",
                    "repo": repo_id,
                    "file": candidate,
                    "revision": path.parent.name,  # the snapshot folder is the commit hash
                }
        raise FetchError(f"timm loaded {name!r} from {repo_id} but none of {names} is cached")
    if load_from == "url":
        path = cache_dir / os.path.basename(str(location).split("?")[0])
        if path.is_file():
            return path, {"kind": "url", "url": location}
    raise ValueError(
        f"timm model {name!r} has no downloadable weights ({load_from or 'none'}); "
        f"set backbone_options['{name}'].weights to a local file"
    )


def _download_error(name: str, error: BaseException) -> FetchError:
    text = " ".join(str(error).split())[:200]
    return FetchError(
        f"cannot download backbone {name!r} ({type(error).__name__}: {text}); fetch it on a "
        f"machine with internet access (HF_HUB_OFFLINE unset), or set "
        f"backbone_options['{name}'].weights to a local file"
    )


def moco_v2_state_dict(checkpoint: Mapping[str, Any], *, source: str | Path) -> dict[str, Any]:
    """The query encoder of a MoCo checkpoint as torchvision ResNet-50 keys, without the
    projection MLP (`fc.*`, replaced by the downstream head)."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: no state dict in the checkpoint")
    out = {
        key.removeprefix(MOCO_PREFIX): value
        for key, value in state.items()
        if key.startswith(MOCO_PREFIX) and not key.removeprefix(MOCO_PREFIX).startswith("fc.")
    }
    if not out:
        raise ValueError(f"{source}: no '{MOCO_PREFIX}*' keys (not a MoCo checkpoint)")
    return out


def load_moco_v2(path: str | Path) -> TimmBackbone:
    """A ResNet-50 backbone with the weights of a MoCo(-v2) `.pth.tar` checkpoint."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors differ by cause
        text = " ".join(str(error).split())[:200]
        raise ValueError(f"{path}: not a readable torch checkpoint ({text})") from None
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    backbone = create_timm_backbone(name=MOCO_ARCHITECTURE, embedding="pooled")
    load_state(backbone.model, moco_v2_state_dict(checkpoint, source=path), source=path)
    return backbone


def _fetch_moco_v2(
    *, out_dir: Path, cache_dir: Path, options: BackboneOptions, progress: bool
) -> dict[str, Any]:
    if options.weights is not None:
        path = _local_file(options.weights)
        source: dict[str, Any] = {"kind": "local", "path": str(path)}
    else:
        from timm.models._hub import download_cached_file

        url = options.url or MOCO_V2_URL
        # urllib waits forever by default; a stalled connection should end the fetch.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            path = Path(download_cached_file(url, progress=progress, cache_dir=cache_dir))
        except Exception as error:  # urllib raises URLError, HTTPError, OSError, timeouts
            raise _download_error(MOCO_V2_BACKBONE, error) from None
        finally:
            socket.setdefaulttimeout(previous)
        source = {"kind": "url", "url": url}
    source["sha256"] = _check_sha256(path, options.sha256)
    backbone = load_moco_v2(path)
    save_backbone(
        backbone=backbone,
        out_dir=out_dir,
        architecture=MOCO_ARCHITECTURE,
        kwargs={"embedding": "pooled"},
        preprocess=timm_preprocess(backbone.model),
        extra={"source": source, "options": asdict(options)},
    )
    return read_json(out_dir / META_FILE)
