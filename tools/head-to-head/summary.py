#!/usr/bin/env python3
"""Summary of a head-to-head run (tools/head-to-head.sh): one markdown table.

    python3 tools/head-to-head/summary.py WORK_DIR [--write-readme benches/README.md]

Reads WORK_DIR/run.json, PROXY-W.json (relay-load --json),
PROXY-W.meta.json (CPU ticks and RSS samples) and, for the profiled
workloads, PROXY-W.floor.json (tools/head-to-head/kernel_floor.py), prints
the table and one line per target, and with --write-readme replaces the
section between `<!-- h2h:start -->` and `<!-- h2h:end -->` of the given
README.

- Added latency = proxy percentile - direct percentile, same workload
  (frame round trip for W1/W2; open-to-first-result for W3).
- CPU s / 1,000 audio-s = proxy CPU seconds / (frames x frame_ms / 1000 / 1000).
- RSS per stream = (peak RSS during the workload - RSS just before it) / streams.
  W4 reports it twice: while held (samples before the hold ends, every stream
  open and idle: the target's figure) and including the closing, when all
  streams end at once.
- User-space share of CPU = the proxy's utime / (utime + stime) over the
  workload (/proc/PID/stat): where a proxy's cost above the kernel's goes.
- Proxy CPU per frame = proxy CPU seconds / frames echoed (W1s, W1, W2);
  per cycle = proxy CPU seconds / cycles completed (W3).
- Kernel socket floor per frame (or cycle) = proxy CPU per frame (or cycle)
  x the share of the proxy's perf samples, in a window in the middle of the
  run, spent in the kernel's socket send and receive paths: what the TCP
  work alone costs that proxy per unit of work.
"""

import json
import os
import sys

PROXIES = ["direct", "floor", "clio", "nginx", "node"]
NAMES = {"direct": "direct", "floor": "floor proxy", "clio": "clio-relay", "nginx": "nginx",
         "node": "node (ws)"}
FRAME_MS = 100
# A direct-path W1 median round trip above this means the cores were busy.
SATURATED_P50_MS = 10.0
START, END = "<!-- h2h:start -->", "<!-- h2h:end -->"


