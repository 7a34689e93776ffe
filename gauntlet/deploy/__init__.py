"""Continuous deployment: serve the champion, canary the next one behind nginx, watch both, keep or roll back.

``servers`` (transformers serve / vLLM processes), ``router`` (nginx: weighted upstreams, graceful reloads, the
access log the watch reads), ``load`` (a bounded load generator: tests and benchmarks), ``watch`` (per-step
numbers of stable and canary, the quality probe, Prometheus text), ``drift`` (PSI of served prompts against the
training data), ``decide`` (the pure rules), ``rollout`` (what serves now: the state file, start, shift, finish),
``kserve`` (the same rollout as a KServe InferenceService). No Prefect here: ``tasks/deploy.py`` and
``flows/deploy.py`` run these as stages of the ``deploy`` flow.
"""
