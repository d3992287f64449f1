"""The parts of the training recipe (:mod:`mydistill.train` reads top to bottom and calls these).

* :mod:`.job` -- :class:`TrainJob`, what one run needs (JSON for the workers).
* :mod:`.launch` -- start the workers (torchrun / DeepSpeed) and follow them.
* :mod:`.kubeflow` -- the cluster engine: the job as a Kubeflow Trainer ``TrainJob``, followed to its end.
* :mod:`.engines` -- the process group; the plain and DeepSpeed (ZeRO-3) engines.
* :mod:`.batches` -- records read once, tokenized, each rank's share of a batch.
* :mod:`.teachers` -- which teachers are loaded and how; where each batch's signal comes from.
* :mod:`.sharded_teacher` -- a teacher partitioned across workers by ZeRO-3 inference.
* :mod:`.student` -- the student from a checkpoint or an architecture.
* :mod:`.objective` -- student + objective as one trained module; one step's loss.
* :mod:`.metrics` -- tokens/s, peak memory, MFU, validation loss.
* :mod:`.checkpoints` -- periodic states for resume; the finished Hugging Face folder.
* :mod:`.ted` -- TED stage 1 (the teacher's layer filters) before the student trains.
* :mod:`.on_policy`, :mod:`.step_by_step`, :mod:`.cross_tokenizer` -- distill-stage features.
"""
