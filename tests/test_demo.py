"""`distsave demo`, the main job, runs in CI in its quick mode: every row must pass its check."""

from tests.conftest import run_python

from distsave.demo import _Table

ROWS = 12


def test_quick_demo_passes_every_row(tmp_path):
    result = run_python(["-m", "distsave.cli", "demo", "--quick", "--cpu-replicas", "2",
                         "--workdir", str(tmp_path / "demo")], timeout=900)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "| step " not in line]
    assert len(rows) == ROWS, result.stdout[-3000:]
    failed = [row for row in rows if not row.rstrip().endswith("| ok    |")]
    assert not failed, "\n".join(failed)
    assert f"{ROWS} of {ROWS} steps passed their checks." in result.stdout


def test_a_failed_row_fails_the_demo(capsys):
    table = _Table(echo=False)
    with table.step("good") as row:
        row.result, row.passed = "fine", True
    with table.step("bad") as row:
        row.result = "wrong"
    table.print()
    assert not table.all_passed
    assert "| FAIL  |" in capsys.readouterr().out
