"""The video stage (amt_lib.learner.video) on toy clips: a short run, a resumed run that ends where an uninterrupted
one ends, the uncached path, and the measures of the trained model."""
import math
import pytest
import torch
from torch.utils.data import DataLoader
from amt_lib.config import load_config, apply_overrides, config_to_yaml
from amt_lib.models.amt import build_model
from amt_lib.learner.checkpoint import save_checkpoint, load_checkpoint
from amt_lib.learner.video import ToyClips, train_video, load_video_model, video_measures, video_table

T, H, S = 4, 2, 56   # frames per clip, forecast horizon, image side (4x4 patches of the smoke backbone: fast)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp('video')
    cfg = load_config('smoke', [f'data.image_size={S}'])
    torch.manual_seed(0)
    amt = build_model(cfg, pretrained=False)
    save_checkpoint(dict(model=amt.state_dict(), config=config_to_yaml(cfg), commit='x', step=0), d/'amt.pt')
    return cfg, d


def run(setup, name, steps, resume=False, cache=True):
    cfg, d = setup
    c = apply_overrides(cfg, {'training.max_steps': steps, 'training.epochs': 4, 'video.batch_size': 2,
                              'training.eval_every': 2, 'logging.tensorboard': False, 'logging.progress': 'plain',
                              'temporal.cache_features': cache})
    clips = lambda n, seed: DataLoader(ToyClips(n, T, H, S, seed), batch_size=2)
    return train_video(c, d/'amt.pt', d/name, clips(6, 0), clips(2, 1), resume=resume)


def test_resume_ends_where_an_uninterrupted_run_ends(setup):
    full = run(setup, 'full', 6)
    assert full.name == 'final_weights.pt' and (full.parent/'checkpoints'/'best.pt').exists()
    run(setup, 'half', 4)                                  # stops after batch 1 of epoch 1 (3 batches an epoch)
    assert load_checkpoint(setup[1]/'half'/'checkpoints'/'last.pt')['sampler']['iter'] == 1
    run(setup, 'half', 6, resume=True)                     # continues mid-epoch
    a, b = (load_checkpoint(setup[1]/n/'checkpoints'/'last.pt') for n in ('full', 'half'))
    assert a['step'] == b['step'] == 6
    assert all(torch.allclose(a['model'][k], b['model'][k], atol=1e-6) for k in a['model'])
    rows = (setup[1]/'half'/'metrics.csv').read_text().splitlines()
    assert len(rows) > 3


def test_uncached_run_trains_the_temporal_model_only(setup):
    f = run(setup, 'uncached', 2, cache=False)
    vm = load_video_model(f)
    amt0 = load_checkpoint(setup[1]/'amt.pt')['model']
    assert all(torch.equal(v, amt0[k]) for k, v in vm.amt.state_dict().items())   # the AMT stayed frozen
    assert vm.temporal.hand.weight.abs().sum() > 0                                   # the zero-initialised head moved


def test_measures_of_the_trained_model(setup):
    vm = load_video_model(setup[1]/'full'/'final_weights.pt')
    m = video_measures(vm, DataLoader(ToyClips(3, T, H, S, 2), batch_size=2))
    assert (m['clips'], m['frames'], m['occluded_frames'], m['horizon']) == (3, 12, 6, H)
    for who in ('temporal', 'single'):
        assert all(math.isfinite(m[who][k]) for k in ('rr_mpjpe', 'rr_mpjpe_occluded', 'accel_error', 'jitter'))
    assert m['temporal']['rr_mpjpe'] != m['single']['rr_mpjpe']                      # refined, not passed through
    assert 0 <= m['phase_accuracy'] <= 1 and len(m['forecast_wrist']['model']) == H
    assert 'const. velocity (labels)' in video_table(m)
