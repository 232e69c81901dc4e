"""Trackers: the no-op, W&B offline under the run folder and off the network, and W&B failures
that never end a run."""

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import wandb

from experiments.loop.trackers import NullTracker, WandbTracker, make_tracker

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """Keep W&B's config, cache and staging files inside the test's folder."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home" / var.lower()))
    for var in ("WANDB_SILENT", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_null_tracker():
    tracker = make_tracker("none", project="ignored")
    assert isinstance(tracker, NullTracker)
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()


def test_wandb_offline_writes_under_run_dir(wandb_home):
    run_dir = wandb_home / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a degraded tracker would pass silently
        tracker = make_tracker("wandb", project="mora-test", run_name="r", config={"rank": 8}, dir=run_dir)
        tracker.log({"loss": 1.0}, step=1)
        tracker.finish()
        tracker.finish()
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "WANDB_SILENT" not in os.environ


def test_wandb_init_failure_warns_once_then_no_ops(wandb_home, monkeypatch):
    def broken_init(**kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "setup", lambda settings=None: None)  # no service for a failing init
    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="W&B init failed") as caught:
        tracker = WandbTracker("p", "r", {}, dir=wandb_home)
        for step in range(3):
            tracker.log({"loss": 1.0}, step=step)
        tracker.finish()
    assert len(caught) == 1


def test_wandb_log_failure_warns_once_and_stops_calling(wandb_home, monkeypatch):
    class BrokenRun:
        calls = 0

        def log(self, metrics, step):
            BrokenRun.calls += 1
            raise OSError("disk full")

        def finish(self):
            raise AssertionError("a failed run is not touched again")

    monkeypatch.setattr(wandb, "setup", lambda settings=None: None)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: BrokenRun())
    with pytest.warns(RuntimeWarning, match="W&B log failed") as caught:
        tracker = WandbTracker("p", "r", {}, dir=wandb_home)
        for step in range(3):
            tracker.log({"loss": 1.0}, step=step)
        tracker.finish()
    assert len(caught) == 1 and BrokenRun.calls == 1


def test_bad_kind_and_mode_are_config_errors(tmp_path):
    with pytest.raises(ValueError, match="logger must be one of"):
        make_tracker("tensorboard")
    with pytest.raises(ValueError, match="mode"):
        WandbTracker("p", "r", {}, mode="offlien", dir=tmp_path)


# A disabled, then an offline W&B run in a child process that records every network call Python
# makes (a name lookup, a connect or a datagram to anything but a local socket) in ``attempts.json``.
# wandb's service (wandb-core, wandb-symon: Go binaries) is out of Python's reach; strace watches those.
OFFLINE_RUN = """
import json, socket, sys

attempts = []
def watch(name, real, describe):
    def wrapper(*args, **kwargs):
        what = describe(*args)
        if what is not None:
            attempts.append(f"{name} {what}")
        return real(*args, **kwargs)
    return wrapper

def remote(sock, address, *rest):
    return None if sock.family == socket.AF_UNIX else repr(address)

socket.getaddrinfo = watch("getaddrinfo", socket.getaddrinfo, lambda host, *rest: repr(host))
socket.gethostbyname = watch("gethostbyname", socket.gethostbyname, repr)
for method in ("connect", "connect_ex"):
    setattr(socket.socket, method, watch(method, getattr(socket.socket, method), remote))
socket.socket.sendto = watch("sendto", socket.socket.sendto, lambda sock, data, *address: remote(sock, address))

import atexit
# registered before wandb's own exit hooks, so it runs after them (atexit is last in, first out)
atexit.register(lambda: open(sys.argv[2], "w").write(json.dumps(attempts)))

from experiments.loop.trackers import make_tracker
for mode in ("disabled", "offline"):  # a disabled run first must not leave wandb's analytics on
    tracker = make_tracker("wandb", project="mora-test", run_name="r", config={"rank": 8}, mode=mode,
                           dir=sys.argv[1])
    for step in range(3):
        tracker.log({"loss": 1.0}, step=step)
    tracker.finish()
"""
# an strace line of a call that sends: "<pid> connect(<fd>, {<address>}, ..." (also when <unfinished ...>)
SENDING_CALL = re.compile(r"^\d+ +(connect|sendto|sendmsg|sendmmsg)\(")
IP_ADDRESS = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"')


def strace_works() -> bool:
    """strace is installed and may trace a child here (ptrace can be forbidden in containers)."""
    if shutil.which("strace") is None:
        return False
    done = subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True, timeout=60)
    return done.returncode == 0


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """One offline W&B run in a child process, under ``strace -f -e trace=network`` when it works:
    (run folder, Python-level attempts, strace log or None)."""
    root = tmp_path_factory.mktemp("offline_network")
    script = root / "offline_run.py"
    script.write_text(OFFLINE_RUN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {f"WANDB_{v}_DIR": str(root / "home" / v.lower()) for v in ("CONFIG", "CACHE", "DATA")}
    env["PYTHONPATH"] = str(REPO)
    traced = strace_works()
    log = root / "strace.log"
    prefix = ["strace", "-f", "-e", "trace=network", "-o", str(log)] if traced else []
    command = [*prefix, sys.executable, str(script), str(root / "run"), str(root / "attempts.json")]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "W&B" not in done.stderr, done.stderr[-3000:]  # the tracker did not degrade to a no-op
    attempts = json.loads((root / "attempts.json").read_text())
    return root / "run", attempts, log.read_text() if traced else None


def remote_network_syscalls(strace_log: str) -> list[str]:
    """The lines of an ``strace -e trace=network`` log that reach past this machine: a connect or
    send to an IPv4/IPv6 address outside loopback (a DNS lookup shows as one to the nameserver's port
    53; a connect to nscd's socket is not counted, as user lookups go there too)."""
    found = []
    for line in filter(SENDING_CALL.match, strace_log.splitlines()):
        addresses = [ipaddress.ip_address(v4 or v6) for v4, v6 in IP_ADDRESS.findall(line)]
        if any(not (a.is_loopback or a.is_unspecified) for a in addresses):
            found.append(line)
    return found


def test_remote_network_syscalls_are_recognised():
    log = "\n".join([
        '7 connect(6, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16) = 0',
        '7 connect(6, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT',
        '7 connect(6, {sa_family=AF_INET6, sin6_port=htons(443), inet_pton(AF_INET6, "2606:4700::1", &a)}, 28) = 0',
        '7 connect(6, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
        '7 connect(6, {sa_family=AF_UNIX, sun_path="/tmp/wandb-1-2-3/socket"}, 110) = 0',
        '7 bind(6, {sa_family=AF_INET6, sin6_port=htons(0), inet_pton(AF_INET6, "::1", &a)}, 28) = 0',
        '7 sendto(5, "\\0", 1, 0, NULL, 0) = 1'])
    assert [line.split()[1][:10] for line in remote_network_syscalls(log)] == ["connect(6,"] * 2


def test_wandb_offline_makes_no_network_call_from_python(offline_run):
    run_dir, attempts, _ = offline_run
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # the run was recorded
    assert attempts == []


def test_wandb_offline_makes_no_network_syscall_in_any_process(offline_run):
    _, _, strace_log = offline_run
    if strace_log is None:
        pytest.skip("strace is not installed or may not trace here: wandb's service processes are unchecked")
    processes = {line.split()[0] for line in strace_log.splitlines() if line[:1].isdigit()}
    assert len(processes) > 1  # strace followed the threads and processes wandb started
    assert remote_network_syscalls(strace_log) == []
