"""Long fuzz campaign over ``wild_nets`` (not run by pytest: its name has no ``test_`` prefix).

    python tests/fuzz_campaign.py --models 10000 [--start 0] [--max-steps 7]

Each model is built from ``random.Random(seed)`` and checked with ``check_wild``; a failure
prints its seed, so ``check_wild(wild_net(random.Random(seed)), random.Random(seed))``
reproduces it. Prints a Markdown summary: models, failures, how the dataflow was read, norms
folded and skipped by reason, time.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wild_nets import check_wild, wild_net


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=7)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    methods: Counter = Counter()
    outcomes: Counter = Counter()
    failures: list[int] = []
    start = time.perf_counter()
    for seed in range(args.start, args.start + args.models):
        try:
            result = check_wild(wild_net(random.Random(seed), args.max_steps), random.Random(seed))
        except Exception:
            failures.append(seed)
            print(f"FAILED seed {seed}:\n{traceback.format_exc()}", flush=True)
            continue
        methods[result.plan.method] += 1
        outcomes["folded"] += len(result.folded)
        outcomes.update(f"skipped: {s.reason.value}" for s in result.skipped)
        if (seed - args.start + 1) % 500 == 0:
            print(
                f"... {seed - args.start + 1} models, {len(failures)} failures, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
    elapsed = time.perf_counter() - start
    print(
        f"\n| models | failures | time | methods |\n|---|---|---|---|\n"
        f"| {args.models} | {len(failures)} | {elapsed:.0f} s | "
        f"{', '.join(f'{k} {v}' for k, v in methods.most_common())} |\n"
    )
    print("| outcome | norms |\n|---|---|")
    for key, value in outcomes.most_common():
        print(f"| {key} | {value} |")
    if failures:
        print(f"\nfailing seeds: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
