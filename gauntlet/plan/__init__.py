"""Training memory planning: the model shape from config.json (``shape``) and the estimate per launch profile (``memory``)."""
