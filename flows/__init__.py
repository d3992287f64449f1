"""Prefect flows: the pipeline DAG and one flow per stage."""

from mydistill.environment import apply_defaults

apply_defaults()
