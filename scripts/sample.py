"""Generate text from a checkpoint: `python scripts/sample.py ckpt=PATH [prompt=... num_samples=... ...]`."""

import hydra
from omegaconf import DictConfig, OmegaConf

from nanogpt_lightning.config import validate_sample_config
from nanogpt_lightning.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    validate_sample_config(cfg)  # a bad setting is refused before the seconds of loading PyTorch
    from nanogpt_lightning.tools.sample import sample

    sample(**OmegaConf.to_container(cfg))


if __name__ == "__main__":
    main()
