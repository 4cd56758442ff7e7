"""Test environment: CPU only, no model hub, reference libraries on one thread per worker."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two xdist workers on two cores: multi-threaded OpenBLAS eigh (FID) is 10-20x slower then.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `configs/` lives at the repository root
    sys.path.insert(0, REPO_ROOT)

try:  # pytest-xdist runs two workers on two cores: keep PyTorch from oversubscribing
    import torch

    torch.set_num_threads(1)
except ImportError:
    pass
