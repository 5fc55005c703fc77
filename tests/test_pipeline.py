"""The experiment notebooks through papermill: the whole pipeline on the smoke preset, and a failing run."""
import json, subprocess, sys, shutil
from pathlib import Path
import nbformat, pytest, torch

def amt(*args, cwd=None, timeout=900):
    exe = shutil.which('amt')
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)

def errors_in(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    return [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.get('output_type') == 'error']

# `pipeline_run` (conftest.py): the smoke pipeline, run once per session; tests/test_console.py reads its console too

def test_every_notebook_ran_without_error(pipeline_run):
    run_dir, _ = pipeline_run
    for st in ('stage1', 'stage2', 'stage3', 'debugging'):
        p = run_dir/f'{st}.ipynb'
        assert p.exists(), p
        assert errors_in(p) == [], (st, errors_in(p))

def test_debugging_notebook_figures(pipeline_run):
    "Each debugging figure is shown once in the executed notebook and saved as a PNG; the plotly 3D view carries a static PNG."
    run_dir, _ = pipeline_run
    # the smoke pipeline runs stage 4 (pose head and MaskDiT): its hypotheses and masks are drawn too
    for name in ('diversity', 'activations', 'grad_norms', 'dead_units', 'attention', 'worst_samples', 'hand_object_3d',
                 'pose_hypotheses', 'mask_samples'):
        assert (run_dir/'debugging'/f'{name}.png').read_bytes()[:4] == b'\x89PNG', name
    nb = nbformat.read(run_dir/'debugging.ipynb', as_version=4)
    outs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if 'data' in o]
    plotly = [o for o in outs if 'application/vnd.plotly.v1+json' in o['data']]
    assert len(plotly) == 1 and 'image/png' in plotly[0]['data'], [list(o['data']) for o in outs]
    assert sum('image/png' in o['data'] for o in outs) == 9, [list(o['data']) for o in outs]   # 8 figures + the 3D view

def test_stages_wrote_checkpoints_and_metrics(pipeline_run):
    run_dir, _ = pipeline_run
    for c in ('hand_encoder', 'object_encoder', 'contact_encoder'):
        assert (run_dir/'stage1'/f'{c}.pt').exists()
        assert (run_dir/'stage1'/c/'metrics.csv').read_text().count('\n') > 1
    for st in ('stage2', 'stage3'):
        assert (run_dir/st/'checkpoints'/'last.pt').exists() and (run_dir/st/'checkpoints'/'best.pt').exists()
        assert (run_dir/st/'metrics.csv').exists() and (run_dir/st/'config.yaml').exists()
    assert (run_dir/'stage3'/'evaluation.json').exists()
    # stage 3 started from stage 2's best: its init weights are stage 2's EMA weights
    init = torch.load(run_dir/'stage3'/'init.pt', weights_only=True)
    assert init['source'].endswith('stage2/checkpoints/best.pt')

def test_summary_json(pipeline_run):
    run_dir, r = pipeline_run
    s = json.loads((run_dir/'summary.json').read_text())
    assert set(s['stages']) == {'stage1', 'stage2', 'stage3'}
    for st in s['stages'].values():
        for k in ('steps', 'minutes', 'rr_mpjpe', 'pa_mpjpe', 'mean_pose_rr_mpjpe', 'spread_ratio'):
            assert isinstance(st[k], (int, float)), k
        assert st['steps'] > 0 and st['mean_pose_rr_mpjpe'] > 0
    assert {'beats_half_baseline', 'no_collapse'} <= set(s['learned'])
    assert 'val rr-MPJPE' in r.stdout          # the table is printed
    g = s['generative']                        # stage 4 (smoke: stages.generative_epochs = 1), run by stage 3's notebook
    assert g['stage'] == 4 and g['steps'] == 3 and g['best_of_16_rr_mpjpe'] > 0 and 'best-of-N' in r.stdout

def test_headless_logs_one_line_per_interval(pipeline_run):
    _, r = pipeline_run
    assert '[train] step 1/' in r.stdout + r.stderr   # --log-output streams the learner's log lines

