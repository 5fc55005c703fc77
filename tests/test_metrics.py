"""amt_lib.metrics: hand-worked examples, independent references for the official DexYCB numbers,
the evaluator's masking/matching/accumulation, and the official results file."""
import math
import numpy as np
import pytest
import roma
import torch
from scipy.linalg import orthogonal_procrustes

from amt_lib.metrics import mpjpe, pa_mpjpe, auc, pck, add, add_s   # the import the issue asks for
from amt_lib.metrics import (pck_2d, contact_accuracy, contact_f1, dexycb_hand_eval, Evaluator,
                             write_hand_results, read_hand_results, joint_errors)


# ---------------------------------------------------------------- hand-worked examples (metres in, mm out)
def test_mpjpe_hand_worked():
    gt = torch.zeros(2, 2, 3)
    # joint 0 off by (3,4,0) mm -> 5 mm; joint 1 off by (0,0,1) mm -> 1 mm; sample 1 is invalid and 1 m off
    pred = torch.tensor([[[0.003, 0.004, 0.], [0., 0., 0.001]], [[1., 0., 0.], [1., 0., 0.]]])
    valid = torch.tensor([True, False])
    assert mpjpe(pred, gt, valid).item() == pytest.approx(3.0)                      # (5 + 1) / 2
    # root-relative: joint 1 off by (0,0,1) - (3,4,0) = (-3,-4,1) mm -> sqrt(26); joint 0 -> 0
    assert mpjpe(pred, gt, valid, root_relative=True).item() == pytest.approx(math.sqrt(26) / 2)
    assert torch.isnan(mpjpe(pred, gt, torch.tensor([False, False])))             # nothing valid: nan, not 0


def test_pa_mpjpe_hand_worked():
    # plus sign (+-1,0,0), (0,+-1,0) cm; prediction squashes y to +-0.5 cm: H = diag(2,1,0), R = I,
    # scale = 3 / 2.5 = 1.2 -> aligned (+-1.2,0,0), (0,+-0.6,0): errors 2,2,4,4 mm -> 3 mm
    gt = torch.tensor([[[-1., 0, 0], [1, 0, 0], [0, 1, 0], [0, -1, 0]]]) * 0.01
    pred = torch.tensor([[[-1., 0, 0], [1, 0, 0], [0, 0.5, 0], [0, -0.5, 0]]]) * 0.01
    R = roma.rotvec_to_rotmat(torch.tensor([1.0, 0.2, -0.3]))
    moved = 0.7 * pred @ R.T + torch.tensor([0.3, 0.0, 0.9])
    for flavour in ('similarity', 'dexycb'):
        assert pa_mpjpe(moved, gt, flavour=flavour).item() == pytest.approx(3.0, abs=1e-4)


def test_pa_flavours_differ_on_a_mirror():
    g = torch.randn(3, 21, 3, dtype=torch.float64) * 0.04
    mirror = g * torch.tensor([-1., 1., 1.], dtype=torch.float64)
    assert pa_mpjpe(mirror, g, flavour='dexycb').item() == pytest.approx(0.0, abs=1e-4)  # reflection allowed
    assert pa_mpjpe(mirror, g, flavour='similarity').item() > 1.0                     # proper rotations only


def test_pa_similarity_matches_roma_umeyama():
    g = torch.randn(4, 21, 3, dtype=torch.float64) * 0.04
    p = g + torch.randn_like(g) * 0.01
    R, t, s = roma.rigid_points_registration(p, g, compute_scaling=True)
    ref = ((s[:, None, None] * p @ R.transpose(-1, -2) + t[:, None]) - g).norm(dim=-1).mean() * 1000
    assert pa_mpjpe(p, g, flavour='similarity').item() == pytest.approx(ref.item(), abs=1e-8)


def test_pck_and_pck2d_hand_worked():
    gt = torch.zeros(1, 2, 3)
    pred = torch.tensor([[[0.003, 0.004, 0.], [0., 0., 0.001]]])                    # errors 5 mm, 1 mm
    assert pck(pred, gt, 3.).item() == pytest.approx(0.5)                            # only joint 1 within 3 mm
    assert pck(pred, gt, 5.).item() == pytest.approx(1.0)                            # '<=' as the official code
    p2 = torch.tensor([[[3., 4.], [0., 0.]]])                                        # 5 px and 0 px
    assert pck_2d(p2, torch.zeros(1, 2, 2), 4.9).item() == pytest.approx(0.5)


