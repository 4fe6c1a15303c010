"""The error the Python API raises for bad input, and the text check every entry point uses.

Every exception class m3mlx defines (this one, ConfigError, LoadError, ConvertError, ...) means
"the input was wrong, and the message says what to do"; the command line prints such errors as
one line. Anything else escaping m3mlx is a bug.
"""


class InputError(ValueError):
    """A bad argument or file: what was wrong and what to do about it."""


def check_text(text: str, what: str) -> str:
    """`text` unless it holds characters that are not Unicode scalar values: the lone
    surrogates Python uses for bytes that were not UTF-8 (argv, files read with
    surrogateescape). They cannot be tokenized or saved, so they are refused here, by name."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not valid UTF-8 text (undecodable byte at character "
                         f"{e.start}); convert it to UTF-8 first, e.g. with iconv") from None
    return text
