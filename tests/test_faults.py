"""Faults, hostile files and images: every case ends in a clear one-line error naming the culprit, and nothing valid is lost.

Predict inputs (K, hand box, 16-bit / EXIF images, equal stems, good and bad images together, non-finite outputs),
checkpoints with NaN or exploded weights, a diverging run, stale temporary files, a group SIGTERM with data workers,
a full disk, and malformed DexYCB labels, meta and calibration files.
"""
import contextlib, errno, io, json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from amt_lib.config import load_config, config_to_yaml
from amt_lib.cli import main
from amt_lib.inference import Predictor, load_photo, predict_photos
from amt_lib.learner.checkpoint import (CheckpointError, save_checkpoint, load_checkpoint, weight_stats, WEIGHT_BOUND,
                                        clean_stale_tmp)
from amt_lib.learner.core import Callback
from amt_lib.data.dexycb import DexYCB, DexYCBError, SERIALS
from amt_lib.data.dexycb_fixture import write_dexycb_fixture

torch.set_num_threads(1)
QUIET = ['logging.tensorboard=false', 'logging.plots=false', 'logging.progress=quiet']


def run(fn, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = fn(argv)
    return rc, out.getvalue(), err.getvalue()


def _ckpt(path, poison=None):
    "A smoke checkpoint as the trainer writes it; `poison(state_dict)` spoils its weights (model and EMA)."
    from amt_lib.models.amt import build_model
    cfg = load_config('smoke')
    torch.manual_seed(0); sd = build_model(cfg).state_dict()
    if poison: poison(sd)
    return save_checkpoint({'model': sd, 'ema': sd, 'optimizer': None, 'step': 7, 'epoch': 0, 'config': config_to_yaml(cfg)}, path)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    return _ckpt(tmp_path_factory.mktemp('run')/'checkpoints'/'last.pt')


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp('photos'); rng = np.random.default_rng(0)
    for n in ('a/img.png', 'b/img.png'):
        (d/n).parent.mkdir(exist_ok=True); Image.fromarray((rng.random((120, 160, 3)) * 255).astype(np.uint8)).save(d/n)
    (d/'bad.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
    return d


# ------------------------------------------------------------------------------------------------ amt predict inputs

@pytest.mark.parametrize('K, msg', [('0,0,0,0', 'focal lengths must be > 0 pixels, got fx=0, fy=0'),
                                    ('500,nan,80,60', 'fy=nan'), ('500,500,80', 'four comma-separated numbers')])
def test_predict_bad_K_is_one_line_exit_2(ckpt, photos, tmp_path, K, msg):
    rc, out, err = run(main, ['predict', str(photos/'a/img.png'), '--ckpt', str(ckpt), '--device', 'cpu', '--K', K, '--out', str(tmp_path)])
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob('*.json'))


def test_predict_principal_point_outside_image_fails_that_image(ckpt, photos, tmp_path):
    rc, out, err = run(main, ['predict', str(photos/'a/img.png'), '--ckpt', str(ckpt), '--device', 'cpu', '--K', '500,500,3000,60',
                                     '--out', str(tmp_path)])
    assert rc == 2 and 'a/img.png' in err and 'principal point (3000, 60) is far outside the 160x120 image' in err


def test_predict_hand_box_checked_against_each_image(ckpt, photos, tmp_path):
    rc, out, err = run(main, ['predict', str(photos/'a/img.png'), '--ckpt', str(ckpt), '--device', 'cpu',
                                     '--hand-box', '400,300,500,400', '--out', str(tmp_path/'o1')])
    assert rc == 2 and 'lies outside the 160x120 image' in err and 'img.png' in err
    rc, out, err = run(main, ['predict', str(photos/'a/img.png'), '--ckpt', str(ckpt), '--device', 'cpu',
                                     '--hand-box', '120,80,220,180', '--out', str(tmp_path/'o2')])
    assert rc == 0 and 'warning' in err and 'clipped to [120.0, 80.0, 160.0, 120.0]' in err
    r = json.loads((tmp_path/'o2'/'img.json').read_text())
    assert r['warnings'] and r['crop']['mode'] == 'hand'
    rc, _, err = run(main, ['predict', str(photos/'a/img.png'), '--ckpt', str(ckpt), '--hand-box', '10,10,inf,20'])
    assert rc == 2 and 'finite' in err


def test_predict_good_and_bad_images_equal_stems(ckpt, photos, tmp_path):
    rc, out, err = run(main, ['predict', str(photos/'a/img.png'), str(photos/'bad.jpg'), str(photos/'b/img.png'), str(photos/'none.png'),
                                     '--ckpt', str(ckpt), '--device', 'cpu', '--out', str(tmp_path)])
    assert rc == 2
    assert sorted(p.name for p in tmp_path.glob('*.json')) == ['a_img_png.json', 'b_img_png.json']   # both kept, none overwritten
    assert 'bad.jpg: cannot read image' in err and 'none.png' in err and '2 of 4 image(s) written' in err
    for p in tmp_path.glob('*.json'):
        r = json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(f'{p} holds {c}'))   # strict JSON
        assert np.isfinite(np.array(r['hand']['joints_mm'])).all()
    assert json.loads((tmp_path/'b_img_png.json').read_text())['image'].endswith('b/img.png')


