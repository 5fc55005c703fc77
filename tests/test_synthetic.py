"SynthHOI integration tests: labels against pixels, contacts against meshes, determinism, workers, benchmark CLI."
import hashlib, json, os, subprocess, sys
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from torch.utils.data import DataLoader

from amt_lib.config import load_config
from amt_lib.tables import YCB_CLASSES
from amt_lib.data.render import YCB_PRIMITIVES, primitive_mesh, ycb_primitives
from amt_lib.data.rig import hand_rig
from amt_lib.data.synthetic import SynthHOI
from amt_lib.geometry import project_points
from amt_lib.hand_model import MANOLayer

SPEC = dict(image=((3, 224, 224), torch.float32), K=((3, 3), torch.float32), hand_joints_3d=((21, 3), torch.float32),
            hand_joints_2d=((21, 2), torch.float32), hand_valid=((), torch.bool), mano_pose=((48,), torch.float32),
            mano_betas=((10,), torch.float32), mano_trans=((3,), torch.float32), obj_pose=((10, 3, 4), torch.float32),
            obj_valid=((10,), torch.bool), obj_class=((10,), torch.long), contact=((10,), torch.float32),
            depth=((224, 224), torch.float32), seg=((224, 224), torch.uint8))
TIPS = (4, 8, 12, 16, 20)


@pytest.fixture(scope='module')
def ds(): return SynthHOI('test', n=40, seed=7)


def _digest(s):
    h = hashlib.sha256()
    for k in SPEC: h.update(s[k].numpy().tobytes())
    return h.hexdigest()


def _ray_hits(scene, K, pix):
    "Independent Moller-Trumbore ray caster: nearest hit Z and label along rays through pixel centres."
    d = np.c_[(pix - K[:2, 2]) / np.diag(K)[:2], np.ones(len(pix))]
    rig, prims = hand_rig(), ycb_primitives()
    tris, labels = [scene['verts'][rig.faces]], [np.full(len(rig.faces), 255)]
    for c, R, t in scene['objects']:
        V, _, F = prims.mesh[c - 1]; tris.append((V @ R.T + t)[F]); labels.append(np.full(len(F), c))
    T, L = np.concatenate(tris), np.concatenate(labels)
    e1, e2 = T[:, 1] - T[:, 0], T[:, 2] - T[:, 0]
    pv = np.cross(d[:, None], e2[None]); det = (e1[None] * pv).sum(-1)
    tv = -T[None, :, 0]; u = (tv * pv).sum(-1) / det
    qv = np.cross(tv, e1[None]); v = (d[:, None] * qv).sum(-1) / det; z = (e2[None] * qv).sum(-1) / det
    z = np.where((u >= 0) & (v >= 0) & (u + v <= 1) & (z > 0), z, np.inf); k = z.argmin(1)
    return z[np.arange(len(pix)), k], np.where(np.isfinite(z.min(1)), L[k], 0)


def test_schema(ds):
    for i in (0, 1, 39):
        s = ds[i]
        assert set(s) == set(SPEC) | {'meta'}
        for k, (shape, dt) in SPEC.items(): assert (k, tuple(s[k].shape), s[k].dtype) == (k, shape, dt)
        assert s['meta'] == dict(subject='synth', sequence='test-seed7', serial='synth', frame=i, index=i, mano_side='right')
        assert 0 <= s['image'].min() and s['image'].max() <= 1 and bool(s['hand_valid'])
        nv = int(s['obj_valid'].sum())
        assert 1 <= nv <= 3 and (s['obj_class'][:nv] >= 1).all() and (s['obj_class'][:nv] <= 21).all()
        assert (s['obj_class'][nv:] == 0).all() and (s['obj_pose'][nv:] == 0).all() and (s['contact'][nv:] == 0).all()
        assert set(np.unique(s['seg'].numpy())) <= {0, 255, *s['obj_class'][:nv].tolist()}
        assert ((s['depth'] > 0) == (s['seg'] > 0)).all()


def test_projection_and_mano(ds):
    layer = MANOLayer(None, side='right')
    for i in range(20):
        s = ds[i]
        err = (project_points(s['hand_joints_3d'].double(), s['K'].double()) - s['hand_joints_2d'].double()).norm(dim=-1)
        assert err.max() < 0.5, (i, err.max())
        assert (s['hand_joints_2d'] >= 0).all() and (s['hand_joints_2d'] <= 223).all()     # the crop holds the hand
        out = layer(s['mano_pose'][None], s['mano_betas'][None], s['mano_trans'][None])
        assert (out['joints'][0] - s['hand_joints_3d']).abs().max() < 2e-5


