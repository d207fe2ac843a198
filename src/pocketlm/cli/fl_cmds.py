"""`pocketlm fl superlink | supernode | run`: thin wrappers over Flower's own commands (README "Running across
devices"). Each prints the exact Flower command it runs (`--dry-run` prints it and stops)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import tempfile
from pathlib import Path

import typer

from ..collab.config import TrainConfig, load_config
from ..errors import PocketLMError
from .app import app, console
from .options import key_values

fl_app = typer.Typer(help="CoMiGS across devices with Flower: a SuperLink, one SuperNode per device, runs.",
                     no_args_is_help=True)
app.add_typer(fl_app, name="fl")

TLS_HELP = ("Folder with ca.crt, server.pem and server.key (pocketlm fl certs); without it the server runs "
            "--insecure.")


def _exec(argv: list[str], dry_run: bool) -> None:
    console.print(" ".join(shlex.quote(a) for a in argv), soft_wrap=True, markup=False, highlight=False)
    if dry_run:
        return
    if shutil.which(argv[0]) is None:
        raise PocketLMError(f"{argv[0]} not found: install Flower with  pip install 'pocketlm[flower]'")
    os.execvp(argv[0], argv)


@fl_app.command("superlink")
def superlink_cmd(
    host: str = typer.Option("0.0.0.0", help="Address to listen on (all of Flower's APIs share one port)."),
    port: int = typer.Option(9091, help="Port of the SuperLink (Fleet, Control and Runtime APIs)."),
    tls: Path = typer.Option(None, help=TLS_HELP),
    database: Path = typer.Option(None, help="SQLite file that keeps runs across SuperLink restarts."),
    auth: bool = typer.Option(False, help="Only accept SuperNodes whose public key was registered "
                                          "(flwr supernode register KEY.pub CONN); needs --tls."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the Flower command and stop."),
) -> None:
    """Start the server-side Flower SuperLink."""
    from ..collab.flower.commands import superlink_argv

    _exec(superlink_argv(host=host, port=port, tls=tls, auth=auth, database=database), dry_run)


@fl_app.command("supernode")
def supernode_cmd(
    state: Path = typer.Option(..., help="This device's private state directory (adapters, optimizer; never sent)."),
    user: Path = typer.Option(None, help="Folder of this device's own .txt documents (the user's data)."),
    partition: int = typer.Option(None, help="Instead of --user: this device is user N of the run's corpus."),
    superlink: str = typer.Option("127.0.0.1:9091", help="host:port of the SuperLink."),
    experts: int = typer.Option(None, help="This device's number of experts (default: the run's)."),
    port: int = typer.Option(9094, help="Local port of this SuperNode's runtime API (one per node on a machine)."),
    root_certificates: Path = typer.Option(None, help="CA certificate of a TLS SuperLink (ca.crt of pocketlm fl "
                                                      "certs); without it: --insecure."),
    auth_key: Path = typer.Option(None, help="This SuperNode's private key (pocketlm fl node-key), its public key "
                                             "registered on the SuperLink; needs --root-certificates."),
    audit_log: Path = typer.Option(None, help="Append the names of everything this device sends (JSON lines)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the Flower command and stop."),
) -> None:
    """Start a Flower SuperNode for one device."""
    from ..collab.flower.commands import supernode_argv

    node_config = _node_config(state, user, partition, experts, audit_log)
    _exec(supernode_argv(superlink=superlink, port=port, node_config=node_config,
                         root_certificates=root_certificates, auth_key=auth_key), dry_run)


def _node_config(state: Path, user: Path | None, partition: int | None, experts: int | None,
                 audit_log: Path | None) -> str:
    """The SuperNode's `--node-config` string: paths made absolute, exactly one of its own data or a partition."""
    if (user is None) == (partition is None):
        raise PocketLMError("give exactly one of --user DIR (the device's own data) or --partition N")
    cfg = {"state-dir": str(state.expanduser().resolve())}
    if user is not None:
        cfg["user-dir"] = str(user.expanduser().resolve())
    else:
        cfg["partition-id"] = partition
    if experts is not None:
        cfg["experts"] = experts
    if audit_log is not None:
        cfg["audit-log"] = str(audit_log.expanduser().resolve())
    return " ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={_toml_str(v)}" for k, v in cfg.items())


