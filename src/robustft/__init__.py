"""robustft: measure how adapting a pretrained image model trades ID for OOD accuracy.

The package is importable without torch: heavy libraries are imported by the submodules
that need them, so that Snakemake can parse the workflow cheaply.
"""

__version__ = "0.1.0"
