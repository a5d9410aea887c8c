"""A throw-away single-node SLURM cluster on localhost, for the sweep tests.

It needs the Debian packages `slurm-wlm` and `munge` (`apt-get install -y slurm-wlm munge`) and
root (slurmd launches jobs). Everything lives in one temporary folder: its own munge key and
munged socket, a generated slurm.conf, state/spool/log folders and free TCP ports, so it does
not touch a system SLURM or munge. Client commands find it through the SLURM_CONF variable in
`cluster.env`.

    cluster = SlurmCluster.start()      # raises ClusterError with the daemons' logs on failure
    cluster.run("sinfo")
    cluster.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel", "scontrol")
PARTITION = "debug"
START_TIMEOUT = 90.0  # seconds to wait for the node to show up idle


class ClusterError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise ClusterError("cannot read MemTotal from /proc/meminfo")


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} missing)"
    return "\n".join(lines[-n:])


def slurm_conf(root: Path, cpus: int, mem_mb: int, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=sweeptest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MinJobAge=3600
KillWait=10
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
            self.env.pop(var, None)
        self.partition = PARTITION

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def start(cls, timeout: float = START_TIMEOUT) -> SlurmCluster:
        missing = missing_binaries()
        if missing:
            raise ClusterError(f"missing binaries: {', '.join(missing)} (apt-get install -y slurm-wlm munge)")
        if os.geteuid() != 0:
            raise ClusterError("the test cluster must run as root (slurmd launches jobs as root)")
        cluster = cls(Path(tempfile.mkdtemp(prefix="slurm-")))
        try:
            cluster._start(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self, timeout: float) -> None:
        root = self.root
        for sub in ("munge", "state", "spool", "run", "log"):
            (root / sub).mkdir(mode=0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        subprocess.run(
            ["munged", "--force", f"--socket={root}/munge/munge.socket", f"--key-file={key}",
             f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
             f"--seed-file={root}/munge/munged.seed"],
            check=True, capture_output=True, text=True,
        )
        cpus = os.cpu_count() or 1
        mem = max(256, int(_mem_total_mb() * 0.9))
        self.conf.write_text(slurm_conf(root, cpus, mem, _free_port(), _free_port()))
        for cmd in (["slurmctld", "-i"], ["slurmd", "-N", "localhost"]):
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ClusterError(f"{cmd[0]} failed to start: {proc.stderr.strip()}\n{self.logs()}")
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            state = proc.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise ClusterError(f"node not idle after {timeout:.0f} s (sinfo: {state!r})\n{self.logs()}")

    def stop(self) -> None:
        if self.conf.exists():
            self.run("scancel", "--full", "--signal=KILL", "--partition", self.partition, check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.root / "run" / f"{name}.pid"
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{_tail(self.root / 'log' / name)}"
            for name in ("slurmctld.log", "slurmd.log", "munged.log")
        )

    def job_states(self, job_id: str) -> dict[str, str]:
        """{job id (array tasks as 123_4): state} for the jobs SLURM still knows about."""
        proc = self.run("squeue", "-h", "-r", "-t", "all", "-j", str(job_id), "-o", "%i %T", check=False)
        states = {}
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    def wait_done(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait until no task of the job is pending, running or requeued; return the final states."""
        active = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                  "REQUEUE_FED", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.job_states(job_id)
            if states and not any(s in active for s in states.values()):
                return states
            time.sleep(1.0)
        raise ClusterError(f"job {job_id} not done after {timeout:.0f} s: {states}\n{self.logs()}")
