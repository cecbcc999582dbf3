"""Fixtures of the harness and CLI tests."""
import pytest

from hessfast.harness.cli import main


@pytest.fixture
def run_cli(capsys):
    """``run_cli(*argv) -> (exit code, stdout, stderr)`` of ``hessfast argv...`` in this process."""

    def run(*argv):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse exits on its own errors
            code = e.code
        cap = capsys.readouterr()
        return code, cap.out, cap.err

    return run
