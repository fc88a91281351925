"""The errors dualkd raises on purpose. The CLI prints them as one clear message, without a traceback."""


class DualKDError(Exception):
    """Base class: a problem the user can fix (config, data, paths), as opposed to a bug."""


class ConfigError(DualKDError):
    """An invalid run config: unknown key, wrong type, impossible combination."""


class DataError(DualKDError):
    """Bad training/eval data. The message names the file, line and field."""


class ModelError(DualKDError):
    """A model or tokenizer that cannot be loaded or does not fit the objective."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries such as transformers write pages): what one clear
    message quotes of it."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
