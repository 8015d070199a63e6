"""Honesty check for issue 7: does the optimized trainer's loss curve match the plain path's?

    python bench/loss_curves.py PLAIN.json OPTIMIZED.json OPTIMIZED_OTHER_SEED.json
Reads three bench/train_throughput.py results logged at the same steps. The run-to-run noise is the gap between
the two seeds of the optimized trainer; the check passes when plain vs optimized (same seed) is within it.
Prints a table and writes bench/results/loss_curves.json.
"""

import json
import sys
from pathlib import Path


def main() -> None:
    plain, opt, other = (json.loads(Path(p).read_text()) for p in sys.argv[1:4])
    n = min(len(plain["losses"]), len(opt["losses"]), len(other["losses"]))
    every = opt["log_every"]
    steps = [1] + [every * i for i in range(1, n)]
    gap = [abs(a - b) for a, b in zip(plain["losses"][:n], opt["losses"][:n])]
    noise = [abs(a - b) for a, b in zip(other["losses"][:n], opt["losses"][:n])]
    tail = max(1, n // 3)  # the last third of the run, once the curves have left the initial drop
    row = {"steps": steps[n - 1], "plain_final": plain["losses"][n - 1], "optimized_final": opt["losses"][n - 1],
           "other_seed_final": other["losses"][n - 1], "mean_gap_last_third": sum(gap[-tail:]) / tail,
           "mean_seed_noise_last_third": sum(noise[-tail:]) / tail}
    row["within_noise"] = row["mean_gap_last_third"] <= row["mean_seed_noise_last_third"]
    print("| step | plain (compile off, pre-optimization code) | optimized | optimized, other seed |")
    print("|---|---|---|---|")
    for i in range(0, n - 1, max(1, n // 10)):
        print(f"| {steps[i]} | {plain['losses'][i]:.4f} | {opt['losses'][i]:.4f} | {other['losses'][i]:.4f} |")
    print(f"| {steps[n - 1]} | {row['plain_final']:.4f} | {row['optimized_final']:.4f} | {row['other_seed_final']:.4f} |")
    print(f"mean |plain - optimized| over the last third: {row['mean_gap_last_third']:.4f}; "
          f"seed-to-seed: {row['mean_seed_noise_last_third']:.4f} -> {'within' if row['within_noise'] else 'OUTSIDE'} noise")
    (Path(__file__).resolve().parent / "results" / "loss_curves.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