def test_auc_hand_worked():
    # one joint, 10 mm error; thresholds 50k/99 mm; PCK = 1 from k = 20 -> 79 full intervals + half of [t19, t20]
    assert auc(torch.tensor([[[0.01, 0., 0.]]]), torch.zeros(1, 1, 3)).item() == pytest.approx(79.5 / 99)


def test_add_and_add_s_hand_worked():
    pts = torch.tensor([[0., 0., 0.], [0.01, 0., 0.]])
    eye = torch.cat([torch.eye(3), torch.zeros(3, 1)], -1)
    shift = eye.clone(); shift[0, 3] = 0.006
    assert add(shift, eye, pts).item() == pytest.approx(6.0)                         # every point 6 mm off
    assert add_s(shift, eye, pts).item() == pytest.approx(5.0)                       # nearest: 6 mm and 4 mm
    # per-object points and a padded slot
    poses_p, poses_g = torch.stack([shift, shift]), torch.stack([eye, eye])
    assert add(poses_p, poses_g, torch.stack([pts, pts * 2]), mask=torch.tensor([True, False])).item() == pytest.approx(6.0)


def test_contact_hand_worked():
    prob = torch.tensor([0.9, 0.2, 0.7, 0.4, 0.9])
    target = torch.tensor([1., 0., 0., 1., 0.])
    m = torch.tensor([True, True, True, True, False])                                # TP, TN, FP, FN; slot 4 padded
    assert contact_accuracy(prob, target, m) == pytest.approx(0.5)
    assert contact_f1(prob, target, m) == pytest.approx(0.5)                         # 2 / (2 + 1 + 1)


# ---------------------------------------------------------------- the official DexYCB numbers
def _official_reference(pred, gt):
    """Independent numpy/scipy re-implementation of hpe_eval.py's procedure (written for this test)."""
    def align(g, p):
        g0, p0 = g - g.mean(0), p - p.mean(0)
        s1, s2 = np.linalg.norm(g0) + 1e-8, np.linalg.norm(p0) + 1e-8
        R, s = orthogonal_procrustes(g0 / s1, p0 / s2)
        return (p0 / s2) @ R.T * s * s1 + g.mean(0)
    th = np.linspace(0, 50, 100)
    out = {}
    for name in ('absolute', 'root-relative', 'procrustes'):
        if name == 'absolute': e = np.linalg.norm(pred - gt, axis=-1)
        elif name == 'root-relative': e = np.linalg.norm((pred - pred[:, :1]) - (gt - gt[:, :1]), axis=-1)
        else: e = np.stack([np.linalg.norm(align(g, p) - g, axis=-1) for g, p in zip(gt, pred)])
        curve = (e[None] <= th[:, None, None]).mean(1)                               # (T,J)
        a = np.array([np.sum((curve[1:, j] + curve[:-1, j]) / 2 * np.diff(th)) for j in range(e.shape[1])]) / 50
        out[name] = dict(mpjpe=e.mean(0).mean(), auc=a.mean(), per_joint=e.mean(0))
    return out


def test_dexycb_hand_eval_matches_official_procedure():
    rng = np.random.default_rng(1)
    gt = rng.normal(0, 40, (200, 21, 3)) + np.array([0, 0, 600.])
    pred = gt + rng.normal(0, 15, gt.shape) + rng.normal(0, 20, (200, 1, 3))
    pred[:20, :, 0] = 2 * gt[:20].mean(1)[:, None, 0] - pred[:20, :, 0]                # mirror some hands
    ours = dexycb_hand_eval(torch.from_numpy(pred), torch.from_numpy(gt))
    ref = _official_reference(pred, gt)
    for name, r in ref.items():
        assert ours[name]['mpjpe'] == pytest.approx(r['mpjpe'], abs=0.01)
        assert ours[name]['auc'] == pytest.approx(r['auc'], abs=1e-6)
        np.testing.assert_allclose(ours[name]['mpjpe_per_joint'], r['per_joint'], atol=0.01)
    # float32 metres through the plain metrics give the same numbers
    p32, g32 = torch.from_numpy(pred / 1000).float(), torch.from_numpy(gt / 1000).float()
    assert mpjpe(p32, g32).item() == pytest.approx(ref['absolute']['mpjpe'], abs=0.01)
    assert mpjpe(p32, g32, root_relative=True).item() == pytest.approx(ref['root-relative']['mpjpe'], abs=0.01)
    assert pa_mpjpe(p32, g32, flavour='dexycb').item() == pytest.approx(ref['procrustes']['mpjpe'], abs=0.01)
    assert auc(p32, g32, align='dexycb').item() == pytest.approx(ref['procrustes']['auc'], abs=1e-3)


