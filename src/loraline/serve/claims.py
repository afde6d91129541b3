"""What one `loraline serve` holds on this machine, checked before anything starts: its two ports, and
its engine, recorded in a pid file under the project.

A serve whose process was killed outright (kill -9, the OOM killer) leaves that file behind. At the
next start, an engine still alive from it is stopped (its process group: vLLM's engine core too);
a live serve of this project is refused instead, since both would share the prepared versions and
the events file; and a process that merely reuses a recorded pid (another start time) is left alone.
Then both ports must be free: a port already taken fails the start at once, naming the port, its
param and the process that holds it where this user may see it, instead of a gateway that talks to
whatever already answers there. Linux only for the holder and the start times (/proc); elsewhere the
bind test alone decides.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)
LISTEN = "0A"  # a socket's state in /proc/net/tcp


class ClaimError(RuntimeError):
    pass


def claim(pid_file: Path, *, engine_port: int, host: str, port: int) -> None:
    """Ready to start: no serve of this project running, its stale engine stopped, both ports free."""
    settle_pid_file(pid_file)
    check_port_free("127.0.0.1", engine_port, "serve.engine_port")
    check_port_free(host, port, "serve.port")


@dataclass(frozen=True)
class Proc:
    """A process as this machine knows it: a pid alone may be reused, a pid with its start time not."""

    pid: int
    started: int  # clock ticks after boot (/proc/<pid>/stat field 22)

    @classmethod
    def of(cls, pid: int) -> Proc | None:
        """The process running as `pid` now; None when there is none."""
        stat = _stat(pid)
        return cls(pid, int(stat[19])) if stat else None

    def alive(self) -> bool:
        return Proc.of(self.pid) == self


@dataclass(frozen=True)
class EngineRecord:
    """The pid file: the serve that started the engine, the engine (leader of its own process group), its port."""

    serve: Proc
    engine: Proc
    port: int

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        part.write_text(json.dumps(asdict(self)) + "\n")
        part.replace(path)  # whole or absent: a reader never sees half a record

    @classmethod
    def read(cls, path: Path) -> EngineRecord | None:
        """The record in `path`; None when there is none or it cannot be read (a fresh start overwrites it)."""
        try:
            data = json.loads(path.read_text())
            return cls(Proc(**data["serve"]), Proc(**data["engine"]), int(data["port"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def record_engine(pid_file: Path, engine_pid: int, port: int) -> EngineRecord:
    """Write down the engine just started by this process; returns the record (see release)."""
    serve, engine = Proc.of(os.getpid()), Proc.of(engine_pid)
    record = EngineRecord(serve or Proc(os.getpid(), 0), engine or Proc(engine_pid, 0), port)
    record.write(pid_file)
    return record


def release(pid_file: Path, record: EngineRecord) -> None:
    """Remove the pid file if it is still `record` (a later serve may have replaced it)."""
    if EngineRecord.read(pid_file) == record:
        pid_file.unlink(missing_ok=True)


def settle_pid_file(pid_file: Path, stop_timeout_s: float = 30) -> None:
    """Refuse when the recorded serve still runs; otherwise stop what is left of its engine and remove the file."""
    record = EngineRecord.read(pid_file)
    if record is not None and record.serve.alive():
        raise ClaimError(
            f"another `loraline serve` of this project is running (pid {record.serve.pid}, its vLLM engine pid "
            f"{record.engine.pid} on 127.0.0.1:{record.port}; recorded "
            f"in {pid_file}): stop it first, or serve from another clone"
        )
    if record is not None:
        left = stale_engine(record)
        if left:
            log.warning(
                "stopping the vLLM engine (pids %s) left running by a `loraline serve` (pid %s) that ended without "
                "stopping it (%s)",
                left,
                record.serve.pid,
                pid_file,
            )
            stop_group(record.engine.pid, stop_timeout_s)
    pid_file.unlink(missing_ok=True)


def stale_engine(record: EngineRecord) -> list[int]:
    """The processes left of the recorded engine: its process group, unless its pid now names another process.

    A process group's id stays reserved while any member lives, so members found under the
    engine's pid are its own (its engine core, say) even after the leader itself ended."""
    leader = Proc.of(record.engine.pid)
    if leader is not None and leader != record.engine:
        return []  # the pid was reused: a foreign process, not ours to stop
    return group_members(record.engine.pid)


def group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (zombies excluded: they hold nothing)."""
    members = []
    for entry in _processes():
        stat = _stat(int(entry.name))
        if stat and int(stat[2]) == pgid and stat[0] != "Z":
            members.append(int(entry.name))
    return sorted(members)


def stop_group(pgid: int, timeout_s: float) -> None:
    """SIGTERM to the group (vLLM shuts its engine core down in order), SIGKILL after `timeout_s`."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not group_members(pgid):
            return
    raise ClaimError(f"could not stop the stale vLLM engine (process group {pgid}): stop it by hand (kill -9 -{pgid})")


def check_port_free(host: str, port: int, param: str) -> None:
    if port_free(host, port):
        return
    holders = [f"pid {pid} ({command(pid)})" for pid in listeners(port)]
    by = f" by {', '.join(holders)}" if holders else ""
    raise ClaimError(
        f"port {port} on {host} ({param}) is already in use{by}: stop it, or choose another port with "
        f"--set {param}=<port>"
    )


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now. SO_REUSEADDR as uvicorn and vLLM set it: a
    port whose last connections are closing is free for them, one with a listener is not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def listeners(port: int) -> list[int]:
    """Pids holding a listening TCP socket on `port` (any address), among the processes this user may inspect."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == LISTEN and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    return sorted({pid for pid, link in _fd_links() if link in inodes}) if inodes else []


def command(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "command unknown"
    return " ".join(a.decode(errors="replace") for a in argv if a)[:200] or "command unknown"


def _fd_links():
    for proc in _processes():
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:  # another user's process, or one that just ended
            continue
        for fd in fds:
            try:
                yield int(proc.name), os.readlink(fd)
            except OSError:
                continue


def _processes() -> list[Path]:
    proc = Path("/proc")
    return [p for p in proc.iterdir() if p.name.isdigit()] if proc.is_dir() else []


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state first); None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()
