"""fastbyol: fast, faithful BYOL pretraining."""

__version__ = "0.1.0"


class InputError(Exception):
    """Bad user input (a flag, a path, a data file). Command-line entry points print it as one line
    naming the culprit and exit with status 2, instead of a traceback."""
