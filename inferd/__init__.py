"""inferd: an inference-serving daemon for GPU nodes.

Importing the package is cheap on purpose: the supervisor, the broker and the
client import it, and they must start fast and never pull in torch.
"""

__version__ = "0.2.0"
