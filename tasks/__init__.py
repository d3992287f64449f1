"""Prefect tasks: thin typed wrappers, one library call each."""

from mydistill.environment import apply_defaults
from tasks.run_log import send_library_lines_to_run_logs

apply_defaults()
send_library_lines_to_run_logs()
