"""The stage notebooks with their own defaults inside one run folder (papermill, only `run_dir` passed), what a stage
says when its input is missing or the recipe replaces an override, and bar mode's static records in a saved notebook."""
import json
from pathlib import Path
import nbformat, papermill as pm, pytest, torch
from amt_lib.stages import STAGE1_TERMS
from amt_lib.pipeline import experiments_dir, EXPERIMENTS

def execute(nb: str, out: Path, **params) -> nbformat.NotebookNode:
    "Run an experiment notebook (a name of EXPERIMENTS) with papermill; the executed notebook."
    pm.execute_notebook(str(experiments_dir()/EXPERIMENTS[nb]), str(out), parameters=params, kernel_name='python3',
                        progress_bar=False, cwd=str(out.parent))
    return nbformat.read(out, as_version=4)

def text_of(nb) -> str:
    "Every stream and text/plain output of a notebook, joined."
    out = []
    for c in nb.cells:
        for o in c.get('outputs', []):
            out.append(o.get('text', '') if o.output_type == 'stream' else o.get('data', {}).get('text/plain', '') or
                       '\n'.join(o.get('traceback', [])))
    return '\n'.join(out)

@pytest.fixture(scope='module')
def stages(tmp_path_factory):
    "Stage 1, 2, 3 notebooks, each given only run_dir (the smoke preset by default), one after the other in one folder."
    run = tmp_path_factory.mktemp('stages')/'pipe'
    run.mkdir()
    return run, {st: execute(st, run/f'{st}.ipynb', run_dir=str(run)) for st in ('stage1', 'stage2', 'stage3')}

def test_each_stage_runs_with_its_defaults_in_a_run_folder(stages):
    run, nbs = stages
    for st, nb in nbs.items():
        assert not [o for c in nb.cells for o in c.get('outputs', []) if o.output_type == 'error'], st
        assert json.loads((run/st/'summary.json').read_text())['steps'] > 0, st
    init2 = torch.load(run/'stage2'/'init.pt', weights_only=False)      # stage 2 found stage 1's weights in the folder
    assert set(init2['source']) == set(STAGE1_TERMS) and init2['source']['hand_encoder'] == str(run/'stage1'/'hand_encoder.pt')
    init3 = torch.load(run/'stage3'/'init.pt', weights_only=False)      # stage 3 found stage 2's best checkpoint
    assert init3['source'] == str(run/'stage2'/'checkpoints'/'best.pt')
    assert "starting from stage 1's" in text_of(nbs['stage2']) and 'starting from ' + str(run/'stage2') in text_of(nbs['stage3'])

def test_last_cell_prints_the_table_not_the_summary_dict(stages):
    run, nbs = stages
    for st, nb in nbs.items():
        outs = nb.cells[-1].outputs
        assert [o.output_type for o in outs] == ['stream'], (st, outs)     # no ~100-line result dictionary
        assert 'val rr-MPJPE' in outs[0].text and str(run/st/'summary.json') in outs[0].text

def test_missing_previous_stage_and_replaced_override(tmp_path):
    "Stage 2 in a folder without stage 1: the replaced override is named, then an error names the file and the command; no folder made."
    run = tmp_path/'empty'; run.mkdir()
    with pytest.raises(pm.PapermillExecutionError) as e:
        execute('stage2', run/'stage2.ipynb', run_dir=str(run), overrides=['training.epochs=3'])
    assert e.value.ename == 'FileNotFoundError'
    msg = e.value.evalue
    assert str(run/'stage1'/'hand_encoder.pt') in msg and f'amt train --stage 1 --preset smoke --run-dir {run}' in msg
    assert 'stage1_pretrain.ipynb' in msg and "to 'scratch' to train without a stage 1" in msg
    assert not (run/'stage2').exists()
    out = text_of(nbformat.read(run/'stage2.ipynb', as_version=4))
    assert 'recipe replaces training.epochs=3 with 2: set stages.stage2_epochs instead' in out

BAR_NB = '''
from amt_lib.learner.core import synth_learner
from amt_lib.learner.callbacks import Recorder, EvalCB, ProgressCB
for run in range(2):   # two training runs: two bars, two tables
    learn = synth_learner(n=16, bs=4)
    learn.fit(1, cbs=[Recorder(1), EvalCB(every=2), ProgressCB(4, desc=f'run{run}')])
'''

def test_bar_mode_leaves_static_records(tmp_path):
    "In a kernel, each finished bar's output is replaced by text and HTML; the table is one output updated in place; no widget left."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(BAR_NB)])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
    src, out = tmp_path/'bar.ipynb', tmp_path/'bar_out.ipynb'
    nbformat.write(nb, src)
    pm.execute_notebook(str(src), str(out), kernel_name='python3', progress_bar=False, cwd=str(tmp_path))
    outs = [o for o in nbformat.read(out, as_version=4).cells[0].outputs if o.output_type == 'display_data']
    assert not [o for o in outs if 'application/vnd.jupyter.widget-view+json' in o.data], 'a widget output is left'
    bars = [o for o in outs if '<progress' in o.data.get('text/html', '')]
    tables = [o for o in outs if 'amt-metrics' in o.data.get('text/html', '')]
    assert len(bars) == 2 and len(tables) == 2 and len(outs) == 4, [o.data.get('text/plain') for o in outs]
    assert bars[0].data['text/plain'].startswith('run0: 100%') and '4/4' in bars[0].data['text/plain']
    assert [l.split()[0] for l in tables[1].data['text/plain'].splitlines()] == ['step', '2', '4']   # a row per validation
