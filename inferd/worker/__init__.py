"""The worker: one device context and one model runner (``engine``), and its process loop (``process``)."""
