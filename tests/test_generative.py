"Learning test of the generative back ends: a tiny token-mode DiT learns a conditional bimodal 2-D distribution."
import time
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
    torch.set_num_threads(2)
    t0 = time.time()
    if backend == 'flow_matching':
        fresh, model = train(FlowMatchingProcess(path='condot', solver='euler', steps=20), steps=600)
        samplers = [FlowMatchingProcess(solver='euler', steps=20), FlowMatchingProcess(solver='midpoint', steps=10)]
    else:
        fresh, model = train(DiffusionProcess(scheduler='ddim', steps=50), steps=1500)
        samplers = [DiffusionProcess(scheduler='ddim', steps=50, eta=0.), DiffusionProcess(scheduler='ddpm', steps=50)]
    for proc in samplers:
        check(measure(fresh, proc), measure(model, proc))
    assert time.time() - t0 < 60
