"""Tokenize a text into train.bin/val.bin: `python scripts/prepare.py data=shakespeare [data.input_file=PATH]`."""

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from nanogpt_lightning.errors import UserError, exit_on_user_error
from nanogpt_lightning.training import build_datamodule

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@exit_on_user_error
def main(overrides: list[str]) -> None:
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    except HydraException as err:
        raise UserError(str(err).splitlines()[0]) from None
    build_datamodule(cfg).prepare_data(force=True)


if __name__ == "__main__":
    main(sys.argv[1:])
