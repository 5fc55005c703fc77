"""The main job learns (issue 15): a short run of the cpu-demo model on cached SynthHOI beats the mean-pose baseline by a
stated margin and keeps its predictions spread out (spread ratio above the mode-collapse alarm's threshold), with the
guards on. Budget: 60 s on 2 CPU cores, rendering the 1,088 samples into the device cache included: 54-63 s measured
in `.ci/test` (one torch thread, beside the other test worker); 123-129 s with the earlier 280 steps of 32."""
import os
import pytest
import torch
from amt_lib.config import load_config
from amt_lib.learner.train import train
from amt_lib.learner.reporting import read_metrics
from amt_lib.inference import Predictor
from amt_lib.metrics import COLLAPSE_RATIO
from amt_lib.pipeline import evaluation_data
from amt_lib.metrics import hand_summary

STEPS = 200    # of 16 samples (the cpu-demo batch): 3,200 samples
MARGIN = 0.75  # rr-MPJPE must be <= MARGIN x the mean-pose baseline; measured 2026-12-01, one thread: 57.8 vs 86.5 mm (0.67);
               # 280 steps of 32: 48.9 (0.57); 0.82 with the cpu-demo model before issue 17

OVERRIDES = ['data.train_size=1024', 'data.val_size=64', 'training.batch_size=16', f'training.max_steps={STEPS}',
             'training.epochs=20', 'training.eval_every=0', 'training.log_every=50', 'training.warmup_steps=20',
             f'training.T_0={STEPS}', 'training.ema_warmup=20', 'logging.tensorboard=false', 'logging.plots=false',
             'logging.progress=plain']


def test_cpu_demo_beats_mean_pose_and_does_not_collapse(tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'disabled')
    cfg = load_config('cpu-demo', OVERRIDES)
    assert cfg.training.guards
    rd = train(cfg, tmp_path/'run')
    rows = read_metrics(rd/'metrics.csv')
    train_rows = [r for r in rows if r['split'] == 'train']
    assert train_rows and all('guard/spread_ratio' in r and 'guard/dead_params' in r for r in train_rows)   # guards ran
    assert train_rows[-1]['guard/dead_params'] == 0                                  # every parameter trained
    mean_hand, val_dl, _ = evaluation_data(cfg)                                      # the stage summaries' data: the run's cache
    model = Predictor.from_checkpoint(rd/'checkpoints'/'last.pt', device='cpu', precision='fp32').model
    s = hand_summary(model, val_dl, mean_hand)
    print({k: s[k] for k in ('rr_mpjpe', 'mean_pose_rr_mpjpe', 'spread_ratio')}, s['diversity']['verdict'])
    assert s['rr_mpjpe'] <= MARGIN * s['mean_pose_rr_mpjpe'], (s['rr_mpjpe'], s['mean_pose_rr_mpjpe'])
    assert s['spread_ratio'] > COLLAPSE_RATIO and s['diversity']['rows']['hand_pose']['verdict'] != 'collapsed'
    val = [r for r in rows if r['split'] == 'val'][-1]
    assert abs(val['spread_ratio'] - s['spread_ratio']) < 1e-6 and 'add_auc' in val   # validation reports the same numbers
