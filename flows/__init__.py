"""The Prefect flows: composition of the stages in ``tasks/``, one page each. Installed as ``gauntlet.flows``."""
