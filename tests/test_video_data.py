"Clips (amt_lib.data.video): DexYCB windows on a fixture tree, SynthHOI video labels, resumable clip loaders, the clip cache."
import json, warnings
import numpy as np
import pytest
import torch
from amt_lib.config import load_config
from amt_lib.data.dexycb import DexYCB, DexYCBError, LABEL_FMT
from amt_lib.data.dexycb_fixture import write_dexycb_fixture
from amt_lib.data.video import (PHASES, SynthHOIVideo, DexYCBClips, ClipCache, ClipLoader, build_clip_loaders,
                                grasp_phase, motion_targets)
from amt_lib.geometry import project_points

T, STEP, STRIDE, FRAMES = 3, 2, 1, 6     # windows [0,2,4] and [1,3,5] in each sequence and camera


@pytest.fixture(scope='module')
def dex(tmp_path_factory):
    "A DexYCB tree of one subject, two sequences, cameras 0, 1 (s2 train), 6 (s2 val), 7 (s2 test), 6 frames each."
    return write_dexycb_fixture(tmp_path_factory.mktemp('vdex')/'dex', subjects=[0], sequences_per_subject=2,
                                serials=[0, 1, 6, 7], frames=FRAMES)


def reader(root, split, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')           # a partial tree: most subjects and cameras are missing
        return DexYCB(root, 's2', split, image_size=32, warn_partial=False, **kw)


def test_dexycb_windows_and_splits(dex):
    clips = {s: DexYCBClips(reader(dex, s), T, STEP, STRIDE) for s in ('train', 'val', 'test')}
    assert {s: len(c) for s, c in clips.items()} == {'train': 2 * 2 * 2, 'val': 2 * 2, 'test': 2 * 2}
    for s, c in clips.items():
        m = c.frames._map[c.rows]                                   # (N,T,3): sequence, camera, frame
        assert (m[:, :, :2] == m[:, :1, :2]).all()                   # never across sequences or cameras
        assert (np.diff(m[:, :, 2], axis=1) == STEP).all()           # consecutive at the frame step
        assert m[:, :, 2].max() < FRAMES
    serials = lambda c: {c.clip_meta(i)['serial'] for i in range(len(c))}
    assert serials(clips['val']).isdisjoint(serials(clips['train'])) and len(serials(clips['test'])) == 1
    assert len(DexYCBClips(reader(dex, 'train'), 4, 2, 1)) == 0      # a window longer than the sequence: none
    some = reader(dex, 'train', skip_no_hand=True)                  # frame 0 of sequence 0 has no hand
    assert len(some) < some.num_frames_total
    with pytest.raises(ValueError, match='skip_no_hand=False'): DexYCBClips(some, T)   # a window needs every frame


def test_dexycb_clip_is_its_frames(dex):
    c = DexYCBClips(reader(dex, 'train'), T, STEP, STRIDE)
    clip = c[3]
    assert clip['image'].shape == (T, 3, 32, 32) and clip['phase'].shape == (T,)
    assert clip['joint_occluded'].shape == (T, 21) and clip['phase'].max() < len(PHASES)
    meta = clip['meta']
    assert meta['source'] == 'dexycb' and meta['step'] == STEP and meta['first_frame'] == 1
    for t, row in enumerate(c.rows[3]):
        f = c.frames._load(int(row))
        assert f['meta']['frame'] == meta['first_frame'] + t * STEP
        torch.testing.assert_close(clip['hand_joints_3d'][t], f['hand_joints_3d'])
        torch.testing.assert_close(clip['image'][t], f['image'])
    torch.testing.assert_close(clip['phase'], grasp_phase(clip['contact'], clip['obj_pose'], clip['obj_valid'],
                                                          c.move_speed))


def test_dexycb_bad_frame_reported(dex, tmp_path):
    bad = sorted(dex.glob(f'*/*/*/{LABEL_FMT.format(2)}'))[0]        # frame 2 of the first sequence, first camera
    saved = bad.read_bytes()
    try:
        bad.write_bytes(b'not an npz')
        with pytest.raises(DexYCBError, match=LABEL_FMT.format(2)):
            DexYCBClips(reader(dex, 'train'), T, STEP, STRIDE)[0]
        log = tmp_path/'errors.jsonl'
        c = DexYCBClips(reader(dex, 'train', on_error='skip', error_log=log), T, STEP, STRIDE)
        clip = c[0]                                                  # window [0,2,4] holds the bad frame
        assert [w['clip'] for w in c.bad_windows] == [0] and c.bad_windows[0]['file'] == str(bad)
        assert clip['meta']['clip'] == 1                             # the next window, not a patched one
        assert [json.loads(l)['file'] for l in log.read_text().splitlines()] == [str(bad)]
        cache = ClipCache(DexYCBClips(reader(dex, 'train', on_error='skip'), T, STEP, STRIDE),
                          cache_dir=tmp_path/'cache')
        assert len(cache) == len(c) - 1 and [w['clip'] for w in cache.bad_windows] == [0]
    finally: bad.write_bytes(saved)


def test_dexycb_cache_matches_plain(dex, tmp_path):
    c = DexYCBClips(reader(dex, 'val'), T, STEP, STRIDE)
    cache = ClipCache(c, cache_dir=tmp_path)
    b = cache.batch(torch.tensor([2, 0]))
    for k, i in enumerate((2, 0)):
        ref = c[i]
        for key in ('hand_joints_3d', 'obj_pose', 'contact', 'phase', 'joint_occluded', 'hand_valid'):
            torch.testing.assert_close(b[key][k], ref[key])
        torch.testing.assert_close(b['image'][k], ref['image'], atol=1 / 255, rtol=0)
        assert b['meta'][k] == ref['meta']
    sparse = ClipCache(DexYCBClips(reader(dex, 'val'), T, STEP, 2), cache_dir=tmp_path)   # windows [0,2,4] only
    assert len(sparse) == 2 and len(sparse.cache) == 2 * T                 # only the frames some window uses (of 12)
    torch.testing.assert_close(sparse.batch(torch.tensor([1]))['hand_joints_3d'][0], c[2]['hand_joints_3d'])


def test_build_clip_loaders_dexycb(dex, tmp_path):
    cfg = load_config('smoke', {'data.source': 'dexycb', 'data.root': str(dex), 'data.setup': 's2',
                                'data.image_size': 32, 'data.cache_dir': str(tmp_path), 'video.clip_len': T,
                                'video.frame_step': STEP, 'video.stride': STRIDE, 'video.batch_size': 2})
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        train, val = build_clip_loaders(cfg)
    assert (len(train.source), len(val.source)) == (8, 4) and (len(train), len(val)) == (4, 2)
    b = next(iter(val))
    assert b['image'].shape == (2, T, 3, 32, 32) and b['fut_joints'].shape == (2, T, 2, 21, 3)
    assert not b['fut_valid'][:, -1].any()                           # nothing beyond the clip's end


@pytest.mark.parametrize('cache', [False, True])
def test_clip_loader_resumes_mid_epoch(cache, tmp_path):
    def loader():
        ds = SynthHOIVideo('train', 7, image_size=32, clip_len=4)
        return ClipLoader(ClipCache(ds, cache_dir=tmp_path) if cache else ds, 2, seed=3, horizon=2)
    a = loader()
    whole = list(a)                                                  # epoch 0 in full
    b = loader(); it = iter(b); next(it)
    state = b.state_dict()
    c = loader(); c.load_state_dict(state)
    rest = list(c)
    assert len(whole) == 3 and len(rest) == 2
    for x, y in zip(whole[1:], rest):
        assert torch.equal(x['index'], y['index']) and torch.equal(x['image'], y['image'])
        assert torch.equal(x['fut_wrist'], y['fut_wrist'])
    assert c.state_dict()['epoch'] == 1                               # the next epoch starts after the last batch


def test_synth_video_labels_and_phases():
    ds = SynthHOIVideo('val', 16, image_size=48, clip_len=6)
    agree = n = 0
    for i in range(len(ds)):
        c = ds[i]
        torch.testing.assert_close(project_points(c['hand_joints_3d'], c['K']), c['hand_joints_2d'], atol=1e-3, rtol=0)
        assert c['hand_valid'].all() and (c['phase'][1:] >= c['phase'][:-1]).all()   # phases in script order
        agree += (grasp_phase(c['contact'], c['obj_pose'], c['obj_valid'], 0.003) == c['phase']).sum().item()
        n += c['phase'].numel()
    assert agree / n >= 0.9, agree / n
    again = SynthHOIVideo('val', 16, image_size=48, clip_len=6)[5]
    assert torch.equal(again['image'], ds[5]['image']) and torch.equal(again['phase'], ds[5]['phase'])


def test_motion_targets_window_ends():
    ds = SynthHOIVideo('train', 2, image_size=32, clip_len=5)
    c = {k: v[None] for k, v in ds[0].items() if torch.is_tensor(v)}
    m = motion_targets(c, 3)
    assert m['fut_valid'][0].sum(-1).tolist() == [3, 3, 2, 1, 0]      # t + h past the end: not valid
    torch.testing.assert_close(m['fut_wrist'][0, 1, 2], c['hand_joints_3d'][0, 4, 0] - c['hand_joints_3d'][0, 1, 0])
    assert m['fut_obj'][0, 3, 1:].abs().sum() == 0


def test_build_clip_loaders_synth_cache(tmp_path):
    cfg = load_config('smoke', {'data.image_size': 32, 'data.cache': True, 'data.cache_dir': str(tmp_path)})
    train, val = build_clip_loaders(cfg, progress='quiet')
    assert train.source.cache_key != val.source.cache_key and train.clips.cache.build_seconds > 0
    again, _ = build_clip_loaders(cfg, progress='quiet')
    assert again.clips.cache.build_seconds == 0                       # a second run renders nothing
    b = next(iter(val))
    assert b['image'].shape == (cfg.video.batch_size, cfg.video.clip_len, 3, 32, 32) and b['image'].dtype == torch.float32
