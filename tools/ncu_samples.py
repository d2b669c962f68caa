"""Summarize the warp-state samples of an ncu SASS export (`ncu -i REPORT --page source --csv --print-source sass`).

    python -m tools.ncu_samples FILE.csv[.gz] [--window SR_TID REDG]

Prints the share of samples by opcode with the top stall reasons, and, with --window A B, the share of samples
that fall between each instruction containing A and the next one containing B (at most 25 instructions on), e.g.
the address math between a thread-index read and its reduction in the CuTe-DSL backward's dkv writes.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
from collections import Counter


def read_rows(path: str) -> tuple[list[str], list[list[str]]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = list(csv.reader(io.StringIO(f.read())))
    header_at = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    return rows[header_at], rows[header_at + 1:]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--window", nargs=2, metavar=("START", "END"))
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    header, data = read_rows(args.file)
    col = {h: i for i, h in enumerate(header)}
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    source = [r[col["Source"]].strip() for r in data]
    samples = [int(r[col["# Samples"]] or 0) for r in data]
    total = sum(samples)
    print(f"{total} samples over {len(data)} instructions")

    def opcode(text: str) -> str:
        parts = text.split()
        if not parts:
            return ""
        return (parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]).split(".")[0]

    by_op, by_op_stall = Counter(), Counter()
    for r, text, n in zip(data, source, samples):
        op = opcode(text)
        by_op[op] += n
        for s in stalls:
            by_op_stall[op, s] += int(r[col[s]] or 0)
    print("| opcode | share of samples | top stall reasons |")
    print("| --- | --- | --- |")
    for op, n in by_op.most_common(args.top):
        reasons = sorted(((by_op_stall[op, s], s) for s in stalls), reverse=True)[:2]
        print(f"| {op} | {100 * n / total:.1f}% | " + ", ".join(f"{s} {100 * v / total:.1f}%" for v, s in reasons) + " |")
    if args.window:
        start, end = args.window
        inside = 0
        starts = [i for i, text in enumerate(source) if start in text]
        for i in starts:
            j = i
            while j < len(source) - 1 and end not in source[j] and j - i < 25:
                j += 1
            inside += sum(samples[i:j + 1])
        print(f"{len(starts)} windows {start} .. {end}: {100 * inside / total:.1f}% of all samples")


if __name__ == "__main__":
    main()
