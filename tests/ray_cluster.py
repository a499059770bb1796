"""A throwaway one-node Ray cluster for tests and benchmarks: `ray start --head --block` as a child process.

`start_head()` runs the head (GCS, raylet, the runtime-env agent; no dashboard, no usage statistics) with
a temporary folder of its own, a free GCS port, `--num-cpus` CPUs and no GPUs, in a new session, and waits
until it says it is up. `stop_head()` sends SIGTERM to that session's process group (the head, its
daemons, their workers and anything they started), SIGKILL to what is left, and deletes the folder:
only processes this helper started are signalled (by the group id, never by name; no `ray stop`).

Ray binds its GCS and raylet to every interface and replaces 127.0.0.1 by the machine's address (Ray has
no option to listen on the loopback only), so the head requires a token (`RAY_AUTH_MODE=token`, a random
`RAY_AUTH_TOKEN` per cluster, given to clients by `env()`): nobody else can submit work to it.

Ray missing (`pip install 'autodiff-opt[ray]'`) is an error, never a skip: CI installs the extra.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "install it with `pip install 'autodiff-opt[ray]'` (CI installs the extra: Makefile, .ci/run)"


class RayUnavailable(RuntimeError):
    """Ray is not installed or its head did not start; the message says why."""


@dataclass
class RayHead:
    root: Path
    address: str
    token: str
    proc: subprocess.Popen

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose Ray clients reach this head (and only this one)."""
        return {**(os.environ if base is None else base), "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}

    def log(self) -> str:
        path = self.root / "head.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_program() -> str:
    exe = Path(sys.executable).with_name("ray")
    if not exe.exists():
        raise RayUnavailable(f"Ray is not installed ({exe} not found): {INSTALL_HINT}")
    return str(exe)


def start_head(env: dict[str, str], num_cpus: int = 2, timeout: float = 90.0) -> RayHead:
    """The head of a new cluster, its workers with `env` (PYTHONPATH, the cache folder...); raises RayUnavailable."""
    program = ray_program()
    root = Path(tempfile.mkdtemp(prefix="adray-"))  # short: Ray's socket paths must stay under 108 characters
    port = _free_port()
    head = RayHead(root, f"127.0.0.1:{port}", secrets.token_hex(16), None)  # type: ignore[arg-type]
    command = [program, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
               f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
               "--object-store-memory=100000000",  # 100 MB, not 30% of the memory: the tasks pass no data
               f"--temp-dir={root}"]
    log = open(root / "head.log", "w")
    head.proc = subprocess.Popen(command, env=head.env(env), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while "Ray runtime started" not in head.log():
            if head.proc.poll() is not None:
                raise RayUnavailable(f"`ray start --head` exited with {head.proc.returncode}:\n{head.log()}")
            if time.monotonic() > deadline:
                raise RayUnavailable(f"the Ray head did not start within {timeout:.0f}s:\n{head.log()}")
            time.sleep(0.2)
    except BaseException:
        stop_head(head)
        raise
    return head


def stop_head(head: RayHead, grace: float = 5.0) -> None:
    """SIGTERM to the head's process group, SIGKILL after `grace` s to what is left, then delete its folder."""
    group = head.proc.pid  # start_new_session: the head leads its own group
    try:
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(group):
            time.sleep(0.2)
        if _group_alive(group):
            os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        head.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    shutil.rmtree(head.root, ignore_errors=True)


def _group_alive(group: int) -> bool:
    """Whether any process of the group is still alive (zombies not counted)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False
