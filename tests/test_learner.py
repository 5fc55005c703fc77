"""The trainer as a run uses it: exact resume, atomic checkpoints, non-finite losses, SIGTERM, DDP, config checks, `amt train`.

Tests marked `needs_data` run the real AMT model on SynthHOI through `train`; the others use the fixture learner
(`synth_learner`) and test the loop itself. Budget: under 3 minutes on 2 CPU cores.
"""
import os, sys, signal, subprocess, textwrap, time, importlib.util
from pathlib import Path
import pytest
import torch

from amt_lib.learner.core import synth_learner, Callback, get_rng_state
from amt_lib.learner.callbacks import SchedulerCB, EMACB, GradClipCB, AccumulateCB, NonFiniteCB, StopCB, Recorder
from amt_lib.learner.optim import make_scheduler
from amt_lib.learner.reporting import read_metrics
from amt_lib.learner.checkpoint import CheckpointCB, load_checkpoint, restore_learner, CheckpointError

HAVE_DATA = importlib.util.find_spec('amt_lib.data.synthetic') is not None and importlib.util.find_spec('amt_lib.models.amt') is not None
needs_data = pytest.mark.skipif(not HAVE_DATA, reason='amt_lib.data.synthetic / amt_lib.models.amt not built yet')
QUIET = ['logging.progress=plain', 'logging.plots=false', 'logging.tensorboard=false']

class Losses(Callback):
    def __init__(self): self.l = []
    def after_loss(self, learn): self.l.append(learn.loss.item())

def fixture_learner(ckpt_dir, **kw):
    learn = synth_learner(n=24, bs=4, **kw)
    learn.cbs += [SchedulerCB(make_scheduler(learn.opt, 2, 4, 2, 1e-4)), EMACB(0.9, 2), GradClipCB(1.), AccumulateCB(2),
                  NonFiniteCB(3), CheckpointCB(ckpt_dir, extra_state=lambda: {'config': 'model: {}\n'})]
    for c in learn.cbs: c.learn = learn
    return learn

# ---------------------------------------------------------------- resume

def test_fixture_resume_mid_epoch_exact(tmp_path):
    full = Losses(); fixture_learner(tmp_path/'a').fit(3, cbs=[full])
    part = Losses(); fixture_learner(tmp_path/'b').fit(3, cbs=[part, StopCB(max_steps=4, handle_signals=False)])
    ck = load_checkpoint(tmp_path/'b'/'last.pt')
    assert (ck['sampler']['epoch'], ck['sampler']['iter']) == (1, 2)     # mid-epoch: 3 steps of 2 batches per epoch
    torch.manual_seed(999)                                                # a fresh process has other RNG states
    learn = fixture_learner(tmp_path/'b'); rest = Losses()
    learn.fit(3, cbs=[rest], **restore_learner(learn, load_checkpoint(tmp_path/'b'/'last.pt')))
    assert len(part.l) == 8 and len(part.l + rest.l) == len(full.l) == 18
    assert max(abs(a - b) for a, b in zip(part.l + rest.l, full.l)) <= 1e-6

@needs_data
@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_train_resume_mid_epoch_exact(tmp_path, monkeypatch, optimizer):
    from amt_lib.config import load_config
    from amt_lib.learner.train import train
    monkeypatch.setenv('WANDB_MODE', 'disabled')                     # W&B off is also a supported setting
    ov = QUIET + ['training.epochs=2', 'training.eval_every=2', f'training.optimizer={optimizer}']   # smoke: 4 steps per epoch, 8 in all
    train(load_config('smoke', ov), tmp_path/'full')
    train(load_config('smoke', ov + ['training.max_steps=3']), tmp_path/'cut')
    ck = load_checkpoint(tmp_path/'cut'/'checkpoints'/'last.pt')
    assert ck['step'] == 3 and (ck['sampler']['epoch'], ck['sampler']['iter']) == (0, 3)   # mid-epoch
    train(load_config('smoke', ov), resume=tmp_path/'cut'/'checkpoints'/'last.pt')
    a = {int(r['step']): r['loss'] for r in read_metrics(tmp_path/'full'/'metrics.csv', 'train')}
    b = {int(r['step']): r['loss'] for r in read_metrics(tmp_path/'cut'/'metrics.csv', 'train')}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert max(abs(a[k] - b[k]) for k in range(4, 9)) <= 1e-6
    va = {int(r['step']): r['rr_mpjpe'] for r in read_metrics(tmp_path/'full'/'metrics.csv', 'val')}
    vb = {int(r['step']): r['rr_mpjpe'] for r in read_metrics(tmp_path/'cut'/'metrics.csv', 'val')}
    assert sorted(va) == [2, 4, 6, 8] and sorted(vb) == [2, 3, 4, 6, 8]   # the cut run validated once more on stopping
    assert max(abs(va[k] - vb[k]) for k in va) <= 1e-6

