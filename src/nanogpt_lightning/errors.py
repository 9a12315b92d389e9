"""User mistakes become one clear line on stderr and a non-zero exit, never a traceback."""

import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from nanogpt_lightning.console import say


class UserError(Exception):
    """A problem the user can fix; the message says how."""


class SettingError(UserError):
    """A UserError from a check that serves several settings (pick_device: sample.py's `device`, training's
    `trainer.accelerator`) and so cannot name the one at fault: its message is a function of the setting's name
    (`key`; check_compile's two spellings `asked_by` and `switch_off`), whose defaults name the usual one; the
    caller that knows better names it with `naming`, instead of passing the name down through each call.

    `naming` calls the function again once the raising `except ... as err:` block has ended and `err` is gone:
    what the message needs of `err` goes into a variable before the raise.
    """

    def __init__(self, message: Callable[..., str]):
        super().__init__(message())
        self.message = message

    def __reduce__(self):  # pickled (to another process) as the UserError it reads as: a function does not pickle
        return UserError, self.args


@contextlib.contextmanager
def naming(**names: str):
    """Around calls whose SettingErrors are about the setting `names` says (e.g. key="trainer.accelerator"):
    their messages name it instead of their defaults."""
    try:
        yield
    except SettingError as err:
        err.args = (err.message(**names),)
        raise


def first_line(err: BaseException, width: int = 160) -> str:
    """`Kind: first line of the message`, cut to `width` characters: a foreign error inside one of ours."""
    text = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    return text if len(text) <= width else text[:width - 3] + "..."


class TrainingInterrupted(Exception):
    """Ctrl+C or SIGTERM stopped training after its state was saved (callbacks.GracefulInterrupt)."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"{signal.Signals(signum).name} at iteration {step}")
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint


def exit_on_user_error(main):
    """Decorate an entry point: a UserError prints `error: <message>` and exits with status 1; a closed
    output pipe ends it quietly; a stopped training run exits as its signal asks."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            say(f"error: {err}", file=sys.stderr)  # also into the run's train.log
            sys.exit(1)
        except TrainingInterrupted as stop:  # the state is saved; SIGTERM tells a scheduler the job did not finish
            sys.exit(0 if stop.signum == signal.SIGINT else 128 + stop.signum)
        except BrokenPipeError:  # the reader left (`sample.py | head`): stop quietly, as other tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
            sys.exit(1)

    return wrapper


def quiet_ctrl_c(message: str = "stopped by Ctrl+C before training began; nothing saved") -> None:
    """Ctrl+C outside training (imports, Hydra's start-up, data preparation): `message` and exit 130, no
    traceback.

    During training callbacks.GracefulInterrupt handles it instead; a sweep's job records it (sweeps.py).
    """
    previous = sys.excepthook

    def hook(kind, value, tb):
        if not issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, tb)
        print(f"\n{message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # after an uncaught KeyboardInterrupt Python would end by the signal, not with a status

    sys.excepthook = hook


@contextlib.contextmanager
def ctrl_c_held():
    """Hold Ctrl+C and SIGTERM until the block ends, then deliver them there (to the handlers before the block).

    For the seconds of importing PyTorch and Lightning: an interrupt raised inside an import leaves modules
    half-made (numpy and scipy then fail with unrelated errors, PyTorch's C++ start-up aborts the process).
    """
    received = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in dict.fromkeys(received):
        signal.raise_signal(signum)
