"""The ``gequiv-timm`` command package: the table, the module contract, ``python -m`` and ``list``."""
import importlib
import subprocess
import sys

import pytest
import timm

import gequiv_timm  # noqa: F401
from gequiv_timm.cli import COMMANDS, build_parser, main


def test_every_command_module_has_the_contract():
    assert set(COMMANDS) == {'list', 'compare', 'train', 'export', 'push', 'check', 'stn-viz'}
    for name, path in COMMANDS.items():
        mod = importlib.import_module(path)
        assert path.startswith('gequiv_timm.cli.'), name
        assert callable(mod.add_arguments) and callable(mod.run), name
        assert (mod.__doc__ or '').strip(), f"{path}: the first docstring line is the command's help"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert 'COMMAND' in capsys.readouterr().out


def test_python_m_runs_the_command():
    r = subprocess.run([sys.executable, '-m', 'gequiv_timm.cli', 'list', 'gequiv_p4cnn'], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('gequiv_p4cnn ')


def test_list_pretrained_shows_only_models_with_tags(capsys):
    assert main(['list', '--pretrained']) == 0
    out = capsys.readouterr().out
    shown = {line.split()[0] for line in out.splitlines() if line and not line.startswith(' ')}
    tagged = {n.split('.')[0] for n in timm.list_pretrained('gequiv_*')}
    assert shown == tagged and 'gequiv_p4cnn' in shown
    assert '.rotmnist' in out
