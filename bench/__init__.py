"""The benchmarks: they drive the whole product from above, so they sit above every floor.

`bench` may import `bot`, `learning` and `knowledge`; none of those imports `bench`
(tests/test_layering.py). `apprentice bench ...` (bot/cli.py) reaches these modules lazily, inside
its command functions, so `apprentice --help` stays fast.
"""
