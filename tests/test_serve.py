"""serve's teardown: every step on its own, so that one failing does not
leave the others undone (issue 31, item 6)."""
import threading
import types

import innernet


class Recorder:
    def __init__(self, calls, name, fail=False):
        self.calls, self.name, self.fail = calls, name, fail

    def __call__(self):
        self.calls.append(self.name)
        if self.fail:
            raise OSError(f"{self.name} refused")


def test_a_failing_litestream_stop_leaves_no_forwarding_on(capsys):
    calls = []
    co = types.SimpleNamespace(
        stop=types.SimpleNamespace(set=Recorder(calls, "stop")),
        device=types.SimpleNamespace(relay=types.SimpleNamespace(remove=Recorder(calls, "forwarding"))),
        hub=types.SimpleNamespace(close=Recorder(calls, "hub")))
    httpd = types.SimpleNamespace(server_close=Recorder(calls, "httpd"))
    replicator = types.SimpleNamespace(close=Recorder(calls, "litestream", fail=True))
    scrape = types.SimpleNamespace(shutdown=Recorder(calls, "scrape"),
                                   server_close=Recorder(calls, "scrape socket", fail=True))
    dns = types.SimpleNamespace(close=Recorder(calls, "dns"))
    relaying = threading.Thread(target=lambda: None)
    relaying.start()
    lock = types.SimpleNamespace(close=Recorder(calls, "lock"))
    steps = innernet._serve_teardown(co, httpd, replicator, scrape, dns, relaying, lock)
    first = innernet.tear_down(steps)
    assert sorted(calls) == sorted(["stop", "httpd", "forwarding", "litestream", "scrape",
                                    "scrape socket", "dns", "hub", "lock"])
    assert str(first) == "litestream refused"
    err = capsys.readouterr().err
    assert "stopping Litestream failed: litestream refused" in err
    assert "stopping the metrics endpoint's socket failed" in err


def test_a_clean_teardown_returns_nothing():
    calls = []
    assert innernet.tear_down([("a", Recorder(calls, "a")), ("b", Recorder(calls, "b"))]) is None
    assert calls == ["a", "b"]
