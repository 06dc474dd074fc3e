"""attncc benchmarks: `python -m benchmarks.run` runs every landed workload against its peers
(SDPA backends, FlexAttention) in one process, checks every output against attncc's reference
before timing it, and writes JSON + Markdown + PNG under `benchmarks/results/`.
`--smoke` runs the same harness on a CPU with tiny shapes and times nothing (CI).

Files: workloads.py (the table), mods.py (FlexAttention-style mask/score mods), flops.py
(allowed pairs, tile efficiency), dense_mask.py (SDPA's dense masks), peers.py (attncc and its
peers), harness.py (check, then time), environment.py, schema.py, report.py, run.py.
"""
