"Learning test of the generative back ends: a tiny token-mode DiT learns a conditional bimodal 2-D distribution."
import os
import pytest
import torch
import torch.nn.functional as F
from amt_lib.models.dit import DiT
from amt_lib.models.generative import DiffusionProcess, FlowMatchingProcess

# context c in {0, 1} -> two modes (a point in 2-D: two tokens of width 1); the other context's modes are the
# first context's mirrored, so a model that ignores the context puts half of its samples 1.6 away from a right mode
MODES = torch.tensor([[[1., 1.], [-1., -1.]], [[1., -1.], [-1., 1.]]]) * 0.8   # (context, mode, xy)
MODE_STD = 0.05
NEAR = 0.3   # a sample within this of one of its context's modes hits that mode
THREADS = int(os.environ.get('OMP_NUM_THREADS') or 2)   # .ci/test: 1 in each of its two pytest workers


def toy_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    "n points (n,2,1) of the toy distribution and their one-hot contexts (n,2)."
    c, k = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    x = MODES[c, k] + MODE_STD * torch.randn(n, 2, generator=g)
    return x[..., None], F.one_hot(c, 2).float()


def measure(model, proc, n: int = 256) -> dict:
    "Per context: median nearest-mode error, share of samples near a right mode, share of those at mode 0."
    out = {}
    for c in (0, 1):
        ctx = F.one_hot(torch.full((n,), c), 2).float()
        s = proc.sample(lambda x, t: model(x, t, ctx), (n, 2, 1), generator=torch.Generator().manual_seed(c))[..., 0]
        assert s.shape == (n, 2) and s.isfinite().all()
        err, k = torch.cdist(s, MODES[c]).min(1)                 # (n,) distance to the nearest right mode, its index
        near = err < NEAR
        out[c] = dict(median=err.median().item(), near=near.float().mean().item(),
                      mode0=(k[near] == 0).float().mean().item() if near.any() else 0.)
    return out


def train(proc, steps: int, seed: int = 0) -> tuple[DiT, DiT]:
    "A fresh tiny DiT and its trained copy (AdamW, linear decay, clipping 1.0) on the toy distribution."
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DiT(in_channels=1, dim=32, depth=2, num_heads=4, num_tokens=2, context_dim=2)
    fresh = DiT(in_channels=1, dim=32, depth=2, num_heads=4, num_tokens=2, context_dim=2)
    fresh.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    for _ in range(steps):
        x1, c = toy_batch(128, g)
        x_t, t, target = proc.training_example(x1, g)
        loss = proc.loss(model(x_t, proc.timestep_input(t), c), target)
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
    return fresh.eval(), model.eval()


def check(before: dict, after: dict):
    for c in (0, 1):
        a, b = after[c], before[c]
        assert a['median'] < 0.1, (c, a)                  # close to a right mode (the modes' own spread: ~0.06)
        assert a['near'] > 0.8, (c, a)                    # most samples at a right mode (ignoring c: <= 0.5)
        assert 0.25 < a['mode0'] < 0.75, (c, a)           # both modes hit, about equally
        assert b['near'] < 0.3 and b['median'] > 0.4, (c, b)   # the untrained model is far from this


@pytest.mark.parametrize('backend', ['flow_matching', 'diffusion'])
def test_dit_learns_bimodal(backend):
    torch.set_num_threads(THREADS)
    if backend == 'flow_matching':
        fresh, model = train(FlowMatchingProcess(path='condot', solver='euler', steps=20), steps=600)
        samplers = [FlowMatchingProcess(solver='euler', steps=20), FlowMatchingProcess(solver='midpoint', steps=10)]
    else:
        fresh, model = train(DiffusionProcess(scheduler='ddim', steps=50), steps=1500)
        samplers = [DiffusionProcess(scheduler='ddim', steps=50, eta=0.), DiffusionProcess(scheduler='ddpm', steps=50)]
    for proc in samplers:
        check(measure(fresh, proc), measure(model, proc))


# --- stage 4: the pose-hypothesis head trained in the pipeline on a frozen AMT, its measures, amt predict --samples ---
import contextlib, io, json
from pathlib import Path
import numpy as np
from PIL import Image
from amt_lib.config import load_config, config_to_yaml
from amt_lib.learner.checkpoint import save_checkpoint, load_checkpoint
from amt_lib.learner.generative import HYPOTHESIS_COUNTS
from amt_lib.learner.runs import load_pose_head
from amt_lib.learner.generative import load_mask_head
from amt_lib.models.amt import build_model
from amt_lib.models.generative import ODE_SOLVERS, DIFFUSION_SCHEDULERS
from amt_lib.pipeline import run_stage
from amt_lib.cli import main


