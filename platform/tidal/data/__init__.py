"""Sources -> documents -> tokenize -> pack -> shards; and the global-cursor loader."""


class DataError(ValueError):
    """The input data cannot make a data set (nothing usable left, too little text): the
    message names the files and the reasons their records were set aside."""


class MissingInput(DataError, FileNotFoundError):
    """A configured data source matches no files (anymore)."""
