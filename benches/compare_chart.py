#!/usr/bin/env python3
"""Draws the JSON written by `benches/compare.rs` as an SVG bar chart.

    python3 benches/compare_chart.py target/compare/compare.json docs/compare.svg \
        --note "2026-11-22, 2-core VM, cargo bench --features compare --bench compare"

One row per workload; one bar per engine, as a multiple of mapstore's figure,
oriented so that a longer bar is always better (for "lower is better" metrics
such as latency, reopen time and bytes, the ratio is inverted). The mapstore
bar is therefore always 1.0. Only the Python standard library is used.
"""

import argparse
import json
import math
from xml.sax.saxutils import escape

COLOURS = {"mapstore": "#1b6ca8", "redb": "#e07b39", "fjall": "#5b9f4a", "sled": "#a05195"}
ORDER = ["mapstore", "redb", "fjall", "sled"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("svg_file")
    parser.add_argument("--note", default="", help="date, machine and command, shown under the title")
    args = parser.parse_args()

    with open(args.json_file) as f:
        data = json.load(f)
    engines = [e for e in ORDER if e in data["engines"]]
    ours = data["engines"].get("mapstore", {})
    rows = []
    parent = ""
    for metric, info in data["metrics"].items():
        label = info["label"]
        if label.startswith("  "):
            # A detail of the row above: name it with its parent.
            label = parent.split(" (")[0] + ": " + label.strip()
        else:
            parent = label
        if info["higher_is_better"] is None:
            continue  # a descriptive figure (what a write costs the device), not a contest
        if metric not in ours or ours[metric] <= 0:
            continue
        ratios = {}
        peers = [e for e in engines if e != "mapstore" and data["engines"][e].get(metric)]
        if not peers:
            continue  # nothing to compare with
        for engine in engines:
            value = data["engines"][engine].get(metric)
            if value is None or value <= 0:
                continue
            ratio = value / ours[metric] if info["higher_is_better"] else ours[metric] / value
            ratios[engine] = ratio
        rows.append((label, ratios))

    # A log scale keeps 0.05x and 20x readable on one axis; it spans the
    # decades the ratios reach.
    all_ratios = [r for _, ratios in rows for r in ratios.values()]
    low = 10 ** math.floor(math.log10(min(all_ratios + [0.5])))
    high = 10 ** math.ceil(math.log10(max(all_ratios + [2.0])))
    label_width, plot_width, bar, gap = 430, 460, 7, 10
    row_height = bar * len(engines) + gap
    top = 70
    height = top + row_height * len(rows) + 50
    width = label_width + plot_width + 40

    def x_of(ratio):
        ratio = min(max(ratio, low), high)
        return label_width + plot_width * (math.log10(ratio) - math.log10(low)) / (
            math.log10(high) - math.log10(low))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="15" font-weight="bold">'
           f'mapstore vs redb, fjall, sled: each engine as a multiple of mapstore (log scale, right is better)</text>',
           f'<text x="10" y="38">{escape(args.note)}</text>',
           f'<text x="10" y="54">{data["keys"]:,} keys, 16-byte keys, 100-byte values; '
           f'machine: {data["cpus"]} CPUs</text>']
    for tick in [t for t in [0.001, 0.01, 0.1, 0.5, 1, 2, 10, 100] if low <= t <= high]:
        x = x_of(tick)
        colour = "#333" if tick == 1 else "#ccc"
        out.append(f'<line x1="{x:.1f}" y1="{top - 5}" x2="{x:.1f}" y2="{height - 40}" stroke="{colour}"/>')
        out.append(f'<text x="{x:.1f}" y="{height - 28}" text-anchor="middle">{tick:g}x</text>')
    for index, (label, ratios) in enumerate(rows):
        y = top + index * row_height
        out.append(f'<text x="{label_width - 8}" y="{y + row_height / 2:.1f}" text-anchor="end" '
                   f'dominant-baseline="middle">{escape(label)}</text>')
        for slot, engine in enumerate(engines):
            if engine not in ratios:
                continue
            x0, x1 = x_of(low), x_of(ratios[engine])
            out.append(f'<rect x="{x0:.1f}" y="{y + slot * bar}" width="{x1 - x0:.1f}" height="{bar - 1}" '
                       f'fill="{COLOURS[engine]}"><title>{engine}: {ratios[engine]:.2f}x</title></rect>')
    legend_y = height - 12
    for slot, engine in enumerate(engines):
        x = 10 + slot * 110
        out.append(f'<rect x="{x}" y="{legend_y - 9}" width="12" height="10" fill="{COLOURS[engine]}"/>')
        out.append(f'<text x="{x + 16}" y="{legend_y}">{engine}</text>')
    out.append("</svg>")
    with open(args.svg_file, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
