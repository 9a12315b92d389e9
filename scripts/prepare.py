"""Tokenize a text into train.bin/val.bin: `python scripts/prepare.py data=shakespeare [data.input_file=PATH]`."""

import sys

from nanogpt_lightning.errors import ctrl_c_held, exit_on_user_error, quiet_ctrl_c

quiet_ctrl_c("stopped by Ctrl+C; no prepared data was changed")  # a preparation is all or nothing (data.py)

from nanogpt_lightning.train.settings import compose_train_config  # noqa: E402


@exit_on_user_error
def main(overrides: list[str]) -> None:
    cfg = compose_train_config(overrides)  # checked before the seconds of loading PyTorch and Lightning
    with ctrl_c_held():
        from nanogpt_lightning.train.run import build_datamodule

    build_datamodule(cfg).prepare_data(force=True)


if __name__ == "__main__":
    main(sys.argv[1:])
