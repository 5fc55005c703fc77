"""The video stage in the pipeline (issue 20): its notebook in the smoke pipeline, `amt train --stage video` alone and
resumed, a finished video stage kept by `--resume`, and `amt predict` on a folder of frames."""
import json, math, shutil, subprocess
from pathlib import Path
import nbformat, numpy as np, pytest, torch

def amt(*args, timeout=600):
    return subprocess.run([shutil.which('amt'), *args], capture_output=True, text=True, timeout=timeout)

def errors_in(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    return [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.get('output_type') == 'error']

TARGETS = {'accel_error', 'rr_mpjpe', 'rr_mpjpe_occluded', 'phase_accuracy', 'forecast_wrist', 'forecast_joints'}

def check_video_summary(s, steps):
    "A video-stage summary: the measures of both models, phases, forecasts per horizon, each target with value and met."
    assert s['stage'] == 'video' and s['steps'] == steps and s['frames'] > 0 and s['clips'] > 0
    for m in ('temporal', 'single'):
        for k in ('rr_mpjpe', 'rr_mpjpe_occluded', 'accel_error', 'jitter'): assert k in s[m], (m, k)
        assert math.isfinite(s[m]['rr_mpjpe']) and math.isfinite(s[m]['accel_error'])
    assert s['rr_mpjpe'] == s['temporal']['rr_mpjpe'] and 0 <= s['phase_accuracy'] <= 1
    assert set(s['phase_f1']) == {'approach', 'grasp', 'move', 'release'}
    for what in ('wrist', 'joints'):
        f = s[f'forecast_{what}']
        assert len(f['model']) == len(f['cv_single']) == len(f['cv_labels']) == s['horizon']
    assert TARGETS <= set(s['targets'])
    for r in s['targets'].values(): assert {'value', 'target', 'rule', 'met'} <= set(r) and isinstance(r['met'], bool)

def test_smoke_pipeline_runs_the_video_notebook(pipeline_run):
    "smoke: stages.video_epochs = 1; the pipeline runs nbs/experiments/video.ipynb after stage 3, headless."
    run_dir, r = pipeline_run
    assert (run_dir/'video.ipynb').exists() and errors_in(run_dir/'video.ipynb') == []
    assert r.stdout.index('[pipeline] video: running video.ipynb') > r.stdout.index('[pipeline] stage3: running')
    assert r.stdout.index('[pipeline] debugging: running') > r.stdout.index('[pipeline] video: running')
    v = run_dir/'video'
    for f in ('checkpoints/last.pt', 'checkpoints/best.pt', 'final_weights.pt', 'metrics.csv', 'config.yaml'):
        assert (v/f).exists(), f
    assert (v/'plots'/'training.png').read_bytes()[:4] == b'\x89PNG'       # the notebook's figure, saved headless
    s = json.loads((v/'summary.json').read_text())
    check_video_summary(s, 2)                                               # 4 clips in batches of 2, 1 epoch
    assert s['amt_weights'] == str(run_dir/'stage3'/'final_weights.pt')
    top = json.loads((run_dir/'summary.json').read_text())
    assert top['video'] == s and set(top['stages']) == {'stage1', 'stage2', 'stage3'}
    table = r.stdout[r.stdout.rindex('stage   steps'):]                      # the pipeline's final table
    assert '\nvideo ' in table and 'phase accuracy' in table and 'forecast error, mm' in table
    assert 'accel_error' in table and ('NOT met' in table or ': met' in table)

def test_train_stage_video_alone_resume_and_pipeline_resume(pipeline_run, tmp_path):
    "amt train --stage video from a folder holding stage 3: a missing stage 3 named; cut, resumed; --resume keeps it."
    run_dir, _ = pipeline_run
    r = amt('train', '--stage', 'video', '--run-dir', str(tmp_path/'empty'))
    assert r.returncode == 2 and str(tmp_path/'empty'/'stage3'/'final_weights.pt') in r.stderr, r.stderr
    assert 'amt train --stage 3' in r.stderr and not (tmp_path/'empty'/'video').exists()
    p = tmp_path/'p'; p.mkdir(); shutil.copytree(run_dir/'stage3', p/'stage3')
    r = amt('train', '--stage', 'video', '--run-dir', str(p), '--max-steps', '1')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'phase accuracy' in r.stdout and str(p/'video'/'summary.json') in r.stdout
    check_video_summary(json.loads((p/'video'/'summary.json').read_text()), 1)
    r = amt('train', '--stage', 'video', '--run-dir', str(p), '--resume')        # on to the end of its 2 steps
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert torch.load(p/'video'/'checkpoints'/'last.pt', weights_only=False)['step'] == 2
    check_video_summary(json.loads((p/'video'/'summary.json').read_text()), 2)
    # the pipeline's --resume keeps a finished video stage (its summary) and reports it
    from amt_lib.pipeline import run_pipeline
    s = run_pipeline('smoke', p, stages=['video'], resume=True, log_output=False)
    assert s['video'] == json.loads((p/'video'/'summary.json').read_text())

def test_predict_on_a_frame_folder(pipeline_run, tmp_path):
    "amt predict FOLDER with the video stage's weights: a JSON per frame with the temporal outputs, an overlay video."
    import imageio.v2 as iio
    from PIL import Image
    from amt_lib.config import load_config
    from amt_lib.data.video import SynthHOIVideo
    run_dir, _ = pipeline_run
    clip = SynthHOIVideo.from_config(load_config('smoke'), 'val')[1]
    (tmp_path/'frames').mkdir()
    for t, im in enumerate(clip['image']):
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path/'frames'/f'f{t}.png')
    r = amt('predict', str(tmp_path/'frames'), '--ckpt', str(run_dir/'video'/'final_weights.pt'), '--out',
            str(tmp_path/'out'), '--track', '--device', 'cpu')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    T = len(clip['image'])
    recs = [json.loads((tmp_path/'out'/'frames'/f'f{t}.json').read_text()) for t in range(T)]
    assert [x['frame'] for x in recs] == list(range(T))
    assert all(x['video']['phase'] in ('approach', 'grasp', 'move', 'release') for x in recs)
    assert np.array(recs[0]['video']['joints_mm']).shape == (21, 3)
    assert "previous frame's predicted hand" in recs[-1]['crop']['description']
    assert len(iio.mimread(tmp_path/'out'/'frames_overlay.mp4', format='FFMPEG')) == T
