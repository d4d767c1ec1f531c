"""A/B: sync predict throughput of a baseline commit against the working tree, in one run.

    .venv/bin/python benchmarks/ab_predict.py [--baseline HEAD] [--rounds 3] [--duration 8] [--concurrency 64]

The baseline commit is checked out into a temporary git worktree; each round runs
``bench_predict.py --servers bastion`` (this tree's copy: the same harness for both) once
against each side, alternating which goes first (A B, B A, ...), with ``PYTHONPATH`` selecting
whose ``bastion`` runs. It prints every run, the median req/s and p99 of each side, and the
ratio of the medians (candidate / baseline). Runs of one side vary with the shared machine's
load: read the ratio, and run again before trusting one near a threshold. Arguments it does not
know go to ``bench_predict.py`` (and from there to ``bastion up``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run_side(tree: Path, args: argparse.Namespace, extra: list[str], out: Path) -> dict[str, float]:
    argv = [
        sys.executable,
        str(HERE / "bench_predict.py"),
        "--servers",
        "bastion",
        "--concurrency",
        str(args.concurrency),
        "--duration",
        str(args.duration),
        "--json",
        str(out),
        # fixed counts: both sides run the same processes whatever their bastion up defaults are
        "--gateways",
        "2",
        "--workers",
        "1",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    top = json.loads(out.read_text())["at_top_concurrency"]
    (found,) = [v for k, v in top.items() if k.startswith("bastion")]  # the one configuration run
    return {"rps": float(found["bastion_rps"]), "p99_ms": float(found["bastion_p99_ms"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="HEAD", help="git commit to compare against (default HEAD)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side (default 3)")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per run (default 8)")
    parser.add_argument("--concurrency", type=int, default=64, help="connections (default 64)")
    args, extra = parser.parse_known_args()
    work = Path(tempfile.mkdtemp(prefix="bastion-ab-"))
    baseline = work / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.baseline], check=True)
    commit = subprocess.run(
        ["git", "-C", str(baseline), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    sides = {"baseline": baseline, "candidate": ROOT}
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "candidate": []}
    try:
        for i in range(args.rounds):
            order = ["baseline", "candidate"] if i % 2 == 0 else ["candidate", "baseline"]
            for side in order:
                figures = run_side(sides[side], args, extra, work / f"{side}-{i}.json")
                runs[side].append(figures)
                print(
                    f"round {i + 1} {side:<9} {figures['rps']:>8.0f} req/s  p99 {figures['p99_ms']:.1f} ms", flush=True
                )
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    medians = {side: statistics.median(r["rps"] for r in found) for side, found in runs.items()}
    p99 = {side: statistics.median(r["p99_ms"] for r in found) for side, found in runs.items()}
    print(f"baseline {commit}: median {medians['baseline']:.0f} req/s, p99 {p99['baseline']:.1f} ms")
    print(f"candidate (working tree): median {medians['candidate']:.0f} req/s, p99 {p99['candidate']:.1f} ms")
    ratio = medians["candidate"] / medians["baseline"]
    print(f"ratio candidate / baseline at concurrency {args.concurrency}: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
