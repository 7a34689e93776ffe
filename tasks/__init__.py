"""The Prefect layer's stages, one module per stage, each declared with ``@stage`` (``tasks/_stage.py``):
its cache key, receipt and MLflow stage run travel with it. Installed as ``gauntlet.tasks``."""
