"""Another tenant's p99 while attackers are tarpitted and banned (issue 4, Done-when 4).

Runs a stack (2 gateways, 1 worker, real thresholds), then ROUNDS rounds: an attacker process
sends 50 malformed requests from a new key and address to gateway 0 (tarpitted, then banned)
while tenant "globex" calls predict on gateway 1; quiet blocks between rounds are the baseline.
Prints both p99s and their ratio. Usage: .venv/bin/python benchmarks/bench_abuse.py [ROUNDS]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.security.test_abuse import GUARDED, _p99, run_attack_rounds
from tests.support import Stack


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory() as root:
        stack = Stack(Path(root), **GUARDED)
        try:
            stack.start()
            results, baseline, during = run_attack_rounds(stack, rounds)
        finally:
            stack.stop()
    banned = sum(1 for r in results if [s for s, _ in r][30:] and {s for s, _ in r[30:]} == {429})
    base, hit = _p99(baseline), _p99(during)
    print(f"rounds: {rounds}, attackers banned: {banned}/{rounds}")
    print(f"other tenant p99: baseline {base * 1000:.2f} ms over {len(baseline)} calls")
    print(f"other tenant p99: during attacks {hit * 1000:.2f} ms over {len(during)} calls")
    print(f"ratio during/baseline: {hit / base:.3f} (target <= 1.20)")


if __name__ == "__main__":
    main()
