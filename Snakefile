# robustft: how ways of adapting a pretrained image model trade ID for OOD accuracy.
# This file only wires the stages together; helpers live in workflow/rules/common.smk.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/wiseft.smk"
include: "workflow/rules/soups.smk"
include: "workflow/rules/predictions.smk"
include: "workflow/rules/zeroshot.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),


# Last, when every rule is defined (why: in common.smk).
cache_signatures(workflow.rules)
tune_garbage_collection()
