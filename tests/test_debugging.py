"""The debugging tools on the real smoke AMT and SynthHOI data, and inside the real Learner."""
import io, os, subprocess, sys, types
import pytest
import torch
from torch.utils.data import DataLoader

from amt_lib.config import load_config
from amt_lib.debugging import (analyze_model, prediction_diversity, find_dead_units, attention_maps, cls_attention,
                               nan_anomaly, NonFiniteError, ModeCollapseAlarm, GradientMonitor, COLLAPSE_RATIO,
                               is_headless, sample_browser, run_model, AMT_SPREADS)

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def cfg():
    return load_config('smoke', ['data.val_size=16'])


@pytest.fixture(scope='module')
def model(cfg):
    from amt_lib.models.amt import build_model
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.fixture(scope='module')
def loader(cfg):
    from amt_lib.data.loaders import build_dataset
    ds = build_dataset(cfg, 'val')
    return list(DataLoader(ds, batch_size=4, shuffle=False))


class Constant(torch.nn.Module):
    "The AMT's first prediction repeated for every image: a collapsed model with the real output format."
    def __init__(self, model): super().__init__(); self.model, self.first = model, None
    def forward(self, image, K):
        out = self.model(image, K)
        if self.first is None: self.first = {k: v[:1] for k, v in out.items()}
        return {k: self.first[k].expand_as(v) if v.ndim and v.shape[0] == image.shape[0] else v for k, v in out.items()}


class Oracle(torch.nn.Module):
    "Predicts the ground truth of each image plus 1 mm noise: what a well-trained model looks like to the spread test."
    def __init__(self, loader):
        super().__init__()
        self.table = {}
        for b in loader:
            for i in range(len(b['image'])):
                self.table[float(b['image'][i].sum())] = {k: b[k][i] for k in ('hand_joints_3d', 'mano_pose', 'obj_pose', 'contact')}
    def forward(self, image, K):
        rows = [self.table[float(im.sum())] for im in image]
        j = torch.stack([r['hand_joints_3d'] for r in rows])
        return {'pred_hand_joints': j + 0.001 * torch.randn_like(j), 'pred_mano_pose': torch.stack([r['mano_pose'] for r in rows]),
                'pred_obj_pos': torch.stack([r['obj_pose'][..., :3, 3] for r in rows]),
                'pred_contact_prob': torch.stack([r['contact'] for r in rows])}


def test_diversity_collapsed_vs_healthy(model, loader):
    r = prediction_diversity(Constant(model), loader)
    assert r.verdict == 'collapsed' and r.rows['hand_pose']['pred_std'] < 1e-6, r
    r = prediction_diversity(Oracle(loader), loader)
    assert r.verdict == 'healthy', r
    assert 0.8 < r.rows['hand_pose']['ratio'] < 1.5


def test_diversity_trained_model_healthy(cfg, loader):
    """A fresh smoke AMT predicts nearly the same hand for every image (collapsed); fitted to a batch of SynthHOI hands
    it spreads its predictions like the data (healthy) within at most 100 steps (checked every 10)."""
    from amt_lib.models.amt import build_model
    torch.manual_seed(1)
    m = build_model(cfg)
    few, watch = loader[:1], {k: AMT_SPREADS[k] for k in ('hand_pose', 'hand_root')}
    before = prediction_diversity(m, few, spreads=watch)
    assert before.verdict == 'collapsed', before
    opt = torch.optim.AdamW(m.parameters(), 3e-3)
    rel = lambda j: j - j[:, :1]
    b, ratios = few[0], []
    for step in range(100):
        m.train()
        out = m(b['image'], b['K'])
        loss = (rel(out['pred_hand_joints']) - rel(b['hand_joints_3d'])).abs().mean() + \
               (out['pred_hand_joints'][:, 0] - b['hand_joints_3d'][:, 0]).abs().mean()
        opt.zero_grad(); loss.backward(); opt.step()
        if step % 10 == 9:
            r = prediction_diversity(m, few, spreads=watch)
            ratios.append(round(r.rows['hand_pose']['ratio'], 3))
            if r.verdict == 'healthy': break
    print(f'hand_pose spread ratio before {before.rows["hand_pose"]["ratio"]:.3f}, every 10 steps: {ratios}')
    assert r.verdict == 'healthy', r


def test_analyze_model_amt(cfg, model, loader):
    from amt_lib.losses import AMTLoss
    loss = AMTLoss(cfg)
    rep = analyze_model(model, loader[0], loss_fn=lambda out, b: loss(out, b, model=model))
    assert set(model.components) <= set(rep.grad_norms)
    assert rep.grad_norms['backbone'] > 0 and rep.grad_norms['hand_encoder'] > 0
    assert len(rep.layers) > 20 and all(0 <= r['near_zero'] <= 1 for r in rep.layers)
    assert all(p.grad is None for p in model.parameters())
    print(rep); print('params without grad:', rep.no_grad[:10])


def test_attention_and_dead_units_amt(model, loader):
    b = loader[0]
    maps = attention_maps(model, b['image'][:2], b['K'][:2])
    nl, nh = model.components['backbone'].dinov2.config.num_hidden_layers, model.components['backbone'].dinov2.config.num_attention_heads
    assert sorted(maps) == list(range(nl)) and maps[0].shape == (2, nh, 257, 257)
    assert cls_attention(maps).shape == (nl, 2, nh, 16, 16)
    d = find_dead_units(model, loader[:2])
    assert d.layers and all(0 <= r['share'] <= 1 for r in d.layers.values())


def test_nan_anomaly_names_module(model, loader):
    b = loader[0]
    img = b['image'][:2].clone(); img[0, 0, 0, 0] = float('nan')
    with pytest.raises(NonFiniteError, match='non-finite output from module'):
        with nan_anomaly(model, backward=False), torch.no_grad(): model(img, b['K'][:2])
    with nan_anomaly(model, backward=False), torch.no_grad(): model(b['image'][:2], b['K'][:2])


def test_alarm_and_monitor_in_learner(cfg, loader):
    "The alarm and the gradient monitor as callbacks of amt_lib's Learner: a model that ignores its input collapses."
    from amt_lib.learner.core import Learner
    class Mean(torch.nn.Module):        # ignores the image: its hand is the same for every sample
        def __init__(self): super().__init__(); self.j = torch.nn.Parameter(torch.zeros(21, 3))
        def forward(self, image, K): return {'pred_hand_joints': self.j.expand(image.shape[0], 21, 3) + 0 * image.mean()}
    buf = io.StringIO()
    alarm, gm = ModeCollapseAlarm(window=3, file=buf, plot=False), GradientMonitor(warn=False)
    m = Mean()
    loss = lambda out, b: (out['pred_hand_joints'] - b['hand_joints_3d']).pow(2).mean()
    learn = Learner(m, (loader, None), loss, lr=1e-2, cbs=[alarm, gm], predict_func=lambda model, b: run_model(model, b))
    learn.fit(1)
    assert len(alarm.alarms) == 1 and 'mode-collapse alarm' in buf.getvalue()
    assert len(gm.history) == len(loader) and gm.history[-1][1]['model'] > 0


def test_headless_skips_browser(loader):
    assert is_headless()
    assert sample_browser(loader[0]['image'], interactive=None) is None
    r = subprocess.run([sys.executable, '-c', 'from amt_lib.debugging import is_headless; print(is_headless())'],
                       capture_output=True, text=True, env={**os.environ, 'AMT_HEADLESS': '0'})
    assert r.stdout.strip() == 'False'   # the override wins
