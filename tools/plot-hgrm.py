#!/usr/bin/env python3
"""Plots HdrHistogram percentile distributions (.hgrm files) side by side as
one SVG: latency (ms) against percentile, on the usual "nines" axis (0%,
90%, 99%, 99.9%, ...), one line per file. Standard library only.

    python3 tools/plot-hgrm.py -o rtt.svg relay=runs/relay/rtt.hgrm direct=runs/direct/rtt.hgrm

Each argument is FILE or LABEL=FILE (the label defaults to the file's
directory and name). relay-load writes the files with --hgrm-dir DIR
(connect.hgrm and rtt.hgrm). Open the SVG in a browser; convert it to PNG
with any SVG tool (e.g. `rsvg-convert -o rtt.png rtt.svg`).
"""

import argparse
import math
import os
import sys
from xml.sax.saxutils import escape

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
W, H = 900, 520
LEFT, RIGHT, TOP, BOTTOM = 80, 220, 50, 60


def read_hgrm(path):
    """(percentile, value ms, total count) points of a classic .hgrm file."""
    points = []
    empty = False
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if line.lstrip().startswith("#"):
                empty = empty or ("Total count" in line and parts[-1].rstrip("]") == "0")
                continue
            if len(parts) < 3:
                continue
            try:
                value, q, count = float(parts[0]), float(parts[1]), int(parts[2])
            except ValueError:
                continue  # the header line
            if 0.0 <= q <= 1.0 and value >= 0:
                points.append((q, value, count))
    if not points and empty:
        raise ValueError("%s: no samples (Total count = 0): the run measured nothing here" % path)
    if not points:
        raise ValueError("%s: no percentile rows (is it an .hgrm file?)" % path)
    return points


def nines(q, top):
    """x position of percentile q: log10(1/(1-q)), 100% drawn at the top."""
    if q >= 1.0:
        return top
    return min(top, math.log10(1.0 / (1.0 - q)))


def nice_step(span):
    raw = span / 6.0
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def fmt_ms(v):
    return ("%.3f" % v).rstrip("0").rstrip(".") if v < 10 else "%.0f" % v


def value_at(points, q):
    """The value at quantile q, as relay-load's table and JSON give it: the
    first row whose count reaches q of the samples. Not the first row whose
    percentile column reaches q: that column is where each row's step ends,
    so its value can be the next sample's (a p99 of 33.9 ms shown as 80 ms)."""
    total = points[-1][2]
    need = max(1, math.ceil(q * total - 1e-9))
    for _, v, count in points:
        if count >= need:
            return v
    return points[-1][1]


def plot(series, title):
    # The nines axis reaches one decade past the last finite percentile of any file.
    finite = [nines(q, 99) for _, pts in series for q, _, _ in pts if q < 1.0]
    top = max(2, math.ceil(max(finite) if finite else 2))
    ymax = max(v for _, pts in series for _, v, _ in pts) or 1.0
    step = nice_step(ymax)
    ymax = math.ceil(ymax / step) * step
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    x = lambda n: LEFT + pw * n / top
    y = lambda v: TOP + ph * (1 - v / ymax)
    out = [
        '<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
        'font-family="sans-serif" font-size="12">' % (W, H, W, H),
        '<rect width="100%" height="100%" fill="white"/>',
        '<text x="%d" y="24" font-size="16">%s</text>' % (LEFT, escape(title)),
    ]
    for i in range(top + 1):
        label = "0%" if i == 0 else ("%." + str(max(0, i - 2)) + "f%%") % (100 - 100 / 10 ** i)
        out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>' % (x(i), TOP, x(i), TOP + ph))
        out.append('<text x="%.1f" y="%d" text-anchor="middle">%s</text>' % (x(i), TOP + ph + 18, label))
    v = 0.0
    while v <= ymax + step / 2:
        out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/>' % (LEFT, y(v), LEFT + pw, y(v)))
        out.append('<text x="%d" y="%.1f" text-anchor="end">%s</text>' % (LEFT - 6, y(v) + 4, fmt_ms(v)))
        v += step
    out.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#444"/>' % (LEFT, TOP, pw, ph))
    out.append('<text x="%.1f" y="%d" text-anchor="middle">percentile</text>' % (LEFT + pw / 2, H - 14))
    out.append('<text transform="translate(20,%.1f) rotate(-90)" text-anchor="middle">latency (ms)</text>'
               % (TOP + ph / 2))
    for i, (label, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        coords = " ".join("%.1f,%.1f" % (x(nines(q, top)), y(v)) for q, v, _ in pts)
        out.append('<polyline class="series" data-label="%s" fill="none" stroke="%s" stroke-width="2" points="%s"/>'
                   % (escape(label, {'"': "&quot;"}), color, coords))
        ly = TOP + 10 + 44 * i
        out.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="3"/>'
                   % (W - RIGHT + 16, ly, W - RIGHT + 40, ly, color))
        out.append('<text x="%d" y="%d">%s</text>' % (W - RIGHT + 46, ly + 4, escape(label)))
        out.append('<text x="%d" y="%d" fill="#555">p50 %s  p99 %s  max %s</text>'
                   % (W - RIGHT + 46, ly + 20, fmt_ms(value_at(pts, 0.5)), fmt_ms(value_at(pts, 0.99)),
                      fmt_ms(pts[-1][1])))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot .hgrm latency distributions side by side as an SVG.")
    p.add_argument("files", nargs="+", metavar="[LABEL=]FILE", help=".hgrm files (relay-load --hgrm-dir)")
    p.add_argument("-o", "--output", default="latency.svg", help="SVG file to write (default latency.svg)")
    p.add_argument("--title", default="latency by percentile", help="title above the plot")
    args = p.parse_args(argv)
    series = []
    try:
        for arg in args.files:
            label, sep, path = arg.partition("=")
            if not sep or os.path.exists(arg):  # no label (or a file name with "=")
                label, path = os.path.join(os.path.basename(os.path.dirname(arg)), os.path.basename(arg)), arg
            series.append((label, read_hgrm(path)))
        svg = plot(series, args.title)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(svg)
    except (OSError, ValueError) as e:
        print("plot-hgrm.py: %s" % e, file=sys.stderr)
        return 1
    print("wrote %s (%d series)" % (args.output, len(series)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
