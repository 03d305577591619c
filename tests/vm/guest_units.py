"""The .deb's systemd units for real (issue 30), run inside the VM lane's guest.

Not collected on the host (the name is not test_*). tests/e2e/test_vm.py
runs `-k before_reboot` on the first boot (which then reboots the guest) and
`-k after_reboot` on the second boot of the same disk.

The guest's "machines" are network namespaces made at every boot by a unit,
innernet-vmlab.service: vsrv (the server, 198.18.0.1), vp1 and vp2 (peers)
on a bridge. Each innernet unit is put in its namespace, and given its flags,
by a drop-in, the documented way (README, "Running it as a service"):
  innernet-server@vmnet  in vsrv, `serve vmnet --no-write-hosts`
  innernet@vmnet         in vp1 (the daemon)
  innernet-fetch@vmnet.timer in vp2, with its own config and data directories
"""
import json
import os
import re
import subprocess
import time

NET = "vmnet"
SRV, P1, P2 = "vsrv", "vp1", "vp2"
P2_DIRS = ["-c", "/etc/innernet-p2", "-d", "/var/lib/innernet-p2"]
DEB = os.environ.get("INNERNET_DEB", "/mnt/share/innernet.deb")
STATE = "/var/lib/innernet-vmlab.json"      # what the first boot leaves the second

LAB_SCRIPT = """#!/bin/sh
# The guest's hosts: namespaces on a bridge (made again at every boot).
set -e
ip link add vbr type bridge 2>/dev/null || true
ip link set vbr up
n=0
for ns in vsrv vp1 vp2; do
  n=$((n + 1))
  [ -e /run/netns/$ns ] && continue
  ip netns add $ns
  ip -n $ns link set lo up
  ip link add v$ns type veth peer name eth0 netns $ns
  ip link set v$ns master vbr up
  ip -n $ns addr add 198.18.0.$n/24 dev eth0
  ip -n $ns link set eth0 up
done
"""
LAB_UNIT = """[Unit]
Description=The VM lane's hosts (network namespaces)
Before=innernet-server@vmnet.service innernet@vmnet.service innernet-fetch@vmnet.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/innernet-vmlab
[Install]
WantedBy=multi-user.target
"""


def dropin(unit, ns, execstart):
    return (unit, f"""[Unit]
Requires=innernet-vmlab.service
After=innernet-vmlab.service
[Service]
NetworkNamespacePath=/run/netns/{ns}
ExecStart=
ExecStart={execstart}
""")


DROPINS = [
    dropin(f"innernet-server@{NET}.service", SRV,
           "/usr/bin/innernet-server serve %i --no-write-hosts"),
    dropin(f"innernet@{NET}.service", P1,
           "/usr/bin/innernet up %i --daemon --interval 60 --no-write-hosts"),
    dropin(f"innernet-fetch@{NET}.service", P2,
           "/usr/bin/innernet " + " ".join(P2_DIRS) + " fetch %i --no-write-hosts"),
]


T0 = time.monotonic()


def step(what):
    """A line of the lane's profile: where the time of the units' tests goes."""
    print(f"units: {what} at {time.monotonic() - T0:.0f} s", flush=True)


def sh(argv, check=True, timeout=120, ns=None):
    if ns:
        argv = ["ip", "netns", "exec", ns] + list(argv)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{argv} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def wait_for(predicate, timeout, what):
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:          # noqa: BLE001 - e.g. not up yet
            last = e
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})\n"
                         + journal())


def journal(*units):
    units = units or (f"innernet-server@{NET}", f"innernet@{NET}", f"innernet-fetch@{NET}")
    args = [a for u in units for a in ("-u", u)]
    return sh(["journalctl", "-b", "--no-pager", "-o", "short-iso"] + args, check=False).stdout


def ping(ns, ip):
    return sh(["ping", "-c", "1", "-W", "2", ip], ns=ns, check=False).returncode == 0


def link_index(ns, ifname):
    out = sh(["ip", "-d", "-j", "link", "show", "dev", ifname], ns=ns, check=False).stdout
    links = json.loads(out) if out.strip() else []
    return links[0]["ifindex"] if links and links[0].get("linkinfo", {}).get(
        "info_kind") == "wireguard" else None


def peer_ip(conf_path):
    return re.search(r'address = "([0-9.]+)/', open(conf_path).read()).group(1)


def wg_dump(ns):
    return sh(["wg", "show", NET, "dump"], ns=ns, check=False).stdout


