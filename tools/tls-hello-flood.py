#!/usr/bin/env python3
"""A flood of TLS ClientHellos at one address, for tools/handshake-flood.sh.

    python3 tools/tls-hello-flood.py HOST:PORT --rate N --seconds S

Each connection sends one ClientHello (made once, at the start, by Python's
ssl module: TLS 1.3 and 1.2, ALPN http/1.1) and waits for the server's first
bytes (its ServerHello and, in TLS 1.3, the flight with its signature), then
closes; one not answered within --wait is closed unanswered. That is the
costliest thing a peer can ask of a TLS server for the price of a connect
and 500 bytes: the server signs, the client computes nothing.

Opens at most --rate connections a second, evenly paced, and holds at most
--in-flight at once (a connection over that is not opened, and counted as
skipped). Prints one JSON object at the end: sent, answered, unanswered,
refused (connect failed), skipped, and the seconds it ran. Bounded in time:
--seconds, then at most --wait for the last answers.
"""

import argparse
import json
import selectors
import socket
import ssl
import sys
import time


def client_hello(server_name):
    """The bytes of one ClientHello, made with a memory BIO."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    if not hello:
        sys.exit("tls-hello-flood: no ClientHello was made")
    return hello


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="HOST:PORT of a TLS server")
    p.add_argument("--rate", type=float, required=True, help="connections a second")
    p.add_argument("--seconds", type=float, required=True, help="how long to flood")
    p.add_argument("--wait", type=float, default=2.0, help="longest wait for an answer")
    p.add_argument("--in-flight", type=int, default=2000, help="most connections open at once")
    p.add_argument("--server-name", default="localhost", help="the SNI sent")
    a = p.parse_args()
    if a.rate <= 0 or a.seconds <= 0 or a.wait <= 0 or a.in_flight < 1:
        sys.exit("tls-hello-flood: --rate, --seconds and --wait must be above 0, --in-flight 1 or more")
    host, _, port = a.target.rpartition(":")
    addr = (host.strip("[]"), int(port))
    hello = client_hello(a.server_name)
    sel = selectors.DefaultSelector()
    opened = {}  # socket -> when it was opened
    counts = {"sent": 0, "answered": 0, "unanswered": 0, "refused": 0, "skipped": 0}

    def close(s):
        sel.unregister(s)
        del opened[s]
        # A reset, not a FIN: nothing of this connection is left in TIME_WAIT.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()

    start = time.monotonic()
    end = start + a.seconds
    due = start
    interval = 1.0 / a.rate
    try:
        while True:
            now = time.monotonic()
            if now >= end and not opened:
                break
            if now >= end + a.wait:
                for s in list(opened):
                    counts["unanswered"] += 1
                    close(s)
                break
            while now < end and due <= now:
                due += interval
                if len(opened) >= a.in_flight:
                    counts["skipped"] += 1
                    continue
                s = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
                try:
                    s.connect(addr)
                    s.sendall(hello)
                except OSError:
                    counts["refused"] += 1
                    s.close()
                    continue
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
                opened[s] = now
                counts["sent"] += 1
            timeout = max(0.0, min(due - time.monotonic(), 0.05)) if now < end else 0.05
            for key, _ in sel.select(timeout):
                s = key.fileobj
                try:
                    got = s.recv(4096)
                except OSError:
                    got = b""
                counts["answered" if got else "unanswered"] += 1
                close(s)
            # Oldest first (a dict keeps its order): stop at the first young one.
            now = time.monotonic()
            old = []
            for s, t in opened.items():
                if now - t <= a.wait:
                    break
                old.append(s)
            for s in old:
                counts["unanswered"] += 1
                close(s)
    except KeyboardInterrupt:
        sys.exit(130)
    counts["seconds"] = round(time.monotonic() - start, 2)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
