"""A process forked early, with the built-in server's imports done, that becomes the server later.

A sweep trial is forked from a process that has imported torch, transformers and the server's
modules (``sweep.FitProcess``). Its built-in server would otherwise start as a fresh
``python -m grpo_lightning.inference.server``, importing all of that again: about 11 CPU-seconds
on 2 cores, the largest fixed cost of a short trial. So the trial forks one process here first
thing, while it is still single-threaded (a process with threads cannot be forked safely: a lock
held by another thread stays locked in the child forever). That process waits on a pipe; the
trial's first ``ManagedServer`` launch of the built-in server hands it the command line, and it
becomes the server exactly as ``subprocess.Popen`` would have started it: its own session, the
environment and log it is given, stdin from /dev/null, the same ``main``. Only the imports are
skipped. Later launches (a restart after a crash) use ``Popen``: the pre-forked process is used
once, and a trial that never launches a built-in server (an attached server, vLLM, SGLang) ends
it by closing the pipe.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

SERVER_MODULE = "grpo_lightning.inference.server"

_ready: tuple[int, int] | None = None  # (pid, write end of its pipe) while unused


class PreforkedProcess:
    """The ``subprocess.Popen`` surface ``ManagedServer`` uses, for a process forked here."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):  # reaped elsewhere: treat as gone
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == 0:
                    return None
                self.returncode = os.waitstatus_to_exitcode(status)
                return self.returncode
            self.returncode = -signal.SIGKILL
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(SERVER_MODULE, timeout or 0.0)
            time.sleep(0.05)
        assert self.returncode is not None
        return self.returncode


def start() -> None:
    """Fork the process that can become this process's first built-in server. Call it while the
    process has no other thread; the server's modules should be imported already (else the server
    imports them when it starts, as a fresh one would)."""
    global _ready
    if _ready is not None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the waiting process; it never returns from here
        os.close(w)
        code = 1
        try:
            code = _wait_and_serve(r)
        except BaseException:  # as an uncaught exception ends ``python -m``: traceback, code 1
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)  # never the parent's atexit hooks or finally blocks
    os.close(r)
    _ready = (pid, w)


def spawn(argv: list[str], env: dict[str, str], log_path: Path) -> PreforkedProcess | None:
    """Start ``argv`` in the pre-forked process if there is one and ``argv`` is this Python running
    the built-in server; None otherwise (the caller starts a process itself)."""
    global _ready
    if _ready is None or argv[:3] != [sys.executable, "-m", SERVER_MODULE]:
        return None
    (pid, w), _ready = _ready, None
    try:
        with os.fdopen(w, "wb") as pipe:
            pickle.dump((argv[3:], env, str(log_path)), pipe)
    except OSError:  # it died meanwhile (e.g. a signal to the process group)
        _reap(pid)
        return None
    return PreforkedProcess(pid)


def discard() -> None:
    """End the pre-forked process if it was never used, and reap it."""
    global _ready
    if _ready is not None:
        (pid, w), _ready = _ready, None
        os.close(w)  # it reads end-of-file and exits
        _reap(pid)


def redirect_output(log_path: str | Path) -> None:
    """Point this process's stdout and stderr (the file descriptors, so child processes and C
    code write there too) at the end of ``log_path``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _wait_and_serve(r: int) -> int:
    # The parent's signal handlers (a sweep trial's) are Python functions about the parent's
    # state: a server starts from the defaults, as after exec.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read()
    if not data:
        return 0  # never needed
    args, env, log_path = pickle.loads(data)
    os.setsid()  # start_new_session=True: the launcher signals the server's group
    os.environ.clear()
    os.environ.update(env)
    redirect_output(log_path)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.argv = [SERVER_MODULE, *args]
    from .server import main

    try:
        return main(args)
    except SystemExit as exc:  # argparse errors, as the module run would exit
        return exc.code if isinstance(exc.code, int) else 1
