"""One error type the CLI turns into a clean message: bad input must never end in a traceback."""


class PocketLMError(Exception):
    """A user-facing error: wrong path, malformed file, unknown model, mismatched tokenizers..."""


class ModelLoadError(PocketLMError):
    """A model or tokenizer could not be loaded from the given spec."""


class DataError(PocketLMError):
    """A corpus or evaluation file is missing, unreadable or malformed."""
