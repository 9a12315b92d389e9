"""nanoGPT's Shakespeare workflow on PyTorch Lightning and Hydra.

Importing the package changes nothing process-wide; the scripts opt in to the CPU memory settings of
`cpu_memory.tune_cpu_memory` at their start.
"""
