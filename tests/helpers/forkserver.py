"""Script runs for the tests, each a child forked from a server that has imported PyTorch, Lightning and Hydra.

A training, sampling, evaluation or export script spends about 6 s of CPU importing those before it does
anything; over the suite's runs that was most of `make test`. The server (`python forkserver.py`, one per test
process) imports them once, then forks a child per run that becomes the script's own process: its arguments,
working directory, environment, module search path (the script's folder and PYTHONPATH), standard streams
and signal handlers are those `python scripts/X.py ...` would have, and it exits with the script's status after
running its exit handlers. What a fresh interpreter does differently is only what happens while importing
those libraries. NANOGPT_TEST_FORK=0 runs every script in a fresh interpreter instead.

Protocol: one JSON request per line on the server's stdin; it answers {"pid": N} at the fork and
{"returncode": R} when the child has ended (R < 0: killed by signal -R), one line each.
"""

from __future__ import annotations

import atexit
import importlib
import io
import json
import os
import runpy
import signal
import sys
import threading

PRELOAD = ("torch", "lightning", "hydra", "matplotlib.pyplot", "nanogpt_lightning.train.run",
           "nanogpt_lightning.tools.sample", "nanogpt_lightning.tools.evaluate", "nanogpt_lightning.tools.export")
# read from the environment when imported, so read again in each child with its own environment
ENVIRONMENT_AT_IMPORT = ("huggingface_hub.constants",)


def _stream(fd: int, errors: str) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors=errors, write_through=True)


def _become(request: dict, search_path: list[str]) -> None:
    """In the child: be `python <script> <args>` started in request["cwd"] with request["env"]; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(request["script"]), *extra, *search_path]
        for name in ENVIRONMENT_AT_IMPORT:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
        for fd, path, flags in ((0, request["stdin"], os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
                                (2, request["stderr"], os.O_WRONLY | os.O_TRUNC)):
            file = os.open(path, flags | (os.O_CREAT if fd else 0))
            os.dup2(file, fd)
            os.close(file)
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = sys.__stdout__ = _stream(1, "strict")
        sys.stderr = sys.__stderr__ = _stream(2, "backslashreplace")
        sys.argv = [request["script"], *request["args"]]
        code = 0
        try:
            runpy.run_path(request["script"], run_name="__main__")
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:  # sys.exit("message"), as the interpreter does it
                print(stop.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - what the interpreter does with any uncaught exception
            sys.excepthook(*sys.exc_info())  # the traceback, or the hook a script set (quiet_ctrl_c)
            code = 1
        threading._shutdown()  # as the interpreter at exit: wait for the threads that are not daemons
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - a failure to become the script: shown, status 1
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream: nothing left to write
                pass
        os._exit(code)


def serve() -> None:
    search_path = sys.path[1:]  # without this file's folder, which a script's process would not have
    for name in PRELOAD:
        importlib.import_module(name)
    reply = sys.stdout
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _become(request, search_path)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()


if __name__ == "__main__":
    serve()
