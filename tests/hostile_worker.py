"""A worker whose model is hostile: run as ``python -m tests.hostile_worker`` with a worker's env.

The fake sits at the runtime seam (``Runtime.load`` / ``LoadedModel.run``): it loads the real
ONNX model and answers every row as it would, except a batch whose first value is one of
``ACTIONS``' codes. Then it first tries that action, as code inside a model could, and answers
with the outcome as every row's ``label``. An action the sandbox answers by killing the process
never answers at all: the test sees the worker loop (or isolation child) die instead.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bastion.runtime.onnx import OnnxModel, OnnxRuntime
from bastion.settings import Settings
from bastion.worker import main

# outcomes, answered as the label
SUCCEEDED = 0  # the attempt worked: the sandbox failed
REFUSED = 1  # PermissionError (EACCES, EPERM)
NO_MORE_PROCESSES = 2  # fork refused (EAGAIN) before FORK_BOMB_BOUND forks
CHILD_KILLED = 3  # the program the attempt started was killed (SIGSYS) before it ran
OTHER_ERROR = 4

FORK_BOMB_BOUND = 2000


def _exec_shell(_: Settings) -> int:
    os.execv("/bin/sh", ["/bin/sh", "-c", "echo pwned"])  # noqa: S606 - the attempt under test
    return SUCCEEDED  # pragma: no cover - exec does not return


def _subprocess_shell(_: Settings) -> int:
    done = subprocess.run(["/bin/sh", "-c", "exit 0"], check=False, timeout=10)
    return CHILD_KILLED if done.returncode == -31 else SUCCEEDED if done.returncode == 0 else OTHER_ERROR


def _read(path: Path) -> int:
    with open(path, "rb") as fh:
        fh.read(1)
    return SUCCEEDED


def _read_shadow(_: Settings) -> int:
    return _read(Path("/etc/shadow"))


def _read_database(settings: Settings) -> int:
    return _read(settings.data_dir / "bastion.db")


def _write_artifact(settings: Settings) -> int:
    with open(settings.resolved_artifact_dir / "planted", "wb") as fh:
        fh.write(b"x")
    return SUCCEEDED


def _connect_postgres(_: Settings) -> int:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=5).close()
    except ConnectionRefusedError:
        return SUCCEEDED  # it reached the port (nothing listened): the sandbox let it through
    return SUCCEEDED


def _netlink(_: Settings) -> int:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()
    return SUCCEEDED


def _fork_bomb(_: Settings) -> int:
    """Fork until refused (bounded): children wait on a pipe, then all are let go and reaped."""
    read_end, write_end = os.pipe()
    children: list[int] = []
    outcome = SUCCEEDED
    try:
        for _ in range(FORK_BOMB_BOUND):
            pid = os.fork()
            if pid == 0:
                os.close(write_end)
                os.read(read_end, 1)
                os._exit(0)
            children.append(pid)
    except BlockingIOError:
        outcome = NO_MORE_PROCESSES
    finally:
        os.close(write_end)
        os.close(read_end)
        for pid in children:
            os.waitpid(pid, 0)
    return outcome


ACTIONS: dict[str, tuple[int, Callable[[Settings], int]]] = {
    "exec_shell": (9001, _exec_shell),
    "subprocess_shell": (9002, _subprocess_shell),
    "read_shadow": (9003, _read_shadow),
    "read_database": (9004, _read_database),
    "write_artifact": (9005, _write_artifact),
    "connect_postgres": (9006, _connect_postgres),
    "netlink_socket": (9007, _netlink),
    "fork_bomb": (9008, _fork_bomb),
}
_BY_CODE = {code: action for code, action in ACTIONS.values()}


def attempt(action: Callable[[Settings], int], settings: Settings) -> int:
    try:
        return action(settings)
    except PermissionError:
        return REFUSED
    except OSError as exc:
        return REFUSED if exc.errno in (errno.EACCES, errno.EPERM) else OTHER_ERROR


class HostileModel:
    def __init__(self, model: OnnxModel, settings: Settings) -> None:
        self.model = model
        self.settings = settings

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = next(iter(inputs.values()))
        action = _BY_CODE.get(int(first.flat[0])) if first.size else None
        outputs = self.model.run(inputs)
        if action is not None:
            outcome = attempt(action, self.settings)
            outputs["label"] = np.full(outputs["label"].shape, outcome, dtype=np.int64)
        return outputs

    def terminate(self) -> None:
        self.model.terminate()


class HostileRuntime:
    def __init__(self, settings: Settings) -> None:
        self.onnx = OnnxRuntime(settings.ort_intra_threads, settings.ort_inter_threads)
        self.settings = settings

    def load(self, artifact: bytes) -> HostileModel:
        return HostileModel(self.onnx.load(artifact), self.settings)


if __name__ == "__main__":
    settings = Settings()
    main.run(settings, HostileRuntime(settings))
