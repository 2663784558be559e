"""``lorakit bench``: speed and memory of lorakit beside PEFT, each configuration in its own process.

The entry point is ``lorakit bench`` (``lorakit.cli.bench.bench_main``); the modules, in the order a run uses them:

* ``suites``: the configurations (``Case``: train steps, inference, mixed-adapter batches, merge, adapter
  switching, scaling, quality) grouped into suites, and how to run one in a subprocess.
* ``child``: ``python -m lorakit.bench.child CASE_JSON``, the subprocess: runs one case, prints one JSON line.
* ``measure``: the case kinds (one function each) and the memory they record; ``build`` makes their models,
  batches, adapters and train steps; ``tokens``: the useful-tokens case; ``timing``: the timers.
* ``session``: runs the selected cases and writes ``bench.json``, ``bench.md`` and the plot, with
  ``verdicts`` (ratios and targets), ``report`` (the markdown) and ``plot`` (the scaling figure).
* ``serve_load``: ``lorakit bench serve``, a load test of ``lorakit serve``, with ``llama_cpp`` (llama.cpp's
  ``llama-server`` as a side on the same adapters and prompts) and ``load`` (what both sides share: the
  server process, closed-loop clients, summaries and medians).
"""
