"""The converter's one error type: a message naming the file and what is wrong with it."""


class ConversionError(Exception):
    """A config or checkpoint that cannot be converted (the message says which and why)."""
