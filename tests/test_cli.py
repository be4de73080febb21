import subprocess
import sys

from nestlearn.cli import main


def test_info_prints_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "nestlearn" in out and "torch" in out and "threads" in out
    assert "shakespeare:" in out


def test_python_dash_m_runs():
    result = subprocess.run([sys.executable, "-m", "nestlearn", "--version"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert result.stdout.startswith("nestlearn ")


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
