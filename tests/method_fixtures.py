"""Fine-tuning methods defined outside the package, as a user would (entry points named in
the config): one that follows the protocol, one that does not."""

from torch import nn

from robustft.methods import Method, Setup


def prepare_smoothed(*, model, options, teacher=None):
    # Cross-entropy with label smoothing: a new objective through the `loss_fn` hook.
    return Setup(loss_fn=nn.CrossEntropyLoss(label_smoothing=float(options["smoothing"])))


def smoothed():
    return Method(
        name="smoothed",
        prepare=prepare_smoothed,
        options={"smoothing": 0.1},
        description="FT with label-smoothed cross-entropy",
    )


def off_protocol():
    return Method(name="off", prepare=lambda model: Setup())
