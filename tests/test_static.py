"""Static peers (issue 15): wg-quick files, their AllowedIPs, QR codes that decode
back to the exact text. tests/e2e/test_static.py runs stock wg-quick with them."""
import ipaddress
import os
import stat

import pytest

import innernet
from innernet import Cidr


def key():
    return innernet.public_key(innernet.generate_private_key())


@pytest.mark.parametrize("network,ip,host", [("10.66.0.0/16", "10.66.1.9", "10.66.1.9/32"),
                                             ("fd00:66::/48", "fd00:66:1::9", "fd00:66:1::9/128")])
def test_wg_quick_text_for_ipv4_and_ipv6(network, ip, host):
    cidrs = [Cidr(1, "evil", network, None)]
    allowed = innernet.static_allowed_ips(cidrs)
    assert allowed == [str(ipaddress.ip_network(network))]
    priv, server = innernet.generate_private_key(), key()
    text = innernet.wg_quick_text(priv, ipaddress.ip_address(ip), allowed, server,
                                  "198.51.100.1:51820")
    lines = text.splitlines()
    assert "[Interface]" in lines and "[Peer]" in lines
    assert f"PrivateKey = {priv}" in lines and f"Address = {host}" in lines
    assert f"PublicKey = {server}" in lines and "Endpoint = 198.51.100.1:51820" in lines
    assert f"AllowedIPs = {allowed[0]}" in lines and "PersistentKeepalive = 25" in lines
    assert not any(line.startswith("DNS") for line in lines)
    assert "DNS = 10.66.0.1" in innernet.wg_quick_text(priv, ip, allowed, server, "h:1",
                                                       dns="10.66.0.1")


def test_allowed_ips_are_the_whole_network_so_the_file_never_goes_stale():
    cidrs = [Cidr(1, "evil", "10.66.0.0/16", None), Cidr(3, "phones", "10.66.9.0/24", 1),
             Cidr(4, "humans", "10.66.1.0/24", 1)]
    assert innernet.static_allowed_ips(cidrs) == ["10.66.0.0/16"]


def decode(pixels, width, height):
    pyzbar = pytest.importorskip("pyzbar.pyzbar")
    try:
        found = pyzbar.decode((pixels, width, height))
    except Exception as e:                # libzbar missing
        pytest.skip(f"zbar cannot decode here: {e}")
    assert len(found) == 1
    return found[0].data.decode()


def test_the_qr_code_decodes_to_the_exact_wg_quick_text(tmp_path):
    pytest.importorskip("qrcode")
    text = innernet.wg_quick_text(innernet.generate_private_key(), "10.66.1.9",
                                  ["10.66.0.0/16"], key(), "198.51.100.1:51820")
    m = innernet.qr_matrix(text)
    scale = 4
    rows = [bytes(0 if dark else 255 for dark in row for _ in range(scale))
            for row in m for _ in range(scale)]
    assert decode(b"".join(rows), len(m[0]) * scale, len(m) * scale) == text
    # the terminal form (half blocks, two module rows a line) decodes too
    term = innernet.qr_terminal(text)
    halves = {"█": (True, True), "▀": (True, False), "▄": (False, True), " ": (False, False)}
    back = []
    for line in term.splitlines():
        cells = [halves[ch] for ch in line.replace("\x1b[30;107m", "").replace("\x1b[0m", "")]
        back += [[t for t, _ in cells], [b for _, b in cells]]
    back = back[:len(m)]
    assert back == [list(row) for row in m]
    rows = [bytes(0 if dark else 255 for dark in row for _ in range(scale))
            for row in back for _ in range(scale)]
    assert decode(b"".join(rows), len(m[0]) * scale, len(m) * scale) == text
    # the PNG, read back with pypng
    png = pytest.importorskip("png")
    path = tmp_path / "phone.png"
    innernet.write_qr_png(str(path), text)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    width, height, data, info = png.Reader(filename=str(path)).asDirect()
    planes = info["planes"]
    gray = b"".join(bytes(row[i] for i in range(0, len(row), planes)) for row in data)
    if info["bitdepth"] == 1:
        gray = bytes(255 * v for v in gray)
    assert decode(gray, width, height) == text


def test_a_missing_qrcode_package_says_how_to_get_it(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_qrcode(name, *a, **kw):
        if name == "qrcode" or name.startswith("qrcode."):
            raise ImportError(name)
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_qrcode)
    with pytest.raises(innernet.InnernetError, match="qrcode package is not installed") as e:
        innernet.qr_terminal("x")
    assert "python3-qrcode" in e.value.hint


def test_static_peers_are_stored_as_such_and_go_through_the_server(tmp_path):
    from helpers import make_network
    s = make_network(tmp_path / "n.db")
    c = s.add_cidr(Cidr(None, "phones", "10.80.9.0/24", 1))
    p = s.add_peer(innernet.Peer(None, "phone", "10.80.9.2", c.id, key(), is_redeemed=True,
                                 is_static=True))
    assert s.peer(p.id).is_static and s.peer(p.id).to_json()["is_static"] is True
    assert not any(q.is_static for q in s.peers() if q.id != p.id)
    s.delete_peer(p.id, 0)
    assert s.conn.execute("SELECT COUNT(*) FROM static_peers").fetchone() == (0,)
