"""The evaluate stage and what it measures with.

* :mod:`.evaluate` -- the stage: every model scored on the eval set, the comparison, the report.
* :mod:`.scoring` -- one model's answers and its teacher-forced metrics (perplexity, KL to the
  teacher, top-1 agreement, calibration).
* :mod:`.metrics` -- answer metrics (exact, contains, extract, rouge_l, chrf).
* :mod:`.judge` -- the ``judge`` metric: an OpenAI-compatible chat model grades answers.

The package face imports nothing, so that ``mydistill.evaluation.metrics`` costs no torch.
"""
