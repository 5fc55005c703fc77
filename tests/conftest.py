import os
# Tests never touch the network: no Hugging Face downloads, W&B offline, no display.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('WANDB_MODE', 'offline')
os.environ.setdefault('WANDB_SILENT', 'true')
os.environ.setdefault('MPLBACKEND', 'Agg')

import json, shutil, subprocess
import pytest
from filelock import FileLock

# `.ci/test` runs pytest with two xdist workers, whole files per worker (`--dist loadfile`), in collection order:
# the files with the longest runs go first, so that neither worker is left with a long file at the end.
SLOWEST_FIRST = ('test_rehearsal.py', 'test_pipeline.py', 'test_generative.py', 'test_gpu_check.py', 'test_stage_notebooks.py',
                 'test_learning.py', 'test_learner.py', 'test_inference.py', 'test_browser.py', 'test_video_stage.py')

def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(SLOWEST_FIRST)))   # stable: the rest keep their order

@pytest.fixture(scope='session')
def pipeline_run(tmp_path_factory):
    "`amt pipeline --preset smoke --max-steps 3` once per test run, shared by the xdist workers: (run folder, the finished process)."
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'): root = root.parent     # the folder every worker's base folder is in
    run_dir, record = root/'pipe-shared'/'smoke', root/'pipe-shared'/'process.json'
    with FileLock(str(root/'pipe-shared.lock')):                      # the first worker runs it, the others wait and read
        if not record.exists():
            r = subprocess.run([shutil.which('amt'), 'pipeline', '--preset', 'smoke', '--run-dir', str(run_dir),
                                '--max-steps', '3'], capture_output=True, text=True, timeout=900)
            record.write_text(json.dumps(dict(args=r.args, returncode=r.returncode, stdout=r.stdout, stderr=r.stderr)))
        r = subprocess.CompletedProcess(**json.loads(record.read_text()))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir, r
