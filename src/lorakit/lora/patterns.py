"""Regular expressions from users and from files, matched in linear time.

Target patterns (``--targets``) and ``rank_pattern`` / ``alpha_pattern`` keys (read from untrusted
``adapter_config.json`` files, which the weights' checksum does not cover) are compiled with RE2, whose
automaton matches in time linear in the module name whatever the pattern: ``(.+)+X`` cannot backtrack
exponentially, because nothing backtracks. A length cap and RE2's memory cap bound compilation too.
Features only a backtracking engine has (back-references, look-around) are refused with a clear error
rather than silently handed to Python's ``re``.
"""

from __future__ import annotations

import functools
from typing import Any

import re2

from lorakit.errors import LorakitError

# Longer than any real pattern (a full list of module names joined by | stays far below this) and small
# enough that compiling is instant; RE2's own memory cap bounds the compiled program.
MAX_PATTERN_LENGTH = 4096
_MAX_MEM = 8 << 20


class PatternError(LorakitError, ValueError):
    """A pattern is not a valid (RE2) regular expression or is too long; ``str`` names which and why."""


def _options() -> Any:
    options = re2.Options()
    options.max_mem = _MAX_MEM
    options.log_errors = False  # RE2 would otherwise print its own copy of the error to stderr
    return options


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> Any:
    try:
        return re2.compile(pattern, _options())
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise PatternError(
            f"pattern {pattern!r} is not a valid regular expression: {reason} (lorakit matches patterns "
            "with RE2, in linear time: back-references and look-arounds are not supported)"
        ) from None


def compile_pattern(pattern: str) -> Any:
    """The compiled RE2 form of ``pattern`` (compiled once: every module name reuses it).

    Args:
        pattern: a regular expression in the common Python/RE2 syntax.

    Raises:
        PatternError: the pattern is not a string, too long, or not valid RE2 syntax.
    """
    if not isinstance(pattern, str):
        raise PatternError(f"pattern {pattern!r} is not a string")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"pattern of {len(pattern)} characters is longer than the {MAX_PATTERN_LENGTH} allowed")
    return _compiled(pattern)


def fullmatch(pattern: str, name: str) -> bool:
    """Whether ``pattern`` matches the whole of ``name``, in time linear in ``len(name)``.

    Args:
        pattern: the regular expression.
        name: the dotted module name.
    """
    return compile_pattern(pattern).fullmatch(name) is not None


def suffix_match(pattern: str, name: str) -> bool:
    """PEFT's rule for rank/alpha patterns: ``pattern`` matches a dotted suffix of ``name``
    (``re.match(rf"(.*\\.)?({pattern})$", name)`` in PEFT), here in linear time.

    Args:
        pattern: the rank_pattern / alpha_pattern key.
        name: the dotted module name.
    """
    compile_pattern(pattern)  # the user's pattern alone, so an error quotes it as written
    return _compiled(rf"(?:.*\.)?(?:{pattern})").fullmatch(name) is not None
