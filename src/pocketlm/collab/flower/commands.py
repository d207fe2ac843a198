"""The Flower 1.42 command lines of a deployment, built in one place: `pocketlm fl superlink|supernode` print and
run them, and the loopback harness (tests, benchmarks) starts exactly these. Paths are made absolute: the
SuperLink hands its CA file on to the SuperExec and ServerApp processes it starts."""

from __future__ import annotations

from pathlib import Path

from ...errors import PocketLMError

SERVER_TLS_FILES = {"--ssl-ca-certfile": "ca.crt", "--ssl-certfile": "server.pem", "--ssl-keyfile": "server.key"}


def _existing(path: Path, what: str) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise PocketLMError(f"{what} {path} does not exist (make TLS files with  pocketlm fl certs DIR --host NAME)")
    return str(path.resolve())


def superlink_argv(*, host: str, port: int, tls: Path | None = None, auth: bool = False,
                   database: Path | None = None) -> list[str]:
    """`flower-superlink` serving every API on host:port; TLS from a `pocketlm fl certs` folder, else insecure.
    Runtime dependency installation is off: the apps run in this environment (else the SuperLink `uv sync`s
    pocketlm's dependencies, a CUDA torch, into a fresh environment for every run)."""
    if auth and tls is None:
        raise PocketLMError("SuperNode authentication needs TLS: give --tls DIR as well")
    argv = ["flower-superlink", "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if tls is None:
        argv.append("--insecure")
    else:
        for flag, name in SERVER_TLS_FILES.items():
            argv += [flag, _existing(Path(tls) / name, "TLS file")]
    if database is not None:
        argv += ["--database", str(Path(database).expanduser().resolve())]
    if auth:
        argv.append("--enable-supernode-auth")
    return argv


def supernode_argv(*, superlink: str, port: int, node_config: str, root_certificates: Path | None = None,
                   auth_key: Path | None = None, max_wait_time: float | None = None) -> list[str]:
    """`flower-supernode` for one device: TLS when `root_certificates` (the CA of the SuperLink) is given, else
    insecure; `auth_key` is the device's OpenSSH ECDSA private key (`pocketlm fl node-key`)."""
    if auth_key is not None and root_certificates is None:
        raise PocketLMError("SuperNode authentication needs TLS: give --root-certificates CA.crt as well")
    argv = ["flower-supernode", "--superlink", superlink, "--port", str(port), "--node-config", node_config]
    if root_certificates is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", _existing(root_certificates, "CA certificate")]
    if auth_key is not None:
        argv += ["--auth-supernode-private-key", _existing(auth_key, "SuperNode key")]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    return argv


def connection_toml(name: str, address: str, root_certificates: Path | None = None) -> str:
    """A `[superlink.NAME]` section of `$FLWR_HOME/config.toml`, the connection `flwr run` / `flwr supernode
    register` use: `root-certificates` for a TLS SuperLink, `insecure = true` otherwise."""
    tls = (f'root-certificates = "{_existing(root_certificates, "CA certificate")}"' if root_certificates
           else "insecure = true")
    return f'[superlink.{name}]\naddress = "{address}"\n{tls}\n'
