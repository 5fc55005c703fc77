"""The `amt` console script as a user calls it: a fresh process, exit codes, messages."""
import subprocess, sys, shutil
import yaml

def amt(*args):
    exe = shutil.which('amt') or sys.executable
    cmd = [exe, *args] if exe.endswith('amt') else [exe, '-m', 'amt_lib.cli', *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

def test_help_lists_commands():
    r = amt('--help')
    assert r.returncode == 0 and 'config' in r.stdout

def test_config_show_merges_override():
    r = amt('config', 'show', '--preset', 'h200', 'training.batch_size=64')
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg['training']['batch_size'] == 64
    assert cfg['model']['hidden_dim'] == 1024 and cfg['training']['accumulation'] == 2

def test_config_show_unknown_key_suggests():
    r = amt('config', 'show', '--preset', 'h200', 'training.batchsize=64')
    assert r.returncode == 2
    assert 'training.batchsize' in r.stderr and 'training.batch_size' in r.stderr

def test_config_show_wrong_type():
    r = amt('config', 'show', '--preset', 'smoke', 'model.sigma_reparam=maybe')
    assert r.returncode == 2 and 'model.sigma_reparam' in r.stderr and 'bool' in r.stderr

def test_unknown_preset():
    r = amt('config', 'show', '--preset', 'nope')
    assert r.returncode == 2 and 'known presets' in r.stderr