def active(unit):
    return sh(["systemctl", "is-active", unit], check=False).stdout.strip() == "active"


def last_fetch_run():
    """When innernet-fetch@vmnet.service last finished a run, in µs (0: never)."""
    out = sh(["systemctl", "show", f"innernet-fetch@{NET}.service",
              "-p", "ExecMainExitTimestampMonotonic", "-p", "ExecMainStatus"]).stdout
    props = dict(line.split("=", 1) for line in out.split())
    return int(props["ExecMainExitTimestampMonotonic"] or 0) \
        if props.get("ExecMainStatus") == "0" else 0


def test_before_reboot_units_start_restart_and_keep_the_tunnels():
    sh(["dpkg", "-i", DEB])
    step("dpkg -i")
    assert sh(["innernet", "--version"]).stdout.startswith("innernet.py")
    with open("/usr/local/sbin/innernet-vmlab", "w") as f:
        f.write(LAB_SCRIPT)
    os.chmod("/usr/local/sbin/innernet-vmlab", 0o755)
    with open("/etc/systemd/system/innernet-vmlab.service", "w") as f:
        f.write(LAB_UNIT)
    for unit, text in DROPINS:
        os.makedirs(f"/etc/systemd/system/{unit}.d", exist_ok=True)
        with open(f"/etc/systemd/system/{unit}.d/vmlab.conf", "w") as f:
            f.write(text)
    sh(["systemctl", "daemon-reload"])
    sh(["systemctl", "enable", "--now", "innernet-vmlab.service"])

    srv = ["innernet-server"]
    sh(srv + ["new", "--network-name", NET, "--network-cidr", "10.77.0.0/16",
              "--external-endpoint", "198.18.0.1:51820", "--listen-port", "51820"], ns=SRV)
    sh(srv + ["add-cidr", NET, "--name", "peers", "--cidr", "10.77.1.0/24", "--parent", NET,
              "--yes"], ns=SRV)
    for name in ("p1", "p2"):
        sh(srv + ["add-peer", NET, "--name", name, "--cidr", "peers", "--auto-ip",
                  "--admin", "false", "--invite-expires", "1h",
                  "--save-config", f"/root/{name}.toml", "--yes"], ns=SRV)
    sh(["systemctl", "enable", "--now", f"innernet-server@{NET}.service"])
    wait_for(lambda: "serving network" in journal(f"innernet-server@{NET}"), 60,
             "the server unit to serve")
    step("network made, server unit serving")

    sh(["innernet", "install", "--name", NET, "--no-write-hosts", "/root/p1.toml"], ns=P1)
    sh(["innernet", *P2_DIRS, "install", "--name", NET, "--no-write-hosts", "/root/p2.toml"],
       ns=P2)
    ip1, ip2 = peer_ip(f"/etc/innernet/{NET}.conf"), peer_ip(f"/etc/innernet-p2/{NET}.conf")
    sh(["systemctl", "enable", "--now", f"innernet@{NET}.service",
        f"innernet-fetch@{NET}.timer"])
    # The timer fires at once (its OnBootSec is past) and the fetch unit runs.
    wait_for(last_fetch_run, 90, "the fetch timer to run innernet-fetch@vmnet once")
    wait_for(lambda: ping(P1, ip2) and ping(P2, ip1), 60, "p1 <-> p2 through the tunnel")
    step("peers installed, daemon and timer running, p1 <-> p2")

    # A restart of the daemons keeps the kernel devices (same link) and the traffic.
    before = {ns: link_index(ns, NET) for ns in (SRV, P1)}
    assert all(before.values()), before
    wg_before = {ns: wg_dump(ns) for ns in (SRV, P1, P2)}
    sh(["systemctl", "restart", f"innernet-server@{NET}.service", f"innernet@{NET}.service"])
    wg_after = {ns: wg_dump(ns) for ns in (SRV, P1, P2)}
    wait_for(lambda: ping(P1, ip2) and ping(P2, ip1), 20,
             f"p1 <-> p2 after the restart\n{wg_before}\n{wg_after}")
    # the peers stayed on the devices, sessions and all (a handshake time is kept)
    for ns in (SRV, P1):
        assert [line.split("\t")[0] for line in wg_after[ns].splitlines()] == \
            [line.split("\t")[0] for line in wg_before[ns].splitlines()], (wg_before, wg_after)
    wait_for(lambda: active(f"innernet-server@{NET}.service") and
             active(f"innernet@{NET}.service"), 60, "the units after the restart")
    assert {ns: link_index(ns, NET) for ns in (SRV, P1)} == before
    sh(["systemctl", "restart", "innernet.target"])
    assert {ns: link_index(ns, NET) for ns in (SRV, P1)} == before
    assert ping(P1, ip2)
    step("restarts")

    # Journal lines: one line per event, with the time and the level's mark.
    lines = [line for line in journal().splitlines() if not line.startswith("--")]
    events = [line for line in lines if re.match(r"^\d{4}-\d\d-\d\dT[\d:]+\S* \S+ \S+\[\d+\]: "
                                                 r"\[[*!.]\] \S", line)]
    assert len(events) >= 3, "\n".join(lines)
    assert not [line for line in lines if "Traceback" in line], "\n".join(lines)
    # the level is journald's priority too: [*] lines at info, none with a raw <N> prefix
    records = [json.loads(line) for line in sh(
        ["journalctl", "-b", "-o", "json", "--no-pager", "-u", f"innernet-server@{NET}",
         "-u", f"innernet@{NET}"]).stdout.splitlines()]
    ours = [r for r in records if str(r.get("MESSAGE", "")).startswith(("[", "<"))]
    assert ours and all(r["PRIORITY"] == ("4" if r["MESSAGE"].startswith("[!]") else "6")
                        for r in ours if r["MESSAGE"].startswith(("[*]", "[!]"))), ours
    assert not [r for r in ours if r["MESSAGE"].startswith("<")], ours

    # The change p2's timer-driven fetch must pick up after the reboot, made
    # while the timer is stopped: p1 renamed.
    sh(["systemctl", "stop", f"innernet-fetch@{NET}.timer"])
    sh(srv + ["rename-peer", NET, "--name", "p1", "--new-name", "p1renamed", "--yes"], ns=SRV)
    with open(STATE, "w") as f:
        json.dump({"ip1": ip1, "ip2": ip2, "links": before}, f)
    store = open(f"/var/lib/innernet-p2/{NET}.json").read()
    assert "p1renamed" not in store
    print("journal sample:\n" + "\n".join(events[:5]))


