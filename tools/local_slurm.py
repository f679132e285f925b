#!/usr/bin/env python3
"""A real single-node Slurm on this machine, to try the pipeline's Slurm profile without a cluster.

    python tools/local_slurm.py start    # munged, slurmctld and slurmd; returns once the node is idle
    python tools/local_slurm.py status   # what is running, and `sinfo`
    python tools/local_slurm.py stop     # cancels this cluster's jobs, stops exactly the daemons it started

Needs root (slurmd runs jobs as their users) and the Debian packages that `bash run.sh setup` installs
(slurmctld slurmd slurm-client munge). There is no systemd here: the daemons are started by hand, with
their state, logs and pid files in $CARSO_SLURM_DIR (default /tmp/carso-slurm). The configuration has to
be /etc/slurm/slurm.conf (the executor's inner `srun` does not keep SLURM_CONF); a configuration this
script did not write is never touched: `start` refuses instead. Every command it runs has a time limit.

The node advertises two placeholder GPUs (GRES `gpu`, type `placeholder`, backed by /dev/null and /dev/zero),
so a job that asks for GPUs (`--gpus=1`, `--gpus=placeholder:1`) is scheduled as on a GPU cluster and a job
that asks for a GPU model this node lacks is refused at submission. There is no GPU behind them: torch in
such a job finds no CUDA device and `runtime.device: auto` runs on the CPU. Slurm sets no CUDA variables
for them (`no_gpu_env`), so a job sees the GPUs of the environment it was submitted from.
"""
from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

STATE = Path(os.environ.get("CARSO_SLURM_DIR", "/tmp/carso-slurm"))
CONF = Path("/etc/slurm/slurm.conf")
GRES_CONF = CONF.parent / "gres.conf"  # Slurm reads it beside slurm.conf
GPU_TYPE, GPU_DEVICES = "placeholder", ("/dev/null", "/dev/zero")  # see the module docstring
MARKER = "# Written by carso tools/local_slurm.py"
MUNGE_USER = "munge"
PACKAGES = {"munged": "munge", "mungekey": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd",
            "sinfo": "slurm-client", "squeue": "slurm-client", "scancel": "slurm-client", "runuser": "util-linux"}
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order: the reverse of the start order
COMMAND_TIMEOUT = 30  # seconds, for each command this script runs
READY_TIMEOUT = 90  # seconds for the node to come up idle after the daemons start
STOP_TIMEOUT = 30  # seconds for running jobs to end and for each daemon to exit


class SlurmError(RuntimeError):
    """A failure with a one-line explanation for the user."""


