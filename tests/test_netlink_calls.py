"""The kernel backend's rtnetlink calls, against a recording fake.

There is no WireGuard kernel module on these machines, so this checks exactly
what innernet.py asks rtnetlink to do (sshuttle's style: assert the call
list); tests/test_wg_genl.py does the same for WireGuard's generic netlink.
The kernel backend runs for real in the VM lane (tests/e2e/test_vm.py), the
userspace backend and the address/route calls in the end-to-end tests.
"""
import errno
import ipaddress
import struct

import pytest

import innernet


class FakeRtnl:
    """Records the rtnetlink requests Netlink sends, decoded enough to check."""
    calls = []
    fail_kind = None

    @staticmethod
    def talk(self, kind, flags, body):
        FakeRtnl.calls.append(decode(kind, flags, body))
        if kind == innernet._RTM_NEWLINK and b"wireguard" in body and FakeRtnl.fail_kind:
            return FakeRtnl.fail_kind
        if kind == innernet._RTM_NEWADDR:
            return errno.EEXIST                     # already there: fine
        return 0


def attrs(data):
    out = {}
    while len(data) >= 4:
        n, kind = struct.unpack_from("=HH", data)
        out[kind] = data[4:n]
        data = data[(n + 3) & ~3:]
    return out


def decode(kind, flags, body):
    """(what, fields) of one request, as the kernel would read it."""
    if kind in (innernet._RTM_NEWLINK, innernet._RTM_DELLINK):
        _, _, index, ifflags, change = struct.unpack_from("=BxHiII", body)
        a = attrs(body[16:])
        if kind == innernet._RTM_DELLINK:
            return ("link", "del", {"index": index})
        if flags & innernet._NLM_F_CREATE:
            info = attrs(a[innernet._IFLA_LINKINFO])
            return ("link", "add", {"ifname": a[innernet._IFLA_IFNAME].rstrip(b"\0").decode(),
                                    "kind": info[innernet._IFLA_INFO_KIND].decode()})
        return ("link", "set", {"index": index, "up": bool(ifflags & change & 1),
                                "mtu": struct.unpack("=I", a[innernet._IFLA_MTU])[0]})
    if kind == innernet._RTM_NEWADDR:
        family, plen, _, _, index = struct.unpack_from("=BBBBI", body)
        a = attrs(body[8:])
        return ("addr", "add", {"index": index, "prefixlen": plen, "attrs": {
            k: str(ipaddress.ip_address(v)) for k, v in a.items()}})
    if kind == innernet._RTM_NEWROUTE:
        family, dst_len, _, _, table, proto, scope, rtype, _ = struct.unpack_from("=BBBBBBBBI",
                                                                                 body)
        a = attrs(body[12:])
        return ("route", "add", {
            "dst": f"{ipaddress.ip_address(a[innernet._RTA_DST])}/{dst_len}",
            "oif": struct.unpack("=I", a[innernet._RTA_OIF])[0], "table": table,
            "scope": scope, "type": rtype, "exclusive": bool(flags & innernet._NLM_F_EXCL)})
    raise AssertionError(kind)


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(innernet.Netlink, "_talk", FakeRtnl.talk)
    monkeypatch.setattr(innernet.Netlink, "index", lambda self, ifname: 7)
    FakeRtnl.calls, FakeRtnl.fail_kind = [], None


def test_auto_falls_back_to_userspace_with_one_warning(fakes, monkeypatch, capsys):
    FakeRtnl.fail_kind = errno.EOPNOTSUPP
    created = []
    monkeypatch.setattr(innernet.UserspaceBackend, "create", lambda self, i: created.append(i))
    backend = innernet.create_device("auto", "wg0")
    assert isinstance(backend, innernet.UserspaceBackend) and created == ["wg0"]
    err = capsys.readouterr().err
    assert err == "[!] WireGuard kernel module not available; using userspace wireguard-go\n"
    with pytest.raises(innernet.InnernetError, match="kernel module is not available"):
        innernet.create_device("kernel", "wg0")


