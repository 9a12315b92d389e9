"""Plot loss curves: `python scripts/plot_loss.py RUN_DIR [RUN_DIR ...] [-o loss.png]`.

Inputs are run directories, a sweep directory, nanoGPT-style text logs, or `-` for a log on standard input.
"""

import argparse

from nanogpt_lightning.errors import exit_on_user_error
from nanogpt_lightning.plotting import plot_loss


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="RUN_DIR",
                        help="a run or sweep directory, a text log file, or - to read a log from standard input")
    parser.add_argument("-o", "--output", help="the image to write, its format from the extension: .png, .pdf, "
                        ".svg, ... (default: loss.png in the first run directory)")
    args = parser.parse_args()
    plot_loss(args.inputs, args.output)


if __name__ == "__main__":
    main()
