"""Host runtime: the launch cache (``launch``), tile tuning and device facts (``tuning``)."""