def test_failing_run_exits_nonzero_and_keeps_notebook(tmp_path):
    run_dir = tmp_path/'bad'                     # valid settings, but the data set is not there: the notebook itself fails
    r = amt('pipeline', '--preset', 'smoke', '--run-dir', str(run_dir), '--stages', 'stage1', 'data.source=dexycb',
            f'data.root={tmp_path/"no-dexycb"}')
    assert r.returncode != 0
    assert 'stage1' in r.stderr and 'saved at' in r.stderr
    assert errors_in(run_dir/'stage1.ipynb'), 'the failing notebook must be saved with its error'
    r = amt('pipeline', '--preset', 'smoke', '--run-dir', str(tmp_path/'bad2'), 'data.source=nowhere')
    assert r.returncode == 2 and 'data.source' in r.stderr and not (tmp_path/'bad2'/'stage1.ipynb').exists()   # refused up front

# --- the h200 recipe as the stages train it (`amt recipe`), the disk budget, stage 2 without stage 1 ---
from amt_lib.stages import recipe, STAGE1_TERMS
from amt_lib.pipeline import run_stage

def test_recipe_h200_table():
    r = {x['name']: x for x in recipe('h200')}
    assert [r[f'1 {c}']['epochs'] for c in STAGE1_TERMS] == [20, 20, 20]
    assert r['1 hand_encoder']['weights']['diversity'] == '0.06'                 # diversity only where the hand head trains
    assert r['1 object_encoder']['weights']['diversity'] == r['1 contact_encoder']['weights']['diversity'] == '0'
    s2, s3 = r['2'], r['3']
    assert s2['epochs'] == 50 and s3['epochs'] == 50
    assert s2['weights']['diversity'] == '0.1; 0.05 from 20'
    assert s2['refine_from_epoch'] == 20 and s2['weights']['hand_refined'].startswith('0 until 20')
    assert s2['weights']['physics'] == '0 -> 0.086 over epochs 20..50'
    assert (s2['lr_backbone'], s2['lr_heads']) == pytest.approx((1e-4, 1e-3))
    assert s3['lr_heads'] == pytest.approx(1e-5) and s3['lr_backbone'] == pytest.approx(1e-6)
    assert s3['weights']['diversity'] == '0.03' and s3['weights']['physics'] == '0.086'
    assert s3['hard_mining'] == 0.3 and s2['hard_mining'] is None
    spe = 465_504 // 32 // 2 + 1                                                 # batches of 32, 2 per optimiser step
    v = r.pop('video')                          # DexYCB clips: how many windows an epoch has is known only with the data
    assert v['epochs'] == 20 and (v['steps_per_epoch'], v['steps']) == (None, None)
    for x in r.values():
        assert (x['steps_per_epoch'], x['steps_exact'], x['steps']) == (spe, False, spe * x['epochs'])   # <= : skip_no_hand
        assert (x['T_0_epochs'], x['T_0_steps'], x['eval_every'], x['checkpoint_every_epochs'], x['keep_checkpoints']) == \
               (10, 10 * spe, 1000, 10, 3)
    out = amt('recipe', '--preset', 'h200')
    assert out.returncode == 0, out.stderr
    for text in ('0.1; 0.05 from 20', '0 -> 0.086 over epochs 20..50', '2 steps from epoch 20', 'on, 30% by error',
                 '<= 7,274', '10 ep = <= 72,740 steps', 'every 10 ep, keep 3 + best + last', '1e-05'):
        assert text in out.stdout, text

def test_train_refuses_a_disk_too_small(tmp_path, monkeypatch, capsys):
    import amt_lib.learner.checkpoint as ck
    from amt_lib.cli import main
    monkeypatch.setattr(ck, 'free_bytes', lambda path: 10**6)                    # 1 MB free
    run = tmp_path/'tiny-disk'
    assert main(['train', '--preset', 'smoke', '--run-dir', str(run), 'logging.progress=quiet']) == 2
    err = capsys.readouterr().err
    assert str(run) in err and 'need up to' in err and 'free' in err and 'training.keep_checkpoints' in err
    assert not (run/'checkpoints').exists()

