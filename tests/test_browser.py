"""JupyterLab in a real browser: the smoke stage-1 notebook run through the UI in Debian's Chromium (driven by Playwright).

Checks what a user sees: one progress widget while a run trains, one figure per training run redrawn in place (same
number of outputs, new image), no error output, no browser console error; then saves, shuts the kernel down, reloads
the page and reopens the notebook: every finished bar is a static record (no "Error displaying widget"). Screenshots
go to $AMT_TEST_ARTIFACTS/browser (default tests/artifacts/browser). Chromium comes from `.ci/setup`
(`apt-get install -y chromium`); without it the test fails and says so."""
import json, os, re, secrets, shutil, socket, subprocess, sys, time
from pathlib import Path
import pytest
import urllib.request

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get('AMT_TEST_ARTIFACTS') or ROOT/'tests'/'artifacts')/'browser'
NB = 'stage1_pretrain.ipynb'
RUNS = 3          # stage 1 trains hand_encoder, object_encoder, contact_encoder: one bar, table and figure each

def chromium() -> str:
    "The system Chromium (Playwright's own download is not possible here)."
    for name in ('chromium', 'chromium-browser'):
        if p := shutil.which(name): return p
    pytest.fail("Chromium not found: the browser test drives Debian's chromium; install it with `apt-get install -y "
                "chromium` (.ci/setup does this when run as root)")

def tiny_stage1(dst: Path):
    "The stage-1 notebook with a validation every 2 steps (two figure updates per run) and its runs in `runs/browser`."
    nb = json.loads((ROOT/'nbs'/'experiments'/NB).read_text())
    cell = next(c for c in nb['cells'] if 'parameters' in c['metadata'].get('tags', []))
    src, n1 = re.subn(r"^(overrides\s*=\s*)\[\]", r"\1['training.eval_every=2']", ''.join(cell['source']), flags=re.M)
    src, n2 = re.subn(r"^(run_dir\s*=\s*)'[^']*'", r"\1'runs/browser'", src, flags=re.M)
    assert n1 == n2 == 1, f'{NB}: the parameters cell no longer has `overrides = []` and `run_dir = ...` lines'
    cell['source'] = src.splitlines(keepends=True)
    dst.write_text(json.dumps(nb, indent=1))

def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on 127.0.0.1 (random port and token) serving a folder with the tiny stage-1 notebook."
    root, settings = tmp_path/'root', tmp_path/'settings'
    root.mkdir(); tiny_stage1(root/NB)
    news = settings/'@jupyterlab'/'apputils-extension'/'notification.jupyterlab-settings'
    news.parent.mkdir(parents=True); news.write_text(json.dumps({'fetchNews': 'false'}))   # no news toast over the page
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path/'config'), JUPYTER_RUNTIME_DIR=str(tmp_path/'runtime'),
               MPLBACKEND='Agg')
    log = open(tmp_path/'jupyterlab.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--no-browser', '--allow-root', '--ServerApp.ip=127.0.0.1',
                             f'--ServerApp.port={port}', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}',
                             f'--LabApp.user_settings_dir={settings}', f'--LabApp.workspaces_dir={tmp_path/"workspaces"}'],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f'http://127.0.0.1:{port}'
    try:
        for _ in range(120):
            if proc.poll() is not None: pytest.fail(f'JupyterLab exited: {(tmp_path/"jupyterlab.log").read_text()[-3000:]}')
            try:
                urllib.request.urlopen(f'{url}/api/status?token={token}', timeout=2); break
            except OSError: time.sleep(0.5)
        else: pytest.fail(f'JupyterLab did not answer in 60 s: {(tmp_path/"jupyterlab.log").read_text()[-3000:]}')
        yield url, token, root
    finally:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()

