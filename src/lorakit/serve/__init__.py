"""`lorakit serve`: one base model, many adapters, an OpenAI-compatible server with continuous batching.

``engine`` schedules and batches, ``app`` speaks HTTP, ``server`` is the command and a background runner.
Needs the ``serve`` extra (fastapi, uvicorn, prometheus_client).
"""
