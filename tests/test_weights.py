"""Real weights: a state dict with the parameter names and shapes of the published facebook/dinov2-large checkpoint
loads strictly through the project's own path (`build_backbone` with `model.backbone.name=<folder>`); a renamed or
missing key fails, naming it.

Where the names come from: transformers' `models/dinov2/convert_dinov2_to_hf.py` (the script that wrote the Hub's
facebook/dinov2-* checkpoints: `create_rename_keys` + `read_in_q_k_v`; it saves a `Dinov2Model`, so no `dinov2.`
prefix) and the Dinov2Model docs / config of dinov2-large (hidden 1024, 24 layers, 16 heads, MLP ratio 4, patch 14,
trained at 518 px: 37 x 37 patch positions + CLS). transformers >= 5 names its attention modules differently
(`attention.q_proj`) and maps the Hub's names on load and back on save; this test pins that the Hub's names work.
Runtime: about 15-30 s on 2 CPU cores (one dinov2-large build, ~1.2 GB fp32 in memory and on disk)."""
import json
import pytest, torch
from safetensors.torch import save_file
from amt_lib.config import load_config
from amt_lib.models.backbone import build_backbone, load_dinov2, BackboneKeysError

def dinov2_hub_keys(hidden: int = 1024, layers: int = 24, mlp_ratio: int = 4, patch: int = 14, grid: int = 37) -> dict:
    "Parameter name -> shape of a facebook/dinov2-* checkpoint as the Hub stores it (model.safetensors)."
    H, M = hidden, hidden * mlp_ratio
    keys = {'embeddings.cls_token': (1, 1, H), 'embeddings.mask_token': (1, H),
            'embeddings.position_embeddings': (1, 1 + grid * grid, H),
            'embeddings.patch_embeddings.projection.weight': (H, 3, patch, patch),
            'embeddings.patch_embeddings.projection.bias': (H,)}
    for i in range(layers):
        p = f'encoder.layer.{i}.'
        for n in ('norm1', 'norm2'): keys[p + n + '.weight'] = keys[p + n + '.bias'] = (H,)
        for n in ('query', 'key', 'value'):
            keys[p + f'attention.attention.{n}.weight'] = (H, H); keys[p + f'attention.attention.{n}.bias'] = (H,)
        keys[p + 'attention.output.dense.weight'] = (H, H); keys[p + 'attention.output.dense.bias'] = (H,)
        keys[p + 'layer_scale1.lambda1'] = keys[p + 'layer_scale2.lambda1'] = (H,)
        keys[p + 'mlp.fc1.weight'] = (M, H); keys[p + 'mlp.fc1.bias'] = (M,)
        keys[p + 'mlp.fc2.weight'] = (H, M); keys[p + 'mlp.fc2.bias'] = (H,)
    keys['layernorm.weight'] = keys['layernorm.bias'] = (H,)
    return keys

def hub_config(hidden: int, layers: int, heads: int) -> dict:
    "config.json of a Dinov2Model checkpoint (the fields of facebook/dinov2-large's, sizes as given)."
    return dict(model_type='dinov2', architectures=['Dinov2Model'], hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, mlp_ratio=4, patch_size=14, image_size=518, num_channels=3, qkv_bias=True,
                layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act='gelu', use_swiglu_ffn=False, drop_path_rate=0.0,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.02)

def write_checkpoint(folder, keys: dict, hidden: int, layers: int, heads: int) -> dict:
    "A save_pretrained-style folder (config.json + model.safetensors); each tensor filled with its own index, cheaply."
    folder.mkdir(parents=True, exist_ok=True)
    (folder/'config.json').write_text(json.dumps(hub_config(hidden, layers, heads)))
    sd = {k: torch.full(s, float(i) / 1000) for i, (k, s) in enumerate(keys.items())}
    save_file(sd, str(folder/'model.safetensors'), metadata={'format': 'pt'})
    return {k: float(i) / 1000 for i, k in enumerate(keys)}

def test_dinov2_large_hub_names_load_strictly(tmp_path):
    keys = dinov2_hub_keys()
    assert len(keys) == 5 + 24 * 18 + 2 == 439          # embeddings, 18 per layer, final LayerNorm
    assert sum(torch.Size(s).numel() for s in keys.values()) == 304_368_640    # ViT-L/14: 304.4M parameters
    val = write_checkpoint(tmp_path/'dinov2-large', keys, 1024, 24, 16)
    cfg = load_config('h200', [f'model.backbone.name={tmp_path/"dinov2-large"}', 'model.backbone.pretrained=true'])
    bb = build_backbone(cfg.model, cfg.data.image_size)
    d = bb.dinov2
    assert (d.config.hidden_size, d.config.num_hidden_layers, d.config.num_attention_heads) == (1024, 24, 16)
    # every value arrived where its name says (module names differ between transformers versions: look them up)
    a0 = d.encoder.layer[0].attention
    q = a0.q_proj if hasattr(a0, 'q_proj') else a0.attention.query
    assert q.weight.shape == (1024, 1024) and torch.all(q.weight == val['encoder.layer.0.attention.attention.query.weight'])
    assert torch.all(d.embeddings.position_embeddings == val['embeddings.position_embeddings'])
    assert torch.all(d.encoder.layer[23].layer_scale2.lambda1 == val['encoder.layer.23.layer_scale2.lambda1'])
    assert torch.all(d.layernorm.bias == val['layernorm.bias'])
    assert sum(p.numel() for p in d.parameters()) == 304_368_640
    assert bb.embed_dim == 1024 and bb.num_tokens == 257 and bb.feature_layers == [6, 12, 18, 24]

@pytest.mark.parametrize('change', ['rename', 'drop'])
def test_renamed_or_missing_key_fails(tmp_path, change):
    "Same names at a small size (the loader's check does not depend on it): one key renamed or dropped must fail."
    keys = dinov2_hub_keys(hidden=32, layers=2)
    old = 'encoder.layer.1.mlp.fc1.weight'
    if change == 'rename': keys['encoder.layer.1.mlp.fc_in.weight'] = keys.pop(old)
    else: del keys[old]
    write_checkpoint(tmp_path/'ck', keys, 32, 2, 2)
    with pytest.raises(BackboneKeysError) as e: load_dinov2(str(tmp_path/'ck'))
    msg = str(e.value)
    assert 'missing keys' in msg and 'encoder.layer.1.mlp.fc1.weight' in msg
    if change == 'rename': assert 'unexpected keys (checkpoint names): encoder.layer.1.mlp.fc_in.weight' in msg
    cfg = load_config('smoke', [f'model.backbone.name={tmp_path/"ck"}', 'model.backbone.pretrained=true'])
    with pytest.raises(BackboneKeysError): build_backbone(cfg.model, cfg.data.image_size)

def test_small_hub_names_load(tmp_path):
    "The same key list at a small size loads without a complaint (the negative tests above are not vacuous)."
    write_checkpoint(tmp_path/'ck', dinov2_hub_keys(hidden=32, layers=2), 32, 2, 2)
    assert load_dinov2(str(tmp_path/'ck')).config.hidden_size == 32
