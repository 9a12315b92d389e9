"""Train a GPT: `python scripts/train.py [overrides]`, e.g. `experiment=macbook_char trainer.accelerator=mps`."""

import hydra
from omegaconf import DictConfig

from nanogpt_lightning.errors import exit_on_user_error
from nanogpt_lightning.training import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
