"""The fast path of an unchanged fetch: its command line, digests and record,
and the module build_zipapp.py makes of it (the end-to-end proof that it
answers, and steps aside when anything changed, is tests/e2e/test_fast_fetch.py)."""
import contextlib
import os
import subprocess
import sys
import types

import pytest

import innernet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import build_zipapp  # noqa: E402

BARE = ["/usr/bin/python3", "-S", "-I"] if os.path.exists("/usr/bin/python3") \
    else [sys.executable, "-S", "-I"]


def test_a_command_line_is_known_by_all_it_depends_on():
    run = innernet.invocation(["fetch", "net"], {"INNERNET_X": "1", "HOME": "/root"}, "/")
    assert run == innernet.invocation(["fetch", "net"], {"INNERNET_X": "1"}, "/")
    others = [innernet.invocation(["fetch", "net", "-v"], {"INNERNET_X": "1"}, "/"),
              innernet.invocation(["fetch", "net"], {"INNERNET_X": "2"}, "/"),
              innernet.invocation(["fetch", "net"], {"INNERNET_X": "1", "WG_X": "1"}, "/"),
              innernet.invocation(["fetch", "net"], {"INNERNET_X": "1"}, "/tmp"),
              innernet.invocation(["fetch net"], {"INNERNET_X": "1"}, "/")]
    assert run not in others and len(set(others)) == len(others)
    assert "\n" not in innernet.invocation(["fetch", "a\nb\tc"], {}, "/")


def test_records_are_looked_for_where_the_command_line_may_have_put_them():
    assert innernet.data_dir_candidates(["fetch"]) == [innernet.CLIENT_DATA_DIR]
    assert innernet.data_dir_candidates(["-d", "/a", "--data-dir=/b", "-d/c", "--data-dir",
                                         "/d", "fetch"])[1:] == ["/a", "/b", "/c", "/d"]


def test_only_a_recorded_command_line_is_answered(tmp_path, monkeypatch):
    monkeypatch.setattr(innernet, "_server_says_unchanged", lambda *a: True)
    monkeypatch.setattr(innernet, "uapi_digest",
                        lambda iface, now: innernet.device_digest([dump([])], now))
    monkeypatch.setattr(innernet, "link_digest", lambda iface, snapshot=None: "0:0")
    watched = tmp_path / "n.conf"
    watched.write_text("x")
    argv = ["innernet", "-d", str(tmp_path), "fetch", "n"]
    run = innernet.invocation(argv[1:], os.environ, os.getcwd())
    links = innernet.raw_links()
    fields = {"run": run, "etag": '"e"', "endpoint": "10.1.0.1:51820", "key": "k",
              "links": innernet.links_fingerprint(links), "link": "0:0",
              "device": innernet.device_digest([dump([])], 0), "due": ""}
    (tmp_path / "n.fetch").write_text(innernet.fast_record(
        fields, [(str(watched), innernet.file_fingerprint(str(watched), secret=False))]))
    assert innernet.fast_fetch(argv) is None                 # no run noted yet
    (tmp_path / innernet.FAST_RUNS).write_text(f"{run}\tn\n")
    assert innernet.fast_fetch(argv) == 0
    assert innernet.fast_fetch(argv + ["--no-write-hosts"]) is None
    assert innernet.fast_fetch(argv[:1] + ["--data-dir", str(tmp_path), "fetch", "n"]) is None
    monkeypatch.setenv("INNERNET_BACKEND_X", "1")
    assert innernet.fast_fetch(argv) is None
    monkeypatch.delenv("INNERNET_BACKEND_X")
    watched.write_text("y")                                  # a watched file changed
    assert innernet.fast_fetch(argv) is None


def test_innernet_server_never_takes_it():
    assert innernet.fast_fetch(["/usr/bin/innernet-server", "fetch"]) is None


def dump(peers, port=51820):
    out = [f"private_key={'11' * 32}", f"listen_port={port}"]
    for key, ep, hs, ka, ips in peers:
        out += [f"public_key={key}", f"endpoint={ep}", f"last_handshake_time_sec={hs}",
                "last_handshake_time_nsec=123", f"rx_bytes={hs * 7}", f"tx_bytes={hs * 3}",
                f"persistent_keepalive_interval={ka}"] + [f"allowed_ip={ip}" for ip in ips]
    return ("\n".join(out) + "\nerrno=0\n\n").encode()


