"""Time training iterations four ways, interleaved: `python scripts/bench.py experiment=m2_shakespeare`.

nanoGPT's plain loop (CPU memory settings off, and on), the Lightning loop with the fused loss off, and on;
see `--help`.
"""

from nanogpt_lightning.cpu_memory import tune_cpu_memory

# before torch loads: it reads its huge-page switch once. The participant processes inherit the switch
# through the environment (all but `plain`, which bench turns off)
tune_cpu_memory()

import sys  # noqa: E402

from nanogpt_lightning.errors import exit_on_user_error  # noqa: E402
from nanogpt_lightning.tools.bench import main  # noqa: E402

if __name__ == "__main__":
    exit_on_user_error(main)(sys.argv[1:])