def test_after_reboot_units_bring_back_server_peers_and_traffic():
    """Nothing is run here but looks: the units did it all at boot."""
    state = json.load(open(STATE))
    t0 = time.monotonic()
    wait_for(lambda: active(f"innernet-server@{NET}.service"), 90, "the server unit")
    wait_for(lambda: link_index(SRV, NET) and link_index(P1, NET), 90,
             "the server's and p1's kernel devices")
    # p2's device comes from the timer (OnBootSec), which fetches the change.
    wait_for(lambda: link_index(P2, NET), 120, "the fetch timer to bring p2 up")
    wait_for(lambda: "p1renamed" in open(f"/var/lib/innernet-p2/{NET}.json").read(), 120,
             "p2's timer-driven fetch to pick up the rename")
    wait_for(lambda: ping(P1, state["ip2"]) and ping(P2, state["ip1"]), 60,
             "p1 <-> p2 through the tunnel after the reboot")
    assert sh(["systemctl", "is-enabled", f"innernet-fetch@{NET}.timer"]).stdout.strip() \
        == "enabled"
    ps = sh(["ps", "-eo", "comm="]).stdout.split()
    assert "wireguard-go" not in ps
    print(f"after the reboot: server, p1 and p2 back and passing traffic "
          f"{time.monotonic() - t0:.0f} s after the payload started, with no command run")
    # p1's network uninstalled under its running unit: the daemon exits with
    # status 3, which the unit does not restart (RestartPreventExitStatus=3):
    # failed at once, not "activating (auto-restart)" for ever
    sh(["innernet", "uninstall", NET, "--yes"], ns=P1)
    unit = f"innernet@{NET}.service"

    def show():
        out = sh(["systemctl", "show", unit, "-p", "ActiveState", "-p", "SubState",
                  "-p", "ExecMainStatus"]).stdout
        return dict(line.split("=", 1) for line in out.split())
    wait_for(lambda: show()["ActiveState"] in ("failed", "inactive", "activating"), 60,
             "the daemon to exit")
    props = show()
    assert props["ExecMainStatus"] == "3" and props["ActiveState"] in ("failed", "inactive") \
        and props["SubState"] != "auto-restart", props

