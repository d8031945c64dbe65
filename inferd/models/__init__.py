"""Models for the torch runtime: the interface a model implements, the built-in ``tiny`` model,
and HuggingFace checkpoints.

The torch runtime (:mod:`inferd.runtimes.torch_runtime`) batches any model
that implements :class:`inferd.models.interface.CausalLM`. A deployment names
its model as ``model = "tiny"`` (the built-in, :mod:`inferd.models.tiny`), as
a factory ``model = "package.module:callable"`` that builds one, or as
``checkpoint = "DIR"`` (a HuggingFace checkpoint, :mod:`inferd.models.hf`).
"""
