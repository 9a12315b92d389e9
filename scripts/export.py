"""Write a checkpoint for Hugging Face transformers: `python scripts/export.py ckpt=PATH out=DIR`."""

from omegaconf import DictConfig

from nanogpt_lightning.config import checked_settings, hydra_main, validate_export_config
from nanogpt_lightning.errors import exit_on_user_error


@hydra_main("export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    settings = checked_settings(cfg, validate_export_config)  # resolved once, refused before PyTorch loads
    from nanogpt_lightning.tools.export import export

    export(**settings)


if __name__ == "__main__":
    main()
