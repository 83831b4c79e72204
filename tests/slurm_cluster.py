"""Bring up (or reuse) a real two-node Slurm cluster on this one machine for the ``slurm`` tests.

WHY a real cluster: submitit's Slurm backend, ``sbatch --requeue``/``--signal``, ``srun`` rank
variables and the rendezvous across nodes are exactly the parts that break on users' clusters, and
no mock exercises them. Debian's slurmctld + slurmd + munge run fine as root in a container with a
minimal config (``proctrack/linuxproc``, ``task/none``: no cgroups, no systemd).

WHY network namespaces: the distro's slurmd is built without ``--enable-multiple-slurmd``, so two
slurmd on one network stack would fight over the node port and names. Each compute node here is a
network namespace (``pcn1``, ``pcn2``) joined by veth pairs to a bridge in the host namespace, with
its own UTS namespace so ``hostname`` (and gloo, which advertises the address its host name
resolves to) says the node's name. Addresses are private and exist only on this machine:
controller 10.77.0.1 on the bridge, nodes 10.77.0.11 and 10.77.0.12, names in ``/etc/hosts``
(between marker lines). A job's ranks on the two nodes therefore talk over a real (virtual) network:
MASTER_ADDR must name the first node of the job, as on a real cluster; 127.0.0.1 would not work.

``ensure_cluster()`` is idempotent:

1. a responding controller whose nodes are ours and usable is reused as is;
2. otherwise the packages are installed with apt-get when missing (needs root), the namespaces,
   a munge key and daemon are set up, our ``slurm.conf`` is written (only over a config that we
   wrote before), and slurmctld + one slurmd per node are (re)started and waited for.

It raises ``SlurmUnavailable`` with the reason only when the cluster cannot be had (not root, no
apt-get, package installation failed, no network-namespace permission, a foreign slurm.conf in the
way); the fixture turns that into a skip. Everything else (a daemon that does not come up) is an
error, not a skip.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
MUNGE_KEY = Path("/etc/munge/munge.key")
HOSTS = Path("/etc/hosts")
MARKER = "# written by powerclip tests/slurm_cluster.py"
PARTITION = "debug"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "iproute2", "util-linux"]
LOG_DIR = Path("/var/log/slurm")
LOCK = Path("/tmp/powerclip-slurm-bringup.lock")
BRIDGE, CONTROLLER_ADDR, PREFIX = "pcbr0", "10.77.0.1", 24
NODES = {"pcn1": "10.77.0.11", "pcn2": "10.77.0.12"}  # node name (= netns name) -> address
CPUS_PER_NODE = 2


class SlurmUnavailable(RuntimeError):
    """The cluster cannot be brought up on this machine (the reason says why); tests skip."""


@dataclass
class ClusterInfo:
    partition: str
    node: str  # the first node
    cpus: int  # CPUs of the first node
    started: bool  # True when this call started the daemons (False: reused a running cluster)
    bringup_s: float  # seconds spent in ensure_cluster (install + start + wait)
    nodes: list[str] = field(default_factory=list)  # every usable node, sorted


def _run(cmd: list[str], timeout: float = 60, check: bool = False, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, **kw)


def _node_states() -> dict[str, str]:
    """{node: state} from sinfo, or {} when the controller does not answer."""
    if shutil.which("sinfo") is None:
        return {}
    try:
        out = _run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=15)
    except subprocess.TimeoutExpired:
        return {}
    if out.returncode != 0:
        return {}
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1].lower()
    return states


def _usable(state: str) -> bool:
    # "idle", "mixed", "allocated", "completing" (trailing "*" = not responding, "~" = powered off)
    base = state.rstrip("*~#!%$@^-")
    return base in ("idle", "mixed", "allocated", "completing") and not state.endswith("*")


def _install_packages() -> None:
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "munged", "ip", "nsenter", "unshare")
               if not _which(b)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm binaries {missing} are missing and we are not root to install them")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm binaries {missing} are missing and there is no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    upd = _run(["apt-get", "update"], timeout=600, env=env)
    inst = _run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], timeout=900, env=env)
    if inst.returncode != 0:
        raise SlurmUnavailable(
            "apt-get install " + " ".join(PACKAGES) + f" failed (rc={inst.returncode}):\n"
            + (upd.stderr[-1500:] if upd.returncode else "") + inst.stdout[-1500:] + inst.stderr[-1500:]
        )
    still = [b for b in missing if not _which(b)]
    if still:
        raise SlurmUnavailable(f"after apt-get install, still missing: {still}")


def _which(binary: str) -> str | None:
    return shutil.which(binary) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin", "/sbin") if (p := Path(d) / binary).exists()), None
    )


def _pid_alive(name: str) -> bool:
    """Is a process with exactly this command name running (read from /proc, no pkill patterns)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        # state field after the ")" : skip zombies
        if comm == name and stat.rsplit(")", 1)[-1].split()[0] != "Z":
            return True
    return False


