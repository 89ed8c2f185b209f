"""`import distsave` loads nothing of torch beyond what `import torch` loads: no torch._dynamo,
no torch.export serializer (they cost seconds of a cold start; only saving a program needs
them). torch 2.13's own `import torch` already imports the light `torch.export` package, so the
check is on the modules distsave adds."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch._dynamo", "torch._export.serde.serialize", "torch._inductor", "torch.onnx")

PROBE = """
import json, sys
import torch
before = set(sys.modules)
import distsave
import distsave.saved_model
print(json.dumps({"added": sorted(m for m in set(sys.modules) - before if m.startswith("torch")),
                  "loaded": sorted(m for m in sys.modules if m.startswith(%r))}))
"""


def _probe() -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE % (HEAVY,)], capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _last_line_of(script: str) -> str:
    """Run ``script`` in a fresh interpreter; the last line it printed (it must succeed)."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_import_distsave_adds_no_torch_modules_in_a_fresh_process():
    result = _probe()
    assert result["added"] == []
    assert result["loaded"] == []


def test_loading_a_program_needs_no_torch_serializer(tmp_path):
    """A fresh process loads a saved signature and runs it without torch._dynamo."""
    import distsave
    from distsave.demo import workflow_cnn

    model = distsave.Sequential(workflow_cnn(), input_spec=distsave.TensorSpec((None, 1, 28, 28)))
    distsave.saved_model.save(model, tmp_path / "exported")
    script = (f"import sys, torch, distsave\n"
              f"loaded = distsave.saved_model.load({str(tmp_path / 'exported')!r})\n"
              f"out = loaded.signatures['serving_default'](torch.zeros(2, 1, 28, 28))['output_0']\n"
              f"assert out.shape == (2, 10)\n"
              f"print(sorted(m for m in sys.modules if m.startswith({HEAVY!r})))\n")
    assert _last_line_of(script) == "[]"


@pytest.mark.parametrize("mmap", [True, False])
def test_load_model_restores_the_optimizer_without_torch_dynamo_and_fit_still_works(tmp_path, mmap):
    """torch imports torch._dynamo (seconds) the first time a process builds an optimizer, and
    sympy the first time it allocates like a meta tensor; load_model needs neither, mapped or
    read into memory it allocates, and leaves torch's methods as they were, so the first
    training step imports torch._dynamo as usual."""
    import torch

    import distsave

    model = distsave.Sequential([torch.nn.Linear(4, 2)], input_spec=distsave.TensorSpec((None, 4)))
    model.compile(loss="mse", optimizer="adam")
    model.fit(torch.rand(8, 4), torch.rand(8, 2), epochs=1, verbose=0)
    model.save(tmp_path / "m")
    script = (f"import sys, torch, distsave\n"
              f"model = distsave.load_model({str(tmp_path / 'm')!r}, mmap={mmap})\n"
              f"assert len(model.optimizer.state) == 2 and 'torch._dynamo' not in sys.modules\n"
              f"assert 'sympy' not in sys.modules, 'allocating the meta model imported sympy'\n"
              f"plain = [getattr(torch.optim.Optimizer, n).__wrapped__ for n in "
              f"('add_param_group', 'state_dict', 'load_state_dict')]\n"
              f"assert not any(hasattr(p, '__dynamo_disable') for p in plain)\n"
              f"model.fit(torch.rand(8, 4), torch.rand(8, 2), epochs=1, verbose=0)\n"
              f"print('torch._dynamo' in sys.modules, int(model.optimizer.state_dict()['state'][0]['step']))\n")
    assert _last_line_of(script) == "True 2"
