"""Run the gloo parity matrix (tests/test_parity.py's cases) on this machine: on GPUs the
parity worker uses NCCL and CUDA, so this is the same check on real accelerators.

    python bench/gpu/parity_matrix.py 2          # 2 ranks (2 GPUs, or 2 CPU processes)

On torch < 2.13 the cases partc refuses there (zero-bubble, and pipelines with the loss
in the graph, whose targets must cross every cut) are left out. Prints PASS/FAIL per case.
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from parity import case_key, refused_here, run_parity
from test_parity import CASES


def main() -> int:
    world = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    cases = [c for c in CASES[world] if refused_here(c) is None]  # partc refuses the others on torch < 2.13
    start = time.time()
    verdicts = run_parity(cases, world)
    failed = 0
    for case in cases:
        ranks = verdicts.get(case_key(case), [])
        failures = {r["rank"]: r["failures"][:2] for r in ranks if r["failures"]}
        ok = len(ranks) == world and not failures
        failed += not ok
        print("PASS" if ok else "FAIL", json.dumps(case), failures or "", "" if len(ranks) == world else f"only {len(ranks)} ranks reported")
    print(f"{len(cases) - failed}/{len(cases)} passed in {time.time() - start:.1f} s (torch {torch.__version__}, "
          f"{'NCCL on ' + str(torch.cuda.device_count()) + ' GPUs' if torch.cuda.is_available() else 'gloo on CPU'})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
