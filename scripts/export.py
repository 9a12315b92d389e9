"""Write a checkpoint for Hugging Face transformers: `python scripts/export.py ckpt=PATH out=DIR`."""

import hydra
from omegaconf import DictConfig, OmegaConf

from nanogpt_lightning.config import validate_export_config
from nanogpt_lightning.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    validate_export_config(cfg)  # a bad setting is refused before the seconds of loading PyTorch
    from nanogpt_lightning.tools.export import export

    export(**OmegaConf.to_container(cfg))


if __name__ == "__main__":
    main()
