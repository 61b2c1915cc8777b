"""The one base class of the errors a user can fix (bad input, not a bug).

Every error the library raises at a boundary (loading a checkpoint, parsing a config, reading a
corpus, a trace or a question file, a failed download, a prompt too long) subclasses `UserError`,
so a launch script catches one class (`cli.guarded`) and prints one line; any other exception is
a bug and keeps its traceback. Each subclass also keeps its builtin base (`ValueError`,
`RuntimeError`), so existing `except ValueError` callers still see it. This module imports
nothing, so the lowest package (`model/`) can use it.
"""


class UserError(Exception):
    """Input the user can fix; the message says what is wrong and, where it can, what to do."""
