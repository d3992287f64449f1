"""What only the top floor (tasks, flows, the CLI) needs: the whole pipeline seen at once.

* :mod:`.plan` -- where each stage reads and writes (``STAGE_READS``: the DAG in ten lines).
* :mod:`.changes` -- what changed since the last run, and which stages that re-runs.
* :mod:`.preflight` -- every input checked before anything runs, every problem listed at once.
* :mod:`.costs` -- what a run cost (wall time, GPU/CPU hours, tokens).
"""
