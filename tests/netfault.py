"""Network faults for tests/test_netem.py: two network namespaces joined by a veth pair, a lossy, jittery
link between them, and the client end that runs inside one of them.

The link is impaired by the kernel's netem qdisc on both veth ends where the kernel has netem. Where it
has not (a kernel built without sch_netem and no module to load: `tc` answers "Specified qdisc kind is
unknown"), the client process impairs its own WebRTC packets instead: every UDP datagram aioice sends or
receives (STUN checks, DTLS, SRTP media, SCTP data channel) is dropped with probability `loss` or handed
on after a delay drawn uniformly from delay +- jitter, which is what netem does with `delay D J loss L`
and no distribution table (so packets reorder, as there). Both directions are impaired, each once, as
netem on the two egresses would do. The HTTP signalling (TCP) stays unimpaired in that mode.

Run as a script inside the client namespace (`python tests/netfault.py client URL WAV ...`), it waits for
the server, runs clients.client.run_client and prints one line `NETFAULT {json}` with the client's stats
and the shim's counters.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass, field

SERVER_ADDR = "10.99.0.1"  # server end of the veth pair (its own namespace, so no clash between runs)
CLIENT_ADDR = "10.99.0.2"
PREFIX_LEN = 24
RESULT_TAG = "NETFAULT "  # the client script's result line: this tag, then the JSON


class NamespacesUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no `ip`, `ip netns add` refused); one-line reason."""


@dataclass
class Impairment:
    """One direction's impairment: each packet is lost with p = `loss`, else delayed delay_ms +- jitter_ms."""
    delay_ms: float = 80.0
    jitter_ms: float = 20.0
    loss: float = 0.03

    def netem_args(self) -> list[str]:
        return ["delay", f"{self.delay_ms:g}ms", f"{self.jitter_ms:g}ms", "loss", f"{self.loss * 100:g}%"]

    def describe(self) -> str:
        return f"delay {self.delay_ms:g} +- {self.jitter_ms:g} ms, {self.loss * 100:g}% loss, each direction"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {(r.stderr or r.stdout).strip()}")
    return r


