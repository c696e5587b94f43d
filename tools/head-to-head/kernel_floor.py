#!/usr/bin/env python3
"""The kernel socket floor: the share of a proxy's perf samples spent in the
kernel's socket send and receive paths.

    perf script -i PERF_DATA -F comm,tid,ip,sym | python3 kernel_floor.py > FLOOR.json

Reads `perf script` output of a `perf record -g` (callchains, leaf first) and
counts each sample once: it is a socket sample when any frame of its
callchain is one of SEND or RECV below. Those are the entry points of a
send or a receive on a socket, whichever way the proxy makes it: a syscall
(`sendto`, `recvfrom`, `sendmsg`, `recvmsg`, `writev`/`readv` and
`write`/`read` on a socket), or an io_uring request (`IORING_OP_SEND`,
`RECV`, `SENDMSG`, `RECVMSG`, `READ`/`WRITE` on a socket), down to TCP.
Everything below them is counted with them: on loopback a send carries
the delivery to the peer's socket (softirq included) in the sender's
context. Readiness waits (`epoll_wait`, `io_uring_enter` sleeping, poll
arming) are not the floor: a proxy could batch or avoid them.

The outermost matching frame names the sample's path (send or receive), so
a sample is never counted twice. Prints one JSON object: samples, socket
samples, share, the send and receive split and the samples per entry
symbol (to check the choice against a real `perf report --children`).
"""

import json
import sys

# Entry points, outermost first within each path. Syscall level, socket
# layer, protocol layer; any one in a callchain is enough, so a kernel that
# inlines or renames one level is still counted through another.
SEND = (
    "__sys_sendto", "__x64_sys_sendto", "__sys_sendmsg", "___sys_sendmsg",
    "__sys_sendmmsg", "__x64_sys_sendmsg",
    "io_send", "io_sendmsg", "io_send_zc", "io_sendmsg_zc",
    "sock_write_iter", "sock_sendmsg", "__sock_sendmsg",
    "inet_sendmsg", "inet6_sendmsg", "tcp_sendmsg", "tcp_sendmsg_locked",
)
RECV = (
    "__sys_recvfrom", "__x64_sys_recvfrom", "__sys_recvmsg", "___sys_recvmsg",
    "__sys_recvmmsg", "__x64_sys_recvmsg",
    "io_recv", "io_recvmsg", "io_recv_finish",
    "sock_read_iter", "sock_recvmsg", "__sock_recvmsg",
    "inet_recvmsg", "inet6_recvmsg", "tcp_recvmsg", "tcp_recvmsg_locked",
)
PATH = {s: "send" for s in SEND}
PATH.update({s: "recv" for s in RECV})


def frame_symbol(line):
    # "\t ffffffff81a2b3c4 tcp_sendmsg+0x25 ([kernel.kallsyms])" or, with
    # -F ip,sym, "\t ffffffff81a2b3c4 tcp_sendmsg"; "[unknown]" when none.
    parts = line.split()
    if len(parts) < 2:
        return None
    sym = parts[1]
    plus = sym.find("+0x")
    return sym[:plus] if plus > 0 else sym


def main():
    samples = socket = 0
    paths = {"send": 0, "recv": 0}
    by_symbol = {}
    comms = {}
    block = []

    def flush():
        nonlocal samples, socket
        if not block:
            return
        header, frames = block[0], block[1:]
        samples += 1
        comm = header.split()[0] if header.split() else "?"
        comms[comm] = comms.get(comm, 0) + 1
        # Leaf first: walk from the root so the outermost entry names it.
        for line in reversed(frames):
            sym = frame_symbol(line)
            if sym in PATH:
                socket += 1
                paths[PATH[sym]] += 1
                by_symbol[sym] = by_symbol.get(sym, 0) + 1
                break
        block.clear()

    for raw in sys.stdin:
        line = raw.rstrip("\n")
        if not line.strip():
            flush()
            continue
        if line[0] in " \t":
            if block:
                block.append(line)
        else:
            flush()
            block.append(line)
    flush()

    json.dump({
        "samples": samples,
        "socket_samples": socket,
        "share": socket / samples if samples else None,
        "send_samples": paths["send"],
        "recv_samples": paths["recv"],
        "by_entry_symbol": dict(sorted(by_symbol.items(), key=lambda kv: -kv[1])),
        "samples_by_comm": dict(sorted(comms.items(), key=lambda kv: -kv[1])),
    }, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        # Ctrl-C stops the whole run; head-to-head.sh says so and cleans up.
        sys.exit(130)
