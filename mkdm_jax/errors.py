"""One exception type for problems the user can fix (bad files, flags, checkpoints).

Command-line entry points catch `UserError` and print its message without a traceback.
"""


class UserError(Exception):
  """A clear, actionable error caused by user input (file, line, flag or checkpoint)."""
