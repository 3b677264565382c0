"""Starting Flower's Deployment Engine for `tunekit federate`: a SuperLink, one SuperNode per owner, `flwr run`.

Flower runs from its own venv (benchmarks/scale_out/install_flower.sh: its pinned web stack cannot share tunekit's);
tunekit starts its programs as subprocesses and reads what the ServerApp wrote into the run folder. In loopback
mode (no `superlink:` in FED.yaml) everything listens on 127.0.0.1 only: the SuperLink on one free port (Fleet,
Control and Runtime APIs, flwr >= 1.4x), each SuperNode's Runtime API on another; each SuperNode is given its own
owner's data file in its node config and nothing else. With `superlink: host:port` only `flwr run` is started
here. Flower's telemetry, its update check and its runtime installation of app dependencies are switched off.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .aggregate import FederatedError
from .config import FedConfig

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
INSTALL_HINT = "bash benchmarks/scale_out/install_flower.sh (creates .flower-venv beside tunekit's venv)"


def find_flower_venv(explicit: str | None = None) -> Path:
    """The venv with flwr: --flower-venv, $TUNEKIT_FLOWER_VENV, ./.flower-venv, or the one beside tunekit's source."""
    here = Path(__file__).resolve().parents[3] / ".flower-venv"
    candidates = [explicit, os.environ.get("TUNEKIT_FLOWER_VENV"), ".flower-venv", str(here)]
    for c in candidates:
        if c and (Path(c) / "bin" / "flower-superlink").exists():
            return Path(c).resolve()
    named = explicit or os.environ.get("TUNEKIT_FLOWER_VENV")
    raise FederatedError(f"Flower is not installed{f' in {named}' if named else ''} (no bin/flower-superlink): "
                         f"{INSTALL_HINT}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reachable(address: str, timeout: float = 5.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def app_pyproject(fed: FedConfig) -> str:
    """The Flower app (FAB) `flwr run` ships: tunekit's ServerApp and ClientApp, the federation as run config."""
    return f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tunekit-federation"
version = "1.0.0"
description = "tunekit federated fine-tuning of adapters"
license = "Apache-2.0"
dependencies = ["flwr>=1.42.0"]

[tool.flwr.app]
publisher = "tunekit"

[tool.flwr.app.components]
serverapp = "tunekit.federated.server_app:app"
clientapp = "tunekit.federated.client_app:app"

[tool.flwr.app.config]
fed-config = {json.dumps(fed.model_dump_json())}
'''


def connection_toml(address: str, fed: FedConfig) -> str:
    lines = ['[superlink]', 'default = "tunekit"', '', '[superlink.tunekit]', f'address = "{address}"']
    lines.append("insecure = true" if fed.insecure else f'root-certificates = "{fed.root_certificates}"')
    return "\n".join(lines) + "\n"


@dataclass
class Processes:
    """The Flower programs this run started (each in its own process group), stopped together."""
    logs: Path
    env: dict
    started: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                                stdin=subprocess.DEVNULL)
        self.started[name] = proc
        (self.logs / "pids.json").write_text(json.dumps({n: p.pid for n, p in self.started.items()}))
        return proc

    def tail(self, name: str, n: int = 15) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def stop(self) -> None:
        # Flower detaches its SuperExec and app processes into their own sessions: find them by parent first.
        family = [pid for proc in self.started.values() for pid in descendants(proc.pid)]
        for proc in reversed(list(self.started.values())):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.started.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            _signal_group(proc, signal.SIGKILL)  # ClientApp/ServerApp children left in the group
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from /proc (Linux); [] elsewhere."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_listening(procs: Processes, name: str, port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs.started[name].poll() is not None:
            raise FederatedError(f"the {name} exited at start (code {procs.started[name].returncode}):\n"
                                 f"{procs.tail(name)}")
        if reachable(f"127.0.0.1:{port}", 1.0):
            return
        time.sleep(0.3)
    raise FederatedError(f"the {name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s:\n{procs.tail(name)}")


def start_loopback(fed: FedConfig, procs: Processes, bin_dir: Path, out: Path) -> str:
    """A SuperLink and one SuperNode per owner on 127.0.0.1; returns the SuperLink's address."""
    port = free_port()
    # Flower's state in memory (no --database): a restarted federation must not see the SuperNodes of the last
    # launch as online; what a resume needs is in tunekit's own round checkpoints.
    procs.start("superlink", [str(bin_dir / "flower-superlink"), "--insecure", "--disable-runtime-dependency-"
                "installation", "--host", "127.0.0.1", "--port", str(port)])
    wait_listening(procs, "superlink", port)
    for owner in fed.owners:
        work = out / "owners" / owner.name
        node_config = (f'owner="{owner.name}" data-file="{Path(owner.data).resolve()}" '
                       f'work-dir="{work.resolve()}"')
        procs.start(f"supernode-{owner.name}", [str(bin_dir / "flower-supernode"), "--insecure", "--superlink",
                    f"127.0.0.1:{port}", "--host", "127.0.0.1", "--port", str(free_port()),
                    "--node-config", node_config])
    return f"127.0.0.1:{port}"


def federate(fed: FedConfig, flower_venv: str | None = None) -> dict:
    """Run the federation to its last round; returns result.json (every round's record)."""
    if fed.superlink is None:
        for owner in fed.owners:
            if not Path(owner.data).is_file():
                raise FederatedError(f"owner {owner.name!r}: data file {owner.data} does not exist; fix `owners:` in "
                                     f"FED.yaml (each owner's SuperNode reads only its own file)")
    venv = find_flower_venv(flower_venv)
    out = Path(fed.output_dir).resolve()
    fed = fed.model_copy(update={"output_dir": str(out), "owners": [o.model_copy(update={"data": str(
        Path(o.data).resolve())}) for o in fed.owners]})
    home = out / "flower"
    logs = out / "logs"
    for d in (home, logs, out / "app"):
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home),
           "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("VIRTUAL_ENV", None)
    procs = Processes(logs, env)
    started = time.time()
    try:
        if fed.superlink is None:
            address = start_loopback(fed, procs, venv / "bin", out)
        else:
            address = fed.superlink
            if not reachable(address):
                raise FederatedError(f"cannot reach the SuperLink at {address}: start it there (flower-superlink "
                                     f"--insecure, or with TLS certificates) or fix `superlink:` in FED.yaml")
        (out / "app" / "pyproject.toml").write_text(app_pyproject(fed))
        (home / "config.toml").write_text(connection_toml(address, fed))
        run = procs.start("flwr-run", [str(venv / "bin" / "flwr"), "run", str(out / "app"), "tunekit", "--stream"])
        print(f"[tunekit] federation submitted to the SuperLink at {address}; Flower's logs: {logs}", flush=True)
        shown = 0
        while run.poll() is None:
            superlink = procs.started.get("superlink")
            if superlink is not None and superlink.poll() is not None:
                raise FederatedError(f"the SuperLink exited (code {superlink.returncode}):\n{procs.tail('superlink')}")
            shown = show_progress(logs / "flwr-run.log", shown)
            time.sleep(1.0)
        show_progress(logs / "flwr-run.log", shown)
        return read_result(out, started, procs)
    finally:
        procs.stop()


def show_progress(log: Path, shown: int) -> int:
    """Print the ServerApp's own lines ([tunekit] round ...) that appeared in flwr run's log since `shown`."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    for line in lines[shown:]:
        if line.startswith("[tunekit]"):
            print(line, flush=True)
    return len(lines)


def read_result(out: Path, started: float, procs: Processes) -> dict:
    error = out / "error.txt"
    if error.exists() and error.stat().st_mtime >= started:
        first = error.read_text().split("\n\n")[0]
        raise FederatedError(f"the federation stopped: {first.split(': ', 1)[-1]} (details: {error}, logs in "
                             f"{out / 'logs'})")
    result = out / "result.json"
    if not result.exists() or result.stat().st_mtime < started:
        raise FederatedError(f"flwr run ended without a result (exit code {procs.started['flwr-run'].returncode}):\n"
                             f"{procs.tail('flwr-run')}")
    return json.loads(result.read_text())
