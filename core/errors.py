"""The one error type the CLI turns into a single line on stderr."""


class GptjError(Exception):
    """A problem with the user's input (files, options, artifact) that needs no traceback to explain."""
