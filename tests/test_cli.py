"""`drseg` entry points: help, exit codes and error messages of the commands that need no data."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hpc_drseg.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("synth", "shard", "config", "info", "bench"):
        assert command in out


def test_python_dash_m_works():
    for module in ("hpc_drseg", "hpc_drseg.cli"):
        done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
        assert done.returncode == 0 and "hpc_drseg" in done.stdout, (module, done.stderr)


def test_help_of_every_command_imports_no_heavy_module():
    # Building the whole parser (every sub-command's builder) runs for `drseg --help` and before any command.
    code = (
        "import sys\n"
        "from hpc_drseg.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'numpy', 'webdataset', 'albumentations', 'accelerate', 'submitit')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: drseg"), done.stderr
    assert done.stdout.endswith("\n[]\n"), done.stdout.splitlines()[-1]


def test_bad_override_exits_nonzero_naming_key(capsys):
    assert main(["config", "check", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optim.lrr'" in err and "optim.lr" in err


def test_config_show_applies_overrides(capsys):
    assert main(["config", "show", "--config", "configs/debug.yaml", "train.seed=11"]) == 0
    out = capsys.readouterr().out
    assert "seed: 11" in out and "backbone: resnet18" in out


def test_config_keys_lists_documented_fields(capsys):
    assert main(["config", "keys"]) == 0
    assert "loss.weights.boundary" in capsys.readouterr().out


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from hpc_drseg.cli import train as config_commands
    from hpc_drseg.errors import InputError

    def user_error(args):
        raise InputError("data.shards: got 'x'; give a shard folder")

    def bug(args):
        raise KeyError("internal")

    monkeypatch.setattr(config_commands, "cmd_config_keys", user_error)
    assert main(["config", "keys"]) == 2
    assert capsys.readouterr().err == "drseg config: error: data.shards: got 'x'; give a shard folder\n"
    monkeypatch.setattr(config_commands, "cmd_config_keys", bug)
    with pytest.raises(KeyError, match="internal"):
        main(["config", "keys"])


def test_nested_commands_and_option_errors(capsys):
    assert main(["bench", "data", "--workers", "a,b"]) == 2
    assert "--workers: got 'a,b'" in capsys.readouterr().err
    assert main(["sweep", "status"]) == 2
    with pytest.raises(SystemExit) as info:
        main(["bench", "nope"])
    assert info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["bench", "gpu"])
    assert info.value.code == 2 and "required: --out" in capsys.readouterr().err


def test_file_system_refusals_are_one_line_naming_the_path(monkeypatch, capsys):
    from hpc_drseg.cli import train as config_commands

    def read_only(args):
        raise PermissionError(13, "Permission denied", "/runs/x/checkpoints/last.pt")

    def no_path(args):
        raise OSError("socket closed")

    monkeypatch.setattr(config_commands, "cmd_config_keys", read_only)
    assert main(["config", "keys"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied: /runs/x/checkpoints/last.pt" in err
    monkeypatch.setattr(config_commands, "cmd_config_keys", no_path)
    with pytest.raises(OSError, match="socket closed"):
        main(["config", "keys"])
