"""ShardedStrategy on GPUs with NCCL (the device tool); skipped without two CUDA GPUs."""

import pytest
import torch

from tests.conftest import read_reports, run_python, run_script

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def test_sharded_x2_nccl_trains_like_mirrored_x2_holding_half_the_model_per_gpu(tmp_path):
    run_script("sharded_train.py", "2", str(tmp_path / "report"), "--extras", "--cuda", timeout=600)
    reports = read_reports(tmp_path / "report", 2)
    for rank, r in enumerate(reports):
        assert r["backend"] == "nccl" and r["parameter_devices"] == [f"cuda:{rank}"]
        assert r["initial_diff"] == 0.0 and r["moved"] > 1e-4
        torch.testing.assert_close(r["sharded_losses"], r["mirrored_losses"], rtol=1e-4, atol=0)
        assert r["trained_diff"] < 1e-4 and r["predict_diff"] < 1e-4 and r["run_gather_diff"] < 1e-4
        assert r["local_rows"]["2.weight"] == 5 and r["adam_state"]["exp_avg"] == ["DTensor", [5, 32]]
        assert r["peak_fraction"] < 0.6, r["peak_fraction"]  # half of the 64 MiB layer, never the whole
        assert r["bf16"]["compute_dtypes"] == ["torch.bfloat16"] and r["bf16"]["moved"] > 1e-4
        assert f"on cuda:{rank}" in r["too_big"] and r["too_big_still_on_meta"]


def test_one_gpu_sharded_trains_eagerly_and_refuses_a_captured_step():
    code = (
        "import torch, distsave\n"
        "from torch import nn\n"
        "s = distsave.ShardedStrategy(devices=['cuda:0'])\n"
        "x, y = torch.randn(256, 8), torch.randint(0, 4, (256,))\n"
        "with s.scope():\n"
        "    m = distsave.Sequential([nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)])\n"
        "    m.compile(optimizer='adam', loss='sparse_categorical_crossentropy')\n"
        "h = m.fit(x, y, batch_size=32, epochs=2, verbose=0).history['loss']\n"
        "assert h[1] < h[0], h\n"
        "m.compile(optimizer='adam', loss='sparse_categorical_crossentropy', jit_compile=True)\n"
        "try:\n"
        "    m.fit(x, y, batch_size=32, epochs=1, verbose=0)\n"
        "except ValueError as e:\n"
        "    assert 'sharded' in str(e), e\n"
        "    print('refused')\n"
    )
    assert "refused" in run_python(["-c", code], timeout=300).stdout
