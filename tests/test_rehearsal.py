"""The h200 recipe rehearsed on the CPU (`amt pipeline --preset h200-rehearsal`): every notebook, every h200 switch, the
checkpoints and their pruning, the schedules as trained. Its own file, so that pytest's two workers can run it beside
tests/test_pipeline.py (`--dist loadfile`)."""
import json
import pytest
from test_pipeline import amt, errors_in

# --- the h200 recipe rehearsed on the CPU (`amt pipeline --preset h200-rehearsal`), once for the tests below ---
import csv, math, time, yaml

@pytest.fixture(scope='module')
def rehearsal(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp('rehearsal')/'h200-rehearsal'
    t0 = time.time()
    r = amt('pipeline', '--preset', 'h200-rehearsal', '--run-dir', str(run_dir))
    minutes = (time.time() - t0) / 60
    print(f'h200-rehearsal pipeline: {minutes:.2f} min')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir, r, minutes

def train_rows(path):
    "Train rows of a metrics.csv, numbers as floats."
    with open(path, newline='') as f:
        return [{k: float(v) if v not in ('', None) and k != 'split' else v for k, v in row.items()}
                for row in csv.DictReader(f) if row['split'] == 'train']

def per_epoch(rows, key):
    "The value of `key` in each epoch's train rows (it must be the same in every row of an epoch)."
    out = {}
    for row in rows: out.setdefault(int(row['epoch']), set()).add(round(row[key], 6))
    assert all(len(v) == 1 for v in out.values()), (key, out)
    return [out[e].pop() for e in sorted(out)]

def test_rehearsal_runs_every_notebook(rehearsal):
    run_dir, r, minutes = rehearsal
    for st in ('stage1', 'stage2', 'stage3', 'debugging'):
        assert (run_dir/f'{st}.ipynb').exists() and errors_in(run_dir/f'{st}.ipynb') == [], st
    assert '[pipeline] checkpoints: at most' in r.stdout      # the disk budget: the whole pipeline's, then each run's
    assert 'checkpoints: at most 2 periodic + best + last' in r.stdout
    assert minutes < 10, f'the rehearsal took {minutes:.1f} min (about 3 on an idle 2-core CPU)'

def test_rehearsal_keeps_every_h200_switch(rehearsal):
    run_dir, _, _ = rehearsal
    c = yaml.safe_load((run_dir/'stage3'/'config.yaml').read_text())
    assert c['training']['precision'] == 'bf16' and c['training']['accumulation'] == 2 and c['training']['ema_decay'] > 0
    assert c['model']['backbone']['gradient_checkpointing'] and c['model']['sigma_reparam'] and c['model']['refine_steps'] == 2
    assert c['data']['cache'] and c['data']['cache_device'] == 'cpu' and c['model']['backbone']['name'] is None
    assert c['training']['hard_mining'] and c['training']['T_0_epochs'] == 1 and c['training']['keep_checkpoints'] == 2
    assert c['model']['compile'] and c['model']['compile_backend'] == 'eager'   # Dynamo capture; Inductor only on the GPU

def test_rehearsal_checkpoints_and_pruning(rehearsal):
    run_dir, _, _ = rehearsal
    for comp in ('hand_encoder', 'object_encoder', 'contact_encoder'):
        assert (run_dir/'stage1'/f'{comp}.pt').exists()
        assert {'last.pt', 'best.pt', 'epoch_001.pt', 'epoch_002.pt'} <= {p.name for p in (run_dir/'stage1'/comp/'checkpoints').iterdir()}
    for st in ('stage2', 'stage3'):                           # 5 epochs, a checkpoint each, keep 2
        names = sorted(p.name for p in (run_dir/st/'checkpoints').iterdir())
        assert names == ['best.pt', 'epoch_004.pt', 'epoch_005.pt', 'last.pt'], (st, names)

def test_rehearsal_schedules_as_trained(rehearsal):
    run_dir, _, _ = rehearsal
    s1 = {c: train_rows(run_dir/'stage1'/c/'metrics.csv') for c in ('hand_encoder', 'object_encoder', 'contact_encoder')}
    assert per_epoch(s1['hand_encoder'], 'w_diversity')[0] > 0                     # diversity only with the hand head
    assert per_epoch(s1['object_encoder'], 'w_diversity') == per_epoch(s1['contact_encoder'], 'w_diversity') == [0, 0]
    s2 = train_rows(run_dir/'stage2'/'metrics.csv')
    assert per_epoch(s2, 'w_diversity') == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.05], abs=1e-6)
    assert per_epoch(s2, 'w_physics') == pytest.approx([0, 0, 0, 0.086 / 3, 0.086 * 2 / 3], abs=1e-6)   # ramp over 2..5
    assert per_epoch(s2, 'refine') == [0, 0, 1, 1, 1]                                   # refinement from epoch 2
    assert per_epoch(s2, 'w_hand_refined') == pytest.approx([0, 0, 1.189, 1.189, 1.189], abs=1e-6)
    for rows, peak in ((s2, 1e-3), (train_rows(run_dir/'stage3'/'metrics.csv'), 1e-5)):
        lrs = [row['lr/hand_encoder'] for row in sorted(rows, key=lambda r: r['step'])]
        # 1 warm-up step, then cosine periods of T_0 = 1 epoch = 2 steps (peak, then halfway to min_lr 1e-6): a restart every epoch
        assert lrs == pytest.approx([peak] * 2 + [(peak + 1e-6) / 2, peak] * 4, rel=1e-4), lrs
        assert all(row['lr/backbone'] == pytest.approx(0.1 * row['lr/hand_encoder']) for row in rows)
    s3 = train_rows(run_dir/'stage3'/'metrics.csv')
    assert per_epoch(s3, 'w_diversity') == pytest.approx([0.03] * 5, abs=1e-6)
    assert per_epoch(s3, 'w_physics') == pytest.approx([0.086] * 5, abs=1e-6)
    seen = per_epoch(s3, 'hard_mining/seen')
    assert seen[0] == 0 and all(x > 0 for x in seen[1:]), seen                      # epochs 1.. drawn by error
    assert 'hard_mining/seen' not in s2[0]

def test_rehearsal_summary(rehearsal):
    run_dir, _, _ = rehearsal
    s = json.loads((run_dir/'summary.json').read_text())
    assert set(s['stages']) == {'stage1', 'stage2', 'stage3'}
    for st in s['stages'].values():
        for k in ('rr_mpjpe', 'pa_mpjpe', 'mean_pose_rr_mpjpe', 'spread_ratio'): assert math.isfinite(st[k]), k
    assert s['stages']['stage2']['steps'] == 10 and s['stages']['stage3']['steps'] == 10 and s['stages']['stage1']['steps'] == 12