def test_kernel_first_when_the_module_works(fakes):
    backend = innernet.create_device("auto", "wg0")
    assert isinstance(backend, innernet.KernelBackend)
    assert FakeRtnl.calls[0] == ("link", "add", {"ifname": "wg0", "kind": "wireguard"})


def test_bring_up_order_and_idempotent_address(fakes, monkeypatch):
    applied = []
    monkeypatch.setattr(innernet.KernelBackend, "apply", lambda self, i, **kw: applied.append(kw))
    iface = innernet.ipaddress.ip_interface("10.66.1.1/16")
    innernet.bring_up("kernel", "wg0", private_key="k", address=iface, listen_port=None,
                      updates=[], mtu=1280, routing=True)
    assert [c[:2] for c in FakeRtnl.calls] == [("link", "add"), ("addr", "add"),
                                               ("link", "set"), ("route", "add")]
    # IPv4: the local address and the address, as `ip address add` sends them
    assert FakeRtnl.calls[1][2] == {"index": 7, "prefixlen": 16, "attrs": {
        innernet._IFA_LOCAL: "10.66.1.1", innernet._IFA_ADDRESS: "10.66.1.1"}}
    assert FakeRtnl.calls[2][2] == {"index": 7, "mtu": 1280, "up": True}
    assert FakeRtnl.calls[3][2] == {"dst": "10.66.0.0/16", "oif": 7, "table": 254,
                                    "scope": 253, "type": 1, "exclusive": True}
    assert applied == [{"private_key": "k", "listen_port": 0, "updates": [],
                        "replace_peers": True}]


def test_bring_up_rolls_back_on_failure(fakes, monkeypatch):
    deleted = []

    def boom(self, i, **kw):
        raise innernet.InnernetError("no")
    monkeypatch.setattr(innernet.KernelBackend, "apply", boom)
    monkeypatch.setattr(innernet.KernelBackend, "delete", lambda self, i: deleted.append(i))
    with pytest.raises(innernet.InnernetError):
        innernet.bring_up("kernel", "wg0", private_key="k",
                          address=innernet.ipaddress.ip_interface("10.66.1.1/16"),
                          listen_port=None, updates=[], mtu=1280, routing=True)
    assert deleted == ["wg0"]


def test_ipv6_address_and_route_requests():
    iface = ipaddress.ip_interface("fd00:66::1/64")
    got = decode(*innernet.rtnl_request("add-address", 3, address=iface))
    assert got == ("addr", "add", {"index": 3, "prefixlen": 64,
                                   "attrs": {innernet._IFA_ADDRESS: "fd00:66::1"}})
    got = decode(*innernet.rtnl_request("add-route", 3, route=iface.network))
    assert got[2]["dst"] == "fd00:66::/64" and got[2]["oif"] == 3


def test_netlink_errors_become_one_line_errors(fakes, monkeypatch):
    monkeypatch.setattr(innernet.Netlink, "_talk", lambda self, *a: errno.EPERM)
    with pytest.raises(innernet.InnernetError, match="cannot set wg0 up with MTU 1280: "
                                                     "Operation not permitted"):
        innernet.Netlink().set_mtu_up("wg0", 1280)
    with pytest.raises(innernet.InnernetError, match="cannot create interface wg0"):
        innernet.Netlink().add_wireguard_link("wg0")


def test_netlink_for_real_on_loopback():
    """Our rtnetlink socket against the kernel, changing nothing: deleting a
    link that does not exist is answered ENODEV (root) or EPERM, never misread."""
    nl = innernet.Netlink()
    try:
        assert nl.index("lo") == 1 and nl.index("no-such-if0") is None
        code = nl._talk(*innernet.rtnl_request("del-link", 2 ** 31 - 1))
        assert code in (errno.ENODEV, errno.EPERM)
        code = nl._talk(*innernet.rtnl_request("del-link", 2 ** 31 - 2))    # the same socket
        assert code in (errno.ENODEV, errno.EPERM)
    finally:
        nl.close()
