"""A whole Flower deployment on 127.0.0.1 (insecure): one `flower-superlink`, N `flower-supernode` processes and
`flwr run <checkout> loop` submissions. For tests and benchmarks: every process starts in its own process group
and `stop_all()` (or leaving the `with` block) stops every group; every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ...errors import PocketLMError

BIN = Path(sys.executable).parent
SRC = Path(__file__).resolve().parents[3]        # .../src: the pocketlm the apps must import


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.2)
    raise PocketLMError(f"timed out after {timeout:.0f}s waiting for {what}")


class LoopbackFederation:
    def __init__(self, root: Path, app_dir: Path, *, start_timeout: float = 60.0):
        self.root, self.app_dir, self.start_timeout = Path(root), Path(app_dir), start_timeout
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        home = self.root / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\n'
                                          f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_all()
        return False

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "ab") as log:
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                 start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self) -> None:
        # no runtime dependency installation: the apps run in this environment (else uv builds a new one per run)
        self._start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--disable-runtime-dependency-installation"])
        wait_for(lambda: "Uvicorn running" in self.log("superlink"), self.start_timeout, "the SuperLink")

    def start_node(self, name: str, node_config: dict) -> None:
        before = self.log(name).count("SuperNode ID")
        cfg = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
        self._start(name, [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                           "--port", str(free_port()), "--node-config", cfg])
        wait_for(lambda: self.log(name).count("SuperNode ID") > before, self.start_timeout, f"SuperNode {name}")

    def stop(self, name: str, sig=signal.SIGTERM) -> None:
        p = self.procs.pop(name)
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def submit(self, run_config: dict, name: str) -> subprocess.Popen:
        """Start `flwr run <app_dir> loop --run-config FILE --stream` (its own process group); see `finish`."""
        cfg = self.root / f"{name}.toml"
        cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
        return subprocess.Popen([str(BIN / "flwr"), "run", str(self.app_dir), "loop", "--run-config", str(cfg),
                                 "--stream"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.root, start_new_session=True, text=True)

    def finish(self, runner: subprocess.Popen, name: str, timeout: float, expect: Path | None = None) -> str:
        """Wait for a submitted run (killing its group after `timeout`); returns its output, raises on failure.
        `flwr run --stream` exits 0 even when the SuperLink failed the run, so `expect` names a file the finished
        run must have written."""
        try:
            out, _ = runner.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGKILL)
            out, _ = runner.communicate(timeout=10)
            raise PocketLMError(f"flwr run {name} timed out after {timeout:.0f}s:\n{out[-3000:]}") from None
        (self.root / f"{name}.out").write_text(out)
        if runner.returncode != 0:
            raise PocketLMError(f"flwr run {name} failed ({runner.returncode}):\n{out[-3000:]}")
        if expect is not None and not Path(expect).exists():
            raise PocketLMError(f"flwr run {name} ended without writing {expect} (see {self.root}/superlink.log):\n"
                                f"{out[-2000:]}")
        return out

    def run(self, run_config: dict, name: str, timeout: float, expect: Path | None = None) -> str:
        return self.finish(self.submit(run_config, name), name, timeout, expect)