def digest(text, now, size=None):
    """device_digest of a dump read in pieces of ``size`` bytes (whole if None)."""
    size = size or len(text) or 1
    return innernet.device_digest([text[i:i + size] for i in range(0, len(text), size)], now)


def test_the_device_digest_sees_what_the_sync_compares():
    now = 10000
    a = ("aa" * 32, "198.18.0.1:1", now - 5, 25, ["10.1.0.2/32"])
    b = ("bb" * 32, "198.18.0.2:2", 0, 25, ["10.1.0.3/32", "10.2.0.0/24"])
    first = digest(dump([a, b]), now)
    assert first.startswith("2:")
    # read in pieces of any size, the same
    for size in (1, 2, 7, 64, 1000):
        assert digest(dump([a, b]), now, size) == first
    # the same device in another order, with other counters and a roamed live peer
    roamed = (a[0], "198.18.0.9:9", now - 1, 25, a[4])
    b_swapped = b[:4] + (list(reversed(b[4])),)
    assert digest(dump([b_swapped, roamed]), now) == first
    changed = [
        dump([a]),                                          # a peer removed by hand
        dump([a, b[:1] + ("198.18.0.7:7",) + b[2:]]),      # a stale peer's endpoint
        dump([a, b[:3] + (0,) + b[4:]]),                   # keepalive
        dump([a, b[:4] + (["10.1.0.3/32"],)]),             # allowed IPs
        dump([a, b], port=51821),                           # the listen port
        dump([a, a[:1] + b[1:]]),                           # two peers swap allowed IPs
    ]
    for d in changed:
        assert digest(d, now) != first
    # a peer whose handshake grows old crosses the line the sync looks at
    assert digest(dump([a, b]), now + innernet.RECENT_HANDSHAKE) != first
    assert digest(dump([]), now) == digest(dump([]), now + 999)
    # an answer cut short, or an error, is no digest
    assert digest(dump([a, b])[:-12], now) is None
    assert digest(dump([a, b]).replace(b"errno=0", b"errno=5"), now) is None


def test_the_record_round_trips_and_damage_is_no_record(tmp_path):
    fields = {"etag": '"abc"', "endpoint": "10.1.0.1:51820", "due": ""}
    files = [("/etc/innernet/n.conf", "1:2:3:100600"), ("/a path/with spaces", "-")]
    path = tmp_path / "n.fetch"
    path.write_text(innernet.fast_record(fields, files))
    assert innernet.read_fast_record(str(path)) == (fields, files)
    # a record of an older format (round 30, U30-1: one from before the lock
    # files were listed in it) is no record
    old = innernet.fast_record(fields, files).replace(innernet.FAST_FORMAT, "innernet-fetch 2")
    for text in ("", "innernet-fetch 1\netag x\n", "garbage", "\0\0", old):
        path.write_text(text)
        assert innernet.read_fast_record(str(path)) is None
    path.write_bytes(b"\xff\xfe")
    assert innernet.read_fast_record(str(path)) is None
    assert innernet.read_fast_record(str(tmp_path / "missing")) is None


def test_world_readable_files_are_left_to_the_full_sync(tmp_path):
    path = tmp_path / "n.conf"
    path.write_text("x")
    os.chmod(path, 0o600)
    assert innernet.file_fingerprint(str(path)).count(":") == 3
    os.chmod(path, 0o644)
    assert innernet.file_fingerprint(str(path)) is None
    assert innernet.file_fingerprint(str(path), secret=False).count(":") == 3   # a hosts file
    assert innernet.file_fingerprint(str(tmp_path / "missing")) == "-"


def test_the_link_digest_sees_addresses_routes_and_rules():
    """On loopback, which every namespace has: the digest is stable, and "-"
    for a missing interface (no root needed to read rtnetlink)."""
    first = innernet.link_digest("lo")
    assert first not in ("-", "?") and first == innernet.link_digest("lo")
    assert innernet.link_digest("no-such-if0") == "-"


