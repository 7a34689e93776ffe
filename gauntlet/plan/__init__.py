"""Training memory planning: the model shape from config.json (``shape``), the estimate per launch profile (``memory``) and ``gauntlet plan``'s report (``report``)."""