# Every 100 ms, the outputs of the training cell (the one calling run_stage): rendered mime type, a hash of its image,
# whether it holds an ipywidget view or a static <progress> record. A snapshot is kept when something changed.
POLL = r'''() => {
  window.__snaps = [];
  const h = s => { let x = 0; for (let i = 0; i < s.length; i++) x = (x * 31 + s.charCodeAt(i)) | 0; return x; };
  window.__poll = setInterval(() => {
    const cell = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')]
      .find(c => (c.querySelector('.jp-InputArea')?.innerText || '').includes('run_stage('));
    if (!cell) return;
    const outs = [...cell.querySelectorAll('.jp-OutputArea-child')].map(o => {
      const img = o.querySelector('img');
      return {mime: o.querySelector('.jp-OutputArea-output')?.getAttribute('data-mime-type') || '', img: img ? h(img.src) : null,
              widget: !!o.querySelector('.widget-hprogress, .jupyter-widget-hprogress'), progress: !!o.querySelector('progress')};
    });
    const js = JSON.stringify(outs), last = window.__snaps[window.__snaps.length - 1];
    if (!last || last.js !== js) window.__snaps.push({js, outs});
  }, 100);
}'''

PANEL = '.jp-NotebookPanel:not(.lm-mod-hidden)'

def menu(page, top: str, item: str):
    "Click a menu bar entry, then one of its items."
    page.click(f'.lm-MenuBar-itemLabel:text-is("{top}")'); page.click(f'.lm-Menu-itemLabel:text-is("{item}")')

def answer_dialog(page, accept: bool = True, timeout: float = 5000) -> str | None:
    "Answer a dialog if one opens (JupyterLab asks which kernel to start for a notebook it has not seen)."
    try: page.wait_for_selector('.jp-Dialog', timeout=timeout)
    except Exception: return None
    text = page.inner_text('.jp-Dialog')
    page.click('.jp-Dialog button.' + ('jp-mod-accept' if accept else 'jp-mod-reject'))
    return text

def wait_until_done(page, timeout: float = 240, shot: Path | None = None):
    "Wait until no cell is queued or running ('[*]') and the kernel is idle, for 2 s in a row; `shot`: a screenshot while a bar is live."
    t0, quiet = time.time(), 0
    while time.time() - t0 < timeout:
        if (shot is not None and page.locator(f'{PANEL} .jp-OutputArea-output .widget-hprogress').count()
                and page.locator(f'{PANEL} .jp-OutputArea-output img').count()):
            page.screenshot(path=str(shot)); shot = None
        busy = page.locator(f'{PANEL} .jp-InputPrompt:has-text("[*]")').count()
        status = page.get_attribute(f'{PANEL} .jp-Notebook-ExecutionIndicator', 'data-status')
        quiet = quiet + 1 if busy == 0 and status == 'idle' else 0
        if quiet >= 4: return
        time.sleep(0.5)
    pytest.fail(f'the notebook was still running after {timeout} s')

def page_errors(page) -> list[str]:
    "Tracebacks on stderr and widget errors shown in the open notebook."
    bad = [t for t in page.locator(f'{PANEL} .jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]').all_text_contents()
           if 'Traceback' in t]
    bad += [t for t in page.locator(f'{PANEL} .jp-OutputArea-output').all_text_contents() if 'Error displaying widget' in t]
    return bad + page.locator(f'{PANEL} .jp-OutputArea-output [data-mime-type="application/vnd.jupyter.error"], '
                              f'{PANEL} .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]').all_text_contents()

