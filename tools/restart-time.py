#!/usr/bin/env python3
"""How long a `systemctl restart clio-relay` takes, on loopback, with the
shipped socket units' arrangement but without systemd.

It holds the two listening sockets as clio-relay.socket and
clio-relay-admin.socket do (the client one with SO_REUSEPORT and a 4096
backlog), starts the relay on them as systemd does (fds 3 and 4,
$LISTEN_FDS, $LISTEN_FDNAMES=client:admin, $LISTEN_PID, and a
$NOTIFY_SOCKET for Type=notify), and restarts it as systemctl does: SIGTERM
(the drain), wait for the process to exit, start the new one, wait for its
READY=1. It prints the time from the SIGTERM to the old process's exit (the
drain) and to the new one's READY=1 (the whole restart).

What runs during the restart: --streams N relay-load streams of
--stream-seconds each in real time, repeated (so they are at every point of
their audio when the SIGTERM comes, and new ones wait in the socket's queue
for the new process), and --silent M connections that never start a stream
(half of them accepted and silent, half upgraded with no first message).

    tools/restart-time.py --streams 50 --silent 20

Binaries: target/release/{clio-relay,fake-soniox,relay-load} unless --bin
names another directory (`cargo build --release` builds them).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

LOCK = threading.Lock()


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=0, help="live streams during the restart")
    p.add_argument("--silent", type=int, default=0, help="connections that never start a stream")
    p.add_argument("--stream-seconds", type=float, default=10.0, help="audio per stream, real time")
    p.add_argument("--bin", default="target/release", help="directory of the three binaries")
    p.add_argument("--drain-timeout", default="30s", help="limits.drain_timeout")
    return p.parse_args()


def start_relay(bin_dir, cfg, client, admin, notify_path, env):
    """Starts the relay on the held sockets, as systemd's socket activation does."""

    def place_fds():
        # fds 3 and 4, inheritable; `exec` in sh keeps its pid, which is
        # what $LISTEN_PID must name.
        for want, s in ((3, client), (4, admin)):
            os.dup2(s.fileno(), want)
            os.set_inheritable(want, True)

    env = dict(env, LISTEN_FDS="2", LISTEN_FDNAMES="client:admin", NOTIFY_SOCKET=notify_path)
    return started(subprocess.Popen(
        ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", f"{bin_dir}/clio-relay", "run", "--config", cfg],
        env=env,
        preexec_fn=place_fds,
        close_fds=False,
        stderr=subprocess.DEVNULL,
    ))


