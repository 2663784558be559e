"""``lorakit bench``: speed and memory of lorakit beside PEFT, each configuration in its own process.

* ``cases``: the configurations (train steps, inference, mixed-adapter batches, merge, adapter switching,
  scaling) and how to run one in a subprocess.
* ``worker``: ``python -m lorakit.bench.runner CASE_JSON`` runs one configuration and prints one JSON line.
* ``run``: ``bench_main`` runs a suite, then writes a markdown table, a JSON file with ratios, and a plot.
"""
