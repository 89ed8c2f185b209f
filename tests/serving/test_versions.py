"""Numbered version folders: the highest is served; a new one is picked up without a failed request."""

from __future__ import annotations

import threading
import time

import httpx
import torch

from distsave.saving.format import MANIFEST
from tests.serving.conftest import cnn, images, save_served_model, serving


def test_a_new_version_folder_is_served_without_a_failed_request(tmp_path):
    versions = tmp_path / "mnist"
    save_served_model(cnn(seed=0), versions / "1")
    (versions / "not-a-version").mkdir()
    x = images(2)
    with torch.no_grad():
        old, new = cnn(seed=0)(x), cnn(seed=1)(x)
    answers: list[httpx.Response] = []
    stop = threading.Event()

    def keep_asking(url: str) -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                answers.append(client.post(url, json={"instances": x.tolist()}, timeout=60))

    with serving(versions, "--poll-seconds", "0.2", tmp=tmp_path) as server:
        asker = threading.Thread(target=keep_asking, args=(server.model_url() + ":predict",))
        asker.start()
        try:
            save_served_model(cnn(seed=1), versions / "2")  # appears atomically (renamed into place)
            deadline = time.monotonic() + 120
            while httpx.get(server.model_url()).json()["model_version_status"][0]["version"] != "2":
                assert time.monotonic() < deadline, "version 2 was not picked up"
                time.sleep(0.1)
            seen = len(answers)
            while len(answers) < seen + 3:
                time.sleep(0.05)
        finally:
            stop.set()
            asker.join()
        assert httpx.get(server.model_url() + "/versions/1").status_code == 404
    assert answers and all(a.status_code == 200 for a in answers)
    served = [torch.tensor(a.json()["predictions"]) for a in answers]
    assert torch.allclose(served[0], old, atol=1e-5) and torch.allclose(served[-1], new, atol=1e-5)
    assert all(torch.allclose(s, old, atol=1e-5) or torch.allclose(s, new, atol=1e-5) for s in served)


def test_a_broken_new_version_is_reported_and_the_old_one_kept(tmp_path):
    versions = tmp_path / "mnist"
    save_served_model(cnn(seed=0), versions / "1")
    with serving(versions, "--poll-seconds", "0.2", tmp=tmp_path) as server:
        save_served_model(cnn(seed=1), versions / "3")
        (versions / "3" / "model.safetensors").write_bytes(b"broken")
        deadline = time.monotonic() + 60
        while len(status := httpx.get(server.model_url()).json()["model_version_status"]) < 2:
            assert time.monotonic() < deadline, "the broken version was never reported"
            time.sleep(0.1)
        assert status[0] == {"version": "1", "state": "AVAILABLE",
                             "status": {"error_code": "OK", "error_message": ""}}
        assert status[1]["version"] == "3" and status[1]["state"] == "END"
        assert "model.safetensors" in status[1]["status"]["error_message"]
        assert httpx.post(server.model_url() + ":predict", json={"instances": images(1).tolist()}).status_code == 200
    assert (versions / "1" / MANIFEST).is_file()
