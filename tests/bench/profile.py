"""Summarise the py-spy profiles that ``run.sh --profile DIR`` recorded: where the time went.

    python -m tests.bench.profile DIR [--top 15]

For each raw profile (``NN-role-pid.txt``, one folded stack per line with its sample count) it
prints the functions with the most samples of their own, and the ones with the most samples
beneath them, as percentages of that process's samples.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def summarise(path: Path) -> tuple[int, Counter, Counter]:
    """(samples, own samples per frame, samples per frame anywhere on the stack)."""
    own: Counter = Counter()
    below: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            below[frame] += n
    return total, own, below


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    for path in sorted(args.folder.glob("*.txt")):
        total, own, below = summarise(path)
        if not total:
            continue
        print(f"\n## {path.name}: {total} samples")
        for title, counts in (("own", own), ("inclusive", below)):
            print(f"-- {title}")
            for frame, n in counts.most_common(args.top):
                print(f"{100 * n / total:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
