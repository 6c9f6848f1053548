from robustft.runtime import job
from robustft.training import remove_unowned_state

with job(log_path=snakemake.log[0]):
    remove_unowned_state(root=snakemake.params.root, owned=snakemake.params.owned)
