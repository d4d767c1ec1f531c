"""The model process's sandbox (``bastion.worker.confine``, docs/sandbox.md), tried from inside.

Unit level: a forked child confines itself and tries each hostile action; every one is refused
(or the child is killed by SIGSYS). End to end: a worker whose runtime is hostile
(``tests/hostile_worker.py``, a fake at the runtime seam) runs each action as a job, against a real
stack; each is refused while the worker keeps answering, and an ``execve`` kills the worker loop,
which the prefork master forks again.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from bastion import codec, demo
from bastion.embedded.redis_server import EmbeddedRedis
from bastion.security import certs
from bastion.settings import Settings
from bastion.worker import confine as confine_module
from bastion.worker.confine import Confinement, Landlock, confine
from bastion.worker.isolation import ChildDied, run_isolated
from tests import hostile_worker as hostile
from tests.support import LIVE, Stack, running, wait_until
from tests.test_tls import needs_tls_redis

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or Landlock.abi() < 4, reason="needs root and Landlock ABI >= 4")

REPO = Path(__file__).resolve().parents[2]
# RLIMIT_NPROC counts per real uid, machine-wide: these tests' fork bombs run under uids of their own,
# so that workers of other tests running meanwhile (confined to 65532) keep their processes.
UNIT_UID = 65533
WORKER_UID = 65531 if "worker_uid" in Settings.model_fields else 65532  # the setting, once it exists
PREDICT = f"/v1/models/{demo.MODEL_NAME}/predict"
ROW = [1.0] * 30


# unit level: confine() in a forked child ---------------------------------------------------


def _in_confined_child(c: Confinement, body: Callable[[], object]) -> tuple[int, object]:
    """Fork, confine the child, run ``body`` there; (the child's wait status, what body returned)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            confine(c)
            os.write(write_end, json.dumps(body()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    return status, json.loads(data) if data else None


def _outcome(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as exc:
        return type(exc).__name__
    return "succeeded"


@pytest.fixture
def unit(tmp_path: Path) -> Confinement:
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "model").write_bytes(b"weights")
    (tmp_path / "bastion.db").write_bytes(b"secrets")
    return Confinement(uid=UNIT_UID, read_paths=(tmp_path / "artifacts",), connect_ports=(6379,), hidden=(tmp_path,))


def test_a_confined_process_is_refused_every_hostile_action(unit: Confinement, tmp_path: Path) -> None:
    """Each attempt fails with the errno the layer that stops it gives; what the worker needs works."""

    def attempts() -> dict[str, object]:
        children: list[int] = []
        r, w = os.pipe()

        def fork_bomb() -> None:
            for _ in range(hostile.FORK_BOMB_BOUND):
                pid = os.fork()
                if pid == 0:
                    os.close(w)
                    os.read(r, 1)
                    os._exit(0)
                children.append(pid)

        out = {
            "shadow": _outcome(lambda: open("/etc/shadow", "rb").close()),
            "database": _outcome(lambda: open(tmp_path / "bastion.db", "rb").close()),
            "write_artifact": _outcome(lambda: open(tmp_path / "artifacts" / "planted", "wb").close()),
            "postgres": _outcome(lambda: socket.create_connection(("127.0.0.1", 5432), timeout=2).close()),
            "netlink": _outcome(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()),
            "udp": _outcome(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()),
            # MPTCP: a stream socket Landlock's TCP rules do not see (the protocol is refused instead)
            "mptcp": _outcome(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262).close()),
            "sctp": _outcome(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132).close()),
            "fork_bomb": _outcome(fork_bomb),
            "forks_before_refused": len(children),
            "artifact": (tmp_path / "artifacts" / "model").read_text(),
            "import": __import__("email.mime.text").__name__,  # a lazy import still works
            "uid": os.getuid(),
        }
        os.close(w)
        for pid in children:
            os.waitpid(pid, 0)
        return out

    status, out = _in_confined_child(unit, attempts)
    assert os.WIFEXITED(status), status
    assert isinstance(out, dict)
    assert out["shadow"] == out["database"] == out["write_artifact"] == "PermissionError"
    assert out["postgres"] == "PermissionError"  # Landlock: TCP connect to the Redis port only
    assert out["netlink"] == out["udp"] == "PermissionError"  # seccomp: socket() EPERM
    assert out["mptcp"] == out["sctp"] == "PermissionError"  # seccomp: only protocols 0, TCP, UDP
    assert out["fork_bomb"] == "BlockingIOError"  # RLIMIT_NPROC, per real uid
    assert out["forks_before_refused"] < unit.max_procs
    assert out["artifact"] == "weights" and out["import"] == "email"
    assert out["uid"] == unit.uid
    assert not (tmp_path / "artifacts" / "planted").exists()


@pytest.mark.parametrize(
    "attempt",
    [
        lambda: os.execv("/bin/sh", ["/bin/sh", "-c", "true"]),  # noqa: S606
        lambda: os.execve("/bin/sh", ["/bin/sh"], {}),  # noqa: S606
        lambda: ctypes.CDLL(None).unshare(0x10000000),  # CLONE_NEWUSER (os.unshare: Python 3.12)
    ],
    ids=["execv", "execve", "unshare"],
)
def test_exec_and_namespaces_kill_the_confined_process(unit: Confinement, attempt: Callable[[], object]) -> None:
    status, out = _in_confined_child(unit, attempt)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS, (status, out)


class _Model:
    def __init__(self, act: Callable[[], object] | None = None) -> None:
        self.act = act

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.act is not None:
            self.act()
        return {"y": np.asarray(inputs["x"]) * 2}

    def terminate(self) -> None:
        pass


def _isolated(model: _Model) -> str:
    blob = codec.encode({"x": np.ones((1, 2), dtype=np.float32)})
    try:
        run_isolated(model, blob, lambda _child: None)
    except ChildDied as exc:
        return str(exc)
    except Exception as exc:
        return type(exc).__name__
    return "answered"


@pytest.mark.parametrize(
    "act",
    [
        lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
        lambda: os.fork(),
    ],
    ids=["socket", "fork"],
)
def test_the_isolation_child_is_killed_for_any_socket_or_process(unit: Confinement, act: Callable[[], object]) -> None:
    """Inside a confined worker, the isolation child may not open a socket (even TCP to the Redis
    port, which its worker may) nor start a process: SIGSYS."""

    def body() -> list[str]:
        return [_isolated(_Model(act)), _isolated(_Model())]

    status, out = _in_confined_child(unit, body)
    assert os.WIFEXITED(status), status
    assert isinstance(out, list)
    assert out[0] == f"the process running the job died (signal {int(signal.SIGSYS)})"
    assert out[1] != out[0] and "died" not in out[1]  # an ordinary job still runs in a child


def test_confinement_off_applies_nothing() -> None:
    _, out = _in_confined_child(
        Confinement(enabled=False), lambda: [os.getuid(), _outcome(lambda: open("/etc/shadow", "rb").close())]
    )
    assert out == [0, "succeeded"]
    assert not confine_module._confined


# end to end: a hostile runtime in a real worker ------------------------------------------


def _spawn_hostile(stack: Stack, name: str = "worker-0") -> None:
    log = open(stack.root / f"{name}.log", "ab")
    stack.procs[name] = subprocess.Popen(
        [sys.executable, "-m", "tests.hostile_worker"],
        env={
            **stack.env,
            "BASTION_WORKER_NAME": name,
            "BASTION_LOG_LEVEL": "info",
            "BASTION_WORKER_UID": str(WORKER_UID),
        },
        cwd=REPO,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose only worker runs the hostile runtime. Redis listens on TCP, as in production
    (a socket path over 100 characters makes the embedded one do so): the worker can then drop to
    its unprivileged uid (the embedded unix socket is mode 0700, root's)."""
    root = tmp_path_factory.mktemp("confinement")
    stack = Stack(root, workers=0, max_deliveries=3)
    stack.redis = EmbeddedRedis(root / ("redis-on-tcp-" + "x" * 100))
    LIVE.append(stack)
    try:
        stack.start()
        _spawn_hostile(stack)
        with stack.client() as http:
            wait_until(lambda: http.post(PREDICT, json={"inputs": [ROW]}).status_code == 200, 60, "the hostile worker")
        yield stack
    finally:
        LIVE.remove(stack)
        stack.stop()


def _predict(stack: Stack, row: list[float], timeout: float = 30.0) -> tuple[int, dict[str, object]]:
    with stack.client(timeout=timeout) as http:
        response = http.post(PREDICT, json={"inputs": [row]})
    return response.status_code, response.json()


def _labels(body: dict[str, object]) -> list[int]:
    outputs = body["outputs"]
    assert isinstance(outputs, dict), body
    labels = outputs["label"]
    assert isinstance(labels, list)
    return [int(v) for v in labels]


def test_the_worker_confined_itself_to_its_unprivileged_uid(stack: Stack) -> None:
    confined = [json.loads(line) for line in stack.log("worker-0").splitlines() if '"confined"' in line]
    assert confined and confined[-1]["uid"] == WORKER_UID, stack.log("worker-0")[-2000:]
    assert confined[-1]["landlock_abi"] >= 4 and confined[-1]["seccomp"] is True


def test_a_confined_loop_dies_with_its_master(tmp_path: Path) -> None:
    """The uid drop clears the parent-death signal (a change of credentials does): it is set again,
    so a master killed with SIGKILL takes its confined loop with it (no orphan serving on)."""
    with running(tmp_path / "orphan", workers=1, gateways=0, worker_uid=WORKER_UID) as own:
        master = own.procs["worker-0"].pid

        def loops() -> list[int]:
            found = []
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    except (OSError, ValueError, IndexError):
                        continue
                    if ppid == master:
                        found.append(int(entry.name))
            return found

        def uid(pid: int) -> str:
            try:
                return Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0]
            except OSError:
                return ""

        wait_until(lambda: any(uid(p) == str(WORKER_UID) for p in loops()), 30, "the loop to drop to its uid")
        (loop,) = loops()
        os.kill(master, signal.SIGKILL)
        own.procs["worker-0"].wait(10)
        wait_until(lambda: not Path(f"/proc/{loop}").exists() or _zombie(loop), 10, "the loop to die with its master")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


SURVIVED = {
    "read_shadow": hostile.REFUSED,
    "read_database": hostile.REFUSED,
    "write_artifact": hostile.REFUSED,
    "connect_postgres": hostile.REFUSED,
    "netlink_socket": hostile.REFUSED,
    "fork_bomb": hostile.NO_MORE_PROCESSES,
    "subprocess_shell": hostile.CHILD_KILLED,  # the shell's process dies at execve; the worker lives
}


@pytest.mark.parametrize("action", sorted(SURVIVED))
def test_a_hostile_model_is_refused_and_the_worker_keeps_answering(stack: Stack, action: str) -> None:
    code, _ = hostile.ACTIONS[action]
    status, body = _predict(stack, [float(code), *ROW[1:]])
    assert status == 200, body
    assert _labels(body) == [SURVIVED[action]], f"{action}: {body}"
    status, body = _predict(stack, ROW)
    assert status == 200 and _labels(body)[0] in (0, 1)  # an ordinary prediction, right after
    assert not (stack.settings.resolved_artifact_dir / "planted").exists()


def test_exec_kills_the_worker_loop_and_the_worker_keeps_answering(stack: Stack) -> None:
    """``execve`` is killed (SIGSYS): the job's deliveries each kill their process (the worker loop,
    then an isolation child per redelivery) until it is dead-lettered; the master forks the loop
    again in milliseconds and ordinary predictions are answered throughout."""
    before = stack.log("worker-0").count("signal 31")
    code, _ = hostile.ACTIONS["exec_shell"]
    status, body = _predict(stack, [float(code), *ROW[1:]], timeout=60)
    assert status != 200, body
    assert "pwned" not in stack.log("worker-0")
    wait_until(lambda: stack.log("worker-0").count("signal 31") > before, 10, "the loop's death to be logged")
    log = stack.log("worker-0")
    assert '"how": "signal 31"' in log  # the worker loop, at the first delivery
    assert '"reason": "the process running the job died (signal 31)"' in log  # isolation children after
    assert "job_dead_lettered" in log
    started = time.monotonic()
    status, body = _predict(stack, ROW)
    assert status == 200, body
    assert time.monotonic() - started < 10


# over TLS: the key is root's (0600), read again on every reconnect -----------------------


@needs_tls_redis
def test_a_confined_worker_reconnects_over_tls_and_survives_a_rotation(tmp_path: Path) -> None:
    """The worker drops to its uid keeping only CAP_DAC_READ_SEARCH (Landlock bounds it to its own
    files): a reconnect after the drop still reads its 0600 key; a rotation replaces the files, and
    the loop is forked again, confined to the new ones, answering on."""
    with running(tmp_path, secure=True, workers=1, log_level="info") as stack, stack.client() as http:
        assert http.post(PREDICT, json={"inputs": [ROW]}).status_code == 200
        confined = [json.loads(line) for line in stack.log("worker-0").splitlines() if '"confined"' in line]
        assert confined[-1]["uid"] == 65532 and confined[-1]["capabilities"] == "CAP_DAC_READ_SEARCH"
        client = stack.redis_client()
        try:
            assert client.client_kill_filter(_type="normal", skipme=True) >= 1  # the worker reconnects
        finally:
            client.close()
        wait_until(lambda: http.post(PREDICT, json={"inputs": [ROW]}).status_code == 200, 20, "a reconnect")
        certs.rotate(stack.certs)
        wait_until(lambda: "tls_files_replaced" in stack.log("worker-0"), 20, "the worker loop to see the rotation")
        wait_until(lambda: stack.log("worker-0").count('"confined"') >= 2, 20, "a new loop")
        assert http.post(PREDICT, json={"inputs": [ROW]}).status_code == 200
