"""Bad values and bad invocations: every case ends in exit 2 and ONE stderr line `amt <cmd>: error: ...` naming the
key, value or file, with no traceback. Run in-process through `amt_lib.cli.main` (what the `amt` script calls); most
cases fail before a model is built; one smoke run (module fixture) provides a real checkpoint."""
import os, pickle, shutil, sys
from pathlib import Path
import pytest
import torch
from amt_lib.cli import main

QUIET = ['logging.progress=quiet', 'logging.plots=false', 'logging.tensorboard=false']
HAVE_CUDA = torch.cuda.is_available()

def amt(capsys, *args):
    "Run `amt args...` in-process; (exit code, stdout, stderr)."
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err

def assert_one_error(rc, err, cmd, *needles):
    "Exit 2, no traceback, exactly one `error:` line, the last one, `amt <cmd>: error:` naming every needle."
    assert rc == 2, f'exit {rc}\n{err}'
    assert 'Traceback' not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    errs = [l for l in lines if 'error:' in l]
    assert len(errs) == 1 and lines[-1] == errs[0], err
    assert errs[0].startswith(f'amt {cmd}: error: '), errs[0]
    for n in needles: assert str(n) in errs[0], f'{n!r} not in {errs[0]!r}'

class Boom:
    "A pickle payload: unpickling it would create the marker file."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (open, (self.marker, 'w'))

@pytest.fixture(scope='module')
def bad_files(tmp_path_factory):
    "Files that are not usable checkpoints or MANO models, and the marker a hostile pickle would write."
    d = tmp_path_factory.mktemp('bad')
    (d/'empty.pt').write_bytes(b'')
    (d/'text.pt').write_text('this is not a checkpoint\n')
    torch.save(torch.zeros(3), d/'tensor.pt')
    torch.save({'weights': torch.zeros(3)}, d/'foreign.pt')
    marker = d/'PWNED'
    (d/'evil.pt').write_bytes(pickle.dumps({'model': Boom(marker)}))
    (d/'mano_text').mkdir(); (d/'mano_text'/'MANO_RIGHT.pkl').write_text('not a pickle\n')
    (d/'mano_evil').mkdir(); (d/'mano_evil'/'MANO_RIGHT.pkl').write_bytes(pickle.dumps({'v_template': Boom(marker)}))
    (d/'a_file').write_text('x')
    yield d
    assert not marker.exists(), 'a hostile pickle ran its payload'

