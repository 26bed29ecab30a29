import json, sys
sys.path[:0] = ["tests", "tests/distributed"]
from parity import run_parity
cases = [
    {"model": "gpt-tied", "mesh": {"dp": 2}, "microbatches": 2, "zero_stage": 0},
    {"model": "gpt-tied", "mesh": {"dp": 2}, "microbatches": 2, "zero_stage": 3},
    {"model": "llama", "mesh": {"dp": 2}, "data_parallel": "fsdp"},
    {"model": "gpt", "mesh": {"dp": 2}, "gradient_compression": "bf16"},
    {"model": "llama", "mesh": {"pp": 2}, "schedule": "1f1b", "microbatches": 2, "recompute": True, "zero_stage": 0},
    {"model": "gpt", "mesh": {"pp": 2}, "other_ranks_model": "llama"},
]
v = run_parity(cases, 2, timeout=300)
ok = 0
for c in cases:
    ranks = v.get(json.dumps(c, sort_keys=True), [])
    fails = [r["failures"][:2] for r in ranks if r["failures"]]
    ok += (len(ranks) == 2 and not fails)
    print("PASS" if len(ranks) == 2 and not fails else "FAIL", json.dumps(c), fails)
print(f"{ok}/{len(cases)} NCCL cases pass")
