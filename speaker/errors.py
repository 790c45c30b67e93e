"""Exceptions that components raise for failures a user can act on.

The engine logs a ComponentError as its message alone. Any other exception is
a bug, so the engine logs it with its traceback.
"""


class ComponentError(RuntimeError):
    """An expected failure with a message that says what to do, such as a missing permission."""
