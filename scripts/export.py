"""Write a checkpoint for Hugging Face transformers: `python scripts/export.py ckpt=PATH out=DIR`."""

import hydra
from omegaconf import DictConfig

from nanogpt_lightning.config import checked_settings, validate_export_config
from nanogpt_lightning.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    settings = checked_settings(cfg, validate_export_config)  # resolved once, refused before PyTorch loads
    from nanogpt_lightning.tools.export import export

    export(**settings)


if __name__ == "__main__":
    main()
