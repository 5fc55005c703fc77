import os
# Tests never touch the network: no Hugging Face downloads, W&B offline, no display.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('WANDB_MODE', 'offline')
os.environ.setdefault('WANDB_SILENT', 'true')
os.environ.setdefault('MPLBACKEND', 'Agg')

import shutil, subprocess
import pytest

@pytest.fixture(scope='session')
def pipeline_run(tmp_path_factory):
    "`amt pipeline --preset smoke --max-steps 3` once per session: (run folder, the finished process with its stdout and stderr)."
    run_dir = tmp_path_factory.mktemp('pipe')/'smoke'
    r = subprocess.run([shutil.which('amt'), 'pipeline', '--preset', 'smoke', '--run-dir', str(run_dir), '--max-steps', '3'],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir, r
