"""File formats: TOML subset, invitation/config/server config, data store, hosts."""
import ipaddress
import os
import re

import pytest

import innernet
from innernet import (InnernetError, InterfaceConfig, Peer, Cidr, ServerConfig,
                      atomic_write, toml_dumps, toml_loads, update_hosts_text, hosts_lines)

INVITE = """# comment header
[interface]
network-name = "evilcorp"
address = "10.66.2.1/16"
private-key = "SGb+ojrRNDuMePufwtIYhXzA//k6wF3R21tEBgKlzlM="

[server]
public-key = "DD5yKRfzExcV5+kDnTroDgCU15latdMjiQ59j1hEuk8="
external-endpoint = "vpn.Example.com:51820"
internal-endpoint = "10.66.0.1:51820"
"""


def test_invitation_parses_as_innernet_writes_it():
    cfg = InterfaceConfig.from_toml(INVITE, "invite.toml")
    assert cfg.network_name == "evilcorp"
    assert cfg.address == ipaddress.ip_interface("10.66.2.1/16")
    assert cfg.listen_port is None
    assert cfg.server_external_endpoint == "vpn.example.com:51820"
    assert str(cfg.server_ip) == "10.66.0.1"


def test_config_round_trip_with_overrides():
    cfg = innernet.replaced(InterfaceConfig.from_toml(INVITE, "x"), listen_port=51821,
                              peer_endpoint_overrides={"10.66.2.7": "198.51.100.9:40000"})
    text = cfg.to_toml(innernet.INVITATION_HEADER)
    assert text.startswith("# This is an innernet invitation")
    assert '"10.66.2.7" = "198.51.100.9:40000"' in text
    assert InterfaceConfig.from_toml(text, "x") == cfg


def test_server_config_round_trip():
    sc = ServerConfig(innernet.generate_private_key(), 51820, "10.66.0.1", 16)
    assert ServerConfig.from_toml(sc.to_toml(), "s") == sc
    assert str(sc.interface) == "10.66.0.1/16"


@pytest.mark.parametrize("text,message", [
    ("[interface]\n", "needs an [interface] and a [server]"),
    (INVITE.replace('address = "10.66.2.1/16"', 'address = "nope"'), "address"),
    (INVITE.replace("SGb+oj", "SGb"), "private-key"),
    (INVITE.replace("[server]", "listen-port = 99999\n[server]"), "listen-port"),
    (INVITE.replace('internal-endpoint = "10.66.0.1:51820"', 'internal-endpoint = "h:1"'),
     "IP:PORT"),
    (INVITE + "bogus = 1\n", "unknown key"),
    (INVITE.replace("[server]", "[server]\n[server]"), "defined twice"),
    ('[interface]\nnetwork-name = "unterminated\n', "unterminated"),
    ("[interface\n", "bad table header"),
    ("x = 1979-05-27\n", "unexpected text"),
    ("\x00\x01garbage", "bad key"),
])
def test_bad_config_files_give_one_clear_error(text, message):
    with pytest.raises(InnernetError, match=re.escape(message)):
        InterfaceConfig.from_toml(text, "f.toml")


def test_toml_values():
    data = toml_loads('a = "x\\ty\\u00e9"\nb = -12\nc = true\n"d e" = [1, "two"]  # c\n'
                      "f = 'lit\\eral'\n[t]\ng = 1_000\n", "t")
    assert data == {"a": "x\tyé", "b": -12, "c": True, "d e": [1, "two"], "f": "lit\\eral",
                    "t": {"g": 1000}}
    assert toml_loads(toml_dumps(data), "t") == data


