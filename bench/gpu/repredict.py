"""Predict every layout of finished runs again with the current cost model (no GPU needed).

    python bench/gpu/repredict.py CLUSTER.json RUN [RUN ...] --out merged.json

Each RUN is a ``results.json`` or a run's output folder (``report.py`` reads folders whose
``results.json`` did not come back from their JSON lines). The runs are merged as
``report.py`` merges them, every layout that ran is priced again on ``CLUSTER.json``
(``predict.py``; partc's own plan pinned to what it ran), the prediction recorded at run
time is kept as ``prediction_at_run``, and the result is written for ``report.py``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict import predict
from report import is_partc_run, load_run, merge

import partc


def repredict(summary: dict, cluster_path: str, workers: int = 2) -> dict:
    cluster = partc.Cluster.from_json(cluster_path)
    summary["repredicted_on"] = cluster_path
    jobs = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        for name, entry in summary["models"].items():
            for layout, result in entry["layouts"].items():
                if result.get("status") == "ok":
                    detail = result.get("detail") if is_partc_run(layout) else None
                    jobs[(name, layout)] = pool.submit(predict, name, entry["batch"], entry["seq"], cluster, layout, detail)
        for (name, layout), job in jobs.items():
            result = summary["models"][name]["layouts"][layout]
            result.setdefault("prediction_at_run", result.get("prediction"))
            result["prediction"] = job.result()
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cluster")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    summaries = [load_run(Path(r)) for r in args.runs]
    merged = summaries[0] if len(summaries) == 1 else merge(summaries)
    Path(args.out).write_text(json.dumps(repredict(merged, args.cluster, args.workers), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
