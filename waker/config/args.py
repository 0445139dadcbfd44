"""Reading an entry's engine args as the engine will: whether a flag is given, and its value.

Here in config (not in engines/flags.py) because config-level checks read args too (the fit check reads the
context and memory flags; engine_memory whether SGLang's pool is capped), and config sits below the engines.
"""

from collections.abc import Iterable, Sequence


def has_flag(args: Sequence[str], names: Iterable[str]) -> bool:
    """True when any spelling in `names` appears in `args`, as `--flag value` or `--flag=value` (exact spellings
    only: argparse's prefix abbreviations are not recognised)."""
    spellings = tuple(names)
    return any(arg == name or arg.startswith(name + "=") for arg in args for name in spellings)


def flag_value(args: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the last of `names` in `args` (``--flag value`` or ``--flag=value``), the one argparse keeps;
    None when absent."""
    value: str | None = None
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(name + "="):
                value = arg[len(name) + 1:]
    return value


__all__ = ["flag_value", "has_flag"]
