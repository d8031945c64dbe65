"""Models for the torch runtime: the interface a model implements, and the built-in ``tiny`` model.

The torch runtime (:mod:`inferd.runtimes.torch_runtime`) batches any model
that implements :class:`inferd.models.interface.CausalLM`. A deployment names
its model as ``model = "tiny"`` (the built-in, :mod:`inferd.models.tiny`) or
as a factory ``model = "package.module:callable"`` that builds one.
"""