# ---------------------------------------------------------------- atomic checkpoints

def test_checkpoint_write_killed_halfway_keeps_previous_last(tmp_path, monkeypatch):
    learn = fixture_learner(tmp_path)
    learn.fit(1)
    before = load_checkpoint(tmp_path/'last.pt')
    assert before['step'] == 3
    def dying_save(obj, f, *a, **k):
        f.write(b'\x80\x02' + b'x' * 1000); f.flush()
        raise OSError('killed half-way through the write (simulated)')
    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(OSError, match='half-way'): learn.fit(2, start_epoch=1)
    monkeypatch.undo()
    after = load_checkpoint(tmp_path/'last.pt')                           # still the previous one, complete
    assert after['step'] == 3 and torch.equal(after['model']['0.weight'], before['model']['0.weight'])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['epoch_001.pt', 'last.pt']   # no temp file left

def test_checkpoint_loads_weights_only(tmp_path):
    fixture_learner(tmp_path).fit(1)
    ck = torch.load(tmp_path/'last.pt', weights_only=True)
    assert {'model', 'ema', 'optimizer', 'scheduler', 'scaler', 'rng', 'sampler', 'step', 'epoch', 'best_metric'} <= set(ck)

# ---------------------------------------------------------------- non-finite losses

class Poison(Callback):
    "Make the loss of the given optimiser-step indices (0-based batch count) non-finite, blaming one term."
    order = -6
    def __init__(self, batches, term): self.batches, self.term, self.n = set(batches), term, 0
    def after_loss(self, learn):
        if learn.training and self.n in self.batches:
            learn.loss = learn.loss * float('inf')
            learn.loss_terms = {**learn.loss_terms, 'loss': learn.loss, self.term: torch.tensor(float('nan'))}
        if learn.training: self.n += 1

def test_nonfinite_skipped_counted_and_stops(tmp_path):
    learn = synth_learner(n=16, bs=4)
    learn.fit(2, cbs=[nf := NonFiniteCB(3), Poison({1, 5}, 'mse'), Recorder(1)])
    assert nf.counts == {'mse': 2} and learn.step_count == 6 and not learn.failed
    assert learn.history[-1]['skipped'] == 2
    learn = synth_learner(n=16, bs=4)
    learn.cbs += [NonFiniteCB(3), CheckpointCB(tmp_path, extra_state=lambda: {'config': 'model: {}\n'})]
    for c in learn.cbs: c.learn = learn
    good = {}
    class Snap(Callback):
        order = 95
        def after_step(self, learn): good.update({k: v.clone() for k, v in learn.model.state_dict().items()})
    learn.fit(3, cbs=[Poison({2, 3, 4}, 'mse'), Snap()])
    assert learn.failed and learn.stop_reason.startswith('non-finite mse in 3 batches in a row')
    ck = load_checkpoint(tmp_path/'last.pt')
    assert ck['step'] == 2 and all(torch.equal(ck['model'][k], good[k]) for k in good)   # the last good state

@needs_data
def test_train_nonfinite_diagnosis(tmp_path, monkeypatch):
    from amt_lib.config import load_config
    monkeypatch.setenv('WANDB_MODE', 'disabled')
    from amt_lib.learner.train import train, NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match='non-finite hand_refined in 2 batches in a row'):
        train(load_config('smoke', QUIET + ['training.nan_patience=2', 'training.epochs=3']), tmp_path,
              callbacks=[Poison({2, 3}, 'hand_refined')])
    ck = load_checkpoint(tmp_path/'checkpoints'/'last.pt')
    assert ck['step'] == 2 and ck['nonfinite'] == {'counts': {'hand_refined': 2}, 'in_a_row': 2}

# ---------------------------------------------------------------- SIGTERM

FIXTURE_SCRIPT = textwrap.dedent('''
    import sys, time
    from amt_lib.learner.core import synth_learner, Callback
    from amt_lib.learner.callbacks import StopCB
    from amt_lib.learner.checkpoint import CheckpointCB
    class Slow(Callback):
        def after_step(self, learn):
            print(f'step {learn.step_count}', flush=True); time.sleep(0.2)
    learn = synth_learner(n=64, bs=4)
    learn.fit(1000, cbs=[StopCB(), Slow(), CheckpointCB(sys.argv[1], every_epochs=0, extra_state=lambda: {'config': 'model: {}\\n'})])
    print('stop_reason:', learn.stop_reason, 'step', learn.step_count, flush=True)
''')

