"""ShardedStrategy (FSDP2) with real processes and gloo: trains as Mirrored does, 1/N per replica."""

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from tests.conftest import read_reports, run_script

import distsave
from distsave.strategies import sharded
from distsave.strategies.sharded import _default_blocks, _mixed_precision, _policy_blocks, _root_policy


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """One run of tests/scripts/sharded_train.py under Sharded×2 and Mirrored×2."""
    prefix = tmp_path_factory.mktemp("sharded2") / "report"
    run_script("sharded_train.py", "2", str(prefix), timeout=300)
    return read_reports(prefix, 2)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Sharded×3 and Mirrored×3 (10 rows over 3 replicas), plus bf16 and a model too big."""
    prefix = tmp_path_factory.mktemp("sharded3") / "report"
    run_script("sharded_train.py", "3", str(prefix), "--extras", timeout=300)
    return read_reports(prefix, 3)


def test_sharded_x2_trains_like_mirrored_x2(two):
    for r in two:
        assert r["initial_diff"] == 0.0  # replica 1 seeded its own weights: replica 0's reached it
        assert r["moved"] > 1e-4
        torch.testing.assert_close(r["sharded_losses"], r["mirrored_losses"], rtol=1e-6, atol=0)
        assert r["trained_diff"] < 1e-6
    assert two[0]["sharded_losses"] != two[1]["sharded_losses"]  # each replica its own part


def test_sharded_x2_holds_row_shards_of_weights_and_adam_state(two):
    for r in two:
        assert r["all_dtensors"] and r["placements"] == ["(Shard(dim=0),)"]
        assert r["optimizer_holds_model_params"]
        assert r["local_rows"] == {"0.weight": 16, "0.bias": 16, "2.weight": 5, "2.bias": 5}
        assert r["global_shapes"]["2.weight"] == [10, 32]
        assert r["adam_state"]["exp_avg"] == ["DTensor", [5, 32]]
        assert r["adam_state"]["exp_avg_sq"] == ["DTensor", [5, 32]]
        assert r["parameter_devices"] == ["cpu"]
        # compiling a built 128 MiB layer: its rows (half) and, on replica 1, their receive buffer
        assert r["host_peak_fraction"] < 1.5, r["host_peak_fraction"]
        assert r["describe"]["class"] == "ShardedStrategy" and r["describe"]["num_replicas"] == 2


def test_evaluate_predict_run_gather_reduce_under_sharded(two):
    for r in two:
        sharded, mirrored = r["evaluate"]
        assert sharded.keys() == mirrored.keys() == {"loss", "accuracy"}
        assert sharded["loss"] == pytest.approx(mirrored["loss"], rel=1e-6)
        assert sharded["accuracy"] == mirrored["accuracy"]
        assert r["predict_rows"] == 37 and r["predict_diff"] < 1e-6
        assert r["run_gather_diff"] < 1e-6
        assert r["reduce"] == [3.0]


def test_sharded_x3_cuts_rows_as_torch_chunk_and_trains_like_mirrored_x3(three):
    assert [r["local_rows"]["2.weight"] for r in three] == [4, 4, 2]  # 10 rows over 3
    assert [r["local_rows"]["0.weight"] for r in three] == [11, 11, 10]
    for r in three:
        assert r["initial_diff"] == 0.0
        assert r["adam_state"]["exp_avg"][1][0] == r["local_rows"]["2.weight"]
        torch.testing.assert_close(r["sharded_losses"], r["mirrored_losses"], rtol=1e-5, atol=0)
        assert r["trained_diff"] < 1e-5 and r["moved"] > 1e-4
        assert r["predict_diff"] < 1e-5 and r["run_gather_diff"] < 1e-5


def test_bf16_mixed_precision_computes_in_bf16_and_keeps_fp32_weights(three):
    for r in three:
        bf16 = r["bf16"]
        assert bf16["compute_dtypes"] == ["torch.bfloat16"]
        assert bf16["param_dtypes"] == ["torch.float32"] and bf16["predict_dtype"] == "torch.float32"
        assert bf16["input_spec"] == "float32"  # the model still takes what the data gives
        assert bf16["moved"] > 1e-4
        losses = bf16["epoch_losses"]
        assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert len({tuple(r["bf16"]["epoch_losses"]) for r in three}) == 1  # merged over replicas


def test_a_model_too_big_for_the_replicas_fails_on_every_one_before_allocating(three):
    for r in three:
        assert "does not fit 3 replica(s): 3 of them lack the memory" in r["too_big"]
        assert "GiB" in r["too_big"] and "Use more replicas" in r["too_big"]
        assert r["too_big_still_on_meta"]


# -- one replica, in this process --------------------------------------------------------------
class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


def test_blocks_are_the_networks_children_with_containers_opened():
    net = Stack()
    blocks = _default_blocks(distsave.Model(net))
    assert blocks == [net.embed, net.layers[0], net.layers[1], net.head]
    assert _policy_blocks(net, {nn.Linear}) == [net.head, net.layers[1], net.layers[0], net.embed]
    assert _policy_blocks(net, lambda m: m is net.head) == [net.head]
    with pytest.raises(TypeError, match="policy"):
        _policy_blocks(net, {"Linear"})


def test_mixed_precision_names():
    policy = _mixed_precision("bf16-mixed")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    root = _root_policy(policy)
    assert root.output_dtype == torch.float32 and not root.cast_forward_inputs
    own = MixedPrecisionPolicy(param_dtype=torch.float16)
    assert _mixed_precision(own) is own and _mixed_precision(None) is None
    with pytest.raises(ValueError, match="bf16-mixed"):
        _mixed_precision("fp8")


def test_one_replica_shards_in_place_once_and_trains():
    strategy = distsave.ShardedStrategy(devices=["cpu"])
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    with strategy.scope():
        torch.manual_seed(0)
        model = distsave.Model(Stack())
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    params = list(model.parameters())
    assert all(isinstance(p, DTensor) for p in params)
    assert strategy.apply_sharding(model) is model and list(model.parameters()) == params
    before = model.network.head.weight.full_tensor().clone()
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
    assert not torch.equal(model.network.head.weight.full_tensor(), before)
    assert strategy.mesh.size() == 1
    assert model.count_params() == sum(p.numel() for p in Stack().parameters())


def test_fit_refuses_an_optimizer_built_before_sharding():
    model = distsave.Model(nn.Linear(4, 3))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")  # no strategy
    with distsave.ShardedStrategy(devices=["cpu"]).scope():
        with pytest.raises(RuntimeError, match="compile the model inside strategy.scope"):
            model.fit(torch.randn(8, 4), torch.randint(0, 3, (8,)), verbose=0)


def test_lazy_layers_without_shapes_are_refused():
    strategy = distsave.ShardedStrategy(devices=["cpu"])
    with strategy.scope(), pytest.raises(ValueError, match="lazy parameters"):
        distsave.Sequential([nn.LazyLinear(3)]).compile(optimizer="adam", loss="mse")


def test_a_model_that_does_not_fit_is_left_as_it_was(monkeypatch):
    monkeypatch.setattr(sharded, "_available_bytes", lambda device: 1024)  # a device nearly full
    strategy = distsave.ShardedStrategy(devices=["cpu"])
    model = distsave.Model(Stack())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MemoryError, match="does not fit 1 replica"):
        strategy.apply_sharding(model)
    after = model.state_dict()
    assert all(type(after[k]) is torch.Tensor and torch.equal(after[k], v) for k, v in before.items())
