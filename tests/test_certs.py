"""`fedlora certs` and `fedlora connect`: what they write, and what they refuse."""

from __future__ import annotations

import stat
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from simulations.cli import main


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_server_certificate_and_site_keys(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--san", "coordinator.example.org",
                 "--san", "10.0.0.5", "--site", "hospital-a"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The loopback names too: the SuperLink's own SuperExec connects to 127.0.0.1 over TLS.
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5",
                                                                            "127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The site's key pair matches, in the OpenSSH format Flower reads, and only the owner
    # may read the private keys.
    private = load_ssh_private_key((tmp_path / "hospital-a.key").read_bytes(), password=None)
    public = load_ssh_public_key((tmp_path / "hospital-a.pub").read_bytes())
    assert private.public_key().public_numbers() == public.public_numbers()
    assert public.curve.name == "secp384r1"
    for key in ("ca.key", "server.key", "hospital-a.key"):
        assert _mode(tmp_path / key) == 0o600, key
    assert _mode(tmp_path / "server.crt") == 0o644
    assert str(tmp_path / "hospital-a.pub") in capsys.readouterr().out


def test_existing_files_are_kept_without_force(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--site", "bank-1"]) == 0
    before = (tmp_path / "bank-1.key").read_bytes()
    assert main(["certs", "--out", str(tmp_path), "--site", "bank-1"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert (tmp_path / "bank-1.key").read_bytes() == before
    assert main(["certs", "--out", str(tmp_path), "--site", "bank-1", "--force"]) == 0
    assert (tmp_path / "bank-1.key").read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("args, message", [
    ([], "give --san"),
    (["--san", "not a host!"], "neither an IP address nor a host name"),
    (["--site", "../escape"], "site name '../escape'"),
    (["--san", "localhost", "--days", "0"], "--days must be between"),
    (["--site", "ok", "--site", "bad/name"], "site name 'bad/name'"),
    (["--site", "twice", "--site", "twice"], "named twice"),
])
def test_bad_certs_input_is_one_line(tmp_path, capsys, args, message):
    assert main(["certs", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_certs_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "notes").write_text("kept")
    assert main(["certs", "--out", str(tmp_path / "notes"), "--site", "a"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and err.count("\n") == 1
    assert (tmp_path / "notes").read_text() == "kept"


def test_connect_saves_a_tls_connection_for_flwr(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    assert main(["certs", "--out", str(tmp_path), "--san", "localhost"]) == 0
    assert main(["connect", "consortium", "--address", "coordinator:9092", "--ca",
                 str(tmp_path / "ca.crt"), "--default"]) == 0
    config = tomllib.loads((tmp_path / "home" / "config.toml").read_text())
    assert config["superlink"]["default"] == "consortium"
    assert config["superlink"]["consortium"] == {
        "address": "coordinator:9092", "root-certificates": str(tmp_path / "ca.crt")}
    assert main(["connect", "x", "--address", "no-port", "--ca", str(tmp_path / "ca.crt")]) == 2
    assert main(["connect", "x", "--address", "h:1", "--ca", str(tmp_path / "nope.crt")]) == 2
    assert main(["connect", "default", "--address", "h:1", "--ca",
                 str(tmp_path / "ca.crt")]) == 2
    err = capsys.readouterr().err
    assert "HOST:PORT" in err and "does not exist" in err and "not 'default'" in err
    assert tomllib.loads((tmp_path / "home" / "config.toml").read_text())["superlink"][
        "default"] == "consortium"


def test_gateway_refuses_bad_input_with_one_line_each(tmp_path, capsys):
    """Before it serves anything: no certificates, an address without a port, the SuperLink's
    own address as the public one."""
    assert main(["certs", "--out", str(tmp_path / "certs"), "--san", "localhost"]) == 0
    capsys.readouterr()
    certs = str(tmp_path / "certs")
    cases = [(["--certs", str(tmp_path / "none")], "ca.crt does not exist"),
             (["--certs", certs, "--listen", "0.0.0.0"], "--listen must be HOST:PORT"),
             (["--certs", certs, "--superlink", "127.0.0.1:99999"], "--superlink must be"),
             (["--certs", certs, "--listen", "127.0.0.1:9000"], "the same address")]
    for args, message in cases:
        assert main(["gateway", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
