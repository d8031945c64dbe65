"""The broker: admission, queues, dispatch and streaming (``core``), and its process loop (``process``)."""