def _wait_for(proc, text, timeout=90):
    t0, lines = time.time(), []
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None: break
        lines.append(line)
        if text in line: return lines
    proc.kill(); raise AssertionError(f'{text!r} never printed: {"".join(lines)[-2000:]}')

def test_sigterm_fixture_finishes_step_and_saves(tmp_path):
    p = subprocess.Popen([sys.executable, '-c', FIXTURE_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(p, 'step 3')
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert 'stop_reason: stopped by SIGTERM' in out
    step = int(out.split('stop_reason: stopped by SIGTERM step ')[1].split()[0])
    assert load_checkpoint(tmp_path/'last.pt')['step'] == step >= 3

@needs_data
def test_sigterm_amt_train(tmp_path):
    code = "import sys; from amt_lib.cli import main; sys.exit(main(['train', *sys.argv[1:]]))"
    p = subprocess.Popen([sys.executable, '-c', code, '--preset', 'smoke', '--run-dir', str(tmp_path), *QUIET, 'training.epochs=100'],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    _wait_for(p, '[train] step 2/')
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=90)
    assert p.returncode == 0, out
    assert 'stopped by SIGTERM' in out
    ck = load_checkpoint(tmp_path/'checkpoints'/'last.pt')
    assert ck['step'] >= 2 and f"stopped by SIGTERM at step {ck['step']}" in out

# ---------------------------------------------------------------- DDP

def test_ddp_two_gloo_ranks_match_single_process():
    from amt_lib.learner.distributed import ddp_check
    r = ddp_check(world_size=2, steps=3, bs=4)
    assert r['ranks'] == 0.0                 # identical weights on both ranks
    assert r['single'] < 1e-5                # = one process with the global batch of 8
    assert r['moved'] > 1e-3                 # and training did change them

# ---------------------------------------------------------------- amt train end to end

@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
    if not HAVE_DATA: pytest.skip('amt_lib.data.synthetic / amt_lib.models.amt not built yet')
    from amt_lib.cli import main
    d = tmp_path_factory.mktemp('smoke')/'run'
    t0 = time.time()
    rc = main(['train', '--preset', 'smoke', '--run-dir', str(d)])
    return d, rc, time.time() - t0

def test_amt_train_smoke_leaves_a_complete_run_dir(smoke_run):
    d, rc, seconds = smoke_run
    assert rc == 0 and seconds < 60
    assert (d/'config.yaml').exists() and (d/'commit.txt').exists()
    rows = read_metrics(d/'metrics.csv')
    assert {r['split'] for r in rows} == {'train', 'val'} and all(k in rows[-1] for k in ('rr_mpjpe', 'pa_mpjpe'))
    assert list((d/'tb').glob('events.out.tfevents.*'))
    runs = list((d/'wandb').glob('offline-run-*'))
    assert runs and list(runs[0].glob('*.wandb'))
    assert (d/'plots'/'training.png').read_bytes()[:4] == b'\x89PNG'
    assert {'last.pt', 'best.pt'} <= {p.name for p in (d/'checkpoints').iterdir()}
    ck = load_checkpoint(d/'checkpoints'/'best.pt')
    assert ck['best_metric'] == min(r['rr_mpjpe'] for r in rows if r['split'] == 'val')

def test_resume_with_another_model_config_names_the_keys(smoke_run, capsys):
    from amt_lib.cli import main
    d, _, _ = smoke_run
    rc = main(['train', '--preset', 'smoke', '--resume', str(d/'checkpoints'/'last.pt'), 'model.hidden_dim=32', 'model.num_layers=2'])
    err = capsys.readouterr().err
    assert rc == 2
    assert 'model.hidden_dim: checkpoint 64, config 32' in err and 'model.num_layers: checkpoint 1, config 2' in err

def test_resume_without_preset_uses_checkpoint_config(smoke_run, tmp_path):
    from amt_lib.learner.runs import resume_config
    d, _, _ = smoke_run
    cfg = resume_config(str(d/'checkpoints'/'last.pt'), None, ['training.epochs=2'])
    assert cfg.name == 'smoke' and cfg.training.epochs == 2 and cfg.model.hidden_dim == 64

@needs_data
def test_amt_sweep_offline(tmp_path):
    from amt_lib.cli import main
    rc = main(['sweep', '--preset', 'smoke', '--param', 'training.lr=1e-3,1e-2', '--sweep-dir', str(tmp_path), *QUIET,
                    'logging.wandb=false', 'training.max_steps=2', 'training.eval_every=2'])
    assert rc == 0
    md = (tmp_path/'results.md').read_text()
    assert md.count('| ok |') == 2 and 'best_rr_mpjpe' in md
    assert len(read_metrics(tmp_path/'results.csv')) == 2