def stage3_weights(run: Path) -> Path:
    "A smoke AMT weights file where stage 3 leaves it (<run>/stage3/final_weights.pt)."
    cfg = load_config('smoke')
    torch.manual_seed(0)
    m = build_model(cfg, pretrained=False)
    return save_checkpoint(dict(model=m.state_dict(), config=config_to_yaml(cfg), commit='test', step=0),
                           run/'stage3'/'final_weights.pt')


@pytest.fixture(scope='module', params=['flow_matching', 'diffusion'])
def stage4(request, tmp_path_factory):
    "Stage 4 of the smoke preset (its recipe: 1 epoch of 4 steps) after a stage 3, with each back end."
    torch.set_num_threads(THREADS)
    run = tmp_path_factory.mktemp(request.param)/'pipe'
    amt = stage3_weights(run)
    s = run_stage(4, 'smoke', [f'generative.backend={request.param}'], run, headless=True)
    return run, amt, s


def test_stage4_trains_the_head_alone_and_writes_its_measures(stage4):
    run, amt, s = stage4
    g = run/'generative'
    for f in ('summary.json', 'final_weights.pt', 'metrics.csv', 'config.yaml', 'checkpoints/best.pt',
              'checkpoints/last.pt'):
        assert (g/f).exists(), f
    assert json.loads((g/'summary.json').read_text()) == s and s['stage'] == 4 and s['steps'] == 4
    for n in HYPOTHESIS_COUNTS:
        for k in (f'best_of_{n}_rr_mpjpe', f'mean_of_{n}_rr_mpjpe'): assert 0 < s[k] < 1e4, (k, s[k])
    assert s['best_of_16_rr_mpjpe'] <= s['best_of_5_rr_mpjpe'] <= s['best_of_1_rr_mpjpe']
    assert s['deterministic_rr_mpjpe'] > 0 and 0 < s['n_frames'] <= 8 and -1 <= s['spread_spearman'] <= 1
    names = ODE_SOLVERS if s['backend'] == 'flow_matching' else DIFFUSION_SCHEDULERS
    assert [t['solver'] for t in s['sampling']] == list(names)
    assert all(t['ms_per_image'] > 0 and t['evaluations'] > 0 and t['finite'] for t in s['sampling'])
    # the AMT is frozen: its weights in the stage-4 file are stage 3's, bit for bit; the head trained (lr > 0)
    a, w = load_checkpoint(amt)['model'], load_checkpoint(g/'final_weights.pt')
    assert w['model'].keys() == a.keys() and all(torch.equal(w['model'][k], a[k]) for k in a)
    stepped = load_checkpoint(g/'checkpoints'/'last.pt')['optimizer']['state']
    assert stepped and load_pose_head(g/'final_weights.pt').process.backend == s['backend']


def test_stage4_trains_the_mask_dit_and_writes_its_measures(stage4):
    run, amt, s = stage4
    g, m = run/'generative', s['masks']
    for f in ('metrics.csv', 'config.yaml', 'checkpoints/best.pt', 'checkpoints/last.pt'): assert (g/'mask'/f).exists(), f
    assert m['steps'] == 4 and m['size'] == 16 and m['context'] == 'crop' and 0 < m['n_frames'] <= 8
    assert m['hand_frames'] > 0 and m['backend'] == s['backend']
    for n in HYPOTHESIS_COUNTS:
        assert 0 <= m[f'hand_mean_of_{n}_iou'] <= 1 and 0 <= m[f'hand_best_of_{n}_iou'] <= 1
    assert m['hand_best_of_1_iou'] <= m['hand_best_of_5_iou'] <= m['hand_best_of_16_iou']
    names = ODE_SOLVERS if s['backend'] == 'flow_matching' else DIFFUSION_SCHEDULERS
    assert [t['solver'] for t in m['sampling']] == list(names)
    assert all(t['ms_per_image'] > 0 and t['evaluations'] > 0 and t['finite'] for t in m['sampling'])
    w = load_checkpoint(g/'final_weights.pt')
    assert w['trained'] == ['pose_head', 'mask_head'] and load_mask_head(g/'final_weights.pt').head.process.backend == s['backend']
    # the MaskDiT trained (its weights moved), the pose head is the pose run's
    first = load_checkpoint(g/'mask'/'checkpoints'/'last.pt')['optimizer']['state']
    assert first and all(torch.equal(v, load_pose_head(g/'final_weights.pt').state_dict()[k]) for k, v in w['pose_head'].items())


def test_stage4_logs_sample_figures_to_tensorboard(stage4):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, _, _ = stage4
    for d in (run/'generative'/'tb', run/'generative'/'mask'/'tb'):       # pose hypotheses, then mask samples
        ea = EventAccumulator(str(d), size_guidance={'images': 0}).Reload()
        assert 'val/samples' in ea.Tags()['images'], (d, ea.Tags())
        assert len(ea.Images('val/samples')) >= 1


