"""What every ``embcam`` command's argument handling shares: a parser whose errors are one
line, the exit status of an expected error, that error as one line, and a command's config
built from its options by field name. A leaf: the
commands import it, and it imports nothing of theirs."""
from __future__ import annotations

import argparse
from dataclasses import fields

from .data.locations import redact

BAD_INPUT = 2  # exit status of every expected error (bad arguments, specs, files), as argparse's


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line: ``<prog>: error: <message> (see <prog> --help)``."""

    def error(self, message: str):
        self.exit(BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def error_line(exc: BaseException) -> str:
    """An expected error as one line: an OSError names its file, newlines are folded, the
    secrets of any uri in it redacted."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, FileNotFoundError) and len(exc.args) == 1 and not str(exc).split()[1:]:
        text = f"{exc}: no such file or directory"  # pyarrow's: only the path
    else:
        text = str(exc) or type(exc).__name__
    return redact(" ".join(text.split()))


def config_from(config_class, args: argparse.Namespace, **computed):
    """``config_class`` (a dataclass) from parsed options, each field from the option of its
    name; ``computed`` gives the fields whose value is not one option's as it is. A field
    with neither is an error here, not a silent default."""
    values = {}
    for field in fields(config_class):
        if field.name in computed:
            values[field.name] = computed[field.name]
        elif hasattr(args, field.name):
            values[field.name] = getattr(args, field.name)
        else:
            raise TypeError(f"{config_class.__name__}.{field.name} has no option of its name")
    return config_class(**values)
