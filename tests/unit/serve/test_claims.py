"""What a serve start checks and what it leaves behind, with real sockets and real processes: a taken
port is named with its holder, a stale engine of this project is stopped, a live serve or a foreign
process is left alone, and the engine ends with the process that started it (even on kill -9)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from loraline.config import ServeParams
from loraline.serve.claims import (
    ClaimError,
    EngineRecord,
    Proc,
    check_port_free,
    claim,
    group_members,
    port_free,
    settle_pid_file,
)
from loraline.serve.engine import Engine, EngineError

# A stand-in for vLLM: answers 200 on every GET (its /health) on the port given, until terminated.
FAKE_ENGINE = textwrap.dedent("""
    import sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
        def log_message(self, *args): pass
    HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
""")
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int, host: str = "127.0.0.1"):
    s = socket.socket()
    s.bind((host, port))
    s.listen()
    return s


def _stat_text(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stat = _stat_text(pid)
        if stat is None or stat.rsplit(") ", 1)[1].startswith("Z"):  # ended (a zombie holds nothing)
            return True
        time.sleep(0.1)
    return False


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def fake_engine(tmp_path) -> list[str]:
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    return [sys.executable, str(script)]


def test_a_taken_port_is_refused_naming_the_port_its_param_and_its_holder(tmp_path):
    port = _free_port()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import socket, time; s = socket.socket(); s.bind(('0.0.0.0', {port})); "
            "s.listen(); print('up', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"up\n"
        assert not port_free("127.0.0.1", port)  # a listener on every interface holds the loopback one too
        with pytest.raises(ClaimError) as err:
            check_port_free("127.0.0.1", port, "serve.engine_port")
        message = str(err.value)
        assert f"port {port} on 127.0.0.1 (serve.engine_port) is already in use by pid {holder.pid} (" in message
        assert "s.bind" in message and "--set serve.engine_port=<port>" in message
        gateway = _free_port()
        with pytest.raises(ClaimError, match=rf"port {port} on 127.0.0.1 \(serve.port\)"):
            claim(tmp_path / "engine.pid", engine_port=gateway, host="127.0.0.1", port=port)
    finally:
        holder.kill()
        holder.wait()
    assert port_free("127.0.0.1", port)
    claim(tmp_path / "engine.pid", engine_port=port, host="127.0.0.1", port=_free_port())


def test_a_stale_engine_of_a_dead_serve_is_stopped_with_its_children(tmp_path):
    """The engine's group, its own child (vLLM's engine core) included, ends; the pid file goes."""
    dead_serve = subprocess.Popen([sys.executable, "-c", "pass"])
    serve = Proc.of(dead_serve.pid)
    dead_serve.wait()
    engine = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            f"c = subprocess.Popen({SLEEPER!r}); print(c.pid, flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    core = int(engine.stdout.readline())
    assert sorted(group_members(engine.pid)) == sorted([engine.pid, core])
    pid_file = tmp_path / "engine.pid"
    EngineRecord(serve, Proc.of(engine.pid), 8001).write(pid_file)
    settle_pid_file(pid_file)
    assert engine.wait(5) == -signal.SIGTERM and _gone(core, 5)
    assert not pid_file.exists()


def test_a_running_serve_is_refused_and_a_reused_pid_is_not_touched(tmp_path):
    pid_file = tmp_path / "engine.pid"
    other = subprocess.Popen(SLEEPER, start_new_session=True)
    try:
        EngineRecord(Proc.of(os.getpid()), Proc.of(other.pid), 8001).write(
            pid_file
        )  # its serve (this process) is alive
        with pytest.raises(
            ClaimError,
            match=rf"another `loraline serve` of this project is running \(pid {os.getpid()}, "
            rf"its vLLM engine pid {other.pid} on 127.0.0.1:8001",
        ):
            settle_pid_file(pid_file)
        assert other.poll() is None and pid_file.exists()
        dead = Proc(os.getpid() + 10**6, 1)  # a serve that no longer runs ...
        reused = Proc(other.pid, Proc.of(other.pid).started - 1)  # ... and an engine pid now held by another process
        EngineRecord(dead, reused, 8001).write(pid_file)
        settle_pid_file(pid_file)
        assert other.poll() is None and not pid_file.exists()
    finally:
        other.kill()
        other.wait()


def test_an_unreadable_pid_file_is_replaced(tmp_path):
    pid_file = tmp_path / "engine.pid"
    pid_file.write_text("{half a rec")
    settle_pid_file(pid_file)
    assert not pid_file.exists()


def test_the_engine_is_recorded_while_it_runs_and_stopped_with_its_record(tmp_path, fake_engine):
    port, pid_file = _free_port(), tmp_path / "serve" / "engine.pid"
    engine = Engine.start(
        [*fake_engine, str(port)],
        ServeParams(engine_port=port, startup_timeout_s=30),
        tmp_path / "e.log",
        on_cpu=False,
        pid_file=pid_file,
    )
    record = EngineRecord.read(pid_file)
    assert record == EngineRecord(Proc.of(os.getpid()), Proc.of(engine.process.pid), port)
    engine.stop()
    assert engine.process.returncode == -signal.SIGTERM and not pid_file.exists() and port_free("127.0.0.1", port)


def test_another_server_already_answering_on_the_port_is_not_taken_for_the_engine(tmp_path, fake_engine):
    """The orphan of an earlier start answers /health; an engine of ours that never listens must not
    pass for ready, and one that fails to bind is reported with the port and its param."""
    port = _free_port()
    orphan = subprocess.Popen([*fake_engine, str(port)], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while port_free("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.1)
        params = ServeParams(engine_port=port, startup_timeout_s=4)
        silent = [*SLEEPER, f"never-listens-{port}"]  # the argument marks it among this machine's processes
        with pytest.raises(EngineError, match=rf"did not answer http://127.0.0.1:{port}/health within 4 s"):
            Engine.start(silent, params, tmp_path / "e.log", on_cpu=False)
        assert not [pid for pid in _pids() if silent[-1] in _cmdline(pid)]  # a failed start leaves nothing running
        with pytest.raises(EngineError) as err:
            Engine.start([*fake_engine, str(port)], params, tmp_path / "e.log", on_cpu=False)
        assert (
            f"vLLM could not listen on 127.0.0.1:{port} (serve.engine_port): it is taken by pid {orphan.pid}"
            in str(err.value)
        )
        assert "--set serve.engine_port=<port>" in str(err.value)
        assert orphan.poll() is None  # not ours: left alone
    finally:
        orphan.kill()
        orphan.wait()


def test_the_engine_ends_when_the_serve_that_started_it_is_killed(tmp_path, fake_engine):
    port = _free_port()
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import time
        from pathlib import Path
        from loraline.config import ServeParams
        from loraline.serve.engine import Engine
        e = Engine.start({[*fake_engine, str(port)]!r}, ServeParams(engine_port={port}, startup_timeout_s=60),
                         Path({str(tmp_path / "e.log")!r}), on_cpu=False,
                         pid_file=Path({str(tmp_path / "engine.pid")!r}))
        print(e.process.pid, flush=True)
        time.sleep(120)
    """),
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    engine_pid = int(parent.stdout.readline())
    assert not port_free("127.0.0.1", port)
    os.killpg(parent.pid, signal.SIGKILL)  # the serve's whole group: the engine is in a session of its own
    parent.wait()
    assert _gone(engine_pid, 5)
    assert port_free("127.0.0.1", port)
    settle_pid_file(tmp_path / "engine.pid")  # the record left behind names a dead serve and no engine: cleared
    assert not (tmp_path / "engine.pid").exists()


def test_the_engine_must_be_started_from_the_main_thread(tmp_path):
    errors = []

    def start():
        try:
            Engine.start(SLEEPER, ServeParams(), tmp_path / "e.log", on_cpu=False)
        except EngineError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=start)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]
