"""MLflow answering badly: a re-sent "create version" leaves one version; a server that kept failing
is told in one line naming it."""

from __future__ import annotations

import uuid

from mlflow.exceptions import MlflowException

from mydistill import tracking


def test_a_version_created_twice_for_one_checkpoint_is_kept_once(tmp_path):
    # what MLflow's client does when the answer to "create version" is lost: it sends it again
    name, c = f"twice-{uuid.uuid4().hex[:6]}", tracking.client()
    c.create_registered_model(name)
    for _ in range(2):
        c.create_model_version(name, source=str(tmp_path), tags={"mydistill.student_sha256": "abc"})
    c.create_model_version(name, source=str(tmp_path), tags={"mydistill.student_sha256": "other"})
    assert tracking.keep_first_version(name, "mydistill.student_sha256", "abc") == "1"
    assert sorted(str(v.version) for v in c.search_model_versions(f"name='{name}'")) == ["1", "3"]


def test_a_server_that_kept_failing_is_told_in_one_line_naming_it():
    lost = MlflowException("API request to endpoint /api/2.0/mlflow/model-versions/create failed with error code 503 != 200. "
                           "Response body: '<Error>\n</Error>'")
    refused = MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed with exception "
                              "ConnectionError(MaxRetryError('...'))")
    retried = MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/model-versions/create failed with exception "
                              "HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded with url: /api/2.0/mlflow/"
                              "model-versions/create (Caused by ResponseError('too many 503 error responses'))")
    for error, what in ((retried, "HTTP 503 from http://127.0.0.1:9/api/2.0/mlflow/model-versions/create"),
                        (lost, "HTTP 503 from /api/2.0/mlflow/model-versions/create"),
                        (refused, "ConnectionError on http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch")):
        assert tracking.tracking_unavailable(error)
        message = str(tracking.unavailable_error(error))
        assert message.startswith(f"MLflow at {tracking.current_uri()} kept failing") and what in message and "\n" not in message
    assert not tracking.tracking_unavailable(MlflowException("API request to endpoint /x failed with error code 404 != 200"))
    assert not tracking.tracking_unavailable(ValueError("bad config"))
