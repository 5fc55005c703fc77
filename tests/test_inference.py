"""Inference, evaluation, export and the benchmark command on a smoke checkpoint, as a user runs them."""
import contextlib, io, json
import numpy as np
import pytest
import torch
from PIL import Image

from amt_lib.config import load_config, config_to_yaml
from amt_lib.inference import Predictor
from amt_lib.export import export_onnx, check_onnx
from amt_lib.cli import main
from amt_lib.metrics import read_hand_results

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    "A smoke checkpoint as the trainer writes it (model, ema, config, ...), EMA weights different from the raw ones."
    from amt_lib.models.amt import build_model
    from amt_lib.learner.checkpoint import save_checkpoint
    cfg = load_config('smoke')
    torch.manual_seed(0); m = build_model(cfg)
    torch.manual_seed(1); ema = build_model(cfg)
    p = tmp_path_factory.mktemp('run')/'checkpoints'/'last.pt'
    save_checkpoint({'model': m.state_dict(), 'ema': ema.state_dict(), 'optimizer': None, 'scheduler': None, 'scaler': None,
                     'rng': None, 'sampler': None, 'step': 0, 'epoch': 0, 'config': config_to_yaml(cfg), 'commit': 'test',
                     'best_metric': None}, p)
    return p


def run(fn, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = fn(argv)
    return rc, out.getvalue(), err.getvalue()


def test_predictor_uses_ema(ckpt):
    p = Predictor.from_checkpoint(ckpt, device='cpu')
    q = Predictor.from_checkpoint(ckpt, device='cpu', use_ema=False)
    img = torch.rand(2, 3, 224, 224); K = torch.tensor([[280., 0, 112], [0, 280., 112], [0, 0, 1]]).expand(2, 3, 3)
    a, b = p.predict(img, K), q.predict(img, K)
    assert p.weights == 'ema' and not torch.allclose(a['pred_hand_joints'], b['pred_hand_joints'])
    assert torch.isfinite(a['pred_hand_joints']).all() and a['pred_hand_joints'].dtype == torch.float32


def test_cli_predict_photo(ckpt, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((480, 640, 3)) * 255).astype(np.uint8)).save(tmp_path/'a.jpg')
    Image.fromarray((rng.random((480, 640, 3)) * 255).astype(np.uint8)).save(tmp_path/'b.png')
    rc, out, err = run(main, ['predict', str(tmp_path/'a.jpg'), str(tmp_path/'b.png'), '--ckpt', str(ckpt), '--device', 'cpu',
                                     '--hand-box', '300,200,380,300', '--K', '600,600,320,240', '--out', str(tmp_path/'o')])
    assert rc == 0, err
    r = json.loads((tmp_path/'o'/'a.json').read_text())
    assert r['crop']['mode'] == 'hand' and 'cropped around the hand' in out
    assert np.array(r['hand']['joints_mm']).shape == (21, 3) and r['weights'] == 'ema'
    assert (tmp_path/'o'/'b_overlay.png').exists()
    assert len(r['hand']['confidence']) == 21 and 'exp(-e / tau)' in r['hand']['confidence_meaning']   # the trained quantity, said
    assert all('force_n' not in o.get('contact', {}) for o in r['objects'])                       # no forces: nothing trains them
    rc, out, _ = run(main, ['predict', str(tmp_path/'a.jpg'), '--ckpt', str(ckpt), '--device', 'cpu', '--out', str(tmp_path/'c')])
    r = json.loads((tmp_path/'c'/'a.json').read_text())
    assert rc == 0 and r['crop']['mode'] == 'centre' and 'centre-cropped' in out and r['K_source'].startswith('default')
    rc, _, err = run(main, ['predict', str(tmp_path/'a.jpg'), '--ckpt', str(ckpt), '--hand-box', '1,2,3'])
    assert rc == 2 and '--hand-box' in err


def test_cli_eval_synth(ckpt, tmp_path):
    rc, out, err = run(main, ['eval', '--ckpt', str(ckpt), '--data', 'synth', '--split', 'test', '--device', 'cpu',
                                  '--no-progress', '--out', str(tmp_path)])
    assert rc == 0, err
    m = json.loads((tmp_path/'metrics.json').read_text())
    assert m['samples'] == load_config('smoke').data.val_size and m['weights'] == 'ema'
    assert m['metrics']['mpjpe'] > 0 and 'pa_mpjpe' in out
    # objects: SynthHOI's model points give ADD, ADD-S, their AUC and the BOP-style recall, overall and per class
    for k in ('add', 'add_s', 'add_auc', 'add_s_auc', 'add_recall@0.1d'): assert np.isfinite(m['metrics'][k]), k
    assert m['metrics']['objects_per_class'] and 'ADD(-S)<0.1d' in out
    assert 'conf_spearman' in m['metrics'] and 'conf_ause' in out               # the confidence's calibration
    idx, j = read_hand_results(tmp_path/'hpe_s0_test.txt')
    assert j.shape == (m['samples'], 21, 3)
    rc, _, err = run(main, ['eval', '--ckpt', str(ckpt), '--data', 'dexycb', '--root', str(tmp_path/'nowhere'), '--device', 'cpu'])
    assert rc == 2 and 'nowhere' in err


def test_cli_export_onnx_matches_onnxruntime(ckpt, tmp_path):
    rc, out, err = run(main, ['export', 'onnx', '--ckpt', str(ckpt), '--out', str(tmp_path/'m.onnx')])
    assert rc == 0, out + err
    assert 'within tolerance' in out
    worst = float(out.split('max abs difference ')[1].split()[0])
    print(out)
    assert worst <= 1e-3


def test_cli_export_torchscript_matches_eager(ckpt, tmp_path):
    "The traced file loads and gives the eager model's outputs (EMA weights) at another batch size than the traced one."
    from amt_lib.export import example_inputs, output_keys
    rc, out, err = run(main, ['export', 'torchscript', '--ckpt', str(ckpt), '--out', str(tmp_path/'m.pt'), '--batch', '2'])
    assert rc == 0 and 'TorchScript' in out, err
    ts = torch.jit.load(str(tmp_path/'m.pt'))
    eager = Predictor.from_checkpoint(ckpt, device='cpu', precision='fp32').model
    img, K = example_inputs(3, 224, seed=11)
    with torch.no_grad(): got, ref = ts(img, K), eager(img, K)
    keys = output_keys(eager, img, K)
    assert len(got) == len(keys) and 'pred_contact_forces' not in keys
    for k, g in zip(keys, got):
        assert g.shape == ref[k].shape, k
        torch.testing.assert_close(g, ref[k], atol=1e-4, rtol=1e-4, msg=k)



def test_cli_bench_writes_json(tmp_path):
    "`amt bench` runs on CPU and writes its record (a few sections, few iterations: this checks the command, not speed)."
    rc, out, err = run(main, ['bench', '--preset', 'smoke', '--only', 'train,infer,attention', '--steps', '2', '--iters', '2',
                                   '--infer-batch', '4', '--json', str(tmp_path/'b.json')])
    assert rc == 0, err
    rec = json.loads((tmp_path/'b.json').read_text())
    figs = {f['figure']: f for f in rec['figures']}
    assert figs['training throughput']['value'] > 0 and figs['training FLOPs per sample']['value'] > 0
    assert figs['inference batch 4']['ratio'] is not None and 'eager attention' in out
    rc, _, err = run(main, ['bench', '--only', 'warp'])
    assert rc == 2 and 'warp' in err