def test_local_networks_are_read_from_the_raw_links():
    links = ([("eth0", "192.168.7.9", "255.255.255.0"), ("eth1", None, None)],
             [["fd000000000000000000000000000002", "04", "40", "00", "80", "eth0"]])
    nets = innernet.local_networks(links)
    assert [str(n) for n in nets] == ["192.168.7.9/24", "fd00::2/64"]
    assert innernet.links_fingerprint(links) != innernet.links_fingerprint((links[0][:1], []))


def test_the_archive_module_is_the_two_sections_and_imports_little(tmp_path):
    src = build_zipapp.fast_module_source(open(os.path.join(ROOT, "innernet.py")).read())
    assert "# Constants ####" in src and "# Fast path of an unchanged fetch ####" in src
    assert "# Errors and output" not in src and "def main(" not in src
    (tmp_path / "innernet_fast.py").write_text(src)
    probe = ("import sys\nprint(' '.join(sorted(sys.modules)))\n"
             "sys.path.insert(0, sys.argv[2])\nimport innernet_fast\n"
             "print(innernet_fast.fast_fetch(['innernet', 'fetch', '--no-such']))\n"
             "print(innernet_fast.fast_fetch(['innernet', '-d', sys.argv[1], 'fetch']))\n"
             "innernet_fast.link_digest('lo')\n"
             "print(' '.join(sorted(sys.modules)))\n")
    r = subprocess.run(BARE + ["-c", probe, str(tmp_path / "none"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    initial, first, second, modules = r.stdout.splitlines()
    assert first == second == "None"
    heavy = {"re", "socket", "ipaddress", "json", "argparse", "dataclasses", "sqlite3",
             "os", "zlib", "fcntl", "io"} - set(initial.split())
    assert not heavy & set(modules.split())


def _nlmsg(header, *attrs):
    return header + b"".join(innernet._nl_attr(kind, payload) for kind, payload in attrs)


def test_the_hosts_links_are_read_from_rtnetlink_as_the_ioctls_would_answer():
    """raw_links from an rtnetlink snapshot: up links other than loopback and
    tunnels, each with its first IPv4 address labelled with its name (what
    SIOCGIFADDR answers), and their IPv6 addresses as /proc/net/if_inet6 rows."""
    import socket
    import struct

    def link(index, flags, name):
        return _nlmsg(struct.pack("=BxHiII", 0, 1, index, flags, 0), (3, name + b"\0"))

    def addr(family, plen, index, local, label=None):
        attrs = [(1, local), (2, local)] + ([(3, label + b"\0")] if label else [])
        return _nlmsg(struct.pack("=BBBBI", family, plen, 0x80, 0, index), *attrs)
    v4 = lambda text: socket.inet_aton(text)                          # noqa: E731
    v6 = lambda text: socket.inet_pton(socket.AF_INET6, text)         # noqa: E731
    links = [link(1, 0x49, b"lo"), link(2, 0x1043, b"eth0"), link(3, 0x91, b"wg0"),
             link(4, 0x1043, b"eth1"), link(5, 0x1002, b"eth2")]
    addrs = [addr(socket.AF_INET, 8, 1, v4("127.0.0.1"), b"lo"),
             addr(socket.AF_INET, 24, 2, v4("192.168.7.9"), b"eth0"),
             addr(socket.AF_INET, 24, 2, v4("192.168.7.10"), b"eth0"),
             addr(socket.AF_INET, 32, 3, v4("10.0.0.1"), b"wg0"),
             addr(socket.AF_INET, 16, 5, v4("172.16.0.1"), b"eth2"),
             addr(socket.AF_INET6, 64, 2, v6("fd00::2")),
             addr(socket.AF_INET6, 128, 3, v6("fd01::1"))]
    found = innernet.raw_links([links, addrs, [], []])
    assert found[0] == [("eth0", "192.168.7.9", "255.255.255.0"), ("eth1", None, None)]
    assert found[1] == [["fd000000000000000000000000000002", "02", "40", "00", "80", "eth0"]]
    assert [str(n) for n in innernet.local_networks(found)] == ["192.168.7.9/24", "fd00::2/64"]
    assert innernet.raw_links([[], [], [], []]) == ([], [])
    # the interface's own digest reads the same snapshot
    assert innernet.link_digest("lo", [links, addrs, [], []]).startswith("2:")
    # a dump the kernel refused (the rules, without policy routing): the links
    # are still read; the interface's digest is unknown, so no fast path
    assert innernet.raw_links([links, addrs, [], None]) == found
    assert innernet.link_digest("lo", [links, addrs, [], None]) == "?"


def test_files_and_paths_without_the_os_module(tmp_path, monkeypatch):
    for head, tail in (("/a", "b"), ("/a/", "b"), ("", "b"), ("a", "/b"), ("/", "b")):
        assert innernet.path_join(head, tail) == os.path.join(head, tail)
    path = tmp_path / "f"
    path.write_bytes("é\n".encode() * 40000)
    assert innernet.fast_read(str(path)) == "é\n" * 40000
    path.write_bytes(b"\xff")
    with pytest.raises(ValueError):
        innernet.fast_read(str(path))
    monkeypatch.setenv("INNERNET_FAST_X", "1")
    monkeypatch.setenv("WG_FAST_X", "2")
    env = innernet.environ_of_note()
    assert env["INNERNET_FAST_X"] == "1" and env["WG_FAST_X"] == "2"
    assert all(k.startswith(("INNERNET_", "WG_")) for k in env)


def test_a_missing_section_fails_the_build():
    with pytest.raises(SystemExit, match="no section"):
        build_zipapp.fast_module_source("print('no banners')\n")


def test_kernel_device_attributes_and_endpoints_are_read_without_pyroute2():
    """kernel_dump's pieces (the whole read runs in the VM lane's guest,
    tests/vm/guest_fastpath.py): netlink attributes, nested, and the
    endpoint's sockaddr as UAPI writes it."""
    import socket
    import struct
    inner = innernet._nl_attr(1, b"\x01\x02") + innernet._nl_attr(3, b"\x18")
    data = innernet._nl_attr(6, struct.pack("=H", 51820)) + innernet._nl_attr(8 | 0x8000, inner)
    attrs = innernet._nl_attrs(data)
    assert [k for k, _ in attrs] == [6, 8] and attrs[0][1][:2] == struct.pack("=H", 51820)
    assert innernet._nl_attrs(attrs[1][1]) == [(1, b"\x01\x02"), (3, b"\x18")]
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack(">H", 51820) + bytes([10, 0, 0, 1]) \
        + bytes(8)
    v6 = struct.pack("=H", socket.AF_INET6) + struct.pack(">HI", 7, 0) \
        + socket.inet_pton(socket.AF_INET6, "fd00::1") + bytes(4)
    assert innernet._endpoint_text(v4) == "10.0.0.1:51820"
    assert innernet._endpoint_text(v6) == "[fd00::1]:7"
    assert innernet._endpoint_text(b"") == ""


def test_no_kernel_device_is_none_for_the_full_sync():
    assert innernet.kernel_dump("innernet-none0") is None
    assert innernet.device_state_digest("innernet-none0", 0) is None


def test_no_record_is_left_under_a_lock_a_verb_moved_during_the_sync(tmp_path, monkeypatch):
    """Outside round 30, U30-4: a `lock add`/`remove` between the sync's save
    of its lock copy and its fast record left a record with the sync's old
    ETag and the new copy's fingerprint: the next cron runs, answered 304,
    never verified the state under the new chain. A sync whose lock moved
    since it saved (lock_moved) leaves no record; the previous one, with the
    copy as it was, sends the next run to the full sync."""
    files = innernet.ClientFiles("net", str(tmp_path), str(tmp_path))
    monkeypatch.setattr(innernet, "device_state_digest", lambda iface, now: "1:0:0:0")
    opts = innernet.FetchOptions(invocation="run", hosts=innernet.HostsOptions(write=False))
    cfg = types.SimpleNamespace(server_internal_endpoint="10.66.0.1:51820",
                                server_public_key="k" * 43 + "=")
    chain = [{"payload": {"t": "genesis"}}, {"payload": {"t": "add"}}]
    for synced, written in ((2, True), (1, False)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(files.fast_record)
        innernet.save_client_lock(files.lock, {"chain": chain, "synced": synced})
        innernet.write_fast_record(files, opts, cfg, '"e1"', [], None, "fetch")
        assert os.path.exists(files.fast_record) is written
