"""What the torchrun workers share: run each case, report one JSON line per rank and case.

A worker calls :func:`serve` with its ``run_case(case) -> list[str]`` (the failures);
tests/parity.py's :func:`run_parity` launches it and collects the reports.
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Callable

import torch
import torch.distributed as dist


def serve(run_case: Callable[[dict], list[str]], *, cases_help: str, backend: str | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True, help=cases_help)
    parser.add_argument("--report-dir", required=True, help="each rank appends one JSON line per case to RANK.jsonl here")
    args = parser.parse_args()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    with open(f"{args.report_dir}/{dist.get_rank()}.jsonl", "a") as report:

        def verdict(case: dict, failures: list[str]) -> None:
            report.write(json.dumps({"rank": dist.get_rank(), "case": case, "failures": failures[:20]}) + "\n")
            report.flush()

        any_failed = False
        for case in json.loads(args.cases):
            try:
                failures = run_case(case)
            except Exception as e:
                # The other ranks may be waiting in a collective: report, then exit so that
                # torchrun stops them all (the remaining cases report nothing).
                verdict(case, [f"{type(e).__name__}: {e}"])
                raise
            any_failed |= bool(failures)
            verdict(case, failures)
            dist.barrier()
    dist.destroy_process_group()
    return 1 if any_failed else 0
