"""The hostile-input fuzz suite's generators (issue 15): no binary corpus is committed, everything is built here.

- `corpus`: >= 1,000 deterministic hostile (and a few good) encoded images, each with its expected outcome;
- `protocol`: ~150 malformed requests for imgcls.v1, KServe v2 and TF Serving, with the status codes allowed;
- `wire`: a real `imgcls serve` subprocess and one way to send an image over each protocol.

Used by tests/test_fuzz_server.py and benchmarks/bench_hostile.py; `python -m hostile.corpus --list` (from
tests/) prints the cases.
"""
