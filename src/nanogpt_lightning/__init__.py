"""nanoGPT's Shakespeare workflow on PyTorch Lightning and Hydra."""

from nanogpt_lightning.cpu_memory import tune_cpu_memory

tune_cpu_memory()