def test_stage1_notebook_in_jupyterlab(lab):
    try: from playwright.sync_api import sync_playwright
    except ImportError: pytest.fail('the browser test needs the pip package playwright (a dev requirement: pip install -e ".[dev]", as .ci/setup does)')
    url, token, root = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    console = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), headless=True,
                                     args=['--no-sandbox'] if os.geteuid() == 0 else [])
        try:
            page = browser.new_page(viewport={'width': 1300, 'height': 4200})   # tall: the whole notebook in view, in the screenshots
            page.on('console', lambda m: console.append(f'{m.type}: {m.text}') if m.type == 'error' else None)
            page.on('pageerror', lambda e: console.append(f'pageerror: {e}'))
            page.goto(f'{url}/lab/tree/{NB}?token={token}')
            page.wait_for_selector(f'{PANEL} .jp-CodeCell', timeout=60_000)
            answer_dialog(page)                                     # "Select Kernel": the venv's Python 3 (ipykernel)
            page.evaluate(POLL)
            menu(page, 'Run', 'Run All Cells')
            time.sleep(2)
            wait_until_done(page, shot=ARTIFACTS/'0_while_training.png')
            page.screenshot(path=str(ARTIFACTS/'1_after_run.png'))
            train = page.locator(f'{PANEL} .jp-CodeCell').filter(has_text='run_stage(')
            train.locator('.jp-OutputArea').screenshot(path=str(ARTIFACTS/'2_training_outputs.png'))
            snaps = page.evaluate('window.__snaps')
            prompts = page.locator(f'{PANEL} .jp-CodeCell .jp-InputPrompt').all_text_contents()
            errors = page_errors(page)

            assert all(re.fullmatch(r'\[\d+\]:', p.strip()) for p in prompts), f'not every cell ran: {prompts}; errors: {errors}'
            assert errors == [], errors
            assert any(o['widget'] for s in snaps for o in s['outs']), 'no progress widget was rendered while training'
            updated = [i for a, b in zip(snaps, snaps[1:]) if len(a['outs']) == len(b['outs'])
                       for i, (x, y) in enumerate(zip(a['outs'], b['outs'])) if x['img'] is not None and y['img'] is not None
                       and x['img'] != y['img']]
            assert updated, 'no figure was redrawn in place (same output count, new image)'
            final = snaps[-1]['outs']
            assert sum(o['img'] is not None for o in final) == RUNS, f'expected one figure per training run: {final}'
            assert sum(o['progress'] for o in final) == RUNS and not any(o['widget'] for o in final), final
            assert train.locator('table.amt-metrics').count() == RUNS       # one metrics table per run

            page.keyboard.press('Control+s')                        # save, shut the kernel down, reload, reopen
            page.wait_for_selector('.lm-TabBar-tab.jp-mod-dirty', state='detached', timeout=30_000)
            menu(page, 'Kernel', 'Shut Down Kernel'); answer_dialog(page, timeout=2000)
            menu(page, 'File', 'Close Tab'); answer_dialog(page, timeout=2000)
            page.reload()
            page.wait_for_selector(f'.jp-DirListing-item:has-text("{NB}")', timeout=60_000)
            page.dblclick(f'.jp-DirListing-item:has-text("{NB}")')
            page.wait_for_selector(f'{PANEL} .jp-CodeCell', timeout=60_000)
            answer_dialog(page, accept=False, timeout=3000)           # no kernel needed to look at the saved outputs
            page.wait_for_function(f'document.querySelectorAll("{PANEL} .jp-OutputArea-output img").length >= {RUNS}',
                                   timeout=30_000)
            time.sleep(2)                                           # let any widget view try (and fail) to render
            page.screenshot(path=str(ARTIFACTS/'3_reopened.png'))
            train = page.locator(f'{PANEL} .jp-CodeCell').filter(has_text='run_stage(')
            train.locator('.jp-OutputArea').screenshot(path=str(ARTIFACTS/'4_reopened_training_outputs.png'))
            assert page_errors(page) == []
            assert train.locator('.jp-OutputArea-output progress').count() == RUNS   # each finished bar, as a static record
            assert train.locator('.jp-OutputArea-output img').count() == RUNS
        finally:
            browser.close()
    assert console == [], console

    saved = json.loads((root/NB).read_text())                        # the file itself: text records, no widget views
    outs = [o for c in saved['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', [])]
    assert not [o for o in outs if 'application/vnd.jupyter.widget-view+json' in o.get('data', {})]
    bars = [o for o in outs if '<progress' in ''.join(o.get('data', {}).get('text/html', ''))]
    assert len(bars) == RUNS and all('100%' in ''.join(o['data']['text/plain']) for o in bars), bars
