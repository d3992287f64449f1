"""The evaluate stage and what it measures with.

* :mod:`.evaluate` -- the stage: every model scored on the eval set, the comparison, the report.
* :mod:`.report` -- the report drawn and written for people: plots, the summary table and lines.
* :mod:`.uncertainty` -- intervals: Wilson for rates, bootstrap for graded scores, paired for retention.
* :mod:`.scoring` -- one model's answers and its teacher-forced metrics (perplexity, KL to the
  teacher, top-1 agreement, calibration).
* :mod:`.metrics` -- answer metrics (exact, contains, extract, rouge_l, chrf).
* :mod:`.judge` -- the ``judge`` metric: an OpenAI-compatible chat model grades answers.

The package face imports nothing, so that ``mydistill.evaluation.metrics`` costs no torch.
"""
