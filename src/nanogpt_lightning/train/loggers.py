"""Loggers of our own making: Weights & Biases that runs offline when no API key is set (conf/logger/wandb.yaml).

TensorBoard and CSV are Lightning's loggers as they are (conf/logger/tensorboard.yaml, csv.yaml).
"""

from __future__ import annotations

import netrc
import os
from urllib.parse import urlparse

from nanogpt_lightning.errors import UserError


def has_wandb_api_key() -> bool:
    """An API key in WANDB_API_KEY, or the one `wandb login` keeps in ~/.netrc for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_logger(save_dir: str, project: str, name: str | None = None, offline: bool | None = None, **kwargs):
    """Lightning's WandbLogger; `offline=None`: offline unless an API key is set or WANDB_MODE says."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError("logger=wandb needs the wandb package: pip install -e '.[wandb]' (or pip install wandb); "
                        "or pass logger=tensorboard, logger=csv or logger=many") from None
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        offline = "WANDB_MODE" not in os.environ and not has_wandb_api_key()
    return WandbLogger(save_dir=save_dir, project=project, name=name, offline=offline, **kwargs)
