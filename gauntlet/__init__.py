"""Gauntlet: an LLM CI/CD pipeline. A committed YAML config in; a trained, evaluated, gated and promoted model out.

The library: everything that is not Prefect. The Prefect layer lives beside it in the repository as
``tasks/`` (one module per stage) and ``flows/`` (composition), installed as ``gauntlet.tasks`` and
``gauntlet.flows``. See docs/architecture.md.
"""

__version__ = "0.2.0"