def test_stage2_without_stage1(tmp_path, capsys):
    s = run_stage(2, 'smoke', ['logging.progress=quiet', 'logging.plots=false'], tmp_path/'p', init_from='scratch', max_steps=1)
    assert 'no stage-1 weights' in capsys.readouterr().out
    assert s['steps'] == 1 and (tmp_path/'p'/'stage2'/'checkpoints'/'last.pt').exists()

def test_hard_mining_resumes_exactly(tmp_path, monkeypatch):
    "A run cut mid-epoch with hard mining on continues with the same batches (the drawn order and the error table are in the checkpoint)."
    from amt_lib.config import load_config
    from amt_lib.learner.train import train
    from amt_lib.learner.reporting import read_metrics
    monkeypatch.setenv('WANDB_MODE', 'disabled')
    ov = ['logging.progress=quiet', 'logging.plots=false', 'logging.tensorboard=false', 'training.epochs=3',
          'training.eval_every=0', 'training.hard_mining=true', 'training.hard_mining_share=0.5']   # smoke: 4 steps an epoch
    train(load_config('smoke', ov), tmp_path/'full')
    train(load_config('smoke', ov + ['training.max_steps=6']), tmp_path/'cut')                 # stops in epoch 1, drawn by error
    train(load_config('smoke', ov), resume=tmp_path/'cut'/'checkpoints'/'last.pt')
    a = {int(r['step']): r for r in read_metrics(tmp_path/'full'/'metrics.csv', 'train')}
    b = {int(r['step']): r for r in read_metrics(tmp_path/'cut'/'metrics.csv', 'train')}
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert [a[k]['hard_mining/seen'] for k in (1, 5, 9)] == [0, 16, 16]     # epochs 1 and 2 drawn from the errors of all 16
    assert max(abs(a[k]['loss'] - b[k]['loss']) for k in range(7, 13)) <= 1e-6

def test_pipeline_refuses_a_disk_too_small(tmp_path, monkeypatch, capsys):
    import amt_lib.learner.checkpoint as ck
    from amt_lib.cli import main
    monkeypatch.setattr(ck, 'free_bytes', lambda path: 10**5)                    # 100 kB free
    assert main(['pipeline', '--preset', 'smoke', '--run-dir', str(tmp_path/'p')]) == 2
    err = capsys.readouterr().err
    assert 'the pipeline keeps up to' in err and str(tmp_path/'p') in err
    assert not (tmp_path/'p'/'stage1.ipynb').exists()                            # refused before any notebook ran

def test_pipeline_refuses_a_used_run_dir_and_resumes_the_interrupted_stage(pipeline_run, tmp_path):
    run_dir, _ = pipeline_run
    r = amt('pipeline', '--preset', 'smoke', '--run-dir', str(run_dir), '--max-steps', '3')
    assert r.returncode == 2 and 'holds a pipeline run' in r.stderr and '--resume' in r.stderr, r.stderr[-2000:]
    d = tmp_path/'copy'; shutil.copytree(run_dir, d)
    # stage 3 was cut short: its summary is missing and it is at step 3 of what is now a 4-step stage (one smoke epoch)
    (d/'stage3'/'summary.json').unlink(); (d/'summary.json').unlink()
    p = json.loads((d/'pipeline.json').read_text()); p['max_steps'] = 4
    p['stages'] = ['stage1', 'stage2', 'stage3']   # the stages after it resume alike (the video stage: test_video_stage.py)
    (d/'pipeline.json').write_text(json.dumps(p))
    r = amt('pipeline', '--resume', str(d))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '[pipeline] stage1: finished earlier, kept' in r.stdout and '[pipeline] stage2: finished earlier, kept' in r.stdout
    assert f"resuming {d/'stage3'}" in r.stdout
    s = json.loads((d/'summary.json').read_text())
    assert s['stages']['stage3']['steps'] == 4 and s['stages']['stage1'] == json.loads((run_dir/'stage1'/'summary.json').read_text())
    assert torch.load(d/'stage3'/'checkpoints'/'last.pt', weights_only=False)['step'] == 4
