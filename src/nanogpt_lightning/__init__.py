"""nanoGPT's Shakespeare workflow on PyTorch Lightning and Hydra."""

import os

# Linux: PyTorch backs CPU tensors of 2 MB and more with transparent huge pages when this is set, so the
# big short-lived tensors of a training step cost far fewer page faults (on a 2-core CPU, m2_shakespeare:
# nanoGPT's loop and ours without the fused loss 1.2x-1.5x faster). torch reads it once, when it starts:
# it only takes effect if this package is imported before torch, as the scripts do.
# THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
