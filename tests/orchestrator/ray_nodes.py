"""A 2-node Ray cluster on this machine for fault tests: `ray start --head` and `ray start --address=...`, each a
`--block` subprocess in its own process group, on free ports and in their own temp folders, so that a test can SIGKILL
exactly one node (a real node loss: no drain, no goodbye) without touching any other Ray on the machine.

Never `ray stop` here: it stops every Ray of this user (other tests' and other programs' included). Each node is
stopped by killing the processes it started, found through /proc as descendants of its `ray start` (Ray's worker
processes call setsid, so killing the process group alone would leave them to die later on their own).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
WORKER_PORTS = 60  # per node: one port per worker process (Tune functions, Train controllers and workers, ...)


def die_with_parent() -> None:
    """`preexec_fn` of a child process: the kernel SIGKILLs it when the process that started it dies (Linux)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


# Kills a node's process group once the test process is gone, so a test that is itself killed (after a SIGTERM or
# SIGKILL no finally block runs) leaves no Ray node behind: `ray start`, its GCS, raylet and agents share that
# group (the raylet's workers, in sessions of their own, exit with the raylet). `Node.kill` ends the reaper first.
REAPER = """
import os, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(1)
try:
    os.killpg(group, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port_range(size: int, taken: set[int]) -> tuple[int, int]:
    """A run of `size` free ports (for a node's worker processes), outside the OS's ephemeral range."""
    for _ in range(200):
        low = random.randrange(20000, 30000 - size)
        ports = range(low, low + size)
        if not taken.intersection(ports) and all(_bindable(p) for p in ports):
            return low, low + size - 1
    raise RuntimeError(f"no run of {size} free ports between 20000 and 30000")


def node_ports(taken: set[int], *, head: bool) -> list[str]:
    """`ray start` flags giving every port with a fixed default a free one (another Ray may hold the defaults)."""
    names = [
        "--node-manager-port",
        "--object-manager-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
    ]
    if head:
        names.append("--dashboard-port")
        from ray._private.utils import get_ray_client_dependency_error

        if get_ray_client_dependency_error() is None:  # the client server starts (on 10001) only with ray[client]
            names.append("--ray-client-server-port")
    flags = []
    for name in names:
        port = free_port()
        while port in taken:
            port = free_port()
        taken.add(port)
        flags += [name, str(port)]
    low, high = free_port_range(WORKER_PORTS, taken)
    taken.update(range(low, high + 1))
    return [*flags, "--min-worker-port", str(low), "--max-worker-port", str(high)]


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it (children first found by their parent id in /proc)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
        children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def process_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class Node:
    """One `ray start --block` process (a Ray node) and the folder it keeps its sessions and logs in."""

    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path
    reaper: subprocess.Popen | None = None

    def pids(self) -> list[int]:
        """The node's processes now: `ray start`, its GCS/raylet/agents, and the workers the raylet started."""
        return descendants(self.process.pid) if self.process.poll() is None else []

    def kill(self) -> list[int]:
        """SIGKILL every process of the node at once, as a machine that loses power would; returns their pids."""
        if self.reaper is not None:
            self.reaper.kill()
            self.reaper.wait()
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # anything of its group not yet seen as a descendant
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        return pids

    def worker_titles(self) -> dict[int, str]:
        """{pid: process title} of the node's Ray worker processes (ray::RayTrainWorker, ray::ImplicitFunc...)."""
        titles = {pid: process_title(pid) for pid in self.pids()}
        return {pid: title for pid, title in titles.items() if title.startswith("ray::")}


STARTUP_TIMED_OUT = "timed out during startup"  # `ray start` gives a raylet 30 s (fixed) to register: a busy machine


@dataclass
class Cluster:
    """A head node and one worker node on this machine; `address` is the head's GCS for `--address`."""

    root: Path
    address: str
    head: Node
    worker: Node | None = None
    env: dict[str, str] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)  # ports given to the nodes: the next node's must differ

    def add_worker(self, *, num_cpus: int, args: list[str] | None = None, timeout: float = 120.0) -> Node:
        """Start the worker node, with `args` added to its `ray start`, and wait until the head counts it alive."""

        def worker_args() -> list[str]:
            ports = node_ports(self.taken, head=False)
            return [f"--address={self.address}", "--num-cpus", str(num_cpus), *ports, *(args or [])]

        self.worker = _start_node("worker", self.root, worker_args, self.env, self.address, 2, timeout, [self.head])
        return self.worker

    def stop(self) -> None:
        """Kill both nodes (whatever is left of them) and remove their folders."""
        for node in (self.worker, self.head):
            if node is not None and node.process.poll() is None:
                node.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def _start(name: str, root: Path, args: list[str], env: dict[str, str]) -> Node:
    temp_dir = Path(tempfile.mkdtemp(prefix=name[0], dir=root))  # short: socket paths stay under ~107 characters
    log = temp_dir.with_suffix(".log")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [RAY, "start", "--block", f"--temp-dir={temp_dir}", "--disable-usage-stats", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: killing it reaches nothing else
        )
    reaper = subprocess.Popen(
        [sys.executable, "-c", REAPER, str(os.getpid()), str(process.pid)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the test's group leaves it to do its work
    )
    return Node(name, process, temp_dir, log, reaper)


def _start_node(
    name: str,
    root: Path,
    args: Callable[[], list[str]],
    env: dict[str, str],
    address: Callable[[], str] | str,
    count: int,
    timeout: float,
    others: list[Node],
    attempts: int = 3,
) -> Node:
    """`ray start` a node (fresh ports each attempt) and wait until the GCS counts `count` nodes alive; on a busy
    machine a raylet can miss `ray start`'s fixed 30 s to register, then it is started again."""
    for attempt in range(attempts):
        node = _start(name, root, args(), env)
        try:
            wait_for_nodes(
                address if isinstance(address, str) else address(), count, timeout=timeout, nodes=[*others, node]
            )
            return node
        except BaseException as e:
            if node.process.poll() is None:
                node.kill()
            if not (isinstance(e, RuntimeError) and STARTUP_TIMED_OUT in str(e)) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def alive_nodes(address: str) -> int:
    """How many nodes the head's GCS counts alive (a GCS client needs no Ray session: this process may hold
    another one)."""
    from ray._raylet import GcsClient

    client = GcsClient(address=address)
    return sum(1 for info in client.get_all_node_info(timeout=10).values() if info.state == 0)


def _listens(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def wait_for_nodes(address: str, count: int, *, timeout: float, nodes: list[Node]) -> None:
    """Until the head's GCS counts `count` nodes alive; `RuntimeError` with its log if a `ray start` exits."""
    deadline = time.monotonic() + timeout
    while True:
        for node in nodes:
            if node.process.poll() is not None:
                raise RuntimeError(f"ray start ({node.name}) exited: {node.log.read_text(errors='replace')[-3000:]}")
        # The GCS client waits long for a GCS that does not listen yet: ask only once it does.
        if _listens(address) and alive_nodes(address) >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} Ray nodes not alive at {address} after {timeout} s")
        time.sleep(0.5)


def start_head(
    *, num_cpus: int, env: dict[str, str] | None = None, args: list[str] | None = None, timeout: float = 120.0
) -> Cluster:
    """Start a head node in a fresh folder under /tmp, with `env` added to its environment and `args` to its
    `ray start`; the caller must `stop()` the returned cluster."""
    from ray._private import services

    root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    # Token authentication (2.60's default for `ray start`) would read or write ~/.ray/auth_token, shared with every
    # Ray of this user: the test cluster, and the sweep that gets this env, go without.
    full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    ip = services.get_node_ip_address()
    gcs_port = 0
    taken: set[int] = set()

    def head_args() -> list[str]:
        nonlocal gcs_port
        gcs_port = free_port()
        taken.add(gcs_port)
        # Ray's processes look a cluster up by RAY_ADDRESS first; without it, Train's PlacementGroupCleaner (State
        # API) scans for local GCS processes and, with another Ray on this machine, dies of "Found multiple active
        # Ray instances". Every process of this cluster (the nodes' workers and the sweep) inherits this env.
        full_env["RAY_ADDRESS"] = f"{ip}:{gcs_port}"
        ports = node_ports(taken, head=True)
        return ["--head", "--port", str(gcs_port), "--num-cpus", str(num_cpus), *ports, *(args or [])]

    try:
        head = _start_node("head", root, head_args, full_env, lambda: f"{ip}:{gcs_port}", 1, timeout, [])
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return Cluster(root, f"{ip}:{gcs_port}", head, env=full_env, taken=taken)