class NetnsPair:
    """Two fresh network namespaces (server, client) joined by a veth pair; removed again on exit.

        with NetnsPair() as net:
            subprocess.Popen(net.exec(net.server, "python", ...))

    Names are unique per run; the veth ends are created directly inside the namespaces, so nothing of
    this run ever appears in (or collides within) the host's own namespace.
    """

    def __init__(self):
        tag = uuid.uuid4().hex[:8]
        self.server, self.client = f"syncavatar-{tag}-s", f"syncavatar-{tag}-c"
        self.server_dev, self.client_dev = f"sa{tag}s", f"sa{tag}c"  # <= 15 characters (IFNAMSIZ)
        self._made: list[str] = []

    def __enter__(self) -> "NetnsPair":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> "NetnsPair":
        """Make the namespaces and the link; NamespacesUnavailable where this machine cannot."""
        if os.geteuid() != 0:
            raise NamespacesUnavailable("network namespaces need root (euid is %d)" % os.geteuid())
        if shutil.which("ip") is None:
            raise NamespacesUnavailable("no `ip` command (apt-get install iproute2)")
        for ns in (self.server, self.client):
            r = _ip("netns", "add", ns, check=False)
            self._made.append(ns)  # a failed add can leave its name behind: close() deletes it too
            if r.returncode != 0:
                self.close()
                raise NamespacesUnavailable(f"`ip netns add` failed: {(r.stderr or r.stdout).strip()}")
        try:
            _ip("link", "add", self.server_dev, "netns", self.server, "type", "veth",
                "peer", "name", self.client_dev, "netns", self.client)
            for ns, dev, addr in ((self.server, self.server_dev, SERVER_ADDR),
                                  (self.client, self.client_dev, CLIENT_ADDR)):
                _ip("-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def exec(self, ns: str, *cmd: str) -> list[str]:
        """The command line that runs `cmd` inside namespace `ns`."""
        return ["ip", "netns", "exec", ns, *cmd]

    def try_netem(self, imp: Impairment) -> tuple[bool, str]:
        """Put netem on both veth egresses -> (applied, why not). Leaves no qdisc behind when it fails."""
        if shutil.which("tc") is None:
            return False, "no `tc` command"
        for ns, dev in ((self.server, self.server_dev), (self.client, self.client_dev)):
            r = subprocess.run(self.exec(ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", *imp.netem_args()),
                               capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                for ns2, dev2 in ((self.server, self.server_dev), (self.client, self.client_dev)):
                    subprocess.run(self.exec(ns2, "tc", "qdisc", "del", "dev", dev2, "root"),
                                   capture_output=True, timeout=30)
                return False, (r.stderr or r.stdout).strip()
        return True, ""

    def netem_counters(self) -> dict:
        """Packets sent and dropped by the netem qdiscs, per direction (from `tc -s -j qdisc show`)."""
        out = {}
        for name, ns, dev in (("server_to_client", self.server, self.server_dev),
                              ("client_to_server", self.client, self.client_dev)):
            r = subprocess.run(self.exec(ns, "tc", "-s", "-j", "qdisc", "show", "dev", dev),
                               capture_output=True, text=True, timeout=30)
            q = next((q for q in json.loads(r.stdout or "[]") if q.get("kind") == "netem"), {})
            out[name] = {"packets": q.get("packets", 0), "drops": q.get("drops", 0)}
        return out

    def close(self) -> None:
        """Kill what still runs in the namespaces (only this run's processes can be there), then delete them."""
        for ns in self._made:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)  # deleting a namespace deletes its veth end, and so the pair
        self._made = []


# ------------------------------------------------------------------------- user-space impairment

@dataclass
class ShimCounters:
    sent: int = 0  # datagrams aioice asked to send
    received: int = 0  # datagrams that arrived from the network
    dropped_out: int = 0
    dropped_in: int = 0
    delayed_out: int = 0
    delayed_in: int = 0
    delays_ms: list = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        ds = sorted(d.pop("delays_ms"))
        d["delay_ms_min"] = round(ds[0], 1) if ds else None
        d["delay_ms_mean"] = round(sum(ds) / len(ds), 1) if ds else None
        d["delay_ms_max"] = round(ds[-1], 1) if ds else None
        return d


class UdpShim:
    """Drop and delay every datagram of aioice's sockets in this process, both directions.

    Patches aioice.ice.StunProtocol (every ICE socket's protocol): `connection_made` wraps the transport
    so its `sendto` is impaired, `datagram_received` is impaired on the way in. `remove()` restores both.
    Meant for a client subprocess only: it changes aioice process-wide.
    """

    def __init__(self, imp: Impairment, seed: int = 0):
        self.imp, self.rng, self.counters = imp, random.Random(seed), ShimCounters()
        self._saved = None

    def _fate(self) -> float | None:
        """None = lost, else the delay in seconds."""
        if self.rng.random() < self.imp.loss:
            return None
        d = self.imp.delay_ms + self.rng.uniform(-self.imp.jitter_ms, self.imp.jitter_ms)
        self.counters.delays_ms.append(d)
        return max(d, 0.0) / 1000.0

    def install(self) -> "UdpShim":
        import asyncio

        from aioice.ice import StunProtocol
        shim, c = self, self.counters
        made, received = StunProtocol.connection_made, StunProtocol.datagram_received

        class ImpairedTransport:
            """The socket's transport with an impaired sendto; everything else passes through."""

            def __init__(self, inner):
                self._inner = inner

            def sendto(self, data, addr=None):
                c.sent += 1
                delay = shim._fate()
                if delay is None:
                    c.dropped_out += 1
                    return
                c.delayed_out += 1
                inner = self._inner
                asyncio.get_running_loop().call_later(
                    delay, lambda: None if inner.is_closing() else inner.sendto(data, addr))

            def __getattr__(self, name):
                return getattr(self._inner, name)

        def connection_made(self, transport):
            made(self, ImpairedTransport(transport))

        def datagram_received(self, data, addr):
            c.received += 1
            delay = shim._fate()
            if delay is None:
                c.dropped_in += 1
                return
            c.delayed_in += 1
            asyncio.get_running_loop().call_later(
                delay, lambda: None if self.transport.is_closing() else received(self, data, addr))

        self._saved = (made, received)
        StunProtocol.connection_made, StunProtocol.datagram_received = connection_made, datagram_received
        return self

    def remove(self) -> None:
        from aioice.ice import StunProtocol
        if self._saved:
            StunProtocol.connection_made, StunProtocol.datagram_received = self._saved
            self._saved = None


# ------------------------------------------------------------------------- the client end (a script)

def _wait_ready(url: str, timeout_s: float) -> None:
    import time
    import urllib.request
    end = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def client_main(argv: list[str]) -> int:
    """`client URL WAV [--shim] [--wait-ready S] [--seed N]`: run_client, print `NETFAULT {json}`."""
    import argparse
    p = argparse.ArgumentParser(prog="netfault.py client")
    p.add_argument("url")
    p.add_argument("wav")
    p.add_argument("--shim", action="store_true", help="impair aioice's UDP in this process")
    p.add_argument("--delay-ms", type=float, default=Impairment.delay_ms)
    p.add_argument("--jitter-ms", type=float, default=Impairment.jitter_ms)
    p.add_argument("--loss", type=float, default=Impairment.loss)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-ready", type=float, default=180.0, help="seconds to wait for GET /healthz")
    a = p.parse_args(argv)
    from clients.client import run_client
    _wait_ready(a.url, a.wait_ready)
    shim = UdpShim(Impairment(a.delay_ms, a.jitter_ms, a.loss), a.seed).install() if a.shim else None
    try:
        stats = run_client(a.url, a.wav)
    finally:
        if shim:
            shim.remove()
    print(RESULT_TAG + json.dumps({"stats": stats, "shim": shim.counters.summary() if shim else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
    if sys.argv[1:2] != ["client"]:
        sys.exit("usage: netfault.py client URL WAV [--shim] ...")
    sys.exit(client_main(sys.argv[2:]))
