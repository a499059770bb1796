"""A throwaway single-node SLURM cluster for tests and benchmarks: Debian's munge, slurmctld and slurmd.

`start_cluster()` writes a munge key and a slurm.conf into a new temporary folder, starts `munged` (as
the `munge` user, which Debian's package creates), `slurmctld` and `slurmd` (as root, in the foreground,
each a child of this process), and waits until the node is idle. `stop_cluster()` stops them by pid
and deletes the folder. Clients (sbatch, squeue, scontrol, submitit) find the cluster through
`SLURM_CONF`, which `start_cluster` sets in os.environ (and `stop_cluster` unsets).

Everything listens on 127.0.0.1 ports picked free at start; state, spool, logs and the munge socket
live in the temporary folder, so nothing of the machine's own SLURM or munge is used or changed.

Missing binaries or a machine that cannot run the daemons (not root: slurmd must be) are an error,
never a skip: CI (.ci/run) installs the packages, so their absence means a broken machine.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = ("install them with `apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge`"
                " (.ci/run does this on CI)")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun", "setpriv")


class SlurmUnavailable(RuntimeError):
    """The daemons are missing or did not start; the message says why (and where their logs are)."""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    cpus: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_binaries() -> None:
    missing = [name for name in DAEMONS if shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        raise SlurmUnavailable(f"SLURM/munge programs not found: {', '.join(missing)}: {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurmd must run as root to start jobs; run the SLURM tests as root (CI does)")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        raise SlurmUnavailable(f"there is no `munge` user (Debian's munge package creates it): {INSTALL_HINT}") from None


def _sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def slurm_conf(root: Path, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    """One node, `cpus` CPUs: more than the machine has are declared with config_overrides (benchmarks)."""
    overrides = "SlurmdParameters=config_overrides\n" if cpus > (os.cpu_count() or 1) else ""
    return f"""\
ClusterName=autodiff
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
KillWait=2
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=20
{overrides}NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _start_munge(root: Path) -> subprocess.Popen:
    munge = pwd.getpwnam("munge")
    folder = root / "munge"
    folder.mkdir(mode=0o700)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    for path in (folder, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    cmd = [_sbin("setpriv"), f"--reuid={munge.pw_uid}", f"--regid={munge.pw_gid}", "--clear-groups",
           _sbin("munged"), "--foreground", "--force", f"--socket={folder / 'munge.socket'}",
           f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}", f"--seed-file={folder / 'munged.seed'}",
           f"--log-file={folder / 'munged.log'}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(root / "munged.log", "w"))


def _wait(check, what: str, cluster: SlurmCluster, timeout: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not check():
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{name} exited with {proc.returncode} while waiting for {what};"
                                       f" its log ({cluster.root}):\n{cluster.log(name)}")
        if time.monotonic() > deadline:
            raise SlurmUnavailable(f"{what} not ready after {timeout:.0f}s; slurmctld log:\n{cluster.log('slurmctld')}"
                                   f"\nslurmd log:\n{cluster.log('slurmd')}")
        time.sleep(0.2)


def _node_idle(cluster: SlurmCluster) -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=cluster.env(), capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")


def start_cluster(cpus: int = 2, timeout: float = 60.0) -> SlurmCluster:
    """munged, slurmctld and slurmd on this machine, in a new temporary folder; raises SlurmUnavailable."""
    check_binaries()
    root = Path(tempfile.mkdtemp(prefix="autodiff-slurm-"))
    root.chmod(0o755)  # munged (user munge) must reach its own folder inside
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, cpus, _free_port(), _free_port()))
    cluster = SlurmCluster(root, conf, cpus)
    os.environ["SLURM_CONF"] = str(conf)
    try:
        cluster.procs["munged"] = _start_munge(root)
        _wait(lambda: (root / "munge" / "munge.socket").exists(), "the munge socket", cluster, timeout)
        cluster.procs["slurmctld"] = subprocess.Popen(
            [_sbin("slurmctld"), "-D", "-i", "-f", str(conf)], env=cluster.env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        cluster.procs["slurmd"] = subprocess.Popen(
            [_sbin("slurmd"), "-D", "-N", "localhost", "-f", str(conf)], env=cluster.env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait(lambda: _node_idle(cluster), "the SLURM node", cluster, timeout)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel every job, stop slurmd, slurmctld and munged by pid (SIGTERM, then SIGKILL), delete the folder."""
    if cluster.procs.get("slurmctld") and cluster.procs["slurmctld"].poll() is None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=cluster.env(), capture_output=True, timeout=30)
    for name in ("slurmd", "slurmctld", "munged"):
        proc = cluster.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if os.environ.get("SLURM_CONF") == str(cluster.conf):
        del os.environ["SLURM_CONF"]
    shutil.rmtree(cluster.root, ignore_errors=True)
