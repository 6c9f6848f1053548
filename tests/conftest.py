import os

# Tests must be reproducible and not fight over the two cores of a CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