# ---------------------------------------------------------------- results file
def test_results_file_round_trip_and_errors(tmp_path):
    j = torch.randn(5, 21, 3, dtype=torch.float64) * 100
    f = write_hand_results(tmp_path / 'res.txt', [4, 1, 0, 9, 2], j)
    line = f.read_text().splitlines()[0].split(',')
    assert len(line) == 64 and line[0] == '4'
    idx, j2 = read_hand_results(f)
    assert idx.tolist() == [4, 1, 0, 9, 2]
    assert torch.allclose(j2, j, atol=1e-6)
    (tmp_path / 'bad.txt').write_text(f.read_text().splitlines()[0] + '\n1,2\n')
    with pytest.raises(ValueError, match='bad.txt, line 2'): read_hand_results(tmp_path / 'bad.txt')
    with pytest.raises(FileNotFoundError, match='missing.txt'): read_hand_results(tmp_path / 'missing.txt')


# ---------------------------------------------------------------- evaluator
def _batch(B, seed, S=10, C=22):
    g = torch.Generator().manual_seed(seed)
    gt = torch.randn(B, 21, 3, generator=g) * 0.04 + torch.tensor([0., 0., 0.6])
    hand_valid = torch.rand(B, generator=g) > 0.3
    pose = torch.zeros(B, S, 3, 4)
    pose[..., :3] = roma.random_rotmat((B, S))
    pose[..., 3] = torch.randn(B, S, 3, generator=g) * 0.1 + torch.tensor([0., 0., 0.7])
    n_obj = torch.randint(0, 4, (B,), generator=g)
    obj_valid = torch.arange(S)[None] < n_obj[:, None]
    batch = dict(hand_joints_3d=gt, hand_valid=hand_valid, obj_pose=pose * obj_valid[..., None, None],
                 obj_valid=obj_valid, obj_class=torch.randint(1, C, (B, S), generator=g) * obj_valid,
                 contact=(torch.rand(B, S, generator=g) > 0.5).float() * obj_valid)
    pred = gt + torch.randn(B, 21, 3, generator=g) * 0.01
    pred[~hand_valid] = 100.                                                          # garbage that must not count
    out = dict(pred_hand_joints=pred, pred_obj_pos=torch.randn(B, S, 3, generator=g) * 0.1 + 0.7,
               pred_obj_rot=torch.nn.functional.normalize(torch.randn(B, S, 4, generator=g), dim=-1),
               pred_obj_logits=torch.randn(B, S, C, generator=g), pred_contact_prob=torch.rand(B, S, generator=g))
    return out, batch


def _cat(items):
    return {k: torch.cat([d[k] for d in items]) for k in items[0]}


def test_evaluator_accumulates_like_one_batch_and_skips_invalid():
    parts = [_batch(B, s) for B, s in ((3, 0), (5, 1), (2, 2))]
    ev = Evaluator()
    for out, batch in parts: ev.update(out, batch)
    r = ev.compute(per_joint=True)
    one = Evaluator(); one.update(_cat([o for o, _ in parts]), _cat([b for _, b in parts]))
    r1 = one.compute(per_joint=True)
    for k, v in r.items():
        if isinstance(v, float) and math.isnan(v): assert math.isnan(r1[k]), k
        else: assert v == pytest.approx(r1[k], abs=1e-9), k
    # hand numbers = the official evaluator's on the valid hands only
    out, batch = _cat([o for o, _ in parts]), _cat([b for _, b in parts])
    v = batch['hand_valid']
    off = dexycb_hand_eval(out['pred_hand_joints'][v] * 1000, batch['hand_joints_3d'][v] * 1000)
    assert r['n_hands'] == int(v.sum()) < len(v)
    assert r['mpjpe'] == pytest.approx(off['absolute']['mpjpe'], abs=1e-3)
    assert r['rr_mpjpe'] == pytest.approx(off['root-relative']['mpjpe'], abs=1e-3)
    assert r['pa_mpjpe_dexycb'] == pytest.approx(off['procrustes']['mpjpe'], abs=1e-3)
    assert r['auc'] == pytest.approx(off['absolute']['auc'], abs=1e-6)
    assert r['n_objects'] == int(batch['obj_valid'].sum())
    assert r['mpjpe'] < 50                                                           # the 100 m garbage is skipped


