"""The MLflow Model Registry as Gauntlet uses it: the lock (``lock``), versions, champion and history (``store``), registering candidates (``candidates``) and moving the champion (``promotion``)."""
