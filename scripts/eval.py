"""Loss, perplexity and bits per byte of a checkpoint: `python scripts/eval.py ckpt=PATH [split=...] [text=FILE]`."""

import hydra
from omegaconf import DictConfig

from nanogpt_lightning.config import checked_settings, validate_eval_config
from nanogpt_lightning.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    settings = checked_settings(cfg, validate_eval_config)  # resolved once, refused before PyTorch loads
    from nanogpt_lightning.tools.evaluate import evaluate

    evaluate(**settings)


if __name__ == "__main__":
    main()
