"The AMT loss as a whole: masks, matching invariances, schedules, the kl hook, optimisation sanity."
import math
import pytest
import torch
import torch.nn.functional as F
from amt_lib.config import load_config
from amt_lib.geometry import axis_angle_to_matrix, matrix_to_quat
from amt_lib.losses import AMTLoss, LOSS_TERMS, DATA_TERMS, loss_weights, match_objects

torch.set_num_threads(1)


def fake_batch(B=3, M=10, n_obj=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = axis_angle_to_matrix(torch.randn(B, M, 3, generator=g))
    t = torch.randn(B, M, 3, generator=g) * 0.1 + torch.tensor([0., 0., 0.6])
    ov = torch.zeros(B, M, dtype=torch.bool); ov[:, :n_obj] = True
    return dict(
        image=torch.rand(B, 3, 224, 224, generator=g), K=torch.eye(3).expand(B, 3, 3).clone(),
        hand_joints_3d=torch.randn(B, 21, 3, generator=g) * 0.03 + torch.tensor([0., 0., 0.5]),
        hand_joints_2d=torch.rand(B, 21, 2, generator=g) * 224, hand_valid=torch.ones(B, dtype=torch.bool),
        mano_pose=torch.randn(B, 48, generator=g) * 0.3, mano_betas=torch.randn(B, 10, generator=g),
        mano_trans=torch.randn(B, 3, generator=g) * 0.1,
        obj_pose=torch.cat([R, t[..., None]], -1) * ov[..., None, None], obj_valid=ov,
        obj_class=torch.where(ov, torch.randint(1, 22, (B, M), generator=g), 0),
        contact=(torch.rand(B, M, generator=g) > 0.5).float() * ov,
        meta=dict(subject=['s'] * B, sequence=['q'] * B, serial=['c'] * B, frame=torch.arange(B) * 2,
                  index=torch.arange(B)))


def fake_outputs(B=3, Q=10, C=22, seed=1, grad=True):
    g = torch.Generator().manual_seed(seed)
    def r(*s, sc=1.):
        return (torch.randn(*s, generator=g) * sc).requires_grad_(grad)
    return dict(
        pred_hand_joints=r(B, 21, 3, sc=.03), pred_hand_joints_coarse=r(B, 21, 3, sc=.03),
        pred_hand_conf=torch.rand(B, 21, generator=g).requires_grad_(grad), pred_hand_joints_2d=r(B, 21, 2, sc=100.),
        pred_mano_pose=r(B, 48, sc=.3), pred_mano_betas=r(B, 10), pred_mano_trans=r(B, 3, sc=.1),
        pred_hand_verts=r(B, 778, 3, sc=.05), pred_obj_pos_coarse=r(B, Q, 3, sc=.1), pred_obj_pos=r(B, Q, 3, sc=.1),
        pred_obj_rot=F.normalize(torch.randn(B, Q, 4, generator=g), dim=-1).requires_grad_(grad),
        pred_obj_logits=r(B, Q, C), pred_contact_points=r(B, Q, 3, sc=.1), pred_contact_logits=r(B, Q),
        pred_contact_prob=torch.rand(B, Q, generator=g), pred_hand_heatmaps=r(B, 21, 16, 16))


@pytest.fixture(scope='module')
def cfg():
    return load_config('smoke')


def test_all_terms_and_total(cfg):
    out, batch = fake_outputs(), fake_batch()
    res = AMTLoss(cfg)(out, batch)
    for k in LOSS_TERMS:
        assert res[k].dim() == 0 and not res[k].requires_grad and torch.isfinite(res[k]), k
    w = loss_weights(cfg, 0)
    assert torch.allclose(res['loss'], sum(w[k] * res[k] for k in LOSS_TERMS), atol=1e-5)
    res['loss'].backward()
    for k, v in out.items():
        if v.requires_grad:
            assert v.grad is not None and torch.isfinite(v.grad).all(), k
    # every output that a loss term reads is trained: the confidence and the contact points too (issue 15)
    assert out['pred_hand_conf'].grad.abs().sum() > 0 and out['pred_contact_points'].grad.abs().sum() > 0


def test_invalid_hands_nan_predictions_are_ignored(cfg):
    crit = AMTLoss(cfg)
    batch = fake_batch(); batch['hand_valid'][0] = False
    batch['obj_class'][:, 0] = 1                       # a large can (inscribed radius 5 cm) ...
    a, b = fake_outputs(), fake_outputs()
    with torch.no_grad():
        for o in (a, b):                               # ... with every hand's vertices close to its centre
            o['pred_hand_verts'] += batch['obj_pose'][:, None, 0, :, 3]
        for k in ('pred_hand_joints', 'pred_hand_joints_coarse', 'pred_hand_joints_2d', 'pred_mano_pose',
                  'pred_mano_betas', 'pred_hand_verts', 'pred_hand_heatmaps'):
            b[k][0] = float('nan')
    ra, rb = crit(a, batch), crit(b, batch)
    for k in LOSS_TERMS:
        assert torch.allclose(ra[k], rb[k]), k
    rb['loss'].backward()
    for k in ('pred_hand_joints', 'pred_hand_joints_coarse', 'pred_hand_joints_2d', 'pred_mano_pose', 'pred_hand_verts',
              'pred_hand_heatmaps'):
        assert torch.equal(b[k].grad[0], torch.zeros_like(b[k].grad[0])), k
        assert b[k].grad[1:].abs().sum() > 0, k


def test_nothing_to_supervise_is_finite(cfg):
    batch = fake_batch(n_obj=0); batch['hand_valid'][:] = False
    out = fake_outputs()
    res = AMTLoss(cfg)(out, batch)
    for k in LOSS_TERMS:
        if k != 'object_class':   # all slots are taught "no object", so that one is not 0
            assert res[k].item() == 0., k
    assert torch.isfinite(res['loss'])
    res['loss'].backward()
    assert torch.equal(out['pred_hand_joints'].grad, torch.zeros_like(out['pred_hand_joints']))


def test_padded_objects_are_ignored(cfg):
    crit = AMTLoss(cfg)
    b1 = fake_batch()
    b2 = {**b1, 'obj_pose': b1['obj_pose'].clone(), 'obj_class': b1['obj_class'].clone(), 'contact': b1['contact'].clone()}
    b2['obj_pose'][:, 3:] = torch.randn_like(b2['obj_pose'][:, 3:]); b2['obj_class'][:, 3:] = 5; b2['contact'][:, 3:] = 1
    out = fake_outputs()
    r1, r2 = crit(out, b1), crit(out, b2)
    for k in LOSS_TERMS:
        assert torch.allclose(r1[k], r2[k]), k


def test_matching_invariances(cfg):
    crit = AMTLoss(cfg)
    batch, out = fake_batch(), fake_outputs(grad=False)
    r0 = crit(out, batch)
    # permuting the prediction slots changes nothing (set prediction)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    slot_keys = [k for k in out if k.startswith('pred_obj') or k.startswith('pred_contact')]
    r1 = crit({**out, **{k: out[k][:, perm] for k in slot_keys}}, batch)
    # permuting the labelled objects (valid ones first or not) changes nothing either
    lperm = torch.tensor([2, 0, 1, 3, 4, 5, 6, 7, 8, 9])
    r2 = crit(out, {**batch, **{k: batch[k][:, lperm] for k in ('obj_pose', 'obj_valid', 'obj_class', 'contact')}})
    # q and -q are one rotation
    r3 = crit({**out, 'pred_obj_rot': -out['pred_obj_rot']}, batch)
    for r in (r1, r2, r3):
        for k in LOSS_TERMS:
            assert torch.allclose(r0[k], r[k], atol=1e-6), k


def test_matching_finds_the_right_slots():
    B, Q, C = 1, 10, 22
    gt_class = torch.tensor([[4, 9, 0]]); gv = gt_class > 0
    gt_pos = torch.tensor([[[0., 0., .5], [.1, 0., .5], [0., 0., 0.]]])
    logits = torch.zeros(B, Q, C); logits[0, 6, 9] = logits[0, 2, 4] = 6.
    pos = torch.zeros(B, Q, 3) + 1.; pos[0, 6] = gt_pos[0, 1]; pos[0, 2] = gt_pos[0, 0]
    m = match_objects(logits, pos, gt_class, gt_pos, gv)
    assert m[0, 6] == 1 and m[0, 2] == 0 and (m >= 0).sum() == 2


def test_schedules(cfg):
    from amt_lib.stages import stage_config
    h200 = stage_config(load_config('h200'), 2)             # the h200 recipe's diversity schedule is stage 2's: 0.1, then 0.05 from epoch 20
    crit = AMTLoss(h200)
    out, batch = fake_outputs(grad=False), fake_batch()
    assert crit(out, batch, epoch=0)['w_diversity'].item() == pytest.approx(0.1)
    assert crit(out, batch, epoch=25)['w_diversity'].item() == pytest.approx(0.05)
    c = load_config('smoke', ['loss.schedules.contact.0=0.', 'loss.schedules.contact.3=2.'])
    assert [loss_weights(c, e)['contact'] for e in (0, 2, 3, 9)] == [0., 0., 2., 2.]
    with pytest.raises(ValueError, match='contactt'):
        AMTLoss(load_config('smoke', ['loss.schedules.contactt.0=1.']))


def test_kl_is_the_models_sigma_reparam_regulariser(cfg):
    "The kl term is amt_lib.models.sigma_reparam's regulariser of the model passed, with its gradient."
    from amt_lib.models.sigma_reparam import apply_sigma_reparam, sigma_reparam_layers, sigma_reparam_regularizer
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)); apply_sigma_reparam(model)
    g = sigma_reparam_layers(model)[1].gamma
    with torch.no_grad(): g.mul_(2.)
    res = AMTLoss(cfg)(fake_outputs(), fake_batch(), model=model)
    assert res['kl'].item() == pytest.approx(sigma_reparam_regularizer(model).item()) and res['kl'] > 0
    res['loss'].backward()
    assert g.grad is not None and g.grad.item() > 0     # the loss pulls the gain back toward its initial value
    assert AMTLoss(cfg)(fake_outputs(), fake_batch())['kl'].item() == 0.   # no model: 0


