"""Attack class: mixed artifacts. A load racing a re-save of the same path returns the old or
the new artifact entirely (its weights match its manifest), never a mix, and never a raw error:
each load reads through one directory handle and files opened once."""

import subprocess
import sys

from tests.conftest import ROOT, SCRIPTS

import distsave


def test_every_load_during_resaves_is_entirely_one_version(tmp_path):
    target, stop = tmp_path / "m", tmp_path / "stop"
    saver = subprocess.Popen([sys.executable, str(SCRIPTS / "resave_loop.py"), str(target), str(stop)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert saver.stdout.readline().strip() == "ready", saver.stderr.read()
        versions = []
        for i in range(500):  # both ways a CPU load reads: mapping the files, and reading them
            model = distsave.load_model(target, compile=False, mmap=i % 2 == 0)
            values = {float(v) for p in model.parameters() for v in p.detach().unique()}
            assert values == {float(model.epoch)}, (model.epoch, values)
            versions.append(model.epoch)
    finally:
        stop.write_text("1")
        out, err = saver.communicate(timeout=120)
    assert saver.returncode == 0, err
    assert len(set(versions)) > 1, "the saver never replaced the artifact during the loads"
    assert versions == sorted(versions)