def load(work, proxy, w):
    try:
        with open(os.path.join(work, f"{proxy}-{w}.meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None, None
    try:
        with open(os.path.join(work, f"{proxy}-{w}.json")) as f:
            rep = json.load(f)
    except (OSError, ValueError):
        rep = None
    return rep, meta


def load_floor(work, proxy, w):
    try:
        with open(os.path.join(work, f"{proxy}-{w}.floor.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cpu_s(meta):
    if meta is None or meta["proxy"] == "direct":
        return None
    return (meta["cpu_ticks_after"] - meta["cpu_ticks_before"]) / meta["clk_tck"]


def user_share(meta):
    """The share of the proxy's CPU time spent in user space (utime), or
    None (the direct path, or a run from before it was recorded)."""
    all_s = cpu_s(meta)
    if not all_s or "user_ticks_after" not in meta:
        return None
    return (meta["user_ticks_after"] - meta["user_ticks_before"]) / meta["clk_tck"] / all_s


def audio_s(rep):
    return rep["frames_received"] * FRAME_MS / 1000.0 if rep else 0.0


def fmt(v, unit=""):
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return f"{v:,}" + unit
    a = abs(v)
    if a >= 1000:
        s = f"{v:,.0f}"
    elif a >= 100:
        s = f"{v:.0f}"
    elif a >= 10:
        s = f"{v:.1f}"
    elif a >= 1:
        s = f"{v:.2f}"
    else:
        s = f"{v:.3f}"
    return s + unit


def ratio(a, b):
    if a is None or b is None or isinstance(a, str) or isinstance(b, str):
        return "—"
    # A negative operand (an added latency below the direct path's own)
    # makes a ratio that reads as a measure and is none: 13.9 ms against
    # nginx's -5.32 ms printed as -2.60x, two negatives as a plain ratio.
    if a < 0 or b < 0:
        return "—"
    if b == 0:
        return "—" if a == 0 else "∞"
    return f"{a / b:.2f}×"


def main():
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    work = args[0]
    readme = None
    if "--write-readme" in args:
        readme = args[args.index("--write-readme") + 1]
    with open(os.path.join(work, "run.json")) as f:
        run = json.load(f)
    workloads = run["workloads"].split()

    data = {(p, w): load(work, p, w) for p in PROXIES for w in workloads}
    floors = {(p, w): load_floor(work, p, w) for p in PROXIES for w in workloads}
    perf_workloads = run.get("perf_workloads", "").split()
    rows = []  # (label, {proxy: value}, unit)
    vals = {}  # (w, metric, proxy) -> value, for the targets

    def row(w, metric, unit, fn, proxies=PROXIES):
        cells = {}
        for p in PROXIES:
            rep, meta = data[(p, w)]
            v = None
            if p in proxies and meta is not None:
                try:
                    v = fn(p, rep, meta)
                except (KeyError, TypeError, ZeroDivisionError):
                    v = None
            cells[p] = v
            vals[(w, metric, p)] = v
        rows.append((f"{w} {metric}", cells, unit))

    def added(q, hist):
        def fn(p, rep, meta):
            base, _ = data[("direct", w_now[0])]
            if rep is None or base is None or rep[hist]["count"] == 0:
                return None
            return rep[hist][q] - base[hist][q]

        return fn

    def floor_rows(w, unit, per_unit):
        # per_unit(rep, meta): the proxy's CPU µs per frame or cycle.
        row(w, f"proxy CPU per {unit} (µs)", "", lambda p, r, m: per_unit(r, m),
            proxies_only)

        def share(p, r, m):
            fl = floors[(p, w)]
            return None if fl is None or fl.get("share") is None else fl["share"]

        row(w, "kernel socket share of samples (%)", "",
            lambda p, r, m: share(p, r, m) * 100.0, proxies_only)
        row(w, f"kernel socket floor per {unit} (µs)", "",
            lambda p, r, m: per_unit(r, m) * share(p, r, m), proxies_only)

    proxies_only = [p for p in PROXIES if p != "direct"]
    w_now = [None]
    for w in workloads:
        w_now[0] = w
        if w in ("W1s", "W1", "W2"):
            row(w, "frames/s", "", lambda p, r, m: r["frames_per_sec"])
            row(w, "rtt p50 (ms)", "", lambda p, r, m: r["rtt"]["p50_ms"])
            for q, name in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
                row(w, f"added rtt {name} (ms)", "", added(q, "rtt"), proxies_only)
            row(w, "lost frames", "", lambda p, r, m: r["lost"])
            row(w, "failed streams", "", lambda p, r, m: r["streams_failed"])
            row(w, "CPU s / 1,000 audio-s", "",
                lambda p, r, m: cpu_s(m) / (audio_s(r) / 1000.0), proxies_only)
            row(w, "user-space share of CPU (%)", "",
                lambda p, r, m: user_share(m) * 100.0, proxies_only)
            if w in ("W1s", "W1"):
                row(w, "RSS / stream (KiB)", "",
                    lambda p, r, m: (m["rss_kb_peak"] - m["rss_kb_before"]) / m["streams"],
                    proxies_only)
            if w in perf_workloads:
                floor_rows(w, "frame",
                           lambda r, m: cpu_s(m) * 1e6 / r["frames_received"])
        elif w == "W3":
            row(w, "cycles/s", "", lambda p, r, m: r["cycles_per_sec"])
            for q, name in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
                row(w, f"added open-to-result {name} (ms)", "", added(q, "connect"), proxies_only)
            row(w, "failed streams", "", lambda p, r, m: r["streams_failed"])
            row(w, "CPU ms / cycle", "",
                lambda p, r, m: cpu_s(m) * 1000.0 / r["streams_ok"], proxies_only)
            row(w, "user-space share of CPU (%)", "",
                lambda p, r, m: user_share(m) * 100.0, proxies_only)
            if w in perf_workloads:
                floor_rows(w, "cycle", lambda r, m: cpu_s(m) * 1e6 / r["streams_ok"])
        elif w == "W4":
            row(w, "streams held", "", lambda p, r, m: r["idle_held"])
            row(w, "failed streams", "", lambda p, r, m: r["streams_failed"])
            row(w, "RSS / stream held (KiB)", "",
                lambda p, r, m: (m.get("rss_kb_held", m["rss_kb_peak"]) - m["rss_kb_before"])
                / max(r["idle_held"], 1),
                proxies_only)
            row(w, "RSS / stream incl. closing (KiB)", "",
                lambda p, r, m: (m["rss_kb_peak"] - m["rss_kb_before"]) / max(r["idle_held"], 1),
                proxies_only)
            row(w, "peak RSS (MiB)", "", lambda p, r, m: m["rss_kb_peak"] / 1024.0, proxies_only)
            row(w, "CPU s", "", lambda p, r, m: cpu_s(m), proxies_only)

    # The floor proxy is a column only in runs that measured it.
    shown = [p for p in PROXIES
             if p != "floor" or any(data[(p, w)][1] is not None for w in workloads)]
    lines = []
    lines.append("| workload · metric | " + " | ".join(NAMES[p] for p in shown)
                 + " | clio-relay / nginx |")
    lines.append("|---|" + "---:|" * (len(shown) + 1))
    for label, cells, unit in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(cells[p], unit) for p in shown)
                     + f" | {ratio(cells['clio'], cells['nginx'])} |")
    table = "\n".join(lines)

    def v(w, m, p):
        return vals.get((w, m, p))

    targets = []

    def target(text, ok, detail):
        state = "not measurable" if ok is None else ("**met**" if ok else "**not met**")
        targets.append(f"- {text}: {state} ({detail})")

    def cmp(a, b, f):
        return None if a is None or b is None else f(a, b)

    notes = []

    def streams(w):
        for p in PROXIES:
            _, meta = data[(p, w)]
            if meta is not None and meta.get("streams"):
                return meta["streams"]
        return None

    def saturated(w):
        # Saturation: an echo over loopback at real-time pace comes back in
        # well under a millisecond when the cores have room. A direct-path
        # median in tens of milliseconds means frames waited in run queues:
        # the load generator and the fake alone kept the cores busy, and a
        # proxy's added latency is then its share of that queueing.
        direct_p50 = v(w, "rtt p50 (ms)", "direct")
        if direct_p50 is None or direct_p50 <= SATURATED_P50_MS:
            return False
        notes.append(
            f"- {w}: the direct path's own median round trip was {fmt(direct_p50)} ms (an "
            "echo over loopback with cores to spare takes well under 1 ms): the load "
            "generator and the fake upstream alone kept the machine's cores busy, so "
            "round trips through a proxy are queueing times and the added latencies are "
            "not a measure of the proxy.")
        return True

    def floor_detail(w, unit):
        # The kernel floor beside a ratio: each proxy's CPU per unit of work
        # and the part of it that the kernel's socket send and receive took.
        if w not in perf_workloads:
            return ""
        a, b = (v(w, f"proxy CPU per {unit} (µs)", p) for p in ("clio", "nginx"))
        fa, fb = (v(w, f"kernel socket floor per {unit} (µs)", p) for p in ("clio", "nginx"))
        if a is None and b is None:
            return ""
        return (f"; per {unit}: {fmt(a)} µs vs {fmt(b)} µs, of which the kernel socket "
                f"floor {fmt(fa)} µs vs {fmt(fb)} µs")

    def rtt_targets(w, sat, label):
        a, b = v(w, "added rtt p99 (ms)", "clio"), v(w, "added rtt p99 (ms)", "nginx")
        ok = None if sat else cmp(a, b, lambda a, b: a <= b)
        target(f"{label}: clio-relay's added p99 ≤ nginx's", ok,
               f"{fmt(a)} ms vs {fmt(b)} ms, {ratio(a, b)}"
               + ("; not measurable in a saturated run" if sat and a is not None else ""))
        a = v(w, "added rtt p99.9 (ms)", "clio")
        ok = None if sat or a is None else a <= 2.0
        target(f"{label}: clio-relay's added p99.9 ≤ 2 ms", ok,
               f"{fmt(a)} ms (nginx {fmt(v(w, 'added rtt p99.9 (ms)', 'nginx'))} ms)"
               + ("; not measurable in a saturated run" if sat and a is not None else ""))

    def cpu_target(w, label, limit):
        a, b = (v(w, "CPU s / 1,000 audio-s", p) for p in ("clio", "nginx"))
        target(f"{label}: clio-relay's CPU ≤ {limit}× nginx's",
               cmp(a, b, lambda a, b: a <= limit * b),
               f"{fmt(a)} vs {fmt(b)} CPU s per 1,000 audio-s, {ratio(a, b)}"
               + floor_detail(w, "frame"))

    def lost_target(w, label):
        lost, failed = v(w, "lost frames", "clio"), v(w, "failed streams", "clio")
        # A failed stream's frames never all came back either: count it against the target.
        target(f"{label}: clio-relay loses 0 frames and fails no stream",
               cmp(lost, failed, lambda a, b: a == 0 and b == 0),
               f"lost {fmt(lost)}, failed streams {fmt(failed)}")

    if "W1s" in workloads:
        label = f"W1s ({fmt(streams('W1s'))} streams)"
        sat = saturated("W1s")
        cpu_target("W1s", label, 0.9)
        rtt_targets("W1s", sat, label)
    if "W1" in workloads:
        label = f"W1 ({fmt(streams('W1'))} streams)"
        saturated("W1")
        cpu_target("W1", label, 0.8)
        lost_target("W1", label)
    if run.get("pin_peers"):
        notes.append(
            f"- Peers pinned (`H2H_PIN_PEERS=1`): relay-load on core 0, fake-soniox's "
            f"threads on core {run['nproc'] - 1}; each proxy placed as it places itself.")
    if "W2" in workloads:
        notes.append(
            "- W2: a flood keeps every socket buffer on the path full, so its round trips are "
            "the time a frame waits behind the backlog (seconds), not a proxy's latency; "
            "differences between paths can be negative. Read W2 for frames/s and CPU.")
        a, b, c = (v("W2", "frames/s", p) for p in ("clio", "nginx", "node"))
        failed = v("W2", "failed streams", "clio")
        target("W2: clio-relay ≥ 1.2× nginx's frames/s and fails no stream",
               cmp(a, b, lambda a, b: a >= 1.2 * b and failed == 0),
               f"{fmt(a)} vs {fmt(b)}, {ratio(a, b)}; failed streams {fmt(failed)}"
               + floor_detail("W2", "frame"))
        targets.append(f"- W2: clio-relay against the Node proxy (information, no target): "
                       f"{fmt(a)} vs {fmt(c)} frames/s, {ratio(a, c)}")
    if "W3" in workloads:
        a, b = v("W3", "cycles/s", "clio"), v("W3", "cycles/s", "nginx")
        target("W3: clio-relay's churn ≥ 0.9× nginx's", cmp(a, b, lambda a, b: a >= 0.9 * b),
               f"{fmt(a)} vs {fmt(b)} cycles/s, {ratio(a, b)}" + floor_detail("W3", "cycle"))
    if "floor" in shown:
        # What the floor proxy (bytes copied, nothing read) costs: what is
        # left to a proxy's own work above it, for each proxy.
        for w, m in (("W1s", "CPU s / 1,000 audio-s"), ("W1", "CPU s / 1,000 audio-s"),
                     ("W3", "CPU ms / cycle")):
            f, a, b = (v(w, m, p) for p in ("floor", "clio", "nginx"))
            if w in workloads and f is not None:
                targets.append(f"- {w}: against the floor proxy (information, no target): "
                               f"clio-relay {ratio(a, f)}, nginx {ratio(b, f)} of its {m}")
    if "W4" in workloads:
        a = v("W4", "RSS / stream held (KiB)", "clio")
        held = v("W4", "streams held", "clio")
        target("W4: clio-relay ≤ 6 KiB RSS per idle stream held", None if a is None else a <= 6,
               f"{fmt(a)} KiB per stream over {fmt(held)} streams held")

    profiled = [w for w in workloads if w in perf_workloads]
    if profiled:
        if run.get("perf_note"):
            notes.append(f"- Kernel socket floor: not measured ({run['perf_note']}).")
        else:
            windows = []
            for w in profiled:
                for p in proxies_only:
                    rep, meta = data[(p, w)]
                    fl = floors[(p, w)]
                    if meta is None:
                        continue
                    if meta.get("perf_window_s") and "perf_from_ms" in meta:
                        windows.append(
                            f"{w} {NAMES[p]} {meta['perf_from_ms'] / 1000:.1f}–"
                            f"{meta['perf_to_ms'] / 1000:.1f} s of {meta['run_ms'] / 1000:.1f} s")
                    if fl is None or fl.get("share") is None:
                        why = (fl or {}).get("error", "no samples")
                        notes.append(f"- {w} {NAMES[p]}: no kernel socket floor ({why}).")
                    elif meta.get("perf_cut"):
                        notes.append(f"- {w} {NAMES[p]}: the run ended inside the perf window; "
                                     "its samples include the end of the run.")
            notes.append(
                "- Kernel socket floor: `perf record -g` (999 Hz of cpu-clock) on each proxy "
                "during " + " and ".join(profiled) + "; the share of its samples whose "
                "callchain is in the kernel's socket send or receive path (syscall or io_uring "
                "request, down through TCP and, on loopback, the delivery to the peer), times "
                "the proxy's CPU per unit. Windows (from relay-load's start): "
                + "; ".join(windows) + ". Raw data: PROXY-W.perf.data, "
                "PROXY-W.perf-report.txt and PROXY-W.floor.json in the work dir.")

    # nginx and node are named only when the run had them.
    others = ([f"nginx {run['nginx']}"] if run.get("nginx") else []) + (
        [f"Node {run['node']} with ws {run['ws']}"] if run.get("node") else [])
    machine = (f"{run['nproc']} cores ({run['cpu']}), {run['mem_gib']} GiB, Linux {run['kernel']}"
               + ("; " + ", ".join(others) if others else ""))
    text = "\n".join([table, "", "Targets:", "", *targets] + (["", "Notes:", "", *notes] if notes else []))
    print(f"Head-to-head, {run['date']}{' (--quick)' if run['quick'] else ''}: {machine}")
    print()
    print(text)

    if readme:
        section = "\n".join([
            START,
            f"Run on {run['date']} with `{run['command']}`"
            + (" (quick, shortened workloads)" if run["quick"] else "") + ".",
            "",
            f"Machine: {machine}. The machine was shared with other work during the run, "
            "so absolute numbers are noisy; read the ratios.",
            "",
            text,
            END,
        ])
        with open(readme) as f:
            old = f.read()
        if START in old and END in old:
            new = old[: old.index(START)] + section + old[old.index(END) + len(END):]
        else:
            new = old.rstrip("\n") + "\n\n" + section + "\n"
        with open(readme, "w") as f:
            f.write(new)
        print(f"\n(wrote {readme})", file=sys.stderr)


if __name__ == "__main__":
    main()
