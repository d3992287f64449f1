"""What keeps artifacts safe on their storage, local or ``s3://`` (:mod:`mydistill.io` reads and writes them).

* :mod:`.s3` -- object stores: retries with backoff, timeouts, the bucket named when one keeps failing.
* :mod:`.locks` -- one writer per artifact: a lock beside each stage's output (flock; a conditional put on S3).
* :mod:`.debris` -- the sweep of what killed runs left (temporary files, staging folders, stale checkpoints).
"""
