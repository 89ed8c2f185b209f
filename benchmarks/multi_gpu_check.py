"""Save under MirroredStrategy over N GPUs, load under M != N GPUs, one GPU and the CPU.

    python benchmarks/multi_gpu_check.py train DIR     # N = every GPU; replicas started by distsave
    CUDA_VISIBLE_DEVICES=0 python benchmarks/multi_gpu_check.py load DIR   # M = 1, plus cuda:0, cpu

Each step prints one JSON line: max abs difference of predictions from the saving model's,
and the training loss before and after one more epoch.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import distsave
from distsave.demo import workflow_cnn

mode, folder = sys.argv[1], Path(sys.argv[2])
mnist = distsave.datasets.load("mnist")
scale = lambda image, label: (image.float() / 255, label)  # noqa: E731
images = next(iter(mnist["test"].take(1024).map(scale).batch(1024)))[0]


def report(step: str, model: distsave.Model, strategy: distsave.Strategy) -> None:
    train = mnist["train"].take(8192).map(scale).cache().batch(64 * strategy.num_replicas_in_sync)
    predictions = model.predict(distsave.data.Dataset.from_tensor_slices(images).batch(256)).cpu()
    reference = load_file(folder / "reference.safetensors")["predictions"]
    before = model.evaluate(train, verbose=0, return_dict=True)["loss"]
    model.fit(train, epochs=1, verbose=0)
    after = model.evaluate(train, verbose=0, return_dict=True)["loss"]
    if strategy.is_chief:
        print(json.dumps({"step": step, "replicas": strategy.num_replicas_in_sync,
                          "device": str(strategy.device),
                          "max_abs_diff": (predictions - reference).abs().max().item(),
                          "loss_before": before, "loss_after_one_epoch": after}), flush=True)


if mode == "train":
    strategy = distsave.MirroredStrategy()
    with strategy.scope():
        torch.manual_seed(0)
        model = distsave.Sequential(workflow_cnn())
        model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    model.fit(mnist["train"].map(scale).cache().shuffle(10000).batch(64 * strategy.num_replicas_in_sync),
              epochs=1, verbose=0)
    model.save(folder / "model")
    if strategy.is_chief:
        with torch.no_grad():
            reference = model(images.to(strategy.device)).cpu()
        save_file({"predictions": reference}, folder / "reference.safetensors")
    strategy.barrier()
    with strategy.scope():
        loaded = distsave.saved_model.load(folder / "model")
    outputs = [strategy.gather(strategy.run(loaded.signatures["serving_default"], args=(x,))["output_0"])
               for x in strategy.experimental_distribute_dataset(
                   distsave.data.Dataset.from_tensor_slices(images).batch(256))]
    if strategy.is_chief:
        reference = load_file(folder / "reference.safetensors")["predictions"]
        print(json.dumps({"step": f"distributed inference over {strategy.num_replicas_in_sync} GPUs",
                          "max_abs_diff": (torch.cat(outputs).cpu() - reference).abs().max().item()}))
else:
    for step, strategy in (("load under MirroredStrategy()", distsave.MirroredStrategy()),
                           ("load under OneDeviceStrategy('cuda:0')", distsave.OneDeviceStrategy("cuda:0")),
                           ("load under OneDeviceStrategy('cpu')", distsave.OneDeviceStrategy("cpu"))):
        with strategy.scope():
            model = distsave.load_model(folder / "model")
        report(step, model, strategy)
