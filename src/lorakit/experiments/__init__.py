"""Experiments built on the trainer and the methods: ``lorakit compare`` (methods x seeds on a task) and
``lorakit latency`` (forward latency of each method against the base model). They sit above ``training``
and ``methods``; nothing below imports them."""
