"""A one-node Slurm cluster on this machine, started in seconds: for tests/test_slurm.py and the
sweep benchmark (tests/bench/slurm_sweep.py). Not a fake: Debian's ``slurm-wlm`` and ``munge``.

:class:`LocalSlurm` writes a minimal ``slurm.conf`` under a private folder (state, spool, logs,
pid files, its own munge key and socket, ports chosen free), and starts ``munged``,
``slurmctld`` and ``slurmd`` as child processes of this one: as root (``SlurmUser=root``),
without cgroups (``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``), one node of
``cpus`` CPUs whatever the machine has (``SlurmdParameters=config_overrides``). Commands talk to
it through ``SLURM_CONF`` (:meth:`LocalSlurm.env`). :meth:`LocalSlurm.stop` ends exactly the
processes it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")
NODE = "attnnode"


def missing() -> str:
    """Why a local cluster cannot start here, or '' when it can."""
    if os.geteuid() != 0:
        return ("not root: slurmctld, slurmd and munged run as root here (SlurmUser=root), as "
                "in CI")
    absent = [name for name in (*DAEMONS, *COMMANDS, "munge")
              if not shutil.which(name) and not Path(f"/usr/sbin/{name}").exists()]
    if absent:
        return (f"{', '.join(absent)} not installed: apt-get install -y slurm-wlm munge (.ci/run "
                "does so when it runs as root with apt)")
    return ""


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalSlurm:
    """slurmctld + slurmd on localhost with a private configuration under ``root``."""

    def __init__(self, root: Path, *, cpus: int = 4) -> None:
        self.root = Path(root)
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.processes: list[subprocess.Popen] = []

    def env(self, **more: str) -> dict[str, str]:
        """This environment, talking to this cluster, without another job's Slurm variables."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        return {**base, "SLURM_CONF": str(self.conf), **more}

    def _write_config(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        ctld_port, slurmd_port = _free_ports(2)
        host = socket.gethostname()
        r = self.root
        self.conf.write_text("\n".join([
            f"ClusterName=attn{ctld_port}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r / 'munge.sock'}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "MailProg=/bin/true",
            "PlugStackConfig=/dev/null",
            "MinJobAge=3600",
            f"NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={self.cpus} "
            "RealMemory=1000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def _start(self, *argv: str) -> None:
        log = open(self.root / "log" / f"{Path(argv[0]).name}.out", "wb")  # noqa: SIM115
        # A session of their own: a Ctrl-C (or timeout's signal) to this process group leaves
        # them up, so that stop() can still cancel the jobs before ending them.
        self.processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env=self.env(),
                                               start_new_session=True))
        log.close()

    def start(self, timeout_s: float = 30.0) -> LocalSlurm:
        """Start munged, slurmctld and slurmd; return once the node is idle."""
        self._write_config()
        r = self.root
        self._start(_binary("munged"), "--foreground", "--force", f"--socket={r / 'munge.sock'}",
                    f"--key-file={r / 'munge.key'}", f"--log-file={r / 'log' / 'munged.log'}",
                    f"--pid-file={r / 'munged.pid'}", f"--seed-file={r / 'munged.seed'}")
        self._wait(lambda: (r / "munge.sock").exists(), timeout_s, "munged")
        self._start(_binary("slurmctld"), "-D", "-i", "-f", str(self.conf))
        self._start(_binary("slurmd"), "-D", "-f", str(self.conf), "-N", NODE)
        self._wait(self._idle, timeout_s, "slurmctld and slurmd")
        return self

    def _idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
        return bool(out) and out[0] in ("idle", "mix", "alloc")

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"{p.name}: {p.read_text(errors='replace')[-800:]}"
                                 for p in sorted((self.root / "log").glob("*")))
                self.stop()
                raise RuntimeError(f"{what} did not start ({', '.join(dead) or 'timeout'})\n"
                                   f"{logs}")
            time.sleep(0.2)

    def run(self, *argv: str, check: bool = True, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A Slurm command (or any command) against this cluster."""
        return subprocess.run(list(argv), cwd=cwd, env=env or self.env(), capture_output=True,
                              text=True, timeout=120, check=check)

    def jobs(self) -> list[str]:
        """Jobs not yet ended (array tasks one by one)."""
        return self.run("squeue", "-h", "-r", "-o", "%i").stdout.split()

    def wait_all(self, timeout_s: float = 600.0) -> float:
        """Wait until no job is pending or running; returns the seconds waited."""
        start = time.monotonic()
        while self.jobs():
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"jobs still running after {timeout_s:g} s: {self.jobs()}")
            time.sleep(0.25)
        return time.monotonic() - start

    def states(self, job: str) -> dict[str, str]:
        """``{job id: state}`` of a job or every task of an array (ended jobs stay known for
        MinJobAge)."""
        out = self.run("scontrol", "-o", "show", "job", job).stdout
        states = {}
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            task = fields.get("ArrayTaskId")
            key = f"{fields['ArrayJobId']}_{task}" if task else fields["JobId"]
            states[key] = fields["JobState"]
        return states

    def stop(self) -> None:
        """Cancel this cluster's jobs, then end the daemons this object started (only those)."""
        if self.processes and all(p.poll() is None for p in self.processes):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.run("scancel", "--user=root", check=False)
                deadline = time.monotonic() + 15
                while self.jobs() and time.monotonic() < deadline:
                    time.sleep(0.2)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
            if process.poll() is None:
                process.kill()
                process.wait(5)
        self.processes.clear()

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