def test_predict_nan_checkpoint_refused(tmp_path, photos):
    bad = _ckpt(tmp_path/'nan.pt', lambda sd: sd['hand_encoder.query'].view(-1)[0].fill_(float('nan')))
    rc, out, err = run(main, ['predict', str(photos/'a/img.png'), '--ckpt', str(bad), '--device', 'cpu', '--out', str(tmp_path/'o')])
    assert rc == 2 and f'checkpoint {bad}' in err and "'hand_encoder.query' has 1 NaN/inf" in err
    assert not (tmp_path/'o').exists() or not list((tmp_path/'o').glob('*.json'))
    rc, out, err = run(main, ['eval', '--ckpt', str(bad), '--device', 'cpu', '--no-progress'])
    assert rc == 2 and f'checkpoint {bad}' in err and 'non-finite weights' in err
    rc, out, err = run(main, ['export', 'onnx', '--ckpt', str(bad), '--out', str(tmp_path/'m.onnx')])
    assert rc != 0 and 'non-finite weights' in err and not (tmp_path/'m.onnx').exists()
    big = _ckpt(tmp_path/'big.pt', lambda sd: sd['refiner.pos_enc.gamma'].mul_(1e29))
    with pytest.raises(CheckpointError, match=r"exploded weights: max \|w\| = .*e\+29 in 'refiner.pos_enc.gamma'"):
        Predictor.from_checkpoint(big, device='cpu')


def test_predict_non_finite_output_is_an_error_for_that_image(ckpt, photos, tmp_path):
    pred = Predictor.from_checkpoint(ckpt, device='cpu')
    real = pred.net
    def half_nan(img, K):
        out = real(img, K); out['pred_hand_joints'][1:] = float('nan'); return out   # the second image of the batch goes bad
    pred.net = half_nan
    errors = []
    recs = predict_photos(pred, [photos/'a/img.png', photos/'b/img.png'], tmp_path, errors=errors)
    assert [Path(r['image']).parent.name for r in recs] == ['a'] and len(errors) == 1
    assert "b/img.png" in errors[0]['error'] and 'pred_hand_joints' in errors[0]['error'] and str(ckpt) in errors[0]['error']
    assert sorted(p.name for p in tmp_path.glob('*.json')) == ['a_img_png.json']


