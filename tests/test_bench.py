"""`amt bench`'s issue-17 parts (plain CNN yardstick, learner overhead, FLOPs per stage) end to end on a tiny smoke run."""
import contextlib, io, json
from amt_lib.bench import bench_table
from amt_lib.cli import main

def test_bench_yardsticks(tmp_path):
    "All three parts in one `amt bench` call write their figures and details into the JSON record (a few steps: the command, not the speed)."
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(['bench', '--preset', 'smoke', '--parts', 'plain_cnn,overhead,stage_flops', '--plain-steps', '3', '--plain-batch', '4', '--overhead-steps', '3',
                        '--json', str(tmp_path/'b.json'), 'data.image_size=56', 'model.sigma_reparam=false'])
    assert rc == 0, out.getvalue()
    rec = json.loads((tmp_path/'b.json').read_text())
    figs = {f['figure']: f for f in rec['figures']}
    D = rec['details']
    assert 'parameters' not in D                                    # no AMT model built for these parts alone
    # FLOPs per stage: one figure per run of the recipe and the whole recipe, in TFLOP
    runs = [r['run'] for r in D['stage_flops']]
    assert runs == ['1 hand_encoder', '1 object_encoder', '1 contact_encoder', '2', '3', '4', '4 mask', 'video', 'total']
    total = figs['training FLOPs, whole recipe']
    assert abs(total['value'] * 1e12 - sum(r['train_flops'] for r in D['stage_flops'][:-1])) < 1e3
    assert 'training FLOPs of the smoke recipe' in out.getvalue()
    # plain CNN: its rr-MPJPE beside the mean-pose baseline, trained on the Learner's batches
    p = D['plain_cnn']
    assert (p['steps'], p['samples'], p['params']) == (3, 12, 913_327)
    f = figs['plain CNN rr-MPJPE after 3 steps of 4']
    assert f['value'] == p['rr_mpjpe'] and f['baseline'] == p['mean_pose_rr_mpjpe'] and f['ratio'] > 0
    # the AMT's side: the recipe's stage-1 hand run on as many samples as the CNN saw
    a = D['amt_hand']
    assert (a['samples'], a['steps'], a['batch_size']) == (12, 3, 4) and a['rr_mpjpe'] > 0
    f = figs['AMT hand run rr-MPJPE after 12 samples (3 steps of 4)']
    assert f['baseline'] == p['rr_mpjpe'] and f['baseline_name'] == 'plain CNN, same samples'
    # overhead: stage 2's config, Learner vs bare loop on the same batches
    o = D['overhead']
    assert o['steps'] == 3 and o['same_batches'] and o['batch_order_sha1'] == p['batch_order_sha1']
    f = figs['Learner step, all default callbacks (stage 2 config)']
    assert f['value'] == o['learner_step_ms'] and f['baseline'] == o['bare_step_ms'] and f['baseline_name'] == 'bare PyTorch loop'
    assert 'samples/s' in f['note'] and 'target ratio <= 1.10' in f['note']
    table = bench_table(rec)
    assert 'bare PyTorch loop' in table and 'mean-pose baseline' in table
