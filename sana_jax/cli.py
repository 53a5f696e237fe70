"""What the command lines share: absl flags parsed with user mistakes reported as one line (exit status 2).

Each command defines its flags on its own `flags.FlagValues` (so one process can import several commands and
parse a command line more than once, as the tests do) and parses them with `parse`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

from absl import flags

HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull")


def fail(message: str) -> NoReturn:
    """Ends the command with a one-line error on stderr and exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse(values: flags.FlagValues, argv: Sequence[str] | None, doc: str, *, positional: bool = False) -> list[str]:
    """Parses `argv` (the arguments after the program name; None: `sys.argv[1:]`) into `values`.

    Returns the positional arguments, which only a command with `positional` takes. --help prints `doc` and the
    flags to stdout and exits 0; an unknown flag, a bad value, a missing required flag or an unexpected
    positional argument ends the command through `fail`.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if any(arg in HELP_FLAGS for arg in args[:args.index("--") if "--" in args else len(args)]):
        print(f"{doc.strip()}\n\nflags:\n{values.get_help(include_special_flags=False).strip()}")
        sys.exit(0)
    try:
        rest = values([sys.argv[0], *args])[1:]
    except flags.Error as error:
        fail(str(error))
    if rest and not positional:
        fail(f"unexpected arguments {rest}: every setting is a --flag")
    return rest
