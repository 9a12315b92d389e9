"""Loss, perplexity and bits per byte of a checkpoint: `python scripts/eval.py ckpt=PATH [split=...] [text=FILE]`."""

from omegaconf import DictConfig

from nanogpt_lightning.config import checked_settings, hydra_main, validate_eval_config
from nanogpt_lightning.errors import exit_on_user_error


@hydra_main("eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    settings = checked_settings(cfg, validate_eval_config)  # resolved once, refused before PyTorch loads
    from nanogpt_lightning.tools.evaluate import evaluate

    evaluate(**settings)


if __name__ == "__main__":
    main()
