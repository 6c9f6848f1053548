"""A fine-tuning method that is not built in: freeze the early layers of the backbone.

Fine-tuning only the later layers changes the early features less, the idea behind surgical
fine-tuning (Lee et al. 2023) and freeze-embed (Kumar et al.). `frozen` is the fraction of the
backbone's parameter tensors, in the order the backbone defines them (input side first), that
stay as pretrained; it is swept like lr, and names the run folders (lr0.01-frozen0.5).

Use it from the config (paths are relative to where snakemake runs):

    methods: [lp, ft, freeze_early]
    finetune:
      freeze_early:
        entry: examples/freeze_early.py:make_method
        lr_grid: [0.01, 0.03]
        frozen_grid: [0.25, 0.5]
"""

from robustft.methods import Method, Setup


def prepare(*, model, options, teacher=None):
    parameters = list(model.backbone.parameters())
    count = round(float(options["frozen"]) * len(parameters))
    for parameter in parameters[:count]:
        parameter.requires_grad_(False)
    return Setup()


def make_method():
    return Method(
        name="freeze_early",
        prepare=prepare,
        swept={"frozen": "frozen_grid"},
        description="FT with the first `frozen` fraction of the backbone's parameters frozen",
    )
