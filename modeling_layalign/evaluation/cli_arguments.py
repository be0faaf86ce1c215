"""Argument types the command lines share (`examples/`, `benchmarks/`): a count that must be positive is refused at
parsing, naming the flag, instead of running on nothing or failing deep inside."""

import argparse


def positive_int(text: str) -> int:
    """An `argparse` type: an int of at least 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value