def test_data_store_round_trip(tmp_path):
    peers = [Peer(1, "innernet-server", "10.66.0.1", 2, innernet.public_key(
        innernet.generate_private_key()), "172.18.1.1:51820", 25, True, False, True, None,
        ["172.18.1.1:51820"]),
        Peer(2, "a", "10.66.1.1", 3, innernet.public_key(innernet.generate_private_key()),
             invite_expires=1700000000)]
    cidrs = [Cidr(1, "evilcorp", "10.66.0.0/16", None), Cidr(3, "humans", "10.66.1.0/24", 1)]
    path = str(tmp_path / "evilcorp.json")
    assert innernet.save_data_store(path, peers, cidrs)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert innernet.load_data_store(path) == (peers, cidrs, None)
    assert not innernet.save_data_store(path, peers, cidrs)      # unchanged: no write
    text = open(path).read()
    assert '"version": "1"' in text and '"secs_since_epoch": 1700000000' in text


def test_a_damaged_data_store_is_refused_and_kept_not_reset(tmp_path):
    """Its pins are not dropped (a lying server's TOFU reset): an error, the
    file left as it is, a hint to move it aside knowingly."""
    path = tmp_path / "x.json"
    for text in ('{"version": "1", "peers": [{"id": "x"}]}', '{"version": "1", "pee'):
        path.write_text(text)
        with pytest.raises(InnernetError) as e:
            innernet.load_data_store(str(path))
        assert str(path) in e.value.message and "\n" not in e.value.message
        assert f"mv {path} {path}.broken-" in e.value.hint
        assert path.read_text() == text


def test_atomic_write_modes_and_exclusive(tmp_path):
    p = str(tmp_path / "secret")
    atomic_write(p, "a", 0o600)
    assert open(p).read() == "a" and os.stat(p).st_mode & 0o777 == 0o600
    atomic_write(p, "b", 0o600)
    assert open(p).read() == "b"
    with pytest.raises(InnernetError, match="already exists"):
        atomic_write(p, "c", 0o600, exclusive=True)
    assert open(p).read() == "b"
    assert os.listdir(tmp_path) == ["secret"]            # no temporary left behind


# -- hosts (innernet's hosts-file section and its tests) -----------------------

def test_hosts_section_added_replaced_and_unchanged(tmp_path):
    path = str(tmp_path / "hosts")
    with open(path, "w") as f:
        f.write("preexisting\ncontent")
    assert innernet.write_hosts_file(path, "foo", ["1.1.1.1 whatever"])
    text = open(path).read()
    assert text.startswith("preexisting\ncontent\n")
    assert "# DO NOT EDIT foo BEGIN\n1.1.1.1 whatever\n# DO NOT EDIT foo END\n" in text
    assert not innernet.write_hosts_file(path, "foo", ["1.1.1.1 whatever"])
    assert innernet.write_hosts_file(path, "foo", ["2.2.2.2 other"])
    assert "whatever" not in open(path).read() and open(path).read().count("BEGIN") == 1
    assert innernet.write_hosts_file(path, "foo", [])
    assert open(path).read() == "preexisting\ncontent\n"
    assert sorted(os.listdir(tmp_path)) == ["hosts"]


def test_hosts_damaged_section_is_an_error():
    with pytest.raises(InnernetError, match="damaged"):
        update_hosts_text("# DO NOT EDIT foo BEGIN\nx\n", "foo", ["1.1.1.1 a"])


def test_hosts_lines_format():
    k = innernet.public_key(innernet.generate_private_key())
    peers = [Peer(2, "b", "10.66.1.10", 1, k, is_redeemed=True),
             Peer(1, "a", "10.66.1.9", 1, k, is_redeemed=True),
             Peer(3, "c", "10.66.1.11", 1, k, is_disabled=True, is_redeemed=True)]
    assert hosts_lines(peers, "evil") == ["10.66.1.9 a.evil.wg", "10.66.1.10 b.evil.wg"]
    assert hosts_lines(peers, "evil", "") == ["10.66.1.9 a", "10.66.1.10 b"]
    assert hosts_lines(peers, "evil", "corp") == ["10.66.1.9 a.corp", "10.66.1.10 b.corp"]


@pytest.mark.parametrize("text,ok", [("30d", 2592000), ("2h", 7200), ("1000s", 1000),
                                     ("7w", 4233600), ("d", None), ("", None), ("5y", None),
                                     ("-1d", None)])