def test_optimising_the_predictions_lowers_every_data_term(cfg):
    "Gradient descent on free predictions drives every term that compares them with labels down."
    torch.manual_seed(0)
    crit = AMTLoss(cfg)
    batch = fake_batch()
    out = {k: torch.nn.Parameter(v.detach().clone()) for k, v in fake_outputs(grad=False).items()
           if k != 'pred_contact_prob'}                      # the confidence is optimised too (its own term)
    # step sizes in each prediction's own unit: pixels for the 2D joints, metres for positions
    lrs = {'pred_hand_joints_2d': 3., 'pred_obj_logits': 0.2, 'pred_contact_logits': 0.2, 'pred_mano_pose': 0.05,
           'pred_mano_betas': 0.05, 'pred_obj_rot': 0.05}
    opt = torch.optim.Adam([{'params': [v], 'lr': lrs.get(k, 0.005)} for k, v in out.items()])
    first = None
    for _ in range(60):
        o = {**out, 'pred_obj_rot': F.normalize(out['pred_obj_rot'], dim=-1)}
        res = crit(o, batch)
        first = first or {k: res[k].item() for k in DATA_TERMS}
        opt.zero_grad(); res['loss'].backward(); opt.step()
    last = {k: res[k].item() for k in DATA_TERMS}
    for k in DATA_TERMS:
        assert last[k] < 0.7 * first[k], (k, first[k], last[k])