@pytest.mark.parametrize('bad_rows', [slice(1, 2), slice(None)])
def test_eval_non_finite_output_names_the_checkpoint(ckpt, tmp_path, monkeypatch, bad_rows):
    """A model whose output goes NaN on some or all samples: the Evaluator counts them (no SVD traceback), `amt eval` ends in
    one line naming the checkpoint and how many, exit 2, and writes no metrics or results file."""
    real = Predictor.predict
    def nan_out(self, images, K):
        out = real(self, images, K)
        for v in out.values(): v[bad_rows] = float('nan')
        return out
    monkeypatch.setattr(Predictor, 'predict', nan_out)
    rc, out, err = run(main, ['eval', '--ckpt', str(ckpt), '--device', 'cpu', '--split', 'val', '--max-batches', '1', '--batch-size', '4',
                                  '--out', str(tmp_path/'ev'), '--no-progress'])
    n = 1 if bad_rows == slice(1, 2) else 4
    lines = err.strip().splitlines()
    assert rc == 2 and 'Traceback' not in err and len(lines) == 1, err
    assert lines[0].startswith(f'amt eval: error: checkpoint {ckpt}: ') and f'not finite for {n} of 4 samples' in lines[0], err
    assert 'nonfinite_pred' in out and not (tmp_path/'ev').exists()


def test_photos_16bit_and_exif(tmp_path):
    g = np.full((30, 40), 40000, np.uint16)
    Image.fromarray(g).save(tmp_path/'g16.png')
    assert abs(float(load_photo(tmp_path/'g16.png').mean()) - 40000 / 65535) < 1e-4       # not clipped to white
    a = np.zeros((30, 40, 3), np.uint8); a[:, :20] = 255                                  # left half white as stored
    im = Image.fromarray(a); ex = im.getexif(); ex[0x0112] = 3                             # orientation 3: rotated 180°
    im.save(tmp_path/'r.jpg', exif=ex, quality=100)
    x = load_photo(tmp_path/'r.jpg')
    assert x.shape == (3, 30, 40) and x[:, :, 30:].mean() > 0.9 and x[:, :, :10].mean() < 0.1   # shown: right half white


# ------------------------------------------------------------------------------------------------ training faults

class Explode(Callback):
    "After optimiser step `at`, multiply every weight by 1e30 (finite, useless): a diverging run."
    order = 35
    def __init__(self, at): self.at = at
    def after_step(self, learn):
        if learn.step_count == self.at:
            with torch.no_grad():
                for p in learn.raw_model.parameters(): p.mul_(1e30)


def test_divergence_keeps_a_good_checkpoint_and_stale_tmp_is_cleaned(tmp_path, monkeypatch, capsys):
    from amt_lib.learner.train import train, NonFiniteLossError
    monkeypatch.setenv('WANDB_MODE', 'disabled')
    ck = tmp_path/'checkpoints'; ck.mkdir()
    (ck/'.last.pt.tmp-999999999').write_bytes(b'half a checkpoint')           # a writer killed long ago (no such pid)
    cfg = load_config('smoke', QUIET + ['training.epochs=3', 'training.good_state_every=2', 'training.nan_patience=2'])
    with pytest.raises(NonFiniteLossError) as e:                               # checks at steps 1 (the first), 2, 4, ...
        train(cfg, tmp_path, callbacks=[Explode(2)])
    msg = str(e.value)
    assert msg.startswith('weights diverged by step 2: exploded weights: max |w| = '), msg
    assert f'the last good state (step 1) is in {ck/"last_good.pt"}' in msg, msg
    assert 'removed 1 stale temporary checkpoint file' in capsys.readouterr().out
    assert not list(ck.glob('.*.tmp-*'))
    good = load_checkpoint(ck/'last_good.pt')                                  # finite and within the bound
    assert good['step'] == 1 and good['config'] and weight_stats(good['model'])[0] < WEIGHT_BOUND
    assert weight_stats(good['ema'])[0] < WEIGHT_BOUND
    with pytest.raises(CheckpointError, match='last.pt .*weights'):               # the state at the stop is refused by name
        load_checkpoint(ck/'last.pt')