class Notify:
    """The $NOTIFY_SOCKET, read all the time as systemd reads it (a relay
    whose datagrams are not read blocks on its next one); wait() returns
    the time of the next READY=1."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.ready = []
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            msg = self.sock.recv(4096).decode()
            if "READY=1" in msg.split("\n"):
                with self.cv:
                    self.ready.append(time.monotonic())
                    self.cv.notify_all()

    def wait(self, relay, limit=60.0):
        """The time of `relay`'s READY=1; an exit when it ends first or
        sends none within `limit` seconds."""
        end = time.monotonic() + limit
        with self.cv:
            while not self.ready:
                if relay.poll() is not None:
                    sys.exit(f"restart-time: the relay exited ({relay.returncode}) before READY=1")
                if time.monotonic() > end:
                    sys.exit("restart-time: the relay sent no READY=1")
                self.cv.wait(timeout=0.1)
            return self.ready.pop(0)


def silent_connections(addr, n):
    conns = []
    for i in range(n):
        s = socket.create_connection(addr)
        if i % 2:
            # Upgraded, its token to come in a first message that never comes.
            s.sendall(
                b"GET /v1/transcribe HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(4096)
            assert head.startswith(b"HTTP/1.1 101"), head
        conns.append(s)
    return conns


def read_answer(s, answers):
    """Counts what a silent connection got in `answers`, then closes it."""
    k = answer_of(s)
    s.close()
    with LOCK:
        answers[k] = answers.get(k, 0) + 1


def answer_of(s):
    """What a silent connection got: the HTTP status, or the close code
    (whose close it answers, as a WebSocket client does)."""
    s.settimeout(120)
    data = b""
    replied = False
    while True:
        try:
            chunk = s.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
        code = None if data.startswith(b"HTTP/") else close_code(data)
        if code is not None and not replied:
            s.sendall(b"\x88\x80\x00\x00\x00\x00")  # an empty close, masked
            replied = True
    if data.startswith(b"HTTP/1.1 "):
        return "http " + data[9:12].decode()
    code = close_code(data)
    return f"close {code}" if code is not None else "nothing"


def close_code(data):
    """The code of the close frame among server frames (unmasked, short)."""
    at = 0
    while at + 2 <= len(data):
        op, n = data[at] & 0x0F, data[at + 1] & 0x7F
        head = 2
        if n == 126:
            n, head = int.from_bytes(data[at + 2:at + 4], "big"), 4
        if op == 8 and n >= 2 and at + head + 2 <= len(data):
            return int.from_bytes(data[at + head:at + head + 2], "big")
        at += head + n
    return None


# Every process the run starts, stopped on the way out however it ends:
# left running, a relay holds the caller's output open (a test reading
# it waits for ever) and its port.
STARTED = []


def started(p):
    STARTED.append(p)
    return p


def main():
    a = parse()
    need = ["clio-relay", "fake-soniox"] + (["relay-load"] if a.streams else [])
    missing = [b for b in need if not os.access(os.path.join(a.bin, b), os.X_OK)]
    if missing:
        sys.exit(f"restart-time: no {', '.join(missing)} in {a.bin}: "
                 "build them first (cargo build --release), or name their directory with --bin")
    try:
        run(a)
    finally:
        for p in STARTED:
            if p.poll() is None:
                p.kill()
                p.wait()


def run(a):
    tmp = tempfile.mkdtemp(prefix="restart-time-")
    fake = started(subprocess.Popen(
        [f"{a.bin}/fake-soniox", "--listen", "127.0.0.1:0", "--key", "k1",
         "--max-concurrent", "100000", "--idle-timeout", "1h", "--echo"],
        stdout=subprocess.PIPE, text=True,
    ))
    fake_url = fake.stdout.readline().split()[3].rstrip(",")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    client.bind(("127.0.0.1", 0))
    client.listen(4096)
    admin = socket.socket()
    admin.bind(("127.0.0.1", 0))
    admin.listen(128)
    addr = client.getsockname()
    notify_path = os.path.join(tmp, "notify")
    notify = Notify(notify_path)
    cfg = os.path.join(tmp, "relay.toml")
    with open(cfg, "w") as f:
        f.write(
            f'[server]\nlisten = "{addr[0]}:{addr[1]}"\nadmin_listen = "127.0.0.1:0"\n'
            f'max_streams = 100000\n[upstream]\nurl = "{fake_url}"\n'
            f'[tokens]\nsecret_env = "RESTART_TIME_SECRET"\n'
            f'[limits]\ndrain_timeout = "{a.drain_timeout}"\n'
            f'[admin]\nstate_dir = "{tmp}/state"\nhealth_interval = "0s"\n'
            f'[[account]]\nid = "a"\nkey_env = "RESTART_TIME_KEY"\nmax_concurrent_streams = 100000\n'
        )
    env = dict(os.environ, RESTART_TIME_SECRET=os.urandom(32).hex(), RESTART_TIME_KEY="k1")
    old = start_relay(a.bin, cfg, client, admin, notify_path, env)
    notify.wait(old)
    load = None
    if a.streams:
        load = started(subprocess.Popen(
            [f"{a.bin}/relay-load", "--target", f"{addr[0]}:{addr[1]}", "--relay-config", cfg,
             "-n", str(a.streams), "--ramp", str(a.streams / a.stream_seconds),
             "--stream-seconds", str(a.stream_seconds), "--loop",
             "--duration", f"{int(3 * a.stream_seconds + 30)}s", "--json", "--quiet"],
            env=env, stdout=subprocess.PIPE, text=True,
        ))
        # Every slot started, and each at another point of its audio.
        time.sleep(2 * a.stream_seconds)
    silent = silent_connections(addr, a.silent)
    # Each reads its answer as it comes and then closes, as a client does.
    answers = {}
    readers = [threading.Thread(target=lambda s=s: read_answer(s, answers)) for s in silent]
    for r in readers:
        r.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    old.send_signal(signal.SIGTERM)
    old.wait()
    exited = time.monotonic()
    new = start_relay(a.bin, cfg, client, admin, notify_path, env)
    ready = notify.wait(new)
    for r in readers:
        r.join()
    result = {
        "streams": a.streams,
        "silent": a.silent,
        "stream_seconds": a.stream_seconds,
        "drain_s": round(exited - t0, 3),
        "restart_s": round(ready - t0, 3),
        "old_exit": old.returncode,
        "silent_answers": answers,
    }
    if load:
        out, _ = load.communicate()
        r = json.loads(out)
        result["load"] = {k: r.get(k) for k in ("streams_ok", "streams_failed", "lost")}
    new.send_signal(signal.SIGTERM)
    new.wait()
    fake.send_signal(signal.SIGTERM)
    fake.wait()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
