"""The method table: what a fine-tuning method is, in one entry, and where a user's own comes from.

An entry (`Method`) says what the model starts from, which hyper-parameters a run sweeps (they
name its folder) and which fixed options it reads, whether it needs the pretrained model as a
teacher, and the `prepare` hook that turns a classifier into a training setup (`Setup`: its
loss, an extra loss term, which parameters train, a post-processing of the trained model).
Everything else (the config schema's checks, the Snakemake rules, run selection, the tables,
WiSE-FT, ER and distortion) reads the table; nothing else names a fine-tuning method.

A user's own method is an entry point named in the config,
`finetune.<name>: {entry: "mypkg.mymodule:make_method", lr_grid: [...], ...}` (or
`"path/to/file.py:make_method"`, relative to the working directory), a function that takes
no arguments and returns a `Method`. See docs/methods.md, "Your own method".

Imported by the workflow at parse time: standard library only. The built-in hooks are named
as "module:function" strings and imported by the job that trains.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

STARTS = ("random_head", "probe_head")
# Methods with rules of their own rather than fine-tuning runs.
STAGE_METHODS = ("lp", "wiseft", "zeroshot", "soups")
# Keys of finetune.<method> that every fine-tuning method has (the training loop's own).
LOOP_KEYS = ("lr_grid", "bn", "clip_grad_norm", "entry")


class MethodError(ValueError):
    """A method entry that cannot be used; the message names the config key."""


@dataclass(frozen=True)
class Setup:
    """What `Method.prepare` returns for one run.

    loss_fn: replaces cross-entropy (called as loss_fn(logits, labels)); extra_loss: a term
    added to it, called as extra_loss(model=, images=, logits=, labels=); finalize: applied to
    the trained model before it is saved (LoRA merges its adapters); lr_factors: {parameter
    name prefix: learning-rate factor}, e.g. {"head.": 10.0}. Parameters the hook sets
    `requires_grad_(False)` do not train; frozen_statistics: names of BatchNorm layers whose
    running statistics stay as they are (eval mode) whatever the run's `bn` mode, so that a
    frozen layer is exactly unchanged (freeze-embed, surgical).
    """

    loss_fn: Any = None
    extra_loss: Callable[..., Any] | None = None
    finalize: Callable[[Any], Any] | None = None
    lr_factors: Mapping[str, float] | None = None
    frozen_statistics: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    name: its name in `methods` and under `finetune`; start: "random_head" (a new head, as FT)
    or "probe_head" (the linear probe's head, as LP-FT); swept: {run-folder key: grid config
    key}, e.g. {"alpha": "alpha_grid"}: each run is one point of lr_grid × these grids;
    options: the fixed config keys it reads (with their defaults); teacher: it needs the
    pretrained model with the probe head (KD); text_tower: it needs the backbone's CLIP text
    tower (FLYP), which the hook then receives as `text` (a `robustft.zeroshot.TextTower`),
    and it runs only on backbones that have one; prepare: the hook,
    prepare(*, model, options, teacher) -> Setup, or its "module:function" name.
    """

    name: str
    prepare: Callable[..., Setup] | str
    start: str = "random_head"
    swept: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    teacher: bool = False
    description: str = ""
    text_tower: bool = False

    @property
    def needs_probe_head(self) -> bool:
        return self.start == "probe_head" or self.teacher

    @property
    def config_keys(self) -> set[str]:
        """Every key `finetune.<name>` may hold."""
        return {*LOOP_KEYS, *self.swept.values(), *self.options}

    def hook(self) -> Callable[..., Setup]:
        if callable(self.prepare):
            return self.prepare
        return load_attribute(self.prepare, where=f"method {self.name!r}")


def _builtin(name: str, **fields: Any) -> Method:
    return Method(name=name, prepare=f"robustft.methods.builtin:prepare_{name}", **fields)


BUILTIN: dict[str, Method] = {
    method.name: method
    for method in (
        _builtin("ft", description="full fine-tuning with a new random head"),
        _builtin("lpft", start="probe_head", description="full fine-tuning from the probe's head"),
        _builtin(
            "l2sp",
            swept={"alpha": "alpha_grid"},
            options={"beta": 0.01},  # the schema's default (Li et al.'s head weight)
            description="ft + α/2·‖w − w₀‖² on the backbone + β/2·‖w_head‖²",
        ),
        _builtin(
            "l1sp", swept={"alpha": "alpha_grid"}, description="ft + α·‖w − w₀‖₁ on the backbone"
        ),
        _builtin(
            "kd",
            swept={"lambda": "lambda_grid"},
            options={"temperature": 2.0},
            teacher=True,
            description="(1 − λ)·CE + λ·T²·KL toward the pretrained model with the probe head",
        ),
        _builtin(
            "lora",
            swept={"rank": "rank_grid"},
            options={"lora_alpha": 8.0, "target": "auto"},  # the schema's defaults
            description="peft LoRA adapters on the backbone, head trained in full, merged",
        ),
        _builtin(
            "freeze_embed",
            description="full fine-tuning with the stem / patch embedding frozen (Kumar et al.)",
        ),
        _builtin(
            "surgical",
            start="probe_head",
            swept={"group": "group_grid"},
            options={"groups": 4},
            description="only one of `groups` contiguous block groups trains (Lee et al.)",
        ),
        _builtin(
            "llrd",
            swept={"decay": "decay_grid"},
            description="layer-wise lr decay: lr × decay^(layers above), timm's grouping",
        ),
        _builtin(
            "flyp",
            text_tower=True,
            options={"templates": "openai_imagenet"},
            description="both CLIP towers trained with CLIP's contrastive loss on class prompts, "
            "classified by the zero-shot head of the trained text tower (Goyal et al.)",
        ),
    )
}


