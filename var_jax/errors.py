"""The errors var-jax raises for files it cannot use.

One `CheckpointError` for every kind of weights file (a torch `.pth`, a native
orbax checkpoint directory): a `ValueError`, so callers that catch bad input catch
it too, with a one-line message that names the file and, where known, the key.
"""


class CheckpointError(ValueError):
  """A weights file or checkpoint that cannot be read: missing parts, corrupt,
  truncated, unsafe, unsupported or not matching its config."""
