"""A whole Flower deployment on 127.0.0.1: one `flower-superlink`, N `flower-supernode` processes and
`flwr run <checkout> loop` submissions, insecure or over TLS (`tls=` a `pocketlm fl certs` folder) with optional
SuperNode authentication (`auth=True`; `register` a node's public key first). The processes are started with the
command lines of `pocketlm fl superlink|supernode` (`commands.py`). For tests and benchmarks: every process starts
in its own process group and `stop_all()` (or leaving the `with` block) stops every group; every wait is bounded."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ...errors import PocketLMError
from .commands import connection_toml, superlink_argv, supernode_argv

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
    def __init__(self, root: Path, app_dir: Path, *, start_timeout: float = 60.0, tls: Path | None = None,
                 auth: bool = False):
        self.root, self.app_dir, self.start_timeout = Path(root), Path(app_dir), start_timeout
        self.tls, self.auth = (Path(tls) if tls is not None else None), auth
        self.ca = self.tls / "ca.crt" if self.tls is not None else None
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        home = self.root / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text('[superlink]\ndefault = "loop"\n\n'
                                          + connection_toml("loop", f"127.0.0.1:{self.port}", self.ca))
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
        argv = superlink_argv(host="127.0.0.1", port=self.port, tls=self.tls, auth=self.auth)
        self._start("superlink", [str(BIN / argv[0]), *argv[1:]])
        wait_for(lambda: "Uvicorn running" in self.log("superlink"), self.start_timeout, "the SuperLink")

    def register(self, public_key: Path) -> int:
        """`flwr supernode register KEY.pub loop` (SuperNode authentication); returns the new node's id."""
        out = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public_key), "loop"],
                             capture_output=True, text=True, env=self.env, cwd=self.root, timeout=self.start_timeout)
        found = re.search(r"SuperNode (\d+) registered", out.stdout)
        if out.returncode != 0 or not found:
            raise PocketLMError(f"registering {public_key} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
        return int(found.group(1))

    def start_node(self, name: str, node_config: dict, *, ca: Path | None | str = "federation",
                   auth_key: Path | None = None, wait: bool = True) -> subprocess.Popen:
        """Start a SuperNode and (with `wait`) return once it has its node id. `ca`: the root certificate it
        trusts (default: the federation's own CA; None = insecure); `auth_key`: its private key."""
        before = self.log(name).count("SuperNode ID")
        cfg = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
        argv = supernode_argv(superlink=f"127.0.0.1:{self.port}", port=free_port(), node_config=cfg,
                              root_certificates=self.ca if ca == "federation" else ca, auth_key=auth_key)
        p = self._start(name, [str(BIN / argv[0]), *argv[1:]])
        if wait:
            wait_for(lambda: self.log(name).count("SuperNode ID") > before or p.poll() is not None,
                     self.start_timeout, f"SuperNode {name}")
            if p.poll() is not None:
                raise PocketLMError(f"SuperNode {name} exited ({p.returncode}):\n{self.log(name)[-2000:]}")
        return p

    def wait_exit(self, name: str, timeout: float) -> int:
        """The exit status of a SuperNode that is expected to give up on its own (bounded wait)."""
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PocketLMError(f"{name} still running after {timeout:.0f}s:\n{self.log(name)[-2000:]}") from None

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
