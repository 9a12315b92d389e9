"""Tokenize a text into train.bin/val.bin: `python scripts/prepare.py data=shakespeare [data.input_file=PATH]`."""

import sys

from nanogpt_lightning.config import compose_train_config
from nanogpt_lightning.errors import exit_on_user_error
from nanogpt_lightning.training import build_datamodule


@exit_on_user_error
def main(overrides: list[str]) -> None:
    build_datamodule(compose_train_config(overrides)).prepare_data(force=True)


if __name__ == "__main__":
    main(sys.argv[1:])
