"""The one error type of checkpoint reading and writing."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or written as asked; the one-line message names
  the culprit (tensor, parameter, file)."""
