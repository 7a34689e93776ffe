"""The demo: its synthetic instruction data (``data``, a DVC stage program) and its tiny base model (``model``)."""
