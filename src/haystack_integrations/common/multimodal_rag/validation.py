"""Small runtime helpers shared by components."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """
    Yield consecutive slices of at most `size` items.

    :param items: The sequence.
    :param size: Batch size, at least 1.
    :returns: An iterator of slices.
    """
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_positive_int(name: str, value: int) -> None:
    """
    Validate a parameter that must be a positive integer.

    :param name: Parameter name for the message.
    :param value: The value.
    :raises ValueError: When it is not an integer >= 1.
    """
    check_int(name, value, minimum=1)


def check_int(name: str, value: object, *, minimum: int = 0, maximum: int | None = None) -> int:
    """
    Validate an integer parameter in `[minimum, maximum]` (booleans are not integers here).

    :param name: Parameter name for the message.
    :param value: The value.
    :param minimum: Smallest allowed value.
    :param maximum: Largest allowed value, or `None` for no bound.
    :returns: The value.
    :raises ValueError: When it is not an integer in range.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        if maximum is not None:
            kind = f"an integer in [{minimum}, {maximum}]"
        elif minimum in (0, 1):
            kind = "a non-negative integer" if minimum == 0 else "a positive integer"
        else:
            kind = f"an integer >= {minimum}"
        msg = f"{name} must be {kind}, got {value!r}"
        raise ValueError(msg)
    return value


def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    finite: bool = True,
) -> float:
    """
    Validate a real-number parameter in `[minimum, maximum]` and `> above` (booleans are not numbers here).

    NaN is always refused.

    :param name: Parameter name for the message.
    :param value: The value.
    :param minimum: Smallest allowed value, or `None`.
    :param maximum: Largest allowed value, or `None`.
    :param above: The value must be strictly greater than this, or `None` (`above=0.0`: "a positive number").
    :param finite: Refuse infinities too.
    :returns: The value as a float.
    :raises ValueError: When it is not a (finite) number in range.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or (finite and not math.isfinite(value))
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
        or (above is not None and not value > above)
    ):
        msg = f"{name} must be {_number_kind(minimum, maximum, above, finite)}, got {value!r}"
        raise ValueError(msg)
    return float(value)


def _number_kind(minimum: float | None, maximum: float | None, above: float | None, finite: bool) -> str:
    """Say in words which numbers `check_number` accepts ("a number in [0, 1]", "a positive number", ...)."""
    if minimum is None and maximum is None and above == 0:
        return "a positive number"
    bounds = []
    if minimum is not None and maximum is not None:
        bounds.append(f"in [{minimum:g}, {maximum:g}]")
    elif minimum is not None:
        bounds.append(f">= {minimum:g}")
    elif maximum is not None:
        bounds.append(f"<= {maximum:g}")
    if above is not None:
        bounds.append(f"> {above:g}")
    # A closed interval already says the number is finite.
    prefix = "a finite number" if finite and (minimum is None or maximum is None) else "a number"
    return " ".join([prefix, *bounds])


def check_query(component_name: str, text: object) -> str:
    """
    Validate a query string.

    :param component_name: Component name, for messages.
    :param text: The query.
    :returns: The query.
    :raises TypeError: When it is not a string.
    :raises ValueError: When it is empty or only whitespace.
    """
    if not isinstance(text, str):
        msg = f"{component_name} expects the query as a string, got {type(text).__name__}"
        raise TypeError(msg)
    if not text.strip():
        msg = f"{component_name} received an empty query (or only whitespace); pass the question to answer or rank for"
        raise ValueError(msg)
    return text


def check_image_size(image_size: Sequence[int] | None) -> tuple[int, int] | None:
    """
    Validate an `image_size` parameter: a `(width, height)` box of positive integers, or `None`.

    :param image_size: The value (a list from YAML is accepted).
    :returns: The box as a tuple, or `None`.
    :raises ValueError: When it is not two positive integers.
    """
    if image_size is None:
        return None
    if isinstance(image_size, (str, bytes)) or not isinstance(image_size, Sequence) or len(image_size) != 2:
        msg = f"image_size must be (width, height), got {image_size!r}"
        raise ValueError(msg)
    for side in image_size:
        check_positive_int("image_size", side)
    return int(image_size[0]), int(image_size[1])


def compile_template(template: str | None, default: str, *, parameter: str) -> Any:
    """
    Compile a user-provided Jinja2 template in a sandbox (the default when `template` is `None`).

    :param template: The template text, or `None`.
    :param default: The default template text.
    :param parameter: The parameter name, for the error message.
    :returns: A compiled `jinja2.Template`.
    :raises ValueError: On a syntax error.
    """
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import SandboxedEnvironment

    try:
        return SandboxedEnvironment().from_string(template if template is not None else default)
    except TemplateSyntaxError as e:
        msg = f"{parameter} is not valid Jinja2: {e}"
        raise ValueError(msg) from e
