"""The offline teacher signal: a versioned store of the teacher's sparse distribution per response token.

* :mod:`.format` -- the bytes: Rice-coded id gaps, 8-bit companded log-probs, fp16 residual.
* :mod:`.sampling` -- dense logits -> top-k, or top-k plus an unbiased importance-sampled tail.
* :mod:`.store` -- shards, per-shard index, manifest; the writer and the random-access reader.
* :mod:`.compute` -- the signal stage: run the teacher once over the training mix.
* :mod:`.served` -- the signal stage against a served teacher (client :mod:`.served_client`, identity
  :mod:`.served_probe`).
* :mod:`.combine` -- several stores (teachers) mixed per token.
* :mod:`.teacher` -- the teacher side of a training batch, read from stores.

See docs/teacher_signal.md.
"""

from mydistill.signal.combine import combine_topk
from mydistill.signal.compute import compute_teacher_signal, weights_sha256
from mydistill.config.signal import SignalConfig
from mydistill.signal.format import FORMAT_NAME, FORMAT_VERSION, StoreFormatError, example_key
from mydistill.signal.sampling import SparseSignal, sparsify
from mydistill.signal.store import SignalEntry, SignalStore, SignalStoreWriter, StoreMismatch
from mydistill.signal.teacher import StoreTeacher

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SignalConfig",
    "SignalEntry",
    "SignalStore",
    "SignalStoreWriter",
    "SparseSignal",
    "StoreFormatError",
    "StoreMismatch",
    "StoreTeacher",
    "combine_topk",
    "compute_teacher_signal",
    "example_key",
    "sparsify",
    "weights_sha256",
]
