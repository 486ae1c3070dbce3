"""The one base class of every exception paddlemix raises on purpose.

``except paddlemix.PaddleMIXError`` catches any of them. Each subclass also derives from the builtin
that callers wrote ``except`` clauses for before the base existed (``ValueError`` for bad input,
``KeyError`` for an unknown name, ``OSError`` for a file that cannot be written, ``RuntimeError`` for
an environment that cannot do the job), so those clauses keep working.
"""


class PaddleMIXError(Exception):
    """Base of the exceptions defined in paddlemix."""
