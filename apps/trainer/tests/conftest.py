import os

# One torch thread per process: the CI box has two cores and parallel BLAS only contends.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
