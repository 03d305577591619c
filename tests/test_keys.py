"""Keys: RFC 7748 vectors, agreement with PyNaCl and `wg pubkey`, generation."""
import base64
import shutil
import subprocess

import pytest

import innernet

RFC7748 = [
    ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
     "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
     "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
    ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
     "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
     "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
]


@pytest.mark.parametrize("k,u,out", RFC7748)
def test_rfc7748_section_5_2(k, u, out):
    assert innernet.x25519(bytes.fromhex(k), bytes.fromhex(u)).hex() == out


def test_rfc7748_iterated():
    k = u = (9).to_bytes(32, "little")
    for i in range(1000):
        k, u = innernet.x25519(k, u), k
        if i == 0:
            assert k.hex() == "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"
    assert k.hex() == "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"


def test_rfc7748_section_6_1_diffie_hellman():
    a = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    b = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    nine = (9).to_bytes(32, "little")
    pa, pb = innernet.x25519(a, nine), innernet.x25519(b, nine)
    assert pa.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert pb.hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert innernet.x25519(a, pb).hex() == innernet.x25519(b, pa).hex() == shared


def test_innernet_key_vector():
    # shared/src/wg.rs test in innernet
    assert innernet.public_key("SGb+ojrRNDuMePufwtIYhXzA//k6wF3R21tEBgKlzlM=") == \
        "DD5yKRfzExcV5+kDnTroDgCU15latdMjiQ59j1hEuk8="


def test_pure_python_agrees_with_pynacl():
    nacl = pytest.importorskip("nacl.bindings")
    for _ in range(30):
        raw = innernet.os.urandom(32)           # deliberately unclamped
        pure = innernet.x25519(raw, (9).to_bytes(32, "little"))
        assert pure == nacl.crypto_scalarmult_base(raw)


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools not installed")
def test_agrees_with_wg_pubkey():
    for _ in range(10):
        priv = innernet.generate_private_key()
        out = subprocess.run(["wg", "pubkey"], input=priv + "\n", capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == innernet.public_key(priv)


def test_generated_keys_are_clamped_and_distinct():
    keys = {innernet.generate_private_key() for _ in range(2000)}
    assert len(keys) == 2000
    for k in list(keys)[:200]:
        raw = base64.b64decode(k)
        assert raw[0] & 7 == 0 and raw[31] & 128 == 0 and raw[31] & 64
        assert innernet.public_key(k) != k


@pytest.mark.parametrize("bad", ["", "abc", "SGb+ojrRNDuMePufwtIYhXzA//k6wF3R21tEBgKlzlM=="[:-1] + "!",
                                 "=MlzlKgBEtl21R3Fw6kA//zXAhYIYtwfuPMuDjNRrjo+bGS",
                                 base64.b64encode(b"x" * 31).decode(), None, 5])
def test_bad_keys_are_refused(bad):
    with pytest.raises(innernet.InnernetError):
        innernet.parse_key(bad)


def test_hex_round_trip():
    k = innernet.generate_private_key()
    assert innernet.key_from_hex(innernet.key_to_hex(k)) == k


def test_network_lock_without_pynacl_is_one_line_naming_the_package(monkeypatch, capsys,
                                                                     tmp_path):
    """Lock needs PyNaCl (a pure-Python Ed25519 verify is ~50x slower: 5,000
    peers would take seconds); without it, one line and a hint naming it."""
    import sys as _sys
    monkeypatch.setitem(_sys.modules, "nacl.signing", None)     # import fails
    with pytest.raises(innernet.InnernetError) as e:
        innernet.lock_keypair()
    assert "PyNaCl" in e.value.message and "python3-nacl" in e.value.hint
    conf = tmp_path / "etc"
    conf.mkdir()
    innernet.atomic_write(str(conf / "evil.conf"), innernet.InterfaceConfig(
        "evil", innernet.ipaddress.ip_interface("10.66.1.2/16"),
        innernet.generate_private_key(), None, innernet.public_key(
            innernet.generate_private_key()), "198.18.0.1:51820", "10.66.0.1:51820").to_toml(),
        0o600)
    assert innernet.main(["-c", str(conf), "-d", str(tmp_path / "lib"), "lock", "key",
                          "evil"]) != 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "innernet: error: network lock needs PyNaCl, which is not installed"
    assert err[1].startswith("hint: ") and "python3-nacl" in err[1] and len(err) == 2