def test_dynamic_weighting(cfg):
    c = load_config('smoke', ['loss.dynamic_weighting=true'])
    crit = AMTLoss(c)
    assert sorted(n for n, _ in crit.named_parameters()) == sorted(f'log_vars.{k}' for k in DATA_TERMS)
    out, batch = fake_outputs(grad=False), fake_batch()
    assert torch.allclose(crit(out, batch)['loss'], AMTLoss(cfg)(out, batch)['loss'], atol=1e-5)
    opt = torch.optim.SGD(crit.parameters(), lr=0.1)
    for _ in range(5):
        res = crit(out, batch); opt.zero_grad(); res['loss'].backward(); opt.step()
    # a term larger than 1 is weighted down (its log-variance grows), its effective weight is logged
    big = max(DATA_TERMS, key=lambda k: res[k].item())
    assert res[big].item() > 1 and crit.log_vars[big].item() > 0
    assert res[f'w_{big}'].item() < loss_weights(c, 0)[big]


def test_non_finite_prediction_gives_non_finite_loss(cfg):
    out = fake_outputs(grad=False)
    out['pred_obj_pos'] = out['pred_obj_pos'].clone(); out['pred_obj_pos'][0] = float('nan')   # every slot of sample 0
    res = AMTLoss(cfg)(out, fake_batch())
    assert not torch.isfinite(res['loss'])


def test_missing_key_is_named(cfg):
    out = fake_outputs(grad=False); del out['pred_obj_rot']
    with pytest.raises(KeyError, match='pred_obj_rot'):
        AMTLoss(cfg)(out, fake_batch())


def test_with_the_real_model(cfg):
    "The loss accepts the real model's outputs (skipped until amt_lib.models.amt exists)."
    amt = pytest.importorskip('amt_lib.models.amt')
    torch.manual_seed(0)
    model = amt.build_model(cfg).eval()
    batch = fake_batch(B=2)
    out = model(batch['image'], batch['K'])
    res = AMTLoss(cfg)(out, batch, model=model)
    assert torch.isfinite(res['loss'])
    res['loss'].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_confidence_target_follows_the_joint_error(cfg):
    "The confidence term is lowest when the confidence equals exp(-error / tau) of each joint, and never moves the joints."
    from amt_lib.losses import confidence_loss
    batch = fake_batch()
    pred = (batch['hand_joints_3d'] + torch.randn(3, 21, 3) * 0.02).requires_grad_()
    err = (pred.detach() - batch['hand_joints_3d']).norm(dim=-1)
    tau = float(cfg.loss.confidence_tau)
    v = torch.ones(3, dtype=torch.bool)
    best = confidence_loss(torch.exp(-err / tau).requires_grad_(), pred, batch['hand_joints_3d'], v, tau)
    for c in (torch.full_like(err, 0.5), torch.exp(-err / tau).flip(-1), 1 - torch.exp(-err / tau)):
        assert confidence_loss(c, pred, batch['hand_joints_3d'], v, tau) > best
    best.backward(); assert pred.grad is None