def load_attribute(reference: str, *, where: str) -> Any:
    """The object named "package.module:attribute" or "path/to/file.py:attribute"."""
    module_name, _, attribute = str(reference).partition(":")
    if not module_name or not attribute:
        raise MethodError(f"{where}: {reference!r} is not 'module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise MethodError(f"{where}: no file {path}")
            key = f"robustft_user_{path.stem}_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(key)
            if module is None:
                spec = importlib.util.spec_from_file_location(key, path)
                module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                sys.modules[key] = module
                spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except MethodError:
        raise
    except Exception as error:  # any failure of the user's module is reported the same way
        raise MethodError(
            f"{where}: cannot import {module_name!r} ({type(error).__name__}: {error})"
        ) from None
    if not hasattr(module, attribute):
        raise MethodError(f"{where}: {module_name!r} has no {attribute!r}")
    return getattr(module, attribute)


def user_method(name: str, entry: str) -> Method:
    """A user's method from its entry point; checked against the protocol."""
    where = f"config key 'finetune.{name}.entry'"
    make = load_attribute(entry, where=where)
    try:
        method = make()
    except Exception as error:
        raise MethodError(f"{where}: {entry} failed ({type(error).__name__}: {error})") from None
    if not isinstance(method, Method):
        raise MethodError(
            f"{where}: {entry} returned {type(method).__name__}, not a robustft Method "
            "(robustft.methods.Method)"
        )
    method = replace(method, name=name)  # the config's name is the method's name
    if method.start not in STARTS:
        raise MethodError(f"{where}: start {method.start!r} is not one of {list(STARTS)}")
    if not (callable(method.prepare) or isinstance(method.prepare, str)):
        raise MethodError(f"{where}: prepare must be a function or 'module:function'")
    _check_hook(
        method.hook() if isinstance(method.prepare, str) else method.prepare,
        where,
        needs=("model", "options", "teacher", *(("text",) if method.text_tower else ())),
    )
    for key, grid in method.swept.items():
        if not (key.isalpha() and key.islower() and key != "lr") or not grid.endswith("_grid"):
            raise MethodError(
                f"{where}: swept {{{key!r}: {grid!r}}}: keys are lowercase letters (not lr), "
                "grids end in _grid"
            )
    return method


def _check_hook(
    hook: Callable[..., Any],
    where: str,
    needs: tuple[str, ...] = ("model", "options", "teacher"),
) -> None:
    """prepare(*, model, options, teacher) -> Setup: the keywords the stage passes (and
    `text`, the text tower, to a method that needs one)."""
    try:
        signature = inspect.signature(hook)
    except (TypeError, ValueError):
        return  # a builtin or C callable: trust it
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    names = {p.name for p in parameters if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    missing = [name for name in needs if name not in names]
    if missing:
        raise MethodError(
            f"{where}: prepare{signature} does not take {', '.join(missing)}; the protocol is "
            f"prepare(*, {', '.join(needs)}) -> Setup"
        )


def method_table(finetune: Mapping[str, Any] | None = None) -> dict[str, Method]:
    """Built-in methods, and every `finetune.<name>` entry with an `entry` point."""
    table = dict(BUILTIN)
    for name, own in (finetune or {}).items():
        if isinstance(own, Mapping) and own.get("entry"):
            if name in BUILTIN or name in STAGE_METHODS:
                raise MethodError(
                    f"config key 'finetune.{name}.entry': {name!r} is a built-in method; "
                    "give your method its own name"
                )
            table[name] = user_method(name, str(own["entry"]))
    return table


def resolve(name: str, options: Mapping[str, Any] | None = None) -> Method:
    """The entry of one method in a job: a built-in, or the user's from its `entry` option."""
    entry = (options or {}).get("entry")
    if entry:
        return user_method(name, str(entry))
    if name not in BUILTIN:
        raise MethodError(f"unknown fine-tuning method {name!r}; known: {', '.join(BUILTIN)}")
    return BUILTIN[name]