@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    "One finished smoke run: (run dir, last.pt, a truncated copy of it)."
    d = tmp_path_factory.mktemp('smoke')/'run'
    rc = main(['train', '--preset', 'smoke', '--run-dir', str(d), *QUIET])
    assert rc == 0
    last = d/'checkpoints'/'last.pt'
    trunc = d.parent/'truncated.pt'; trunc.write_bytes(last.read_bytes()[:len(last.read_bytes()) // 2])
    return d, last, trunc

# ---------------------------------------------------------------- values: refused before anything is built
VALUE_CASES = [
    ('training.batch_size=0', 'training.batch_size=0'), ('training.lr=-1', 'training.lr=-1.0'),
    ('training.lr=.nan', 'training.lr=nan'), ('training.device=tpu', "training.device='tpu'"),
    ('training.precision=fp8', "training.precision='fp8'"), ('data.source=foo', "data.source='foo'"),
    ('data.num_workers=-1', 'data.num_workers=-1'), ('data.image_size=100', 'data.image_size=100'),
    ('logging.progress=fancy', "logging.progress='fancy'"), ('training.epochs=-1', 'training.epochs=-1'),
    ('training.epochs=0', 'training.epochs=0'), ('data.train_size=2', 'data.train_size=2'),
    ('training.ema_decay=2.0', 'training.ema_decay=2.0'), ('training.monitor=nosuch', "training.monitor='nosuch'"),
    ('training.batchsize=4', 'training.batch_size'), ('model.sigma_reparam=maybe', 'model.sigma_reparam'),
] + ([] if HAVE_CUDA else [('training.device=cuda', "training.device='cuda'")])

@pytest.mark.parametrize('override,needle', VALUE_CASES)
def test_train_bad_value(capsys, tmp_path, override, needle):
    rc, _, err = amt(capsys, 'train', '--preset', 'smoke', '--run-dir', tmp_path/'r', override)
    assert_one_error(rc, err, 'train', needle)
    assert not (tmp_path/'r'/'metrics.csv').exists()

@pytest.mark.parametrize('cmd', [['model', 'summary'], ['config', 'show']])
def test_other_commands_bad_value(capsys, cmd):
    rc, _, err = amt(capsys, *cmd, '--preset', 'smoke', 'training.batchsize=4')
    assert_one_error(rc, err, cmd[0], 'training.batch_size')

def test_model_summary_checks_meaning(capsys):
    rc, _, err = amt(capsys, 'model', 'summary', '--preset', 'smoke', 'data.image_size=100')
    assert_one_error(rc, err, 'model', 'data.image_size=100', 'patch_size=14')

# ---------------------------------------------------------------- MANO files
@pytest.mark.parametrize('which,needle', [('missing', 'MANO model file not found'), ('mano_text', 'MANO_RIGHT.pkl'),
                                          ('mano_evil', 'refusing to load global'), ('a_file', 'MANO model file not found')])
def test_model_summary_bad_mano_path(capsys, bad_files, which, needle):
    p = bad_files/which
    rc, _, err = amt(capsys, 'model', 'summary', '--preset', 'smoke', f'model.mano_path={p}')
    assert_one_error(rc, err, 'model', needle, p)

# ---------------------------------------------------------------- run folders
def test_run_dir_read_only(capsys):
    rc, _, err = amt(capsys, 'train', '--preset', 'smoke', '--run-dir', '/sys/amt_errors_test/run', *QUIET)
    assert_one_error(rc, err, 'train', '/sys/amt_errors_test/run', 'cannot be written')

def test_run_dir_below_a_file(capsys, bad_files):
    rc, _, err = amt(capsys, 'train', '--preset', 'smoke', '--run-dir', bad_files/'a_file'/'run', *QUIET)
    assert_one_error(rc, err, 'train', f"{bad_files/'a_file'} is a file")

def test_run_dir_checkpoints_is_a_file(capsys, tmp_path):
    (tmp_path/'checkpoints').write_text('x')
    rc, _, err = amt(capsys, 'train', '--preset', 'smoke', '--run-dir', tmp_path, *QUIET)
    assert_one_error(rc, err, 'train', 'checkpoints is a file')

def test_reused_run_dir_refused(capsys, smoke):
    d, _, _ = smoke
    rows = (d/'metrics.csv').read_text()
    rc, _, err = amt(capsys, 'train', '--preset', 'smoke', '--run-dir', d, *QUIET)
    assert_one_error(rc, err, 'train', 'already holds a run', '--resume', '--overwrite')
    assert (d/'metrics.csv').read_text() == rows

# ---------------------------------------------------------------- checkpoints: resume, init-from, stage 3
@pytest.mark.parametrize('name,needle', [('empty.pt', 'cannot read checkpoint'), ('text.pt', 'cannot read checkpoint'),
                                         ('tensor.pt', 'holds a Tensor'), ('foreign.pt', 'holds no model'),
                                         ('evil.pt', 'cannot read checkpoint')])
@pytest.mark.parametrize('how', ['resume', 'init_from', 'stage3'])
def test_bad_checkpoint_files(capsys, bad_files, tmp_path, name, needle, how):
    p = bad_files/name
    args = {'resume': ['train', '--resume', p, '--run-dir', tmp_path/'r'],
            'init_from': ['train', '--preset', 'smoke', '--run-dir', tmp_path/'r', f'training.init_from={p}', *QUIET],
            'stage3': ['train', '--stage', '3', '--init-from', p, '--preset', 'smoke', '--run-dir', tmp_path/'r']}[how]
    rc, _, err = amt(capsys, *args)
    assert_one_error(rc, err, 'train', needle, p)

def test_truncated_checkpoint(capsys, smoke, tmp_path):
    _, _, trunc = smoke
    for args in (['--resume', trunc], ['--stage', '3', '--init-from', trunc, '--preset', 'smoke']):
        rc, _, err = amt(capsys, 'train', *args, '--run-dir', tmp_path/'r')
        assert_one_error(rc, err, 'train', 'cannot read checkpoint', trunc)

def test_resume_weights_that_do_not_fit_their_config(capsys, smoke, tmp_path):
    import yaml
    from amt_lib.learner.checkpoint import load_checkpoint, save_checkpoint
    _, last, _ = smoke
    ck = load_checkpoint(last)
    cfg = yaml.safe_load(ck['config']); cfg['model']['contact_hidden'] += 8
    bad = save_checkpoint({**ck, 'config': yaml.safe_dump(cfg)}, tmp_path/'misfit.pt')
    rc, _, err = amt(capsys, 'train', '--resume', bad, '--run-dir', tmp_path/'r', *QUIET)
    assert_one_error(rc, err, 'train', f'weights in {bad}'.split(' in ')[0], 'do not fit')

def test_resume_with_other_mano_path(capsys, smoke, tmp_path):
    import numpy as np
    from amt_lib.hand_model import generate_mano
    _, last, _ = smoke
    m = generate_mano('right'); m['v_template'] = np.asarray(m['v_template']) + 0.01
    (tmp_path/'MANO_RIGHT.pkl').write_bytes(pickle.dumps(m))
    rc, _, err = amt(capsys, 'train', '--resume', last, f'model.mano_path={tmp_path}', 'training.epochs=2', *QUIET)
    assert_one_error(rc, err, 'train', f'model.mano_path={str(tmp_path)!r}', 'model.mano_path=None')

def test_resume_of_a_finished_run_trains_nothing_and_says_so(capsys, smoke):
    _, last, _ = smoke
    rc, _, err = amt(capsys, 'train', '--resume', last, *QUIET)
    assert_one_error(rc, err, 'train', 'nothing to train', 'is at step 4 of 4')

def test_resume_refuses_freeze_change(capsys, smoke):
    _, last, _ = smoke
    rc, _, err = amt(capsys, 'train', '--resume', last, 'training.freeze=[backbone]', 'training.epochs=2', *QUIET)
    assert_one_error(rc, err, 'train', 'training.freeze')

def test_resume_refuses_another_optimizer(capsys, smoke):
    _, last, _ = smoke
    rc, _, err = amt(capsys, 'train', '--resume', last, 'training.optimizer=muon', 'training.epochs=2', *QUIET)
    assert_one_error(rc, err, 'train', 'training.optimizer', "'adamw' -> 'muon'")

def test_resume_applies_a_new_lr(capsys, smoke, tmp_path):
    from amt_lib.learner.checkpoint import load_checkpoint
    d, last, _ = smoke
    run = tmp_path/'run'; shutil.copytree(d, run, ignore=shutil.ignore_patterns('wandb', 'tb'))
    rc, out, err = amt(capsys, 'train', '--resume', run/'checkpoints'/'last.pt', 'training.lr=0.002', 'training.epochs=2', *QUIET)
    assert rc == 0, err
    assert 'resume with training.lr 0.001 -> 0.002' in out, out
    groups = load_checkpoint(run/'checkpoints'/'last.pt')['optimizer']['param_groups']
    assert {g['initial_lr'] for g in groups if g['name'].split('.')[0] != 'backbone'} == {0.002}

# ---------------------------------------------------------------- predict
def test_predict_out_is_a_file(capsys, smoke, bad_files):
    from PIL import Image
    _, last, _ = smoke
    img = bad_files/'photo.png'; Image.new('RGB', (64, 48)).save(img)
    rc, _, err = amt(capsys, 'predict', img, '--ckpt', last, '--out', bad_files/'a_file')
    assert_one_error(rc, err, 'predict', bad_files/'a_file')

@pytest.mark.parametrize('which', ['missing', 'mano_evil'])
def test_predict_checkpoint_with_bad_mano_path(capsys, smoke, bad_files, tmp_path, which):
    import yaml
    from PIL import Image
    from amt_lib.learner.checkpoint import load_checkpoint, save_checkpoint
    _, last, _ = smoke
    ck = load_checkpoint(last)
    cfg = yaml.safe_load(ck['config']); cfg['model']['mano_path'] = str(bad_files/which)
    p = save_checkpoint({**ck, 'config': yaml.safe_dump(cfg)}, tmp_path/'ck.pt')
    img = tmp_path/'photo.png'; Image.new('RGB', (64, 48)).save(img)
    rc, _, err = amt(capsys, 'predict', img, '--ckpt', p, '--out', tmp_path/'out')
    assert_one_error(rc, err, 'predict', bad_files/which)

# ---------------------------------------------------------------- run / pipeline invocations
def test_run_options_and_overrides_in_any_order(capsys):
    rc, _, err = amt(capsys, 'run', 'stage1', '--preset', 'smoke', 'training.lr=-1', '-p', 'max_steps', '1')
    assert_one_error(rc, err, 'run', 'training.lr=-1.0')        # parsed (not an argparse error), then the value refused

def test_run_unknown_parameter(capsys):
    rc, _, err = amt(capsys, 'run', 'stage1', '--preset', 'smoke', '-p', 'max_step', '1')
    assert_one_error(rc, err, 'run', "'max_step'", 'max_steps')

def test_run_missing_notebook(capsys, tmp_path):
    rc, _, err = amt(capsys, 'run', tmp_path/'nope.ipynb')
    assert_one_error(rc, err, 'run', tmp_path/'nope.ipynb')

def test_pipeline_unknown_stage(capsys):
    rc, _, err = amt(capsys, 'pipeline', '--preset', 'smoke', '--stages', 'stage1,nosuch')
    assert_one_error(rc, err, 'pipeline', 'nosuch')

def test_stage_needs_init_from(capsys):
    rc, _, err = amt(capsys, 'train', '--stage', '2', '--preset', 'smoke')
    assert_one_error(rc, err, 'train', '--init-from')

def test_a_bug_says_so(capsys, monkeypatch):
    import amt_lib.config as C
    monkeypatch.setattr(C, 'list_presets', lambda: 1 / 0)
    rc, _, err = amt(capsys, 'config', 'presets')
    assert rc == 1 and 'Traceback' in err and 'ZeroDivisionError' in err
    last = err.strip().splitlines()[-1]
    assert 'a bug' in last and 'full log in' in last
    Path(last.split('full log in ')[1]).unlink()

# ---------------------------------------------------------------- the other commands: config checked first, one line, exit 2
@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    "A smoke checkpoint as the trainer writes it (random weights, no training) and one whose saved config has a bad value."
    from amt_lib.config import config_to_yaml, load_config
    from amt_lib.learner.checkpoint import save_checkpoint
    from amt_lib.models.amt import build_model
    d = tmp_path_factory.mktemp('ckpts')
    cfg = load_config('smoke'); torch.manual_seed(0); sd = build_model(cfg).state_dict()
    ck = dict(model=sd, ema=sd, optimizer=None, step=1, epoch=0)
    good = save_checkpoint({**ck, 'config': config_to_yaml(cfg)}, d/'good.pt')
    bad = save_checkpoint({**ck, 'config': config_to_yaml(load_config('smoke', ['data.image_size=100']))}, d/'bad_config.pt')
    from PIL import Image
    Image.new('RGB', (64, 48)).save(d/'photo.png')
    return d, good, bad

COMMAND_CASES = {   # id -> (argv after `amt`, with {good} {bad} {d} filled in; the command; needles of the error line)
    'eval-override': (['eval', '--ckpt', '{good}', '--device', 'cpu', 'data.num_workers=-1'], 'eval', ['data.num_workers=-1']),
    'eval-unknown-key': (['eval', '--ckpt', '{good}', '--device', 'cpu', 'data.num_worker=2'], 'eval', ['data.num_worker']),
    'eval-batch-size': (['eval', '--ckpt', '{good}', '--device', 'cpu', '--batch-size', '0'], 'eval', ['--batch-size 0']),
    'eval-bad-ckpt-config': (['eval', '--ckpt', '{bad}', '--device', 'cpu'], 'eval', ['{bad}', 'data.image_size=100']),
    'eval-device': (['eval', '--ckpt', '{good}', '--device', 'tpu'], 'eval', ["--device 'tpu'"]),
    'predict-bad-ckpt-config': (['predict', '{d}/photo.png', '--ckpt', '{bad}', '--out', '{d}/p'], 'predict', ['{bad}', 'data.image_size=100']),
    'predict-K': (['predict', '{d}/photo.png', '--ckpt', '{good}', '--K', '1,2,3'], 'predict', ['--K']),
    'export-batch': (['export', 'onnx', '--ckpt', '{good}', '--out', '{d}/m.onnx', '--batch', '0'], 'export', ['--batch 0']),
    'export-bad-ckpt-config': (['export', 'torchscript', '--ckpt', '{bad}', '--out', '{d}/m.pt'], 'export', ['{bad}', 'data.image_size=100']),
    'bench-value': (['bench', '--preset', 'smoke', 'training.batch_size=0'], 'bench', ['training.batch_size=0']),
    'bench-section': (['bench', '--only', 'train,warp'], 'bench', ['--only', 'warp']),
    'gpu-check-device': (['gpu-check', '--device', 'tpu', '--out', '{d}/g.json'], 'gpu-check', ["--device 'tpu'"]),
    'sweep-value': (['sweep', '--preset', 'smoke', '--param', 'training.lr=1e-3,-1', '--sweep-dir', '{d}/sw'], 'sweep', ['training.lr=-1.0']),
    'sweep-key': (['sweep', '--preset', 'smoke', '--param', 'training.lrr=1e-3'], 'sweep', ["'training.lrr'", 'training.lr']),
}

@pytest.mark.parametrize('case', list(COMMAND_CASES))
def test_command_bad_value(capsys, ckpts, case):
    d, good, bad = ckpts
    argv, cmd, needles = COMMAND_CASES[case]
    fill = lambda s: s.format(good=good, bad=bad, d=d)
    rc, _, err = amt(capsys, *map(fill, argv))
    assert_one_error(rc, err, cmd, *map(fill, needles))
    assert not any((d/n).exists() for n in ('p', 'm.onnx', 'm.pt', 'g.json', 'sw'))     # refused before anything was written