def test_timestring(text, ok):
    if ok is None:
        with pytest.raises(InnernetError):
            innernet.parse_timestring(text)
    else:
        assert innernet.parse_timestring(text) == ok


@pytest.mark.parametrize("text,norm", [("1.2.3.4:51820", "1.2.3.4:51820"),
                                       ("[fd00::1]:51820", "[fd00::1]:51820"),
                                       ("VPN.example.com:1", "vpn.example.com:1")])
def test_endpoints(text, norm):
    assert innernet.normalize_endpoint(text) == norm


@pytest.mark.parametrize("bad", ["1.2.3.4", "1.2.3.4:0", "1.2.3.4:70000", "fd00::1:5",
                                 ":51820", "a b:1", "x" * 400 + ":1"])
def test_bad_endpoints(bad):
    with pytest.raises(InnernetError):
        innernet.parse_endpoint(bad)


@pytest.mark.parametrize("name,ok", [("wg-01", True), ("", False), ("\0", False),
                                     ("a\0b", False), ("a b", False), ("a/b", False),
                                     ("abcdefghijklmnop", False), ("Upper", False)])
def test_interface_names(name, ok):
    if ok:
        assert innernet.parse_interface(name) == name
    else:
        with pytest.raises(InnernetError):
            innernet.parse_interface(name)


def test_client_config_lists_standby_endpoints_in_an_extension_key():
    from innernet import InterfaceConfig, InnernetError
    text = InterfaceConfig("n", innernet.ipaddress.ip_interface("10.9.0.2/16"),
                           innernet.generate_private_key(), None,
                           innernet.public_key(innernet.generate_private_key()),
                           "198.18.0.1:51820", "10.9.0.1:51820",
                           server_endpoints=["198.18.0.9:51820"]).to_toml()
    assert 'external-endpoints = ["198.18.0.1:51820", "198.18.0.9:51820"]' in text
    cfg = InterfaceConfig.from_toml(text, "c")
    assert cfg.endpoints == ["198.18.0.1:51820", "198.18.0.9:51820"]
    plain = InterfaceConfig.from_toml(text.replace(
        'external-endpoints = ["198.18.0.1:51820", "198.18.0.9:51820"]\n', ""), "c")
    assert plain.endpoints == ["198.18.0.1:51820"] and "external-endpoints" not in \
        plain.to_toml()                      # innernet's file, byte for byte as before
    with pytest.raises(InnernetError):
        InterfaceConfig.from_toml(text.replace('"198.18.0.9:51820"]', '"nope"]'), "c")



class RecordingBackend:
    """A device that is up, empty, and records what fail_over applies to it."""

    def __init__(self):
        self.applied = []

    def exists(self, iface):
        return True

    def get(self, iface):
        return innernet.Device(iface)

    def apply(self, iface, updates):
        self.applied += updates


def test_a_client_on_the_standby_fails_back_to_the_primary(tmp_path):
    """Found by the chaos soak: once failed over, the endpoint list lost the
    primary (current_server's cfg starts at the standby), so a client whose
    standby did not answer stayed there for ever, even with the primary back."""
    files = innernet.ClientFiles("n", str(tmp_path / "etc"), str(tmp_path / "lib"))
    os.makedirs(files.config_dir)
    os.makedirs(files.data_dir)
    eps = ["198.18.0.1:51820", "198.18.0.2:51820", "198.18.0.3:51820"]
    server_key = innernet.public_key(innernet.generate_private_key())
    cfg = InterfaceConfig("n", ipaddress.ip_interface("10.9.0.2/16"),
                          innernet.generate_private_key(), None, server_key, eps[0],
                          "10.9.0.1:51820", server_endpoints=eps[1:])
    innernet.atomic_write(files.config, cfg.to_toml())

    seen = []
    for _ in range(4):
        now = innernet.current_server(files, innernet.load_client_config(files))
        seen.append(innernet.fail_over(files, now, RecordingBackend()).server_external_endpoint)
    assert seen == [eps[1], eps[2], eps[0], eps[1]]