@fl_app.command("certs")
def certs_cmd(
    directory: Path = typer.Argument(..., help="Folder for ca.crt, ca.key, server.pem, server.key (created)."),
    hosts: list[str] = typer.Option(..., "--host", help="Name or IP the devices use to reach the SuperLink "
                                                        "(repeatable); 127.0.0.1 and localhost are always added."),
    days: int = typer.Option(365, help="Validity of both certificates, in days."),
) -> None:
    """Make a private CA and a SuperLink TLS certificate signed by it (for pocketlm fl superlink --tls DIR)."""
    from ..collab.flower.certs import make_tls

    paths = make_tls(directory, hosts, days=days)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}\n"
                  f"SuperLink: pocketlm fl superlink --tls {directory}\n"
                  f"devices and the flwr connection: root certificate {paths['ca.crt']} "
                  f"(keep ca.key and server.key private)", markup=False, highlight=False, soft_wrap=True)


@fl_app.command("node-key")
def node_key_cmd(
    path: Path = typer.Argument(..., help="Private key file to create (PATH.pub gets the public key)."),
) -> None:
    """Make a SuperNode authentication key pair (OpenSSH ECDSA P-384, the format Flower reads)."""
    from ..collab.flower.certs import make_node_key

    key, pub = make_node_key(path)
    console.print(f"wrote {key} and {pub}\n"
                  f"register it on the SuperLink: flwr supernode register {pub} CONNECTION\n"
                  f"start the device with: pocketlm fl supernode --auth-key {key} --root-certificates CA.crt ...",
                  markup=False, highlight=False, soft_wrap=True)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(v) -> str:
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return _toml_str(",".join(str(x) for x in v))
    if isinstance(v, (int, float)):
        return repr(v)
    return _toml_str(str(v))


def run_config_toml(config: Path | None, overrides: list[str]) -> str:
    """The whole training config (validated here) plus federation keys, as a Flower `--run-config` TOML file."""
    from ..collab.flower.task import FL_KEYS, settings

    fl = [o for o in overrides if o.split("=", 1)[0].strip() in FL_KEYS]
    train = [o for o in overrides if o not in fl]
    cfg = load_config(config, train)
    lines = [f"{f.name} = {_toml_value(getattr(cfg, f.name))}" for f in dataclasses.fields(TrainConfig)]
    flvals = key_values(fl, "--set")
    _, st = settings(flvals)     # validates the federation keys
    for key, f in FL_KEYS.items():
        if key in flvals:
            lines.append(f"{key} = {_toml_value(getattr(st, f.name))}")
    return "\n".join(lines) + "\n"


@fl_app.command("run")
def run_cmd(
    config: Path = typer.Option(None, "--config", "-c", help="pocketlm TOML config (e.g. configs/fortunes-id.toml)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a training or federation key, e.g. --set rounds=3 "
                                                          "--set min-available-nodes=4 (repeatable)."),
    connection: str = typer.Option(None, help="SuperLink connection in $FLWR_HOME/config.toml (default: Flower's "
                                              "default connection; `local` = Flower's simulation engine)."),
    app_dir: Path = typer.Option(Path("."), help="The pocketlm checkout (its pyproject.toml declares the Flower app)."),
    stream: bool = typer.Option(True, help="Stream the run's logs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the Flower command and stop."),
) -> None:
    """Submit a CoMiGS run to a SuperLink (or to Flower's simulation engine)."""
    if not (app_dir / "pyproject.toml").is_file():
        raise PocketLMError(f"{app_dir} has no pyproject.toml: run from the pocketlm checkout or pass --app-dir")
    text = run_config_toml(config, overrides)
    fd, path = tempfile.mkstemp(prefix="pocketlm-fl-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    # a SuperLink that `flwr run` starts itself (the simulation engine) must not `uv sync` pocketlm's dependencies
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    argv = ["flwr", "run", str(app_dir)] + ([connection] if connection else []) + ["--run-config", path]
    if stream:
        argv.append("--stream")
    _exec(argv, dry_run)
