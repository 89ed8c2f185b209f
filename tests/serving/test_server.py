"""`distsave serve` as a real process: TF Serving's REST API, answered over HTTP."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.conftest import rewrite_manifest
from tests.serving.conftest import images, run_serve

TOLERANCE = dict(rtol=0, atol=1e-5)


def test_status_reports_version_1_available(server):
    answer = httpx.get(server.model_url())
    assert answer.status_code == 200
    assert answer.json() == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert httpx.get(server.model_url() + "/versions/1").status_code == 200


def test_server_binds_localhost_by_default(server):
    assert server.url.startswith("http://127.0.0.1:")


def test_metadata_matches_the_signatures(server, loaded):
    answer = httpx.get(server.model_url() + "/metadata").json()
    assert answer["model_spec"] == {"name": "mnist", "signature_name": "", "version": "1"}
    defs = answer["metadata"]["signature_def"]["signature_def"]
    assert set(defs) == set(loaded.signatures)
    default = defs["serving_default"]
    assert default["method_name"] == "tensorflow/serving/predict"
    assert default["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in default["inputs"]["x"]["tensor_shape"]["dim"]] == ["-1", "1", "28", "28"]
    assert [d["size"] for d in default["outputs"]["output_0"]["tensor_shape"]["dim"]] == ["-1", "10"]
    assert set(defs["both"]["outputs"]) == {"logits", "embedding"}
    assert list(defs["pair"]["inputs"]) == ["a", "b"]


def test_predict_rows_equal_the_signature(server, loaded):
    x = images(5)
    answer = httpx.post(server.model_url() + ":predict", json={"instances": x.tolist()})
    assert answer.status_code == 200, answer.text
    expected = loaded.signatures["serving_default"](x)["output_0"]
    torch.testing.assert_close(torch.tensor(answer.json()["predictions"]), expected, **TOLERANCE)


def test_predict_columns_equal_the_signature(server, loaded):
    x = images(3, seed=1)
    answer = httpx.post(server.model_url() + ":predict", json={"inputs": {"x": x.tolist()}})
    expected = loaded.signatures["serving_default"](x)["output_0"]
    torch.testing.assert_close(torch.tensor(answer.json()["outputs"]), expected, **TOLERANCE)
    bare = httpx.post(server.model_url() + "/versions/1:predict", json={"inputs": x.tolist()})
    assert bare.json() == answer.json()


def test_two_outputs_answer_a_dict_per_row_or_a_dict_of_columns(server, loaded):
    x = images(2, seed=2)
    expected = loaded.signatures["both"](x)
    rows = httpx.post(server.model_url() + ":predict",
                      json={"signature_name": "both", "instances": x.tolist()}).json()["predictions"]
    assert len(rows) == 2 and set(rows[0]) == {"logits", "embedding"}
    torch.testing.assert_close(torch.tensor([r["embedding"] for r in rows]), expected["embedding"], **TOLERANCE)
    columns = httpx.post(server.model_url() + ":predict",
                         json={"signature_name": "both", "inputs": x.tolist()}).json()["outputs"]
    torch.testing.assert_close(torch.tensor(columns["logits"]), expected["logits"], **TOLERANCE)


def test_two_inputs_are_named_in_each_instance(server):
    body = {"signature_name": "pair", "instances": [{"a": [1, 2, 3], "b": [0.5, 0, 0]}, {"a": [0, 0, 1], "b": [1, 1, 1]}]}
    answer = httpx.post(server.model_url() + ":predict", json=body)
    assert answer.json() == {"predictions": [[2.5, 4.0, 6.0], [1.0, 1.0, 3.0]]}


@pytest.mark.parametrize("body, message", [
    (b'{"instances": [1, 2', "JSON Parse error"),
    (b'[1, 2]', "not an object"),
    (json.dumps({"instances": [[1.0, 2.0]]}).encode(), "expects float32[None, 1, 28, 28]; received float32[1, 2]"),
    (json.dumps({"instances": [[["a"] * 28] * 28]}).encode(), "expects float32 values; received JSON strings"),
    (json.dumps({"signature_name": "pair", "instances": [{"a": [1, 2, 3], "c": [1, 2, 3]}]}).encode(),
     "unknown: ['c']; missing: ['b']"),
    (json.dumps({"signature_name": "nope", "inputs": [1]}).encode(),
     'Serving signature name: "nope" not found in signature def'),
    (json.dumps({"inputs": [1], "instances": [1]}).encode(), "Not both 'inputs' and 'instances'"),
    (json.dumps({"signature_name": "pair"}).encode(), "Missing 'inputs' or 'instances' key"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b" " * 2_000_001 + b"{}", "larger than the server's limit of 2000000 bytes"),
])
def test_bad_input_gets_400_and_tf_servings_error_json(server, body, message):
    answer = httpx.post(server.model_url() + ":predict", content=body,
                        headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert set(answer.json()) == {"error"} and message in answer.json()["error"]


def test_unknown_model_version_or_route_gets_404_error_json(server):
    for answer in (httpx.post(server.url + "/v1/models/other:predict", json={"inputs": [1]}),
                   httpx.get(server.url + "/v1/models/other/metadata"),
                   httpx.get(server.model_url() + "/versions/7"),
                   httpx.get(server.url + "/v2/anything")):
        assert answer.status_code == 404 and set(answer.json()) == {"error"}
    assert "Servable not found for request: Latest(other)" in \
        httpx.get(server.url + "/v1/models/other").json()["error"]


def test_200_concurrent_requests_from_8_threads_are_all_answered_correctly(server, loaded):
    inputs = [images(1 + i % 3, seed=100 + i) for i in range(200)]
    expected = [loaded.signatures["serving_default"](x)["output_0"] for x in inputs]

    def ask(client: httpx.Client, x: torch.Tensor) -> httpx.Response:
        return client.post(server.model_url() + ":predict", json={"instances": x.tolist()}, timeout=120)

    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda x: ask(client, x), inputs))
    assert [a.status_code for a in answers] == [200] * 200
    for answer, want in zip(answers, expected):
        torch.testing.assert_close(torch.tensor(answer.json()["predictions"]), want, **TOLERANCE)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'distsave_serving_requests_total{api="predict",code="200",model="mnist"}' in metrics
    calls = _metric(metrics, "distsave_serving_batch_rows_count", 'signature="serving_default"')
    rows = _metric(metrics, "distsave_serving_batch_rows_sum", 'signature="serving_default"')
    assert rows >= sum(len(x) for x in inputs) and calls < 200  # requests were merged into batches


def _metric(text: str, name: str, label: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and label in line)


def test_hostile_artifact_refuses_to_start_with_the_artifact_error(served_artifact, tmp_path):
    import shutil

    hostile = tmp_path / "hostile"
    shutil.copytree(served_artifact, hostile)
    program = json.loads((hostile / "signatures/serving_default.json").read_text())
    text = json.dumps(program).replace("aten.relu.default", "aten._exec_code.default", 1)
    assert text != json.dumps(program)
    (hostile / "signatures/serving_default.json").write_text(text)
    rewrite_manifest(hostile)
    process = run_serve(hostile, "--port", "0", tmp=tmp_path)
    out, _ = process.communicate(timeout=180)
    stderr = (tmp_path / "serve.stderr").read_text()
    assert process.returncode == 1 and "at http://" not in out
    assert "distsave serve: Refusing to load a program" in stderr and "aten._exec_code" in stderr
