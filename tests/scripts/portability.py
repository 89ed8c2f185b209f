"""The Mirrored x2 half of the portability matrix.

    portability.py save DIR          train under MirroredStrategy x2, save inside and outside scope
    portability.py load DIR NAME...  load each artifact under MirroredStrategy x2, predict, fit on
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import distsave
from distsave.demo import workflow_cnn

mode, folder, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
torch.set_num_threads(1)  # as the test process does: bitwise-equal predictions need equal threads
strategy = distsave.MirroredStrategy(devices=["cpu", "cpu"])
mnist = distsave.datasets.load("mnist")
scale = lambda image, label: (image.float() / 255, label)  # noqa: E731
train = mnist["train"].take(1024).map(scale).cache().batch(64 * 2)
test_images = next(iter(mnist["test"].take(512).map(scale).batch(512)))[0]

if mode == "save":
    with strategy.scope():
        torch.manual_seed(0)
        model = distsave.Sequential(workflow_cnn())
        model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    model.fit(train, epochs=1, verbose=0)
    with strategy.scope():
        model.save(folder / "mirrored2-inside")
    model.save(folder / "mirrored2-outside")
    reference = model.predict(distsave.data.Dataset.from_tensor_slices(test_images).batch(256))  # 128 a replica
    if strategy.is_chief:
        for name in ("mirrored2-inside", "mirrored2-outside"):
            save_file({"predictions": reference}, folder / f"{name}.reference.safetensors")
else:
    losses = {}
    for name in names:
        with strategy.scope():
            model = distsave.load_model(folder / name)
        predictions = model.predict(distsave.data.Dataset.from_tensor_slices(test_images).batch(256))
        before = model.evaluate(train, verbose=0, return_dict=True)["loss"]
        model.fit(train, epochs=1, verbose=0)
        after = model.evaluate(train, verbose=0, return_dict=True)["loss"]
        losses[name] = [before, after]
        if strategy.is_chief:
            save_file({"predictions": predictions}, folder / f"{name}.mirrored2.safetensors")
    if strategy.is_chief:
        (folder / "mirrored2-losses.json").write_text(json.dumps(losses))
