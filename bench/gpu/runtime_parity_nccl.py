"""The runtime parity cases of the CPU test suite, on GPUs with NCCL.

    python3 bench/gpu/runtime_parity_nccl.py [--gpus 2|4|8]

Runs tests/test_parity.py's and tests/test_loss_mean_parity.py's cases for that many processes (one per GPU; with 8 the
dp x tp x pp cases) through the same worker, on CUDA devices and NCCL instead of CPUs and
gloo, plus the NCCL-only bf16 gradient compression hook: loss, gradients and parameters
after 3 AdamW steps against the single-device model, with the CPU tests' tolerances.
On torch < 2.13 the cases partc refuses there (zero-bubble, a pipeline with the loss
traced in) are left out and counted.
Prints PASS/FAIL per case and a count. Needs as many GPUs as --gpus.
"""

import argparse
import json
import sys

sys.path[:0] = ["tests", "tests/distributed"]
from parity import case_key, refused_here, run_parity  # noqa: E402
from test_loss_mean_parity import CASES as LOSS_MEAN_CASES  # noqa: E402
from test_parity import CASES  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, choices=sorted(CASES))
    args = parser.parse_args()
    wanted = CASES[args.gpus] + LOSS_MEAN_CASES.get(args.gpus, [])
    cases = [c for c in wanted if refused_here(c) is None]
    skipped = len(wanted) - len(cases)
    if args.gpus == 2:
        cases.append({"model": "gpt", "mesh": {"dp": 2}, "gradient_compression": "bf16"})  # needs NCCL
    verdicts = run_parity(cases, args.gpus, timeout=580)
    passed = 0
    for case in cases:
        ranks = verdicts.get(case_key(case), [])
        failures = [r["failures"][:2] for r in ranks if r["failures"]]
        ok = len(ranks) == args.gpus and not failures
        passed += ok
        print("PASS" if ok else "FAIL", json.dumps(case), failures if failures else ("" if ranks else "no verdict"))
    print(f"{passed}/{len(cases)} NCCL cases pass on {args.gpus} GPUs" + (f" ({skipped} cases partc refuses on this torch left out)" if skipped else ""))
    return 0 if passed == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
