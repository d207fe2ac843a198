"""TLS and SuperNode authentication of a real Flower deployment on loopback, with the key material of
`pocketlm fl certs` / `pocketlm fl node-key` and the command lines of `pocketlm fl superlink|supernode`.

One SuperLink serves over TLS with `--enable-supernode-auth`; two devices whose public keys were registered with
`flwr supernode register` join with `--root-certificates` and their private keys, and a CoMiGS round submitted with
`flwr run` over the TLS connection equals the in-process simulation. A device trusting another CA, one with an
unregistered key and one with no key are all refused, each ending on its own (bounded waits, the reason in its
log or the SuperLink's). Every process is started in its own process group and stopped (`LoopbackFederation`)."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("flwr", reason="Flower is the optional `flower` extra")

from safetensors.torch import load_file  # noqa: E402

from conftest import REPO, write_folder_corpus  # noqa: E402
from flower_local import USERS, assert_matches_simulation, run_config, simulate  # noqa: E402
from pocketlm.collab.flower.certs import CertError, make_node_key, make_tls  # noqa: E402
from pocketlm.collab.flower.loopback import LoopbackFederation  # noqa: E402
from pocketlm.errors import PocketLMError  # noqa: E402

RUN_TIMEOUT = 300      # one `flwr run`, seconds (2 cores shared with other work)
REFUSAL_TIMEOUT = 90   # a refused SuperNode gives up on its own well within this
DEVICES = USERS[:2]    # alice, bob: registered, trained


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    make_tls(root / "certs", ["localhost"])           # 127.0.0.1 is always in the certificate too
    with LoopbackFederation(root, REPO, tls=root / "certs", auth=True) as f:
        f.corpus = write_folder_corpus(root / "corpus")
        shutil.rmtree(f.corpus / "carol")              # two devices: the corpus has two users
        f.keys = {u: make_node_key(root / "keys" / u)[0] for u in [*DEVICES, "dave", "mallory"]}
        f.start_superlink()
        for i, user in enumerate(DEVICES):
            f.register(pub(f.keys[user]))
            f.start_node(user, node_config(f, i), auth_key=f.keys[user])
        yield f


def pub(key):
    return key.with_name(key.name + ".pub")


def node_config(fed, i: int) -> dict:
    return {"partition-id": i, "state-dir": str(fed.root / "state" / USERS[i])}


def refused(fed, name: str) -> str:
    """Wait (bounded) for a SuperNode that must give up by itself; its log, after checking it never joined."""
    assert fed.wait_exit(name, REFUSAL_TIMEOUT) != 0
    log = fed.log(name)
    assert "SuperNode ID" not in log and "Receiving" not in log, log[-2000:]
    return log


def test_a_supernode_trusting_another_ca_cannot_connect(fed):
    make_tls(fed.root / "other-ca", ["localhost"])
    fed.register(pub(fed.keys["dave"]))                # registered: only the CA is wrong
    fed.start_node("dave", node_config(fed, 1), ca=fed.root / "other-ca" / "ca.crt", auth_key=fed.keys["dave"],
                   wait=False)
    assert "CERTIFICATE_VERIFY_FAILED" in refused(fed, "dave")


def test_unregistered_supernodes_are_refused(fed):
    fed.start_node("mallory", node_config(fed, 1), auth_key=fed.keys["mallory"], wait=False)
    fed.start_node("keyless", node_config(fed, 1), wait=False)      # TLS but no key at all
    assert "Failed to activate SuperNode" in refused(fed, "mallory")
    assert "must be registered" in refused(fed, "keyless")
    link = fed.log("superlink")
    assert "No SuperNode found with the given public key" in link    # mallory's key is unknown
    assert "ApiError:2001" in link                                   # fleet self-registration is off


def test_a_tls_round_with_authenticated_devices_equals_the_simulation(fed, tmp_path):
    assert f"Uvicorn running on https://127.0.0.1:{fed.port}" in fed.log("superlink")
    out = fed.root / "a" / "out" / "1g1s"
    rc = run_config(fed.corpus, fed.root / "a", rounds=1,
                    **{"min-available-nodes": len(DEVICES), "min-train-nodes": len(DEVICES)})
    fed.run(rc, "a", RUN_TIMEOUT, expect=out / "history.json")
    assert json.loads((out / "history.json").read_text())["rounds"]["1"]["train"]["accepted"] == len(DEVICES)
    sim = simulate(fed.corpus, tmp_path, rounds=1)
    assert_matches_simulation(sim, load_file(str(out / "global.safetensors")),
                              {u: fed.root / "state" / u for u in DEVICES})
    for user in DEVICES:
        assert "Receiving: train message" in fed.log(user)


def test_key_material_is_what_flower_reads(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    key, public = make_node_key(tmp_path / "dev")
    assert load_ssh_private_key(key.read_bytes(), None).curve.name == "secp384r1"
    assert try_load_public_key(public)                  # what `flwr supernode register` accepts
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(CertError, match="refusing to overwrite"):
        make_node_key(tmp_path / "dev")


def test_certificates_name_the_server_and_bad_requests_are_clear_errors(tmp_path):
    from cryptography import x509
    from typer.testing import CliRunner

    from pocketlm.cli import app

    with pytest.raises(CertError, match="not a host name"):
        make_tls(tmp_path / "c", ["http://server:9091"])
    assert not (tmp_path / "c").exists()
    paths = make_tls(tmp_path / "c", ["server.example", "10.0.0.1"])
    san = x509.load_pem_x509_certificate(paths["server.pem"].read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert set(map(str, san.get_values_for_type(x509.IPAddress))) == {"10.0.0.1", "127.0.0.1"}
    assert san.get_values_for_type(x509.DNSName) == ["server.example", "localhost"]
    before = paths["ca.crt"].read_bytes()
    with pytest.raises(CertError, match="refusing to overwrite"):
        make_tls(tmp_path / "c", ["server.example"])
    assert paths["ca.crt"].read_bytes() == before       # nothing lost
    r = CliRunner().invoke(app, ["fl", "superlink", "--auth", "--dry-run"])
    assert isinstance(r.exception, PocketLMError) and "needs TLS" in str(r.exception)
    r = CliRunner().invoke(app, ["fl", "superlink", "--tls", str(tmp_path / "none"), "--dry-run"])
    assert isinstance(r.exception, PocketLMError) and "ca.crt does not exist" in str(r.exception)
    r = CliRunner().invoke(app, ["fl", "supernode", "--state", "s", "--partition", "0", "--auth-key", "k",
                                 "--dry-run"])
    assert isinstance(r.exception, PocketLMError) and "needs TLS" in str(r.exception)