def test_stage4_resume_keeps_a_finished_run(stage4, capsys):
    run, _, s = stage4
    again = run_stage(4, 'smoke', [f"generative.backend={s['backend']}"], run, headless=True, resume=True)
    assert 'finished, kept' in capsys.readouterr().out and again['steps'] == s['steps']
    assert again['best_of_16_rr_mpjpe'] == s['best_of_16_rr_mpjpe']       # same weights, same noise: same numbers


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_predict_samples_writes_the_hypotheses(stage4, tmp_path):
    run, amt, s = stage4
    Image.fromarray((np.random.default_rng(0).random((240, 320, 3)) * 255).astype(np.uint8)).save(tmp_path/'a.png')
    ck = run/'generative'/'final_weights.pt'
    rc, out, err = run_cli(['predict', str(tmp_path/'a.png'), '--ckpt', str(ck), '--device', 'cpu', '--samples', '16',
                            '--out', str(tmp_path/'o')])
    assert rc == 0, err
    r = json.loads((tmp_path/'o'/'a.json').read_text())
    h = np.array(r['hand']['hypotheses_mm'])
    assert h.shape == (16, 21, 3) and np.isfinite(h).all() and '16 hand hypotheses' in out
    assert h.std(0).mean() > 0                                               # 16 different hands, not one copied
    mk = r['masks']                                                          # the weights hold a MaskDiT: its masks too
    assert set(mk['files']) == {'hand', 'object'} and mk['size'] == 16 and 'masks (hand, object)' in out
    for f in mk['files'].values():
        a = np.array(Image.open(f))
        assert a.shape == (16, 16) and a.dtype == np.uint8 and Path(f).parent == tmp_path/'o'
    assert all(0 <= v <= 1 for v in mk['area_share'].values())
    rc, _, err = run_cli(['predict', str(tmp_path/'a.png'), '--ckpt', str(amt), '--device', 'cpu', '--samples', '4',
                          '--out', str(tmp_path/'p')])
    assert rc != 0 and 'no trained pose head' in err and 'generative/final_weights.pt' in err


# --- masks: a tiny MaskDiT learns to copy a square from its context, with each back end ---
from amt_lib.models.generative import MaskDiT
from amt_lib.metrics import mask_iou


def square_batch(n: int, g: torch.Generator, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    "Images (n,3,size,size): a red square (the 'hand') left, a blue one (the 'object') right; masks (n,2,size,size)."
    r = torch.arange(size)
    def square(x0: int, x1: int) -> torch.Tensor:                          # (n,size,size) squares of side 3..6
        w = torch.randint(3, 7, (n, 1), generator=g)
        x = x0 + (torch.rand(n, 1, generator=g) * (x1 - x0 - w)).long()
        y = (torch.rand(n, 1, generator=g) * (size - w)).long()
        return (((r >= y) & (r < y + w))[:, :, None] & ((r >= x) & (r < x + w))[:, None, :]).float()
    masks = torch.stack([square(0, size // 2), square(size // 2, size)], 1)   # (n,2,size,size)
    img = torch.rand(n, 3, size, size, generator=g) * 0.2
    img[:, 0] += masks[:, 0] * 0.8; img[:, 2] += masks[:, 1] * 0.8        # a red hand, a blue object
    return img, masks


@pytest.mark.parametrize('backend', ['flow_matching', 'diffusion'])
def test_mask_dit_learns_masks_from_its_context(backend):
    torch.set_num_threads(THREADS); torch.manual_seed(0)
    proc = (FlowMatchingProcess(path='condot', solver='euler', steps=10) if backend == 'flow_matching'
            else DiffusionProcess(scheduler='ddim', steps=20, prediction_type='sample'))   # generative.mask.prediction_type
    md = MaskDiT(process=proc, size=16, patch_size=4, dim=32, depth=2, num_heads=4)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(md.parameters(), lr=3e-3, weight_decay=0.)
    steps = 200
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    img, masks = square_batch(32, torch.Generator().manual_seed(1))
    before = md.eval().sample(img, 4, generator=torch.Generator().manual_seed(0)).mean(1)   # (32,2,16,16)
    md.train()
    for _ in range(steps):
        x, m = square_batch(32, g)
        loss = md.loss(m, x, g)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(md.parameters(), 1.0); opt.step(); sched.step()
    after = md.eval().sample(img, 4, generator=torch.Generator().manual_seed(0)).mean(1)
    iou = lambda p: mask_iou(p > 0.5, masks > 0.5).nanmean(0)                  # (2,) hand, object
    assert (iou(after) > 0.8).all(), (backend, iou(after), iou(before))
    assert (iou(before) < 0.3).all(), iou(before)
