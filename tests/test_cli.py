import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from fastmath.cli import COMMANDS, main

LIGHT_MODULES = ["fastmath", "fastmath.cli", "fastmath.grading", "fastmath.metrics", "fastmath.synth",
                 "fastmath.commands.grade", "fastmath.commands.synth"]


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_light_modules_do_not_import_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_lists_every_command_without_importing_torch():
    code = ("import sys; from click.testing import CliRunner; from fastmath.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); print(r.output); assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_has_help(name):
    cmd = main.get_command(click.Context(main), name)
    assert cmd.help or cmd.short_help
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help, f"fastmath {name} {param.opts[0]} has no help text"


def test_info():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    for key in ("torch", "triton", "device", "attention", "kernels"):
        assert key in result.output
    assert "torch (SDPA per document) on cpu" in result.output
