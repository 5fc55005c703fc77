"""The console of a headless run: `amt pipeline` prints one line per logging interval, one per validation, the stage
tables and a few headers; no papermill chatter, kernel warnings, parse warnings, blank-line floods or per-joint lists
(`-v` brings papermill's log back)."""
import json, math, re, shutil, subprocess
from pathlib import Path
import nbformat, papermill as pm, pytest, torch, yaml
from amt_lib.pipeline import experiments_dir, EXPERIMENTS, notebook_parameters

NOISE = ('Executing Cell', 'Ending Cell', 'without encryption', 'Unable to parse', 'Passed unknown parameter',
         'Input Notebook', 'Output Notebook', '<IPython.core.display', 'mpjpe_per_joint')
HEADERS_PER_RUN = 3        # `checkpoints: at most ...`, `amt train: <run> | ...`, `amt train: finished ...`
HEADERS_PER_NOTEBOOK = 8   # `[pipeline] <stage>: running ...`, the recipe's overrides (one per stage-1 component), where it starts from, where the summary is
HEADERS_PIPELINE = 4       # the disk budget, `learned`, where summary.json is, one spare
HYPOTHESIS_TABLE_LINES = 7 # stage 4's table (`hypothesis_table`): title, header, N = 1, 5, 16, spread, sampling times
MASK_TABLE_LINES = 8       # stage 4's mask table after it: a blank line, title, header, N = 1, 5, 16, per-class recall, times
VIDEO_TABLE_LINES = 25     # the video stage's tables: its summary row, `video_table` (15 lines), `verdict_table` (8)

def amt(*args, timeout=300):
    return subprocess.run([shutil.which('amt'), *args], capture_output=True, text=True, timeout=timeout)

def training_runs(run_dir: Path) -> list[Path]:
    "The folders of the pipeline's training runs (stage1/<component>, stage2, stage3, stage 4's two, video)."
    return sorted(p.parent.parent for p in [*run_dir.glob('stage*/**/checkpoints/last.pt'),
                                            *run_dir.glob('generative/checkpoints/last.pt'),
                                            *run_dir.glob('generative/mask/checkpoints/last.pt'),
                                            *run_dir.glob('video/checkpoints/last.pt')])

