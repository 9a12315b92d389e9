"""Tokenize a corpus into token shards: `python scripts/prepare.py data=shakespeare [data.input_file=PATH]`.

Needs neither PyTorch nor Lightning: it starts in a moment."""

import sys

from nanogpt_lightning.errors import exit_on_user_error, quiet_ctrl_c

# a preparation keeps its whole shards (data/shards.py); it said so already when it had some
quiet_ctrl_c("stopped by Ctrl+C; no finished prepared data was changed")

from nanogpt_lightning.data.preparation import preparation_from_settings  # noqa: E402
from nanogpt_lightning.train.settings import compose_train_config  # noqa: E402


@exit_on_user_error
def main(overrides: list[str]) -> None:
    preparation_from_settings(compose_train_config(overrides).data).prepare_data(force=True)


if __name__ == "__main__":
    main(sys.argv[1:])