def test_disk_full_is_named(tmp_path, monkeypatch):
    from amt_lib.learner import checkpoint as C
    monkeypatch.setenv('WANDB_MODE', 'disabled')
    p = save_checkpoint({'step': 1}, tmp_path/'last.pt')
    real = C.torch.save
    def full(obj, f, *a, **k):
        f.write(b'PK\x03\x04part')
        raise RuntimeError('[enforce fail at inline_container.cc:626] . unexpected pos 4096 vs 1024')
    monkeypatch.setattr(C.torch, 'save', full)
    with pytest.raises(CheckpointError, match=f'disk full \\(or write failed\\) while writing {p}: .* free there; the previous last.pt is intact'):
        save_checkpoint({'step': 2}, p)
    monkeypatch.setattr(C.torch, 'save', lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, 'No space left on device')))
    rc, out, err = run(main, ['train', '--preset', 'smoke', '--run-dir', str(tmp_path/'run'), *QUIET, 'training.max_steps=1'])
    assert rc == 2 and 'disk full (or write failed) while writing' in err and 'last.pt' in err and 'Traceback' not in err
    monkeypatch.setattr(C.torch, 'save', real)
    assert load_checkpoint(p)['step'] == 1 and [x.name for x in tmp_path.iterdir() if x.is_file()] == ['last.pt']


