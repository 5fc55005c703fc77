"""`amt gpu-check` on CPU through `.ci/gpu-check`: small sizes, every part; the pipeline part with stage 1 only (the
smoke preset, one step a training run: the code path that runs `run_pipeline` per stage and reads the peak memory its
papermill kernel wrote). And a failing part: recorded, the others still run, exit code 1.
Runtime: about 60-90 s on 2 unshared CPU cores (most of it torch.compile's graph capture and the stage-1 kernel)."""
import json, math, subprocess
from pathlib import Path
from amt_lib.bench import GPU_CHECK_PARTS
from amt_lib.cli import main

ROOT = Path(__file__).resolve().parents[1]

def numbers(x, path=''):
    "(path, value) of every number in a JSON record."
    if isinstance(x, dict):
        for k, v in x.items(): yield from numbers(v, f'{path}.{k}')
    elif isinstance(x, list):
        for i, v in enumerate(x): yield from numbers(v, f'{path}[{i}]')
    elif isinstance(x, (int, float)) and not isinstance(x, bool): yield path, x

def test_gpu_check_on_cpu(tmp_path):
    out, run = tmp_path/'g.json', tmp_path/'run'
    r = subprocess.run(['bash', str(ROOT/'.ci'/'gpu-check'), '--device', 'cpu', '--out', str(out), '--stages', 'stage1',
                        '--run-dir', str(run), '--record', str(tmp_path/'rows.md')],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert 'ran on CPU with SMALL sizes' in r.stdout and 'not the H200 figures' in r.stdout
    rec = json.loads(out.read_text())
    assert (rec['ran_on'], rec['sizes'], rec['ok'], rec['errors']) == ('cpu', 'small', True, {})
    assert 'SMALL sizes' in rec['warning']
    assert all(rec['parts'][p]['ok'] for p in GPU_CHECK_PARTS), rec['parts']
    bad = [(p, v) for p, v in numbers(rec) if not math.isfinite(v)]
    assert not bad, bad
    for k in ('device', 'torch', 'date', 'commit', 'python'): assert rec[k], k
    assert 0 < rec['wall_s'] <= rec['budget_s']
    T = rec['training']
    assert (T['batch_size'], T['accumulation']) == (2, 2)
    for k in ('eager', 'compiled'):
        assert T[k]['samples_per_s'] > 0 and T[k]['accumulation'] == 2, k
        assert T[f'mfu_{k}']['mfu'] is None and 'no bf16 peak known' in T[f'mfu_{k}']['peak_source']   # no peak for a CPU
        assert T[f'mfu_{k}']['achieved_tflops'] > 0
    assert T['compiled']['compile_backend'] == 'eager'
    assert T['flops']['train_flops_per_sample'] > T['flops']['forward_flops_per_sample'] > 0
    I = rec['inference']
    for k in ('eager', 'compiled'):
        b1 = I[k]['batch1']
        assert b1['p90_ms'] >= b1['median_ms'] > 0 and b1['fps'] > 0, k
        assert I[k]['batch4']['samples_per_s'] > 0, k
    C = rec['device_cache']
    assert C['cache_samples_per_s'] > 0 and C['dataloader_samples_per_s'] > 0 and C['ratio'] > 0 and C['device'] == 'cpu'
    assert C['bytes_per_sample'] > 224 * 224 * 3      # the h200 sample: a 224 px uint8 image + labels
    P = rec['pipeline']
    assert P['preset'] == 'smoke' and P['overrides'] == ['training.device=cpu'] and list(P['stages']) == ['stage1']
    s1 = P['stages']['stage1']
    assert s1['wall_s'] > 0 and s1['rss_peak_mb'] > 100, s1       # written by the hook inside the papermill kernel
    assert 'cuda_max_allocated_mb' not in s1                        # no CUDA in that kernel
    assert (run/'stage1'/'summary.json').exists() and (run/'stage1.ipynb').exists()
    rows = (tmp_path/'rows.md').read_text().splitlines()
    assert rows == rec['record_rows'].splitlines() and len(rows) >= 10
    assert all(row.startswith(f"| {rec['date'][:10]} | CPU") and 'small sizes' in row for row in rows)
    assert 'rows for the benchmark record' in r.stdout

def test_a_failing_part_is_recorded_and_the_exit_code_is_1(tmp_path, capsys):
    out = tmp_path/'g.json'
    rc = main(['gpu-check', '--device', 'cpu', '--parts', 'pipeline', '--pipeline-preset', 'no-such-preset',
                        '--run-dir', str(tmp_path/'run'), '--out', str(out)])
    assert rc == 1
    rec = json.loads(out.read_text())
    assert rec['ok'] is False and rec['parts']['pipeline']['ok'] is False
    assert 'no-such-preset' in rec['errors']['pipeline'], rec['errors']
    assert 'FAILED' in capsys.readouterr().out
