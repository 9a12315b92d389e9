"""Generate text from a checkpoint: `python scripts/sample.py ckpt=PATH [prompt=... num_samples=... ...]`."""

from omegaconf import DictConfig

from nanogpt_lightning.config import checked_settings, hydra_main, validate_sample_config
from nanogpt_lightning.errors import exit_on_user_error


@hydra_main("sample")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    settings = checked_settings(cfg, validate_sample_config)  # resolved once, refused before PyTorch loads
    from nanogpt_lightning.tools.sample import sample

    sample(**settings)


if __name__ == "__main__":
    main()
