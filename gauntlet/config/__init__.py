"""Config is data: pydantic models validate a YAML file once, at the edge; stages receive typed objects.

One module per section of a run config (``model``, ``data``, ``train``, ``quantize``, ``eval``, ``gate`` and
``registry``, ``notify`` and ``tracking``), the run and leaderboard configs that hold them, and
``load`` (YAML, ``--set`` overrides, every problem with its YAML path and a hint). No Prefect, MLflow or
torch import happens here, so validation is instant. This package file imports nothing, so that a stage's
code version follows only the sections it really uses.
"""