def test_a_client_waits_only_for_a_standby_that_refuses_not_one_that_is_gone(tmp_path):
    """Issue 29 item 7: a client that switched endpoints less than
    FAILOVER_GRACE ago and had a handshake there since stayed with that
    server when it was gone. Only a refused connection (the host is there,
    its API not yet) may wait; a timeout or a broken connection moves on."""
    import time
    files = innernet.ClientFiles("n", str(tmp_path / "etc"), str(tmp_path / "lib"))
    os.makedirs(files.config_dir)
    os.makedirs(files.data_dir)
    eps = ["198.18.0.1:51820", "198.18.0.2:51820"]
    server_key = innernet.public_key(innernet.generate_private_key())
    cfg = InterfaceConfig("n", ipaddress.ip_interface("10.9.0.2/16"),
                          innernet.generate_private_key(), None, server_key, eps[0],
                          "10.9.0.1:51820", server_endpoints=eps[1:])
    innernet.atomic_write(files.config, cfg.to_toml())
    innernet.save_server_state(files, eps[1])            # switched to the standby just now

    class Backend:
        def exists(self, iface):
            return True

        def get(self, iface):                             # ... and it handshook since
            return innernet.Device(iface, peers=[innernet.DevicePeer(
                server_key, allowed_ips=["10.9.0.1/32"], last_handshake=time.time() + 1)])

        def apply(self, iface, updates):
            pass
    now = innernet.current_server(files, innernet.load_client_config(files))
    assert now.server_external_endpoint == eps[1]
    stay = innernet.fail_over(files, now, Backend(), refused=True)
    assert stay.server_external_endpoint == eps[1]        # a standby starting: wait
    gone = innernet.fail_over(files, now, Backend(), refused=False)
    assert gone.server_external_endpoint == eps[0]        # gone: the next one at once


def test_a_sync_that_outlived_its_interface_fails_over_nothing(tmp_path):
    """Found by the 60-minute soak: a fetch still waiting on the server when
    its interface was uninstalled and another peer installed under the same
    name pointed the new peer's device at the next endpoint. fail_over (and
    the sync, same_peer) now leave alone a config that is gone or another's."""
    files = innernet.ClientFiles("n", str(tmp_path / "etc"), str(tmp_path / "lib"))
    os.makedirs(files.config_dir)
    os.makedirs(files.data_dir)
    eps = ["198.18.0.1:51820", "198.18.0.2:51820"]
    server_key = innernet.public_key(innernet.generate_private_key())
    old = InterfaceConfig("n", ipaddress.ip_interface("10.9.0.2/16"),
                          innernet.generate_private_key(), None, server_key, eps[0],
                          "10.9.0.1:51820", server_endpoints=eps[1:])
    backend = RecordingBackend()
    assert not innernet.same_peer(files, old)                 # uninstalled
    assert innernet.fail_over(files, old, backend) is old
    new = innernet.replaced(old, address=ipaddress.ip_interface("10.9.0.3/16"),
                              private_key=innernet.generate_private_key())
    innernet.atomic_write(files.config, new.to_toml())        # installed again
    assert not innernet.same_peer(files, old)
    assert innernet.fail_over(files, old, backend) is old
    assert backend.applied == [] and innernet.load_server_state(files) == {}
    assert innernet.same_peer(files, new)
    assert innernet.fail_over(files, new, RecordingBackend()).server_external_endpoint == eps[1]


def test_replica_urls_are_checked_before_litestream_runs(tmp_path):
    from innernet import InnernetError, litestream_config
    out = litestream_config(str(tmp_path / "n.db"), "/srv/replica", 1)
    assert '"url": "file:///srv/replica"' in out and '"sync-interval": "1s"' in out
    assert '"url": "sftp://u@h/p"' in litestream_config("n.db", "sftp://u@h/p", 2)
    for bad in ("replica", "http://x", "file://", "s3://a b"):
        with pytest.raises(InnernetError):
            litestream_config("n.db", bad, 1)
