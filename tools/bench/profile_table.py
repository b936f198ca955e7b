#!/usr/bin/env python3
"""Prints the kernels of an Nsight Compute CSV (scripts/gpu-profile.sh) in launch order.

One row a launch: its ID, time (µs), short name, grid and block. `--tail N` keeps the last N
launches (a decode case's last step is its last few dozen: the LM head's GEMM ends it); `--ids
FIRST:LAST` a range of IDs. The total of the rows shown comes last. Run it where the CSV was
fetched to, with the standard library only:
  python3 tools/bench/profile_table.py OUT/profile.csv --tail 60
"""

import argparse
import csv
import io
import re
import sys


def launches(path):
    """(id, µs, short name, grid, block) for each kernel launch in the CSV."""
    text = open(path, encoding="utf-8", errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        sys.exit(f"{path}: no ncu CSV header")
    rows = []
    for row in csv.DictReader(io.StringIO(text[start:])):
        launch_id = row["ID"].replace(",", "")
        if not launch_id.isdigit():
            continue  # the units row
        name = re.sub(r"^void |<unnamed>::|\(anonymous namespace\)::", "", row["Kernel Name"])
        name = re.sub(r"[<(].*", "", name)[:60]
        nanoseconds = float(row["gpu__time_duration.sum"].replace(",", ""))
        rows.append((int(launch_id), nanoseconds / 1000, name, row["Grid Size"], row["Block Size"]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--tail", type=int, default=0, help="only the last N launches")
    parser.add_argument("--ids", default="", help="FIRST:LAST, an inclusive range of launch IDs")
    args = parser.parse_args()
    rows = launches(args.csv)
    if args.ids:
        first, last = (int(part) for part in args.ids.split(":"))
        rows = [row for row in rows if first <= row[0] <= last]
    if args.tail:
        rows = rows[-args.tail:]
    for launch_id, micros, name, grid, block in rows:
        print(f"{launch_id:6d} {micros:9.1f}  {name:60s} {grid:>16s} {block:>14s}")
    print(f"{len(rows)} launches, {sum(row[1] for row in rows):.1f} µs")


if __name__ == "__main__":
    main()
