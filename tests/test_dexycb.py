"""DexYCB reader on fixture trees: official selections and order, label round trip, bad files, eval-results, cache."""
import json, os, subprocess, sys, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

from amt_lib.data.dexycb import (DexYCB, DexYCBError, SERIALS, SUBJECTS, LABEL_FMT,
                                 dexycb_ground_truth, ManoPCA)
from amt_lib.data.dexycb_fixture import write_dexycb_fixture
from amt_lib.geometry import project_points


def official_mapping(root, setup, split):
    """Direct re-implementation of dex_ycb_toolkit's DexYCBDataset selection and order: rows (subject, sequence, serial, frame)."""
    sub = {'s0': {'train': range(10), 'val': [0, 1], 'test': range(2, 10)}, 's1': {'train': [0, 1, 2, 3, 4, 5, 9], 'val': [6], 'test': [7, 8]}}
    cam = {'s2': {'train': range(6), 'val': [6], 'test': [7]}}
    seq = {'s0': {'train': [i for i in range(100) if i % 5 != 4], 'val': [i for i in range(100) if i % 5 == 4],
                  'test': [i for i in range(100) if i % 5 == 4]},
           's3': {'train': [i for i in range(100) if i // 5 not in (3, 7, 11, 15, 19)],
                  'val': [i for i in range(100) if i // 5 in (3, 19)], 'test': [i for i in range(100) if i // 5 in (7, 11, 15)]}}
    subjects = [SUBJECTS[i] for i in sub.get(setup, {}).get(split, range(10))]
    serials = [SERIALS[i] for i in cam.get(setup, {}).get(split, range(8))]
    rows = []
    import yaml
    for n in subjects:
        if not os.path.isdir(os.path.join(root, n)): continue
        names = sorted(os.listdir(os.path.join(root, n)))
        for q in seq.get(setup, {}).get(split, range(100)):
            if q >= len(names): continue
            meta = yaml.load(open(os.path.join(root, n, names[q], 'meta.yml')), Loader=getattr(yaml, 'CSafeLoader', yaml.SafeLoader))
            f, c = np.meshgrid(np.arange(meta['num_frames']), np.arange(len(serials)))
            rows += [(n, names[q], serials[ci], fi) for ci, fi in zip(c.ravel(), f.ravel())]
    return rows


def our_rows(ds):
    return [(ds.sequences[s]['subject'], ds.sequences[s]['sequence'], ds.serials[c], f) for s, c, f in ds._map.tolist()]


@pytest.fixture(scope='module')
def full_tree(tmp_path_factory):
    """All 10 subjects x 100 sequences x 8 cameras, meta only (the official layout without frame files)."""
    return write_dexycb_fixture(tmp_path_factory.mktemp('meta')/'dex', subjects=10, sequences_per_subject=100,
                                serials=8, frames=2, files='meta')


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """A small tree with frame files: 2 subjects (the second left-handed) x 5 sequences x 2 cameras x 2 frames."""
    return write_dexycb_fixture(tmp_path_factory.mktemp('frames')/'dex', subjects=[0, 1], sequences_per_subject=5,
                                serials=2, frames=2)


@pytest.mark.parametrize('setup', ['s0', 's1', 's2', 's3'])
def test_official_selection_and_order(full_tree, setup):
    for split in ('train', 'val', 'test'):
        with warnings.catch_warnings():
            warnings.simplefilter('error')                   # a complete tree gives no partial-download warning
            ds = DexYCB(full_tree, setup, split)
        ref = official_mapping(full_tree, setup, split)
        assert len(ref) > 0 and our_rows(ds) == ref, (setup, split)
        assert len(ds) == len(ref)


def test_s0_sizes(full_tree):
    n = {sp: len(DexYCB(full_tree, 's0', sp)) for sp in ('train', 'val', 'test')}
    assert n == {'train': 10 * 80 * 8 * 2, 'val': 2 * 20 * 8 * 2, 'test': 8 * 20 * 8 * 2}


def test_partial_download_warns(tmp_path):
    root = write_dexycb_fixture(tmp_path/'dex', subjects=[0, 2], sequences_per_subject=[20, 7], serials=8, frames=1, files='meta')
    with pytest.warns(UserWarning, match='partial DexYCB download') as w:
        ds = DexYCB(root, 's0', 'val')
    msg = str(w[0].message)
    assert '20200709-subject-01 has 20 of 100' in msg
    assert our_rows(ds) == official_mapping(root, 's0', 'val')       # positions 4, 9, 14, 19 of subject 01
    with pytest.warns(UserWarning, match='subject 20200813-subject-02'):
        DexYCB(root, 's1', 'train')


def test_labels_round_trip(tree):
    for split in ('train',):
        ds = DexYCB(tree, 's0', split)
        for i in range(len(ds)):
            s, paths = ds[i], ds.frame_paths(i)
            lab = np.load(paths['label'])
            if np.all(lab['joint_3d'] == -1):
                assert not s['hand_valid'] and s['hand_joints_3d'].abs().sum() == 0 and s['contact'].sum() == 0
                continue
            assert s['hand_valid']
            np.testing.assert_allclose(s['hand_joints_3d'].numpy(), lab['joint_3d'][0], atol=1e-7)   # metres, as written
            # 2D: the crop's pixels mapped back to the full frame are the written joint_2d
            K_full = torch.from_numpy(ds.K_full[s['meta']['serial']])
            A = s['K'].double() @ torch.linalg.inv(K_full)
            back = torch.cat([s['hand_joints_2d'].double(), torch.ones(21, 1, dtype=torch.float64)], 1) @ torch.linalg.inv(A).T
            np.testing.assert_allclose(back[:, :2].numpy(), lab['joint_2d'][0], atol=1e-3)
            assert (project_points(s['hand_joints_3d'], s['K']) - s['hand_joints_2d']).abs().max() < 0.05
            n = len(ds.sequences[0]['ycb_ids'])
            np.testing.assert_allclose(s['obj_pose'][:n].numpy(), lab['pose_y'], atol=1e-7)
            assert s['obj_valid'].sum() == n and (s['obj_class'][n:] == 0).all()
            # decoded MANO parameters reproduce the written joints with the subject's betas
            from amt_lib.hand_model import MANOLayer, generated_mano_path
            side = s['meta']['mano_side']
            out = MANOLayer(generated_mano_path(side), side=side)(s['mano_pose'][None].double(), s['mano_betas'][None].double(),
                                                                   s['mano_trans'][None].double())
            np.testing.assert_allclose(out['joints'][0].numpy(), lab['joint_3d'][0], atol=1e-5)
            # depth in metres: where the seg says hand, depth is within the hand's z range
            hand = s['seg'] == 255
            assert hand.any()
            z = s['depth'][hand]
            assert (z > s["hand_joints_3d"][:, 2].min() - 0.05).all() and (z < s["hand_joints_3d"][:, 2].max() + 0.05).all()
            g = ds.sequences[ds._map[ds._rows[i]][0]]['grasp_ind']
            assert s['contact'][g] == 1 and s['contact'].sum() == 1
    sides = {DexYCB(tree, 's0', 'train')[i]['meta']['mano_side'] for i in (0, -1)}
    assert sides == {'right', 'left'}


def test_fixture_is_one_rendered_scene_per_sequence(tree):
    """The fixture's pixels show its labels (right and mirrored left hands), and a sequence is one grasp seen by every camera."""
    ds = DexYCB(tree, 's0', 'train')
    hits, by_seq = {'left': [], 'right': []}, {}
    for i in range(len(ds)):
        paths, meta = ds.frame_paths(i), ds[i]['meta']
        lab = np.load(paths['label'])
        seg, depth = lab['seg'], np.asarray(Image.open(paths['depth']))
        assert ((seg > 0) == (depth > 0)).all()                            # every drawn pixel has depth, and only those
        if np.all(lab['joint_3d'] == -1):
            assert not (seg == 255).any() and (seg > 0).any()                # no hand drawn; the objects are
            continue
        uv = np.round(lab['joint_2d'][0]).astype(int)
        inside = (uv[:, 0] >= 2) & (uv[:, 0] < 638) & (uv[:, 1] >= 2) & (uv[:, 1] < 478)
        zj = lab['joint_3d'][0][inside, 2]
        # a joint's pixel shows the hand (within 2 px), or an object in front of the joint that hides it
        on = [(seg[v - 2:v + 3, u - 2:u + 3] == 255).any() or (0 < seg[v, u] < 255 and depth[v, u] / 1000 < z)
              for (u, v), z in zip(uv[inside], zj)]
        hits[meta['mano_side']].append(np.mean(on))
        # the visible surface at a joint's pixel is never behind the joint by more than a finger's half thickness
        z = depth[uv[inside, 1], uv[inside, 0]] / 1000
        drawn = z > 0
        dz = z[drawn] - lab['joint_3d'][0][inside][drawn, 2]
        assert dz.max() < 0.012, dz.max()
        by_seq.setdefault(meta['sequence'], []).append(lab)
    for side in ('left', 'right'):                                         # a wrong mirror puts the joints off the hand
        assert len(hits[side]) >= 8 and min(hits[side]) > 0.9, (side, hits[side])
    for name, labs in by_seq.items():
        assert len(labs) >= 2
        for lab in labs[1:]:                                               # same finger articulation in every view ...
            np.testing.assert_allclose(lab['pose_m'][0, 3:48], labs[0]['pose_m'][0, 3:48], atol=1e-4)
            d0 = np.linalg.norm(labs[0]['joint_3d'][0][:, None] - labs[0]['joint_3d'][0][None], axis=-1)
            d1 = np.linalg.norm(lab['joint_3d'][0][:, None] - lab['joint_3d'][0][None], axis=-1)
            np.testing.assert_allclose(d1, d0, atol=1e-5)                  # ... and the same hand, moved rigidly
        views = {(round(float(lab['pose_y'][0, 0, 3]), 4)) for lab in labs}
        assert len(views) == len(labs)                                     # but every camera / frame sees it differently


def test_skip_no_hand_keeps_official_indices(tree):
    full = DexYCB(tree, 's0', 'train')
    ds = DexYCB(tree, 's0', 'train', skip_no_hand=True)
    valid = [r for r in range(len(full)) if not np.all(full.joints_3d(r) == -1)]
    assert len(valid) < len(full) and len(ds) == len(valid)
    assert [ds.official_index(i) for i in range(len(ds))] == valid and ds[0]['meta']['index'] == valid[0]


def _corrupt(root, tmp_path):
    ds = DexYCB(root, 's0', 'val')
    p = ds.frame_paths(0)
    p['label'].write_bytes(p['label'].read_bytes()[:200])            # truncated npz
    c = ds.frame_paths(1)['color']
    c.write_bytes(c.read_bytes()[:300])                               # truncated JPEG
    ds.frame_paths(2)['color'].unlink()                               # missing image
    return p['label'], c, ds.frame_paths(2)['color']


def test_bad_files(tmp_path):
    root = write_dexycb_fixture(tmp_path/'dex', subjects=[0], sequences_per_subject=5, serials=2, frames=2)
    npz, jpg, gone = _corrupt(root, tmp_path)
    ds = DexYCB(root, 's0', 'val')
    for i, f in ((0, npz), (1, jpg), (2, gone)):
        with pytest.raises(DexYCBError, match=str(f.name)): ds[i]
    skip = DexYCB(root, 's0', 'val', on_error='skip', error_log=tmp_path/'errors.jsonl')
    out = [skip[i]['meta']['index'] for i in range(len(skip))]
    assert out == [3, 3, 3, 3]
    rep = json.loads(skip.write_error_report(tmp_path/'report.json').read_text())
    assert {Path(r['file']).name for r in rep['skipped']} == {npz.name, jpg.name, gone.name}
    assert len((tmp_path/'errors.jsonl').read_text().splitlines()) >= 3
    (root/'calibration'/'intrinsics'/f'{SERIALS[1]}_640x480.yml').unlink()
    with pytest.raises(DexYCBError, match=f'{SERIALS[1]}_640x480.yml: missing file'): DexYCB(root, 's0', 'val')
    ds = DexYCB(root, 's0', 'val', on_error='skip')
    assert ds.serials == [s for s in SERIALS if s != SERIALS[1]] and any('640x480' in r['file'] for r in ds.error_report)
    with pytest.raises(FileNotFoundError, match='does not exist'): DexYCB(tmp_path/'nowhere')


def test_eval_results_known_noise(tree, tmp_path):
    from amt_lib.metrics import write_hand_results
    ds = DexYCB(tree, 's0', 'train')
    idx, gt = dexycb_ground_truth(ds)
    noise = np.random.default_rng(0).normal(0, 1, gt.shape)
    noise = 4.0 * noise / np.linalg.norm(noise, axis=-1, keepdims=True)      # every joint exactly 4 mm off
    write_hand_results(tmp_path/'r.txt', idx, torch.as_tensor(gt + noise))
    from amt_lib.cli import main
    assert main(['eval-results', str(tmp_path/'r.txt'), '--root', str(tree), '--setup', 's0', '--split', 'train',
                             '--json', str(tmp_path/'r.json')]) == 0
    r = json.loads((tmp_path/'r.json').read_text())
    assert abs(r['absolute']['mpjpe'] - 4.0) < 1e-4 and r['num_samples'] == len(idx) < ds.num_frames_total


def test_augmented_fixture_batch_projects(tree):
    from torch.utils.data import default_collate
    from amt_lib.data.augment import Augmenter
    ds = DexYCB(tree, 's0', 'train', skip_no_hand=True)
    b = default_collate([ds[i] for i in range(4)])
    a = Augmenter(rotation_deg=45, scale=0.2, translation=0.1)(b, torch.Generator().manual_seed(0))
    assert (project_points(a['hand_joints_3d'], a['K']) - a['hand_joints_2d']).abs().max() < 0.5
    assert a['seg'].dtype == torch.uint8 and set(a['seg'].unique().tolist()) <= set(b['seg'].unique().tolist()) | {0}


def test_cache_bench_cli(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'amt_lib.cli', 'cache', '--bench', '--batches', '2', '--batch-size', '4',
                        '--json', str(tmp_path/'b.json')], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr
    b = json.loads((tmp_path/'b.json').read_text())
    assert b['cache_samples_per_s'] > 0 and b['dataloader_samples_per_s'] > 0 and 'ratio' in r.stdout


def test_train_on_dexycb_fixture_with_a_corrupt_frame(tmp_path):
    """`amt train` on the DexYCB data source runs end to end; with on_error=skip the bad frame is reported, not trained on."""
    root = write_dexycb_fixture(tmp_path/'dex', subjects=[0, 1], sequences_per_subject=5, serials=2, frames=2)
    bad = DexYCB(root, 's0', 'train', warn_partial=False).frame_paths(5)['color']
    bad.write_bytes(bad.read_bytes()[:500])                                  # a truncated JPEG
    run = tmp_path/'run'
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'WANDB_MODE': 'offline', 'OMP_NUM_THREADS': '1'}
    args = [sys.executable, '-m', 'amt_lib.cli', 'train', '--preset', 'smoke', '--run-dir', str(run),
            'data.source=dexycb', f'data.root={root}', 'training.max_steps=4']
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0 and bad.name in r.stderr + r.stdout             # default on_error=raise names the file
    r = subprocess.run(args + ['data.on_error=skip'], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((run/'data'/'report_train.json').read_text())
    assert rep['num_skipped'] >= 1 and {Path(s['file']).name for s in rep['skipped']} == {bad.name}
    assert 'skipped (data.on_error=skip)' in r.stdout and (run/'data'/'errors_train.jsonl').exists()
    assert json.loads((run/'data'/'report_val.json').read_text())['num_skipped'] == 0
    import csv
    rows = [row for row in csv.DictReader(open(run/'metrics.csv')) if row.get('rr_mpjpe')]
    assert rows and np.isfinite(float(rows[-1]['rr_mpjpe']))
    assert (run/'checkpoints'/'last.pt').exists()


def test_cached_skips_stay_in_the_report(tmp_path):
    """A frame skipped while the device cache was built is still reported by a later run that only loads the cache."""
    from amt_lib.data.cache import DeviceCache
    root = write_dexycb_fixture(tmp_path/'dex', subjects=[0], sequences_per_subject=5, serials=2, frames=2)
    bad = DexYCB(root, 's0', 'val', warn_partial=False).frame_paths(1)['label']
    bad.write_bytes(bad.read_bytes()[:100])                                  # a truncated label file
    first = DexYCB(root, 's0', 'val', on_error='skip', warn_partial=False)
    c1 = DeviceCache(first, tmp_path/'cache')
    assert c1.build_seconds > 0 and [Path(r['file']).name for r in first.error_report] == [bad.name]
    later = DexYCB(root, 's0', 'val', on_error='skip', warn_partial=False)    # a new run: nothing read yet
    c2 = DeviceCache(later, tmp_path/'cache')
    assert c2.build_seconds == 0                                             # loaded, not rebuilt
    rep = json.loads(later.write_error_report(tmp_path/'report.json').read_text())
    assert rep['num_skipped'] == 1 and Path(rep['skipped'][0]['file']).name == bad.name