def run(args: list[str], timeout: float = COMMAND_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(args)}` did not finish within {timeout:.0f} s") from None
    if check and result.returncode != 0:
        raise SlurmError(f"`{' '.join(args)}` failed: {(result.stderr or result.stdout).strip()}")
    return result


def tool(name: str) -> str:
    """The path of an installed Slurm or munge command (the daemons live in /usr/sbin)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise SlurmError(f"{name} is not installed (Debian package {PACKAGES[name]}): run `bash run.sh setup`")
    return path


def pid_file(daemon: str) -> Path:
    # munged runs as the munge user and writes only inside its own directory
    return STATE / "munge" / "munged.pid" if daemon == "munged" else STATE / f"{daemon}.pid"


def alive(pid: int, name: str) -> bool:
    """Whether process `pid` is running (not a zombie) and is called `name`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
    return comm == name and state != "Z"


def running_pid(daemon: str) -> int | None:
    """The pid in the daemon's pid file, if that process is alive and is that daemon."""
    try:
        pid = int(pid_file(daemon).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if alive(pid, daemon) else None


def node_state() -> str:
    """The node's state as sinfo reports it (idle, mixed, down*, ...), or "" when slurmctld does not answer."""
    result = run([tool("sinfo"), "--noheader", "--format=%T"], timeout=10, check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def slurm_conf(node_line: str) -> str:
    """A minimal slurm.conf: one node (this machine, as `slurmd -C` sees it), one partition, no accounting."""
    return f"""{MARKER} for a local single-node cluster; `python tools/local_slurm.py stop` removes it.
ClusterName=carso-local
SlurmctldHost={socket.gethostname().split('.')[0]}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={STATE / 'munge' / 'munge.socket'}
StateSaveLocation={STATE / 'slurmctld'}
SlurmdSpoolDir={STATE / 'slurmd'}
SlurmctldPidFile={pid_file('slurmctld')}
SlurmdPidFile={pid_file('slurmd')}
SlurmctldLogFile={STATE / 'slurmctld.log'}
SlurmdLogFile={STATE / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
# each job step is bound to the CPUs it was given, as on a real cluster: `--cores all` inside a job = its CPUs
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# start a submitted job at once (Slurm's default lets batch jobs wait up to 3 s, for clusters with many submissions)
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# finished jobs stay visible to squeue / scontrol for a day (there is no accounting database for sacct)
MinJobAge=86400
GresTypes=gpu
{node_line} Gres=gpu:{GPU_TYPE}:{len(GPU_DEVICES)} State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def gres_conf() -> str:
    """One placeholder GPU per device file (a GPU GRES needs a File; nothing ever opens it)."""
    return f"{MARKER}\n" + "".join(f"Name=gpu Type={GPU_TYPE} File={dev} Flags=no_gpu_env\n" for dev in GPU_DEVICES)


def ours(path: Path) -> bool:
    return path.exists() and MARKER in path.read_text()


def write_conf() -> None:
    for path in (CONF, GRES_CONF):
        if path.exists() and not ours(path):
            raise SlurmError(f"{path} exists and was not written by this script: this machine already has a Slurm "
                             "configuration; use that cluster, or move the file away first")
    node_line = run([tool("slurmd"), "-C"]).stdout.splitlines()[0]  # NodeName=... CPUs=... RealMemory=...
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(slurm_conf(node_line))
    GRES_CONF.write_text(gres_conf())


def start_munge() -> None:
    munge_dir = STATE / "munge"
    munge_dir.mkdir(mode=0o755)
    user = pwd.getpwnam(MUNGE_USER)
    key = munge_dir / "munge.key"
    run([tool("mungekey"), "--create", f"--keyfile={key}"])
    for path in (munge_dir, key):
        os.chown(path, user.pw_uid, user.pw_gid)
    key.chmod(0o600)
    run([tool("runuser"), "-u", MUNGE_USER, "--", tool("munged"), f"--key-file={key}",
         f"--socket={munge_dir / 'munge.socket'}", f"--pid-file={pid_file('munged')}",
         f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}"])
    wait_for(lambda: running_pid("munged") is not None, 10, "munged did not start (see "
             f"{munge_dir / 'munged.log'})")


def wait_for(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SlurmError(message)
        time.sleep(0.5)


def start() -> None:
    if os.geteuid() != 0:
        raise SlurmError("run this as root: slurmd has to run jobs as their users")
    for name in PACKAGES:
        tool(name)
    if all(running_pid(d) for d in DAEMONS) and node_state() in ("idle", "mixed", "allocated"):
        print(f"local Slurm already running (state in {STATE})")
        return
    stop(quiet=True)  # whatever is left of an earlier start
    if STATE.exists():
        shutil.rmtree(STATE)
    STATE.mkdir(parents=True, mode=0o755)
    for sub in ("slurmctld", "slurmd"):
        (STATE / sub).mkdir(mode=0o755)
    try:
        write_conf()
        start_munge()
        run([tool("slurmctld")])  # both daemonise once they are listening
        run([tool("slurmd")])
        wait_for(lambda: node_state() == "idle", READY_TIMEOUT,
                 f"the node did not become idle within {READY_TIMEOUT} s (sinfo: {node_state() or 'no answer'}; "
                 f"logs in {STATE})")
    except BaseException:
        stop(quiet=True)
        raise
    print(f"local Slurm is up: partition `local`, node {socket.gethostname().split('.')[0]} idle "
          f"(state and logs in {STATE}); stop it with `python tools/local_slurm.py stop`")


def stop_daemon(daemon: str) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT s, to the process in the daemon's pid file (if it is that daemon)."""
    pid = running_pid(daemon)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        try:
            wait_for(lambda: not alive(pid, daemon), STOP_TIMEOUT, "")
        except SlurmError:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not alive(pid, daemon), 5, f"{daemon} (pid {pid}) does not exit")
    pid_file(daemon).unlink(missing_ok=True)


def stop(quiet: bool = False) -> None:
    """Cancel this cluster's jobs, stop the daemons this script started, remove its slurm.conf and gres.conf."""
    if running_pid("slurmctld") is not None and ours(CONF):
        jobs = run([tool("squeue"), "--noheader", "--format=%i", "--states=PENDING,RUNNING,SUSPENDED"],
                   check=False).stdout.split()
        if jobs:
            run([tool("scancel"), *jobs], check=False)
            wait_for(lambda: not run([tool("squeue"), "--noheader", "--format=%i",
                                      "--states=PENDING,RUNNING,SUSPENDED,COMPLETING"], check=False).stdout.split(),
                     STOP_TIMEOUT, f"jobs {', '.join(jobs)} were cancelled but did not end")
    for daemon in DAEMONS:
        stop_daemon(daemon)
    for path in (CONF, GRES_CONF):
        if ours(path):
            path.unlink()
    if not quiet:
        print("local Slurm stopped")


def status() -> int:
    pids = {d: running_pid(d) for d in DAEMONS}
    for daemon, pid in pids.items():
        print(f"{daemon:10s} {'running, pid ' + str(pid) if pid else 'not running'}")
    state = node_state() if pids["slurmctld"] else ""
    print(f"node       {state or 'unknown'}")
    return 0 if all(pids.values()) and state in ("idle", "mixed", "allocated") else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            start()
        elif args.command == "stop":
            stop()
        else:
            return status()
    except SlurmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
