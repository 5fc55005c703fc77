"""The AMT model end to end on the smoke config: shapes, gradients, weights round trip, freezing, sigma-reparam,
pixel-aligned sampling and `amt model summary` (issue 6). Budget: under 30 s on 2 CPU cores."""
import contextlib, io, time
import pytest
import torch
from amt_lib.config import load_config
from amt_lib.geometry import project_points
from amt_lib.cli import main as amt_main
from amt_lib.models.amt import (AMT, COMPONENTS, build_model, freeze_all_except, parameter_summary,
                                unfreeze_all)
from amt_lib.models.backbone import BackboneWeightsError, load_dinov2
from amt_lib.models.refinement import sample_features
from amt_lib.models.sigma_reparam import SigmaReparamLinear, sigma_reparam_layers, sigma_reparam_regularizer

B = 2

def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, 224, 224, generator=g)
    K = torch.tensor([[620., 0., 111.5], [0., 615., 110.], [0., 0., 1.]]).repeat(B, 1, 1)
    return image, K

@pytest.fixture(scope='module')
def smoke_model():
    torch.manual_seed(0)
    return build_model(load_config('smoke'))

def test_forward_backward_shapes_and_time(smoke_model):
    cfg = load_config('smoke')
    m = smoke_model.train()
    image, K = _inputs()
    m(image, K)  # warm-up
    m.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = m(image, K)
    loss = sum(v.float().square().mean() for v in out.values())
    loss.backward()
    dt = time.perf_counter() - t0
    assert dt < 3.0, f'smoke forward+backward took {dt:.2f} s'
    S, Q, C = cfg.model.refine_steps, cfg.model.num_objects, cfg.model.num_classes
    want = dict(pred_hand_joints=(B, 21, 3), pred_hand_joints_coarse=(B, 21, 3), pred_hand_conf=(B, 21),
                pred_hand_joints_2d=(B, 21, 2), pred_mano_pose=(B, 48), pred_mano_betas=(B, 10), pred_mano_trans=(B, 3),
                pred_hand_verts=(B, 778, 3), pred_obj_pos_coarse=(B, Q, 3), pred_obj_pos=(B, Q, 3), pred_obj_rot=(B, Q, 4),
                pred_obj_logits=(B, Q, C), pred_contact_points=(B, Q, 3), pred_contact_logits=(B, Q),
                pred_contact_prob=(B, Q), pred_hand_joints_steps=(B, S, 21, 3))
    g = cfg.data.image_size // cfg.model.backbone.patch_size * cfg.model.heatmap_upsample
    want['pred_hand_heatmaps'] = (B, 21, g, g)                                       # auxiliary: the heatmap term's input
    for k, shape in want.items(): assert tuple(out[k].shape) == shape, k
    assert 'pred_contact_forces' not in out                                        # no label backs forces: no such output
    assert all(torch.isfinite(v).all() for v in out.values())
    assert all(isinstance(v, torch.Tensor) for v in out.values())
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)                                       # no unused parameters (DDP-safe)
    assert all(torch.isfinite(g).all() for g in grads)
    assert m.backbone.dinov2.encoder.layer[0].mlp.fc1.weight.grad.abs().sum() > 0   # the encoder learns too
    torch.testing.assert_close(out['pred_hand_joints_2d'], project_points(out['pred_hand_joints'], K))
    torch.testing.assert_close(out['pred_obj_rot'].norm(dim=-1), torch.ones(B, Q))

def test_initial_predictions_are_sane(smoke_model):
    m = smoke_model.eval()
    image, K = _inputs(1)
    with torch.no_grad(): out = m(image, K)
    wrist = out['pred_hand_joints'][:, 0]
    assert ((wrist[:, 2] > 0.45) & (wrist[:, 2] < 0.8)).all()                      # ~f_x/1000 m in front of the camera
    uv = out['pred_hand_joints_2d']
    assert ((uv > 0) & (uv < 223)).all()                                           # the whole hand inside the crop
    assert (uv.mean(1) - torch.tensor([111.5, 110.])).abs().max() < 40             # around the image centre
    assert ((out['pred_obj_pos'][..., 2] > 0.45) & (out['pred_obj_pos'][..., 2] < 0.8)).all()
    span = (out['pred_hand_joints'] - wrist[:, None]).norm(dim=-1).max()
    assert 0.05 < span < 0.3                                                       # a hand-sized hand

def test_backbone_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    m1 = build_model(load_config('smoke')).eval()
    folder = tmp_path/'tiny-dinov2'
    m1.backbone.dinov2.save_pretrained(folder)
    m2 = build_model(load_config('smoke', [f'model.backbone.name={folder}'])).eval()
    m2.load_state_dict(m1.state_dict())        # strict: same architecture through the folder
    for a, b in zip(m1.backbone.state_dict().values(), m2.backbone.state_dict().values()): assert torch.equal(a, b)
    image, K = _inputs()
    with torch.no_grad(): torch.testing.assert_close(m2(image, K)['pred_hand_joints'], m1(image, K)['pred_hand_joints'])