def test_evaluator_hungarian_matching_and_object_metrics():
    out, batch = _batch(4, 3)
    batch['obj_valid'][:] = False; batch['obj_valid'][:, :2] = True
    batch['obj_pose'][..., :3] = roma.random_rotmat((4, 10))
    batch['obj_pose'][..., 3] = torch.randn(4, 10, 3) * 0.1 + torch.tensor([0., 0., 0.7])
    batch['obj_class'][:, :2] = torch.tensor([2, 5])
    perm = [7, 4]                                                                      # true slots 0,1 -> predicted 7,4
    for k, s in enumerate(perm):
        out['pred_obj_pos'][:, s] = batch['obj_pose'][:, k, :, 3]
        out['pred_obj_rot'][:, s] = roma.quat_xyzw_to_wxyz(roma.rotmat_to_unitquat(batch['obj_pose'][:, k, :, :3]))
        out['pred_obj_logits'][:, s] = -10.; out['pred_obj_logits'][:, s, batch['obj_class'][0, k]] = 10.
    pts = {2: torch.randn(30, 3) * 0.05, 5: torch.randn(20, 3) * 0.05}
    ev = Evaluator(obj_points=pts); ev.update(out, batch); r = ev.compute()
    assert r['obj_pos_err'] == pytest.approx(0, abs=1e-3) and r['obj_rot_err_deg'] == pytest.approx(0, abs=1e-2)
    assert r['add'] == pytest.approx(0, abs=1e-3) and r['add_s'] == pytest.approx(0, abs=1e-3)
    assert r['obj_cls_acc'] == 1.0 and r['n_objects'] == 8
    # contact of the matched slot: predicted 7 and 4 carry the probabilities for true slots 0 and 1
    out['pred_contact_prob'][:] = 0.; out['pred_contact_prob'][:, 7] = 1.
    batch['contact'][:] = 0.; batch['contact'][:, 0] = 1.
    ev = Evaluator(); ev.update(out, batch); r = ev.compute()
    assert r['contact_acc'] == 1.0 and r['contact_f1'] == 1.0
    # a 90 degree turn of every predicted rotation
    q90 = torch.tensor([math.cos(math.pi / 4), 0., 0., math.sin(math.pi / 4)])        # w first, about z
    R90 = roma.unitquat_to_rotmat(roma.quat_wxyz_to_xyzw(q90))
    for k, s in enumerate(perm):
        out['pred_obj_rot'][:, s] = roma.quat_xyzw_to_wxyz(roma.rotmat_to_unitquat(batch['obj_pose'][:, k, :, :3] @ R90))
    ev = Evaluator(); ev.update(out, batch)
    assert ev.compute()['obj_rot_err_deg'] == pytest.approx(90., abs=1e-3)
    with pytest.raises(ValueError, match='matching'): Evaluator(matching='greedy')
    with pytest.raises(KeyError, match='class 5'):
        Evaluator(obj_points={2: pts[2]}).update(out, batch)


def test_joint_errors_reports_millimetres():
    assert joint_errors(torch.tensor([[[0.001, 0., 0.]]]), torch.zeros(1, 1, 3)).item() == pytest.approx(1.0)


def test_evaluator_keys_are_stable_without_valid_objects():
    out, batch = _batch(2, 4)
    batch['obj_valid'][:] = False; batch['hand_valid'][:] = False
    ev = Evaluator(); ev.update(out, batch); r = ev.compute()
    assert math.isnan(r['obj_pos_err']) and math.isnan(r['contact_f1']) and math.isnan(r['mpjpe'])
    assert r['n_objects'] == 0 and r['n_hands'] == 0
    assert r['obj_empty_acc'] == pytest.approx((out['pred_obj_logits'].argmax(-1) == 0).float().mean().item())
