"""The MANO layer against an independent implementation (smplx), and the MANO file loader on official-style pickles."""
import os, pickle, shutil, sys, time, types
import numpy as np
import pytest
import scipy.sparse
import torch

from amt_lib.hand_model import (MANOLayer, generate_mano, generated_mano_path, load_mano_file, local_frames,
                                multi_coordinate_features, DEXYCB_JOINT_ORDER, TIP_VERTEX_IDS, MANO_KEYS)

smplx = pytest.importorskip('smplx')


def _smplx_vs_layer(path, side, seed=0, B=4):
    "Max abs differences (verts, 16 joints, 21 joints) between smplx.MANO and MANOLayer for random pose and shape."
    g = torch.Generator().manual_seed(seed)
    pose = torch.randn(B, 48, generator=g, dtype=torch.float64) * 0.8
    betas = torch.randn(B, 10, generator=g, dtype=torch.float64) * 2
    trans = torch.randn(B, 3, generator=g, dtype=torch.float64) * 0.3
    # smplx: full axis-angle pose given as is (no PCA, no mean added); translation added to every vertex
    sm = smplx.MANO(str(path), is_rhand=side == 'right', use_pca=False, flat_hand_mean=True,
                    num_betas=10, dtype=torch.float64)
    ref = sm(betas=betas, global_orient=pose[:, :3], hand_pose=pose[:, 3:], transl=trans)
    out = MANOLayer(path, side=side, dtype=torch.float64)(pose, betas, trans)
    ref21 = torch.cat([ref.joints[:, :16], ref.vertices[:, list(TIP_VERTEX_IDS[side])]], 1)[:, list(DEXYCB_JOINT_ORDER)]
    return ((ref.vertices - out['verts']).abs().max().item(),
            (ref.joints[:, :16] - out['transforms'][:, :, :3, 3]).abs().max().item(),
            (ref21 - out['joints']).abs().max().item())


@pytest.mark.parametrize('side', ['right', 'left'])
def test_generated_model_matches_smplx(side):
    for err in _smplx_vs_layer(generated_mano_path(side), side): assert err < 1e-5


def _stress_model(tmp_path, side):
    "The generated model with random pose correctives, shape directions and skinning weights (tests the layouts)."
    m = generate_mano(side)
    rng = np.random.default_rng(7)
    m['posedirs'] = rng.standard_normal(m['posedirs'].shape) * 0.01
    m['shapedirs'] = m['shapedirs'] + rng.standard_normal(m['shapedirs'].shape) * 0.003
    w = rng.random(m['weights'].shape) ** 4; m['weights'] = w / w.sum(1, keepdims=True)
    p = tmp_path/f'MANO_{side.upper()}.pkl'
    p.write_bytes(pickle.dumps(m, protocol=2))
    return p


@pytest.mark.parametrize('side', ['right', 'left'])
def test_random_model_matches_smplx(tmp_path, side):
    for err in _smplx_vs_layer(_stress_model(tmp_path, side), side, seed=1): assert err < 1e-5


class _Ch:
    "Stand-in for chumpy.ch.Ch: pickles under chumpy's name with its value in `x`, like the official files."
    def __init__(self, x): self.x = x
_Ch.__module__, _Ch.__qualname__, _Ch.__name__ = 'chumpy.ch', 'Ch', 'Ch'


def test_official_style_pickle_loads_without_chumpy(tmp_path):
    m = generate_mano('right')
    off = dict(m, shapedirs=_Ch(m['shapedirs']), v_template=_Ch(m['v_template']), posedirs=_Ch(m['posedirs']),
               J=_Ch(m['J_regressor'] @ m['v_template']), bs_style='lbs', bs_type='lrotmin')
    mod = types.ModuleType('chumpy.ch'); mod.Ch = _Ch
    saved = {k: sys.modules.get(k) for k in ('chumpy', 'chumpy.ch')}
    sys.modules['chumpy'], sys.modules['chumpy.ch'] = types.ModuleType('chumpy'), mod
    try: data = pickle.dumps(off, protocol=2)
    finally:
        for k, v in saved.items():
            if v is None: sys.modules.pop(k, None)
            else: sys.modules[k] = v
    assert b'chumpy.ch' in data
    (tmp_path/'MANO_RIGHT.pkl').write_bytes(data)
    d = load_mano_file(tmp_path/'MANO_RIGHT.pkl')
    assert 'chumpy' not in sys.modules or saved['chumpy'] is not None
    for k in MANO_KEYS:
        a, b = d[k], m[k]
        if scipy.sparse.issparse(a): a, b = a.toarray(), b.toarray()
        np.testing.assert_array_equal(a, b)
    pose = torch.randn(2, 48) * 0.5
    o1 = MANOLayer(tmp_path)(pose)                                 # a folder: MANO_RIGHT.pkl inside
    o2 = MANOLayer()(pose)
    torch.testing.assert_close(o1['verts'], o2['verts'])


def test_refuses_other_globals(tmp_path):
    class Evil:
        def __reduce__(self): return (os.system, ('echo should-not-run',))
    (tmp_path/'evil.pkl').write_bytes(pickle.dumps({'v_template': Evil()}, protocol=2))
    from amt_lib.hand_model import MANOFileError
    with pytest.raises(MANOFileError, match='refusing to load global (os|posix).system') as e:   # refused, naming the file
        load_mano_file(tmp_path/'evil.pkl')
    assert str(tmp_path/'evil.pkl') in str(e.value)


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError) as e: MANOLayer(tmp_path, side='left')
    msg = str(e.value)
    assert str(tmp_path/'MANO_LEFT.pkl') in msg and 'mano.is.tue.mpg.de' in msg and 'model.mano_path' in msg


def test_bad_file_names_missing_keys(tmp_path):
    (tmp_path/'x.pkl').write_bytes(pickle.dumps({'v_template': np.zeros((778, 3))}))
    with pytest.raises(ValueError, match='missing keys'): load_mano_file(tmp_path/'x.pkl')


def test_single_hand_forward_is_fast_and_features_shapes():
    torch.set_num_threads(1)
    layer = MANOLayer()
    pose, betas, trans = torch.randn(1, 48) * 0.5, torch.randn(1, 10), torch.randn(1, 3)
    with torch.no_grad():
        for _ in range(5): layer(pose, betas, trans)
        ts = []
        for _ in range(30):
            t = time.perf_counter(); out = layer(pose, betas, trans); ts.append(time.perf_counter() - t)
    assert np.median(ts) < 0.02, f'single-hand forward took {np.median(ts) * 1e3:.1f} ms'   # ~1-2 ms unloaded
    feats = multi_coordinate_features(out['verts'], local_frames(out['transforms'], out['verts']))
    assert feats.shape == (1, 778, 67) and torch.isfinite(feats).all()