def test_seg_and_depth_at_joints(ds):
    agree = total = 0; gaps = []
    for i in range(20):
        s, (sc, _) = ds[i], ds.scene(i)
        K = s['K'].double().numpy(); j3 = sc['joints']
        pix = np.round((j3 @ K.T)[:, :2] / (j3 @ K.T)[:, 2:])
        r, c = pix[:, 1].astype(int), pix[:, 0].astype(int)
        z_ray, lab_ray = _ray_hits(sc, K, pix)
        dep, seg = s['depth'].numpy()[r, c], s['seg'].numpy()[r, c]
        agree += ((np.abs(dep - np.where(np.isfinite(z_ray), z_ray, 0)) < 1e-4) & (seg == lab_ray)).sum(); total += 21
        body = np.array([j not in TIPS for j in range(21)])
        free = body & (lab_ray == 255)                      # no object in front of the joint
        assert (seg[free] == 255).all(), i                  # unoccluded joint pixels are hand
        assert (dep[free] <= j3[free, 2] + 1e-3).all(), i   # the hand's front surface is in front of its joints
        vis = free & (dep >= j3[:, 2] - 0.02)               # joints whose own finger / palm is the visible surface
        gaps += list(j3[vis, 2] - dep[vis])
    assert agree / total > 0.97, agree / total              # the z-buffer agrees with the ray caster
    gaps = np.array(gaps) * 1000
    assert len(gaps) > 100 and np.median(gaps) < 12, (len(gaps), np.median(gaps))   # a joint is ~ a finger radius deep


def _surface_points(cls, R, t, n=30000, seed=0):
    kind, ext, _ = YCB_PRIMITIVES[YCB_CLASSES[cls]]
    V, _, F = primitive_mesh(kind, ext)
    T = V[F]; area = np.linalg.norm(np.cross(T[:, 1] - T[:, 0], T[:, 2] - T[:, 0]), axis=1) / 2
    rng = np.random.default_rng(seed); f = rng.choice(len(F), n, p=area / area.sum())
    a, b = rng.random(n), rng.random(n); m = a + b > 1; a[m], b[m] = 1 - a[m], 1 - b[m]
    P = T[f, 0] + a[:, None] * (T[f, 1] - T[f, 0]) + b[:, None] * (T[f, 2] - T[f, 0])
    fn = np.cross(T[:, 1] - T[:, 0], T[:, 2] - T[:, 0])
    return P @ R.T + t, (fn / np.linalg.norm(fn, axis=1, keepdims=True)) @ R.T, T[:, 0] @ R.T + t


def test_contact_labels_against_meshes(ds):
    "contact = 1 <=> some hand vertex within 5 mm of (or inside) the object's mesh, measured on the mesh itself."
    n_contact = 0
    for i in range(24):
        s, (sc, _) = ds[i], ds.scene(i)
        for k, (c, R, t) in enumerate(sc['objects']):
            P, fn, fp = _surface_points(c, R, t)
            dist = cKDTree(P).query(sc['verts'])[0]
            inside = (((sc['verts'][:, None] - fp[None]) * fn[None]).sum(-1) < 0).all(1)   # convex: behind every face
            near = dist.min()
            if s['contact'][k] == 1:
                n_contact += 1
                assert near < 0.005 + 0.0015 or inside.any(), (i, k, near)   # 1.5 mm: sampling spacing of the mesh
            else:
                assert near > 0.005 and not inside.any(), (i, k, near)
    assert n_contact >= 10                                   # grasps are common (synth_grasp_share 0.7)


def test_determinism_and_splits(ds):
    a = _digest(ds[3])
    assert a == _digest(ds[3]) == _digest(SynthHOI('test', n=40, seed=7)[3])
    assert a != _digest(SynthHOI('val', n=40, seed=7)[3]) and a != _digest(SynthHOI('test', n=40, seed=8)[3])
    code = ("from amt_lib.data.synthetic import SynthHOI; import hashlib; s = SynthHOI('test', n=40, seed=7)[3]; h = hashlib.sha256()\n"
            f"for k in {list(SPEC)}: h.update(s[k].numpy().tobytes())\nprint(h.hexdigest())")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, env=os.environ | {'OMP_NUM_THREADS': '1'})
    assert out.stdout.strip() == a                           # same bytes in a fresh process


def test_dataloader_two_workers(ds):
    dl = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = [b for _, b in zip(range(2), dl)]
    b = batches[1]
    assert b['image'].shape == (4, 3, 224, 224) and b['meta']['index'].tolist() == [4, 5, 6, 7]
    for j in range(4):
        s = ds[4 + j]
        for k in SPEC: assert torch.equal(b[k][j], s[k]), k


def test_from_config():
    cfg = load_config('smoke', ['data.val_size=5', 'data.synth_seed=3', 'data.image_size=112'])
    d = SynthHOI.from_config(cfg, 'val')
    assert (len(d), d.seed, d.image_size, d.crop_margin) == (5, 3, 112, cfg.data.crop_margin)
    s = d[0]
    assert s['image'].shape == (3, 112, 112) and s['depth'].shape == (112, 112)
    with pytest.raises(ValueError, match='unknown split'): SynthHOI.from_config(cfg, 'dev')


def test_bench_cli(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'amt_lib.cli', 'bench-synth', '--bench', '-n', '30', '--json', str(tmp_path / 'b.json')],
                         capture_output=True, text=True, check=True, env=os.environ | {'OMP_NUM_THREADS': '1'})
    r = json.loads((tmp_path / 'b.json').read_text())
    assert 'samples/s' in out.stdout and r['samples'] == 30 and r['samples_per_s'] > 0 and r['threads'] == 1
