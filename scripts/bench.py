"""Time training iterations four ways, interleaved: `python scripts/bench.py experiment=m2_shakespeare`.

nanoGPT's plain loop (huge pages off, and on), the Lightning loop with the fused loss off, and on;
see `--help`.
"""

import sys

from nanogpt_lightning.benchmark import main
from nanogpt_lightning.errors import exit_on_user_error

if __name__ == "__main__":
    exit_on_user_error(main)(sys.argv[1:])
