"""The GPT in plain PyTorch: no Lightning, no Hydra, no files (imports only the base modules)."""
