"""Model soups (Wortsman et al., ICML 2022): average the weights of fine-tuned runs that share
an initialisation; pure functions over state dicts.

- Uniform soup: the mean of every run's state dict.
- Greedy soup: take the runs in order of ID val accuracy, best first; start from the best and
  add a run only if the average of the soup's runs and it scores at least as well on ID val
  as the soup did (Algorithm 1 of the paper, "≥"; their main.py keeps a run only on a strict
  gain). Its ID val is therefore never below that of its best run.

Floating-point entries are averaged in float64 and cast back, so that a soup of one run, or of
identical runs, is that run bit for bit. Integer entries (BatchNorm's step counters) cannot be
averaged: they come from the first state dict (the best run, for the greedy soup).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

StateDict = Mapping[str, torch.Tensor]


def state_dict_sha256(state: StateDict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's entries (in name
    order): equal for two models exactly when their weights are."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _Average:
    """Running float64 sums of state dicts of one architecture."""

    def __init__(self, first: StateDict) -> None:
        self.template = {key: value.detach().clone() for key, value in first.items()}
        self.totals = {
            key: value.detach().to(torch.float64)
            for key, value in first.items()
            if value.is_floating_point()
        }
        self.count = 1

    def _checked(self, state: StateDict) -> StateDict:
        if set(state) != set(self.template):
            missing = sorted(set(self.template) - set(state))[:2]
            extra = sorted(set(state) - set(self.template))[:2]
            raise ValueError(f"state dicts differ in keys (missing: {missing}, extra: {extra})")
        for key, value in state.items():
            if value.shape != self.template[key].shape:
                raise ValueError(
                    f"'{key}': shapes {tuple(self.template[key].shape)} and "
                    f"{tuple(value.shape)} differ"
                )
        return state

    def add(self, state: StateDict) -> None:
        state = self._checked(state)
        for key, total in self.totals.items():
            total.add_(state[key].detach().to(torch.float64))
        self.count += 1

    def mean(self, extra: StateDict | None = None) -> dict[str, torch.Tensor]:
        """The mean of the added state dicts, and of `extra` too when given (not added)."""
        if extra is not None:
            extra = self._checked(extra)
        count = self.count + (extra is not None)
        out = {}
        for key, value in self.template.items():
            if key not in self.totals:
                out[key] = value.clone()
                continue
            total = self.totals[key]
            if extra is not None:
                total = total + extra[key].detach().to(torch.float64)
            out[key] = (total / count).to(value.dtype)
        return out


def uniform_soup(*, state_dicts: Iterable[StateDict]) -> dict[str, torch.Tensor]:
    """The entry-wise mean of `state_dicts` (all of one architecture)."""
    average = None
    for state in state_dicts:
        if average is None:
            average = _Average(state)
        else:
            average.add(state)
    if average is None:
        raise ValueError("a soup needs at least one state dict")
    return average.mean()


@dataclass(frozen=True)
class GreedySoup:
    """A greedy soup: its weights, its runs in the order they were added, its ID val accuracy,
    and every step tried ({"run", "val_accuracy" of the soup with it, "kept"})."""

    state_dict: dict[str, torch.Tensor]
    ingredients: list[str]
    val_accuracy: float
    steps: list[dict[str, Any]] = field(default_factory=list)


def greedy_order(val_accuracy: Mapping[str, float]) -> list[str]:
    """Run names by ID val accuracy, best first; ties keep the mapping's order."""
    names = list(val_accuracy)
    return sorted(names, key=lambda name: -float(val_accuracy[name]))


def greedy_soup(
    *,
    val_accuracy: Mapping[str, float],
    load: Callable[[str], StateDict],
    evaluate: Callable[[StateDict], float],
) -> GreedySoup:
    """The greedy soup of the runs named in `val_accuracy` ({run: its ID val accuracy}, which
    orders them). `load(run)` gives a run's state dict; `evaluate(state)` the ID val accuracy
    of a state dict, the score every decision compares (the best run's included), so that the
    soup never scores below its first run. One state dict besides the sums is held at a time.
    """
    order: Sequence[str] = greedy_order(val_accuracy)
    if not order:
        raise ValueError("a soup needs at least one run")
    first = load(order[0])
    average = _Average(first)
    best = float(evaluate(first))
    ingredients = [order[0]]
    steps: list[dict[str, Any]] = [{"run": order[0], "val_accuracy": best, "kept": True}]
    for name in order[1:]:
        candidate = load(name)
        score = float(evaluate(average.mean(extra=candidate)))
        kept = score >= best
        steps.append({"run": name, "val_accuracy": score, "kept": kept})
        if kept:
            average.add(candidate)
            ingredients.append(name)
            best = score
    return GreedySoup(
        state_dict=average.mean(), ingredients=ingredients, val_accuracy=best, steps=steps
    )