def test_group_sigterm_with_data_workers_saves_and_exits_0(tmp_path):
    """SIGTERM to the whole process group (Slurm, systemd), data.num_workers=2: one line, a checkpoint, exit 0."""
    p = subprocess.Popen([sys.executable, '-m', 'amt_lib.cli', 'train', '--preset', 'smoke', '--run-dir', str(tmp_path),
                          'data.num_workers=2', 'training.epochs=100', 'training.log_every=1', 'logging.tensorboard=false',
                          'logging.plots=false'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, env={**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'disabled'})
    t0, lines = time.time(), []
    while time.time() - t0 < 120:
        line = p.stdout.readline()
        if not line: break
        lines.append(line)
        if '[train] step 2/' in line: os.killpg(p.pid, signal.SIGTERM); break
    out = ''.join(lines) + p.communicate(timeout=120)[0]
    assert p.returncode == 0, out[-3000:]
    assert 'Traceback' not in out and 'killed by signal' not in out, out[-3000:]
    assert out.count('SIGTERM received') == 1                                  # the main process only, not each worker
    ck = load_checkpoint(tmp_path/'checkpoints'/'last.pt')
    assert ck['step'] >= 2 and f"stopped by SIGTERM at step {ck['step']}" in out


# ------------------------------------------------------------------------------------------------ DexYCB files

@pytest.fixture(scope='module')
def dex(tmp_path_factory):
    "s0/val of this tree: sequence 4 of subject 0, 2 cameras x 2 frames = 4 samples."
    return write_dexycb_fixture(tmp_path_factory.mktemp('dex')/'dex', subjects=[0], sequences_per_subject=5, serials=2, frames=2)


def _rewrite_npz(path, **changes):
    with np.load(path) as z: d = {k: z[k] for k in z.files}
    d.update(changes); np.savez_compressed(path, **d)


def _pose_y_sheared(p):
    with np.load(p) as z: y = z['pose_y'].copy()
    y[0, 0, :3] *= 1.5
    return y


LABEL_CASES = {
    'joint_3d': lambda p: dict(joint_3d=np.full((1, 21, 3), np.nan, np.float32)),
    'joint_2d': lambda p: dict(joint_2d=np.full((1, 21, 2), np.inf, np.float32)),
    'pose_m': lambda p: dict(pose_m=np.full((1, 51), np.nan, np.float32)),
    'pose_y': lambda p: dict(pose_y=_pose_y_sheared(p)),
    'seg': lambda p: dict(seg=np.full((480, 640), 77, np.uint8)),
}


@pytest.mark.parametrize('key', list(LABEL_CASES))
def test_malformed_label_named_and_skipped(dex, tmp_path, key):
    ds = DexYCB(dex, 's0', 'val', warn_partial=False)
    lab = ds.frame_paths(1)['label']
    keep = lab.read_bytes()
    try:
        _rewrite_npz(lab, **LABEL_CASES[key](lab))
        with pytest.raises(DexYCBError, match=f'{lab.name}: {key}'): ds[1]
        skip = DexYCB(dex, 's0', 'val', on_error='skip', warn_partial=False)
        assert [skip[i]['meta']['index'] for i in range(len(skip))] == [0, 2, 2, 3]        # exactly that frame is skipped
        rep = json.loads(skip.write_error_report(tmp_path/'r.json').read_text())
        assert rep['num_skipped'] == 1 and rep['skipped'][0]['file'] == str(lab) and key in rep['skipped'][0]['error']
    finally: lab.write_bytes(keep)


def test_non_finite_joints_in_the_hand_scan(dex):
    ds = DexYCB(dex, 's0', 'val', warn_partial=False)
    lab = ds.frame_paths(2)['label']; keep = lab.read_bytes()
    try:
        _rewrite_npz(lab, joint_3d=np.full((1, 21, 3), np.nan, np.float32))
        with pytest.raises(DexYCBError, match=f'{lab.name}: joint_3d'):
            DexYCB(dex, 's0', 'val', skip_no_hand=True, warn_partial=False, cache_dir=dex/'scan1')
        ds = DexYCB(dex, 's0', 'val', skip_no_hand=True, on_error='skip', warn_partial=False, cache_dir=dex/'scan2')
        assert 2 not in ds._rows and [r['file'] for r in ds.error_report] == [str(lab)]
    finally: lab.write_bytes(keep)


META_CASES = {'ycb_ids': [0, 5], 'ycb_grasp_ind': 7, 'mano_sides': ['both'], 'num_frames': 'two', 'mano_calib': 3}


@pytest.mark.parametrize('key', list(META_CASES) + ['missing'])
def test_malformed_meta_named_and_skipped(dex, key):
    seq = DexYCB(dex, 's0', 'val', warn_partial=False).sequences[0]['name']
    meta = dex/seq/'meta.yml'; keep = meta.read_text()
    try:
        m = yaml.safe_load(keep)
        if key == 'missing': del m['ycb_grasp_ind']
        else: m[key] = META_CASES[key]
        meta.write_text(yaml.safe_dump(m))
        with pytest.raises(DexYCBError, match=f"meta.yml: .*{'ycb_grasp_ind' if key == 'missing' else key}"):
            DexYCB(dex, 's0', 'val', warn_partial=False)
        skip = DexYCB(dex, 's0', 'val', on_error='skip', warn_partial=False)
        assert skip.num_frames_total == 0 and [r['file'] for r in skip.error_report] == [str(meta)]
    finally: meta.write_text(keep)


@pytest.mark.parametrize('what', ['intrinsics', 'betas'])
def test_malformed_calibration_named(dex, what):
    if what == 'intrinsics': f = dex/'calibration'/'intrinsics'/f'{SERIALS[1]}_640x480.yml'
    else: f = next((dex/'calibration').glob('mano_*'))/'mano.yml'
    keep = f.read_text()
    try:
        d = yaml.safe_load(keep)
        if what == 'intrinsics': d['color']['fx'] = float('nan')
        else: d['betas'][3] = float('inf')
        f.write_text(yaml.safe_dump(d))
        with pytest.raises(DexYCBError, match=f"{f.name}: {'color.fx = nan' if what == 'intrinsics' else 'betas: non-finite'}"):
            DexYCB(dex, 's0', 'val', warn_partial=False)
        skip = DexYCB(dex, 's0', 'val', on_error='skip', warn_partial=False)
        assert [r['file'] for r in skip.error_report] == [str(f)]
        assert len(skip) == (2 if what == 'intrinsics' else 0)                 # that camera's frames, or that subject's sequences
    finally: f.write_text(keep)