def line_budget(run_dir: Path) -> dict:
    "The most lines the console may have, from each training run's steps and its log_every / eval_every."
    train = val = runs = 0
    for rd in training_runs(run_dir):
        t = yaml.safe_load((rd/'config.yaml').read_text())['training']
        steps = int(torch.load(rd/'checkpoints'/'last.pt', weights_only=False)['step'])
        train += math.ceil(steps / t['log_every'])
        val += (steps // t['eval_every'] if t['eval_every'] else 0) + 1                # every eval_every steps and at the end
        runs += 1
    summaries = {st: json.loads((run_dir/st/'summary.json').read_text()) for st in ('stage1', 'stage2', 'stage3')}
    events = sum(g['collapse_alarms'] + g['grad_flags'] for s in summaries.values() for g in s['guards'].values())  # alarm lines
    tables = 2 * len(summaries) + 1 + len(summaries)                                  # each stage notebook's, the pipeline's
    tables += 2 * HYPOTHESIS_TABLE_LINES * (run_dir/'generative'/'summary.json').exists()   # stage 4: stage 3's, the pipeline's
    tables += 2 * MASK_TABLE_LINES * (run_dir/'generative'/'mask').is_dir()
    tables += 2 * VIDEO_TABLE_LINES * (run_dir/'video'/'summary.json').exists()        # the video notebook's, the pipeline's
    fixed = HEADERS_PER_RUN * runs + HEADERS_PER_NOTEBOOK * len(EXPERIMENTS) + HEADERS_PIPELINE
    return dict(train=train, val=val, runs=runs, total=train + val + events + tables + fixed)

def test_pipeline_console_is_one_line_per_interval(pipeline_run):
    run_dir, r = pipeline_run
    text = r.stdout + r.stderr
    for s in NOISE: assert s not in text, f'{s!r} on the console'
    assert not re.search(r'\n[ \t]*\n[ \t]*\n', '\n' + text), 'a run of blank lines'
    b = line_budget(run_dir)
    assert b['runs'] == 8                                    # 3 stage-1 components, stages 2, 3, stage 4's two runs, video
    lines = text.splitlines()
    train = [l for l in lines if l.startswith('[train] ')]
    assert len(train) == b['train'] and all(' | ETA ' in l and ' samples/s' in l for l in train), train[:3]
    assert len([l for l in lines if l.startswith('[val] ')]) <= b['val']
    assert len(lines) <= b['total'], (len(lines), b, text[-3000:])
    assert 'val rr-MPJPE' in r.stdout and f"summary: {run_dir/'summary.json'}" in r.stdout   # the table; where every number is
    print(f"amt pipeline --preset smoke --max-steps 3: {len(lines)} console lines (budget {b['total']})")

def test_stage1_lines_show_only_the_terms_it_trains(pipeline_run):
    run_dir, r = pipeline_run
    lines = [l for l in r.stdout.splitlines() if l.startswith('[train] ')]
    obj = [l for l in lines if ' object_class ' in l and ' hand_coarse ' not in l]     # the object-encoder phase of stage 1
    assert obj and not any(' contact ' in l or ' mano ' in l for l in obj), obj

def test_papermill_sees_every_parameter_of_the_experiment_notebooks():
    "papermill's parser reads the same names as the notebooks' `parameters` cells hold (no 'Passed unknown parameter')."
    for nb in EXPERIMENTS.values():
        p = experiments_dir()/nb
        assert list(pm.inspect_notebook(str(p))) == notebook_parameters(p), nb

@pytest.fixture(scope='module')
def tiny_notebook(tmp_path_factory):
    d = tmp_path_factory.mktemp('tiny')
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("preset = 'smoke'  # a preset\nrun_dir = None\nx = 1  # e.g. -p x 2", metadata={'tags': ['parameters']}),
        nbformat.v4.new_code_cell("print('x is', x)\nf'result-{x * 21}'")])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    nbformat.write(nb, d/'tiny.ipynb')
    return d

def test_amt_run_is_quiet_and_verbose_brings_the_chatter_back(tiny_notebook):
    d = tiny_notebook
    r = amt('run', str(d/'tiny.ipynb'), '-p', 'x', '2', '--run-dir', str(d/'quiet'))
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr
    assert 'x is 2\n' in r.stdout and 'result-42' not in text                          # printed lines only, no displayed result
    for s in NOISE: assert s not in text, s
    r = amt('run', str(d/'tiny.ipynb'), '-p', 'x', '2', '--run-dir', str(d/'loud'), '-v')
    assert r.returncode == 0, r.stderr
    assert 'Executing Cell 1' in r.stdout and 'Ending Cell 2' in r.stdout and 'x is 2' in r.stdout and 'result-42' in r.stdout

def test_wandb_runs_of_a_pipeline_share_a_group(tmp_path):
    "A stage run inside a pipeline folder is `<run>/<stage>[/<component>]` in W&B, grouped by the pipeline folder's name."
    from amt_lib.config import load_config
    from amt_lib.learner.train import build_learner, close_callbacks
    from amt_lib.learner.callbacks import WandbCB
    for stage, rd, name in ((1, tmp_path/'pipe-a'/'stage1'/'hand_encoder', 'pipe-a/stage1/hand_encoder'),
                            (2, tmp_path/'pipe-a'/'stage2', 'pipe-a/stage2')):
        learn = build_learner(load_config('smoke', [f'training.stage={stage}', 'logging.progress=quiet', 'logging.plots=false',
                                                    'logging.tensorboard=false']), rd)
        try:
            run = learn.cb(WandbCB).run
            assert (run.name, run.group) == (name, 'pipe-a')
        finally: close_callbacks(learn)