def test_missing_weights_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(BackboneWeightsError, match='huggingface-cli download facebook/dinov2-large'):
        build_model(load_config('h200'))
    with pytest.raises(BackboneWeightsError, match='no such folder'):
        load_dinov2(str(tmp_path/'missing'))

def test_freezing(smoke_model):
    m = smoke_model.train()
    freeze_all_except(m, ['hand_encoder', 'refiner'])
    s = parameter_summary(m)
    assert [s[n][1] > 0 for n in COMPONENTS] == [False, True, False, False, True]
    m.zero_grad(set_to_none=True)
    out = m(*_inputs())
    (out['pred_hand_joints'].square().mean() + out['pred_contact_logits'].mean()).backward()
    for n, c in m.components.items():
        has = any(p.grad is not None for p in c.parameters())
        assert has == (n in ('hand_encoder', 'refiner')), n
    unfreeze_all(m)
    assert parameter_summary(m).trainable == parameter_summary(m).total - m.backbone.embed_dim   # all but DINOv2's mask_token
    with pytest.raises(ValueError, match='unknown component'): freeze_all_except(m, ['decoder'])

def test_backbone_freeze_layers():
    m = build_model(load_config('smoke', ['model.backbone.freeze_layers=1']))
    frozen = [p.requires_grad for p in m.backbone.dinov2.encoder.layer[0].parameters()]
    assert not any(frozen) and all(p.requires_grad for p in m.backbone.dinov2.encoder.layer[1].parameters())
    unfreeze_all(m)
    assert not any(p.requires_grad for p in m.backbone.dinov2.embeddings.parameters())

def test_sigma_reparam_spectral_norm_and_regularizer(smoke_model):
    torch.manual_seed(0)
    lin = SigmaReparamLinear(96, 64, init_iterations=0).train()
    for _ in range(30): lin(torch.randn(2, 96))
    sn = torch.linalg.matrix_norm(lin.effective_weight().detach(), 2)
    assert abs(sn - lin.gamma.detach().abs()) < 0.01 * lin.gamma.detach().abs()
    layers = sigma_reparam_layers(smoke_model)
    assert len(layers) > 20 and not sigma_reparam_layers(smoke_model.backbone)
    r = sigma_reparam_regularizer(smoke_model)
    assert r.shape == () and r.requires_grad
    with torch.no_grad():
        old = layers[0].gamma.clone(); layers[0].gamma.mul_(2.)
    assert sigma_reparam_regularizer(smoke_model) > r
    with torch.no_grad(): layers[0].gamma.copy_(old)

def test_sampled_features_match_pattern():
    g = 16
    centres = torch.arange(g) * 14 + 6.5
    fmap = torch.stack([centres.view(1, g).expand(g, g), centres.view(g, 1).expand(g, g)]).expand(B, 2, g, g)
    X = torch.tensor([[[0.02, 0.01, 0.5], [-0.04, 0.03, 0.6]]]).expand(B, 2, 3)
    _, K = _inputs()
    uv = project_points(X, K)
    torch.testing.assert_close(sample_features(fmap, uv, 224), uv, atol=1e-4, rtol=0)

def test_cli_model_summary_h200():
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        assert amt_main(['model', 'summary', '--preset', 'h200']) == 0
    text = buf.getvalue()
    for n in COMPONENTS + ('total',): assert n in text
    assert 'facebook/dinov2-large' in text and '304,368,640' in text   # dinov2-large's own size, no download


def test_full_loss_trains_every_parameter():
    "Every trainable parameter of the smoke model gets a non-zero gradient from the full AMT loss (issue 15, DDP-safe)."
    from torch.utils.data import default_collate
    from amt_lib.data.synthetic import SynthHOI
    from amt_lib.losses import AMTLoss, LOSS_TERMS
    cfg = load_config('smoke', [f'loss.weights.{t}=1.0' for t in LOSS_TERMS])    # every term on
    assert cfg.model.refine_steps >= 1 and not cfg.training.ddp_find_unused and cfg.training.guards
    assert not load_config('base').training.ddp_find_unused
    torch.manual_seed(0)
    model = build_model(cfg).train()
    b = default_collate([SynthHOI.from_config(cfg, 'train')[i] for i in range(4)])
    assert b['hand_valid'].all() and b['obj_valid'].any() and (b['contact'] > 0).any()   # hands, objects, contacts
    res = AMTLoss(cfg)(model(b['image'], b['K']), b, model)
    assert all(res[t] > 0 for t in ('confidence', 'contact_point')), {t: float(res[t]) for t in LOSS_TERMS}
    res['loss'].backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead, f'parameters without gradient: {dead}'