def _start_munge() -> None:
    if _run(["munge", "-n"], timeout=10).returncode == 0 and _pid_alive("munged"):
        return
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
    for d in (Path("/run/munge"), Path("/var/log/munge"), Path("/var/lib/munge")):
        d.mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    if not _pid_alive("munged"):
        r = _run(["runuser", "-u", "munge", "--", _which("munged") or "munged"], timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"munged did not start: {r.stderr.strip()}")
    for _ in range(50):
        if _run(["munge", "-n"], timeout=10).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("munged started but `munge -n` still fails")


def _real_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * 0.8 / len(NODES))
    return 1024


def render_conf(controller: str, mem_mb: int) -> str:
    """The two-node config. Why each non-default line is there:

    * SlurmctldHost=NAME(ADDR): the node daemons, in their own namespaces, reach the controller on
      the bridge address;
    * NodeAddr: each node's namespace address (names resolve through /etc/hosts as well);
    * %n in the slurmd pid/spool/log paths: two slurmd share one file system;
    * proctrack/linuxproc + task/none: no cgroup or systemd needed (containers, CI);
    * SlurmdParameters=config_overrides: trust CPUs=... even on a 2-core machine (each node claims 2);
    * CR_CPU: schedule CPUs only, memory is not a consumable (tests ask for no memory);
    * KillWait=5: a requeued/cancelled job's leftovers die fast, so requeue tests stay short;
    * sched_interval=2: the scheduler notices within 2 s (not 60) that a requeued job may start;
    * AuthInfo=cred_expire=5: a requeued job may start again after ~6 s instead of 121 s;
    * SlurmUser=root: the daemons run as root here, no spool ownership to get right.
    """
    nodes = "\n".join(f"NodeName={n} NodeAddr={a} NodeHostname={n} CPUs={CPUS_PER_NODE} RealMemory={mem_mb} "
                      "State=UNKNOWN" for n, a in NODES.items())
    return f"""{MARKER}
ClusterName=powerclip
SlurmctldHost={controller}({CONTROLLER_ADDR})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=5
MinJobAge=600
SlurmdParameters=config_overrides
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd-%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile={LOG_DIR}/slurmctld.log
SlurmdLogFile={LOG_DIR}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
{nodes}
PartitionName={PARTITION} Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _write_conf(controller: str) -> bool:
    """Write our config; True when it changed (running daemons must restart to read it)."""
    if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text():
        raise SlurmUnavailable(
            f"{SLURM_CONF} exists, was not written by these tests, and no cluster answers with it; "
            "not overwriting someone else's Slurm configuration"
        )
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    text = render_conf(controller, _real_memory_mb())
    changed = not SLURM_CONF.exists() or SLURM_CONF.read_text() != text
    if changed:
        SLURM_CONF.write_text(text)
    for d in (LOG_DIR, Path("/var/lib/slurm/slurmctld"), *(Path(f"/var/lib/slurm/slurmd-{n}") for n in NODES)):
        d.mkdir(parents=True, exist_ok=True)
    return changed


# ------------------------------------------------------------------------------ the network
def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    r = _run(cmd, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r


def _network_ready() -> bool:
    for name, addr in NODES.items():
        r = _ip("-o", "addr", "show", "dev", "eth0", netns=name, check=False)
        if r.returncode != 0 or f"{addr}/" not in r.stdout or "UP" not in _ip("link", "show", "eth0", netns=name,
                                                                              check=False).stdout:
            return False
    return f"{CONTROLLER_ADDR}/" in _ip("-o", "addr", "show", "dev", BRIDGE, check=False).stdout


def _setup_network() -> None:
    """Bridge + one namespace and veth pair per node (idempotent); SlurmUnavailable without permission."""
    if _network_ready():
        return
    if shutil.which("ip") is None:
        raise SlurmUnavailable("no `ip` command (iproute2) to create the nodes' network namespaces")
    if _ip("link", "show", BRIDGE, check=False).returncode != 0:
        r = _ip("link", "add", BRIDGE, "type", "bridge", check=False)
        if r.returncode != 0:
            raise SlurmUnavailable(f"cannot create the bridge {BRIDGE} for the node namespaces: {r.stderr.strip()}")
    if f"{CONTROLLER_ADDR}/" not in _ip("-o", "addr", "show", "dev", BRIDGE).stdout:
        _ip("addr", "add", f"{CONTROLLER_ADDR}/{PREFIX}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    existing = _ip("netns", "list").stdout.split()
    for name, addr in NODES.items():
        if name not in existing:
            r = _ip("netns", "add", name, check=False)
            if r.returncode != 0:
                raise SlurmUnavailable(f"cannot create network namespace {name}: {r.stderr.strip()}")
        host_end = f"{name}h"
        if _ip("link", "show", host_end, check=False).returncode != 0:
            _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("link", "set", host_end, "master", BRIDGE)
        _ip("link", "set", host_end, "up")
        if f"{addr}/" not in _ip("-o", "addr", "show", "dev", "eth0", netns=name).stdout:
            _ip("addr", "add", f"{addr}/{PREFIX}", "dev", "eth0", netns=name)
        _ip("link", "set", "eth0", "up", netns=name)
        _ip("link", "set", "lo", "up", netns=name)


def _write_hosts() -> None:
    """Node names -> namespace addresses in /etc/hosts, between our marker lines (replaced each time)."""
    begin, end = f"{MARKER} begin", f"{MARKER} end"
    lines = HOSTS.read_text().splitlines() if HOSTS.exists() else []
    if begin in lines and end in lines:
        lines = lines[:lines.index(begin)] + lines[lines.index(end) + 1:]
    ours = [begin, *(f"{addr} {name}" for name, addr in NODES.items()), end]
    text = "\n".join([*lines, *ours]) + "\n"
    if not HOSTS.exists() or HOSTS.read_text() != text:
        HOSTS.write_text(text)


# ------------------------------------------------------------------------------ the daemons
def _pid_file_alive(path: Path) -> bool:
    try:
        pid = int(path.read_text().split()[0])
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError, IndexError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _slurmd_alive(node: str) -> bool:
    return _pid_file_alive(Path(f"/run/slurmd-{node}.pid"))


def _stop_daemons() -> None:
    _run(["scontrol", "shutdown"], timeout=60)
    for _ in range(100):
        if not _pid_alive("slurmctld") and not _pid_alive("slurmd"):
            return
        time.sleep(0.2)


def _start_daemons() -> None:
    if not _pid_alive("slurmctld"):
        r = _run([_which("slurmctld") or "slurmctld"], timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"slurmctld did not start (rc={r.returncode}): {r.stderr.strip()}\n{_log_tail()}")
    # wait for the controller before the node daemons register with it
    for _ in range(100):
        if _run(["scontrol", "ping"], timeout=10).stdout.find("UP") >= 0:
            break
        time.sleep(0.2)
    else:
        raise RuntimeError(f"slurmctld started but `scontrol ping` does not report UP\n{_log_tail()}")
    slurmd = _which("slurmd") or "slurmd"
    for node in NODES:
        if _slurmd_alive(node):
            continue
        # its own network and UTS namespace: the node's address, and `hostname` says the node's name.
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup mounts slurmd reads
        r = _run(["nsenter", f"--net=/run/netns/{node}", "unshare", "--uts", "sh", "-c",
                  'hostname "$1" && exec "$2" -N "$1"', "sh", node, slurmd], timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"slurmd -N {node} did not start (rc={r.returncode}): {r.stderr.strip()}\n{_log_tail()}")


def _log_tail() -> str:
    parts = []
    for name in ("slurmctld.log", *(f"slurmd-{n}.log" for n in NODES)):
        p = LOG_DIR / name
        if p.exists():
            parts.append(f"--- {p} (tail)\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(parts)


def _wait_nodes_usable(timeout: float) -> list[str]:
    deadline = time.time() + timeout
    states: dict[str, str] = {}
    resumed = False
    while time.time() < deadline:
        states = _node_states()
        if set(NODES) <= set(states) and all(_usable(states[n]) for n in NODES):
            return sorted(NODES)
        # a node left "down"/"drained" by an earlier unclean stop: put it back once
        if states and not resumed:
            for node, state in states.items():
                if state.startswith(("down", "drain")) and not state.endswith("*"):
                    _run(["scontrol", "update", f"nodename={node}", "state=resume"], timeout=15)
                    resumed = True
        time.sleep(0.3)
    raise RuntimeError(f"nodes {sorted(NODES)} not usable after {timeout:.0f}s; sinfo says {states}\n{_log_tail()}")


def _ours_and_usable(states: dict[str, str]) -> bool:
    return set(states) == set(NODES) and all(_usable(states[n]) for n in NODES) and _network_ready()


def ensure_cluster(timeout: float = 90.0) -> ClusterInfo:
    """Return the usable two-node cluster, starting (and installing) it when needed. See module doc."""
    t0 = time.time()
    LOCK.touch(exist_ok=True)
    with open(LOCK) as lock:  # several pytest processes may ask at once: one brings it up
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _ours_and_usable(_node_states()):
            return _info(started=False, t0=t0)
        if os.geteuid() != 0:
            raise SlurmUnavailable("the two-node cluster needs root (network namespaces, daemons as root)")
        _install_packages()
        controller = socket.gethostname().split(".")[0]
        _setup_network()
        _write_hosts()
        if _write_conf(controller) or not all(_slurmd_alive(n) for n in NODES):
            # settings such as AuthInfo and the node list are read only at daemon start
            if _pid_alive("slurmctld") or _pid_alive("slurmd"):
                _stop_daemons()
        _start_munge()
        _start_daemons()
        _wait_nodes_usable(timeout)
        return _info(started=True, t0=t0)


def _info(started: bool, t0: float) -> ClusterInfo:
    nodes = sorted(NODES)
    return ClusterInfo(PARTITION, nodes[0], _node_cpus(nodes[0]), started=started, bringup_s=time.time() - t0,
                       nodes=nodes)


def _node_cpus(node: str) -> int:
    out = _run(["sinfo", "-h", "-n", node, "-o", "%c"], timeout=15).stdout.split()
    return int(out[0]) if out and out[0].isdigit() else 1


def wait_job(job_id: str, timeout: float, poll: float = 1.0) -> str:
    """Wait until a job has left the queue; return its final state from ``scontrol show job``."""
    deadline = time.time() + timeout
    state = "UNKNOWN"
    while time.time() < deadline:
        state = job_state(job_id)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                     "PREEMPTED", "BOOT_FAIL", "DEADLINE"):
            return state
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f}s\n{_log_tail()}")


def job_state(job_id: str) -> str:
    out = _run(["scontrol", "show", "job", "-o", job_id], timeout=15)
    for tok in out.stdout.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return "UNKNOWN"


# ------------------------------------------------------------------- job entry point for tests
# ``powerclip submit --entry tests.slurm_cluster:resumable_entry`` calls it with the Config on every
# task; it proves the cluster + submitit + rendezvous + requeue plumbing independently of the trainer.

def resumable_entry(cfg) -> dict:
    """A stand-in trainer (fast to start: torch only): ``train.steps`` steps of an all_reduce recurrence, checkpointed by rank 0
    after every step to ``RUN/toy_state.json`` and resumed from it. Each step sleeps
    ``POWERCLIP_TOY_STEP_S`` seconds (default 0.5) so a test can signal it mid-run.
    The final value depends only on the step count, so a resumed run must match an uninterrupted one.
    The result also carries the rendezvous variables the task saw.
    """
    import json
    import time

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    path = Path(cfg.train.run_dir) / "toy_state.json"
    state = json.loads(path.read_text()) if path.exists() else {"step": 0, "value": 0.0}
    start, value = int(state["step"]), float(state["value"])
    pause = float(os.environ.get("POWERCLIP_TOY_STEP_S", "0.5"))
    for step in range(start + 1, cfg.train.steps + 1):
        t = torch.tensor([float((rank + 1) * step)])
        dist.all_reduce(t)
        value = 0.5 * value + float(t.item())
        time.sleep(pause)
        if rank == 0:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step, "value": value}))
            tmp.replace(path)
        dist.barrier()
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                          "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURMD_NODENAME")}
    env["hostname"] = socket.gethostname()
    return {"rank": rank, "world": dist.get_world_size(), "start_step": start, "step": cfg.train.steps,
            "value": value, "env": env}


def toy_expected(steps: int, world: int) -> float:
    value = 0.0
    for step in range(1, steps + 1):
        value = 0.5 * value + step * world * (world + 1) / 2
    return value


if __name__ == "__main__":  # `python tests/slurm_cluster.py` brings the cluster up by hand
    info = ensure_cluster()
    print(info)
