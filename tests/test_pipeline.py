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

@pytest.fixture(scope='module')
def pipeline_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp('pipe')/'smoke'
    r = amt('pipeline', '--preset', 'smoke', '--run-dir', str(run_dir), '--max-steps', '3')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir, r

def test_every_notebook_ran_without_error(pipeline_run):
    run_dir, _ = pipeline_run
    for st in ('stage1', 'stage2', 'stage3', 'debugging'):
        p = run_dir/f'{st}.ipynb'
        assert p.exists(), p
        assert errors_in(p) == [], (st, errors_in(p))

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
    assert set(s['learned']) == {'beats_half_baseline', 'no_collapse'}
    assert 'val rr-MPJPE' in r.stdout          # the table is printed

def test_headless_logs_one_line_per_interval(pipeline_run):
    _, r = pipeline_run
    assert '[train] step 1/' in r.stdout + r.stderr   # --log-output streams the learner's log lines

def test_failing_run_exits_nonzero_and_keeps_notebook(tmp_path):
    run_dir = tmp_path/'bad'
    r = amt('pipeline', '--preset', 'smoke', '--run-dir', str(run_dir), '--stages', 'stage1', 'data.source=nowhere')
    assert r.returncode != 0
    assert 'stage1' in r.stderr and 'saved at' in r.stderr
    assert errors_in(run_dir/'stage1.ipynb'), 'the failing notebook must be saved with its error'
