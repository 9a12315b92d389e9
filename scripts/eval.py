"""Loss, perplexity and bits per byte of a checkpoint: `python scripts/eval.py ckpt=PATH [split=...] [text=FILE]`."""

import hydra
from omegaconf import DictConfig, OmegaConf

from nanogpt_lightning.config import validate_eval_config
from nanogpt_lightning.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    validate_eval_config(cfg)  # a bad setting is refused before the seconds of loading PyTorch
    from nanogpt_lightning.tools.evaluate import evaluate

    evaluate(**OmegaConf.to_container(cfg))


if __name__ == "__main__":
    main()
