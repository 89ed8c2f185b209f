"""Attack class: anything else. A seeded, time-bounded run of the artifact fuzzer: mutated
manifests, safetensors headers, programs and bytes (checksums recomputed) give only
ArtifactError, never another exception, a hang or a payload run (canary)."""

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

FUZZER = Path(__file__).with_name("fuzz_artifacts.py")


def test_fuzzed_artifacts_only_ever_raise_artifact_error(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, str(FUZZER), "--seconds", "20", "--seed", "20261126",
                             "--round-timeout", "30", "--report", str(report)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert report.exists(), f"the fuzzer died (a hang is reported with its stacks):\n{result.stderr[-5000:]}"
    findings = json.loads(report.read_text())
    assert findings["rounds"] > 50
    assert findings["findings"] == {}, json.dumps(findings["findings"], indent=1)
