#!/usr/bin/env python3
"""The daemon's pace against a server that answers every long poll at once.

A hijacked or broken server that offers long polls and answers each at once
must not spin `up --daemon` into a busy loop: its state requests stay
DAEMON_MIN_PERIOD (1 s) apart. This runs the daemon's own loop (innernet._daemon)
in real time with the sync itself replaced by an answer that comes at once
(a new state, the poll "held"), and counts its rounds; the baseline, in the
same run, is the same loop paced by `--interval 1 --no-long-poll` against a
server that never changes. The ratio is the claim: about 1. (The condition
itself is a unit test with a clock only the loop's sleeps move:
tests/test_hardening.py::test_a_daemons_state_requests_are_a_second_apart_whatever_the_server_answers.)

    python3 bench/daemon_pace.py [--quick]
"""
import os
import tempfile
import time

from common import innernet, quick, table


class Stop(BaseException):      # not an Exception: the daemon survives those
    pass


def rounds_per_second(seconds, *, long_poll):
    """Rounds a second of the daemon's loop for ``seconds`` of real time."""
    starts = []
    end = time.monotonic() + seconds

    def fetch(files, opts, **kw):
        if time.monotonic() >= end:
            raise Stop()
        starts.append(time.monotonic())
        return innernet.FetchResult([], False, long_poll, long_poll)
    innernet.fetch_interface = fetch
    innernet.server_capabilities = lambda files, opts: (
        {"long_poll_seconds": 30} if long_poll else {})
    innernet._say_innernet_server = lambda files, told: None
    opts = innernet.FetchOptions(interval=1 if not long_poll else 60, no_nat_traversal=True,
                                 no_long_poll=not long_poll)
    with tempfile.TemporaryDirectory() as d:       # the daemon runs while a config exists
        open(os.path.join(d, "bench.conf"), "w").close()
        try:
            innernet._daemon(innernet.ClientFiles("bench", d, d), opts)
        except Stop:
            pass
    return (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 else 0.0


def main():
    seconds = 4 if quick() else 20
    out = {"spin": rounds_per_second(seconds, long_poll=True),
           "paced": rounds_per_second(seconds, long_poll=False)}
    table("The daemon's state requests a second, a server answering every long poll at once "
          f"({seconds} s each)",
          ["server", "requests/s", "vs --interval 1"],
          [("answers every long poll at once", f"{out['spin']:.2f}",
            f"{out['spin'] / out['paced']:.2f}x"),
           ("baseline: --interval 1 --no-long-poll, nothing changes", f"{out['paced']:.2f}",
            "1.00x")])


if __name__ == "__main__":
    main()
