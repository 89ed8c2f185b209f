"""model.summary(): layers, output shapes and parameter totals, as Keras prints them."""

from __future__ import annotations

import torch
from torch import nn

import distsave
from distsave.demo import workflow_cnn
from distsave.saving.architecture import build_module, module_spec
from distsave.training.summary import format_summary


def test_summary_lists_output_shapes_and_parameters():
    model = distsave.Sequential(workflow_cnn(), input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    lines: list[str] = []
    model.summary(print_fn=lines.append)
    table = lines[0]
    assert "0 (Conv2d)" in table and "(None, 32, 26, 26)" in table
    assert "4 (Linear)" in table and "(None, 64)" in table and "346,176" in table
    assert "Total params: 347,146" in table and "Non-trainable params: 0" in table
    assert model.count_params() == 347_146


def test_frozen_and_shared_parameters_count_once_and_unknown_inputs_show_question_marks():
    shared = nn.Linear(4, 4)
    model = distsave.Model(nn.Sequential(shared, nn.ReLU(), shared, nn.BatchNorm1d(4)))
    model.network[3].weight.requires_grad_(False)
    lines: list[str] = []
    model.summary(print_fn=lines.append)
    assert "Total params: 28" in lines[0] and "Trainable params: 24" in lines[0]
    assert "Non-trainable params: 4" in lines[0] and "Output shapes are unknown" in lines[0]
    assert model.count_params() == 28


def test_summary_of_an_architecture_built_on_the_meta_device_matches_the_model():
    model = distsave.Sequential(workflow_cnn(), input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    with torch.device("meta"):
        rebuilt = build_module(module_spec(model))
    assert format_summary(rebuilt, model.input_spec) == format_summary(model, model.input_spec)
