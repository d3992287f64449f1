"""Prefect tasks: thin typed wrappers, one library call each."""

from mydistill.environment import apply_defaults

apply_defaults()
