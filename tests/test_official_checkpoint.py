"""Checkpoints of the authors' released code (`epoch_N_checkpoints.pth.tar`, a dict holding `model_state_dict`, whose
model ends in Linear(d, 2) + Softmax trained against [y, 1-y], so output unit 0 is class y=1): `load_official_checkpoint`
reads them with output unit y = class y, and every other loader refuses them."""
import re
import pytest
import torch
from torch import nn
from silent_majority.core import Run, UnsafeFileError, pinned_threads
from silent_majority.models import (build_model, classifier_name, load_official_checkpoint, load_weights,
                                    outputs_probabilities, resnet50, vit_s16)
from silent_majority.neurons import gradient_scores, magnitude_scores
from silent_majority.train import ERMRun, erm_config, make_model


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "ResNet-50 and ViT-S passes on a few tiny images: one thread is faster than several competing for shared cores."
    with pinned_threads(1): yield


def _set_released_head(model, head, features):
    "Set `head` (the released code's Linear(d, 2)) so that its unit 0 (y=1 there) fires for image 0, unit 1 (y=0) for image 1."
    d = (features[0] - features[1]) / (features[0] - features[1]).norm() ** 2
    w = torch.stack([d, -2 * d])                      # rows of unequal norms, so that swapping them shows in the magnitudes
    with torch.no_grad():
        head.weight.copy_(w); head.bias.copy_(-w @ (features[0] + features[1]) / 2)   # unit 0 minus unit 1: +-1.5 at the two images


def _released_file(path, state_dict):
    "Write `state_dict` in the released code's checkpoint layout."
    torch.save({'epoch': 40, 'model_state_dict': state_dict, 'optimizer_state_dict': {'state': {}, 'param_groups': [
        {'lr': 5e-6, 'betas': (0.9, 0.999), 'weight_decay': 0, 'params': list(range(len(state_dict)))}]},
        'loss': torch.tensor(12.5)}, path)
    return path


def _to_released_vit(sd):
    "torchvision ViT keys -> the released code's timm-format keys (head at `head.0`), written independently of the loader."
    top = {'class_token': 'cls_token', 'encoder.pos_embedding': 'pos_embed', 'conv_proj.weight': 'patch_embed.proj.weight',
           'conv_proj.bias': 'patch_embed.proj.bias', 'encoder.ln.weight': 'norm.weight', 'encoder.ln.bias': 'norm.bias',
           'heads.head.0.weight': 'head.0.weight', 'heads.head.0.bias': 'head.0.bias'}
    out = {}
    for k, v in sd.items():
        if k in top: out[top[k]] = v; continue
        i, rest = re.fullmatch(r'encoder\.layers\.encoder_layer_(\d+)\.(.+)', k).groups()
        for a, b in (('ln_1', 'norm1'), ('ln_2', 'norm2'), ('self_attention.in_proj_', 'attn.qkv.'),
                     ('self_attention.out_proj', 'attn.proj'), ('mlp.0', 'mlp.fc1'), ('mlp.3', 'mlp.fc2')):
            rest = rest.replace(a, b)
        out[f'blocks.{i}.{rest}'] = v
    return out


@pytest.fixture(scope='module')
def released_resnet(tmp_path_factory):
    "(the released model, two images, its checkpoint file): image 0 is class y=1, image 1 class y=0."
    m = build_model('resnet50', softmax_output=True, seed=1).eval()      # the released code's keys: fc = Sequential(Linear, Softmax)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): f = torch.flatten(nn.Sequential(*list(m.children())[:-1])(x), 1)
    _set_released_head(m, m.fc[0], f)
    return m, x, _released_file(tmp_path_factory.mktemp('r50') / 'epoch_40_checkpoints.pth.tar', m.state_dict())


@pytest.fixture(scope='module')
def released_vit(tmp_path_factory):
    m = build_model('vit_s16', softmax_output=True, seed=1).eval()
    with torch.no_grad():
        for p in (m.class_token, m.conv_proj.weight): p.add_(0.5 * torch.randn_like(p))   # images give distinct features
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    heads, m.heads = m.heads, nn.Identity()
    with torch.no_grad(): f = m(x)                                          # the class token after the final LayerNorm
    m.heads = heads
    _set_released_head(m, m.heads.head[0], f)
    return m, x, _released_file(tmp_path_factory.mktemp('vit') / 'epoch_40_checkpoints.pth.tar', _to_released_vit(m.state_dict()))


_LOADED = {}

def _released_and_loaded(arch, request):
    "(the released model, two images, its file, `load_official_checkpoint` of the file), loaded once per arch."
    released, x, path = request.getfixturevalue('released_resnet' if arch == 'resnet50' else 'released_vit')
    if path not in _LOADED: _LOADED[path] = load_official_checkpoint(path, arch)
    return released, x, path, _LOADED[path]


@pytest.mark.parametrize('arch', ['resnet50', 'vit_s16'])
def test_argmax_is_the_class_and_outputs_stay_probabilities(arch, request):
    released, x, path, m = _released_and_loaded(arch, request)
    with torch.no_grad(): before = released(x)
    assert before.argmax(1).tolist() == [0, 1]              # the released code: unit 0 (y=1) for image 0
    with torch.no_grad(): out = m(x)
    assert out.argmax(1).tolist() == [1, 0]                 # ours: image 0 is class 1, image 1 is class 0
    assert not m.training and outputs_probabilities(m)
    assert (out >= 0).all() and torch.allclose(out.sum(1), torch.ones(2))
    assert torch.allclose(out, before.flip(1), atol=1e-6)   # the same probabilities, in swapped order
    head = classifier_name(m)
    assert head == ('fc.0' if arch == 'resnet50' else 'heads.head.0')
    assert torch.equal(m.get_submodule(head).weight, released.get_submodule(head).weight[[1, 0]])
    assert torch.equal(m.get_submodule(head).bias, released.get_submodule(head).bias[[1, 0]])
    ours, theirs = m.state_dict(), released.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == [f'{head}.weight', f'{head}.bias']


@pytest.mark.parametrize('arch', ['resnet50', 'vit_s16'])
def test_magnitude_scores_unchanged_but_the_two_final_rows(arch, request):
    released, _, _, loaded = _released_and_loaded(arch, request)
    ours, theirs = magnitude_scores(loaded), magnitude_scores(released)
    head = classifier_name(released)
    assert list(ours) == list(theirs) and head in ours
    assert all(torch.equal(ours[n], theirs[n]) for n in ours if n != head)
    assert torch.equal(ours[head], theirs[head].flip(0)) and not torch.equal(ours[head], theirs[head])


def test_gradient_scores_equal_the_released_codes_on_its_own_targets(request):
    released, x, _, loaded = _released_and_loaded('resnet50', request)
    y = torch.tensor([1, 0])
    ours = gradient_scores(loaded, x, y)
    theirs = gradient_scores(released, x, 1 - y)            # the released code's target [y, 1-y] is index 1-y of its outputs
    assert all(torch.allclose(ours[n], theirs[n], rtol=1e-4, atol=1e-7) for n in ours if n != 'fc.0')
    assert torch.allclose(ours['fc.0'], theirs['fc.0'].flip(0), rtol=1e-4)


def test_every_other_loader_refuses_it_naming_load_official_checkpoint(released_resnet):
    released, _, path = released_resnet
    ck = torch.load(path, weights_only=True)
    loaders = {'load_weights(file)': lambda: load_weights(build_model('resnet50', softmax_output=True), path),
               'load_weights(dict)': lambda: load_weights(build_model('resnet50', softmax_output=True), ck),
               'resnet50(weights_path)': lambda: resnet50(weights_path=path),
               'build_model(weights_path)': lambda: build_model('resnet50', softmax_output=True, weights_path=path)}
    for name, load in loaders.items():
        with pytest.raises(ValueError, match=r"released code .*load_official_checkpoint\(path"):
            load()
    load_weights(build_model('resnet50', softmax_output=True), {'model': ck['model_state_dict'], 'epoch': 40})  # our own layout loads


def test_vit_checkpoint_refused_by_vit_s16_weights_path(released_vit):
    with pytest.raises(ValueError, match='load_official_checkpoint'): vit_s16(weights_path=released_vit[2])


def test_erm_run_model_refuses_a_released_checkpoint(fresh_cache):
    cfg = erm_config(scale='smoke', seed=11, epochs=3)
    run = ERMRun(cfg, Run(cfg, 'erm'), {'best_epoch': 3})        # a run's folder, without training it
    own = make_model(cfg, 2, 3).state_dict()
    run.run.save_checkpoint('best', {'model': own, 'epoch': 3})
    assert torch.equal(run.model('best').state_dict()['fc.weight'], own['fc.weight'])   # our own layout loads
    run.run.save_checkpoint('best', {'epoch': 3, 'model_state_dict': own, 'loss': 0.5})
    with pytest.raises(ValueError, match=r'best\.pt .*released code.*load_official_checkpoint'):
        run.model('best')


def test_data_parallel_prefix(released_resnet, tmp_path):
    released, x, path = released_resnet
    sd = torch.load(path, weights_only=True)['model_state_dict']
    dp = _released_file(tmp_path / 'dp.pth.tar', {'module.' + k: v for k, v in sd.items()})   # saved through nn.DataParallel
    with torch.no_grad(): assert torch.equal(load_official_checkpoint(dp)(x), released(x).flip(1))
    _released_file(tmp_path / 'mixed.pth.tar', {'module.conv1.weight': sd['conv1.weight'], 'fc.0.weight': sd['fc.0.weight']})
    with pytest.raises(ValueError, match=r"1 of the 2 keys of the released-code checkpoint .* start with DataParallel's "
                                         r"'module.' prefix: expected it on every key"):
        load_official_checkpoint(tmp_path / 'mixed.pth.tar')


def test_bad_checkpoints_name_what_was_expected(released_resnet, released_vit, tmp_path):
    _, _, r50 = released_resnet
    sd = torch.load(r50, weights_only=True)['model_state_dict']
    torch.save({'epoch': 40, 'state_dict': sd}, tmp_path / 'no_key.pth')
    with pytest.raises(ValueError, match=r"holds no 'model_state_dict' \(found \['epoch', 'state_dict'\]\): expected the released"):
        load_official_checkpoint(tmp_path / 'no_key.pth')
    _released_file(tmp_path / 'three.pth', {'fc.0.weight': torch.randn(3, 2048), 'fc.0.bias': torch.randn(3)})
    with pytest.raises(ValueError, match=r'head with 3 outputs .*expected exactly 2'):
        load_official_checkpoint(tmp_path / 'three.pth')
    _released_file(tmp_path / 'logits.pth', {'fc.weight': torch.randn(2, 2048), 'fc.bias': torch.randn(2)})
    with pytest.raises(ValueError, match=r"no fc.0.weight and fc.0.bias: expected the released code's head Sequential"):
        load_official_checkpoint(tmp_path / 'logits.pth')
    _released_file(tmp_path / 'short.pth', {k: v for k, v in sd.items() if k != 'layer1.0.conv1.weight'})
    with pytest.raises(ValueError, match=r"expected arch resnet50\) is for another architecture .*missing keys \['layer1.0.conv1.weight'\]"):
        load_official_checkpoint(tmp_path / 'short.pth')
    with pytest.raises(ValueError, match=r'expected arch vit_s16\) has no head.0.weight'):
        load_official_checkpoint(r50, 'vit_s16')
    with pytest.raises(ValueError, match=r'expected arch resnet50\) has no fc.0.weight'):
        load_official_checkpoint(released_vit[2], 'resnet50')
    with pytest.raises(ValueError, match=r"unknown arch 'deit_small': expected one of \['resnet50', 'vit_s16'\]"):
        load_official_checkpoint(r50, 'deit_small')
    with pytest.raises(FileNotFoundError, match='nope.pth.tar'):
        load_official_checkpoint(tmp_path / 'nope.pth.tar')


class Payload:
    "Anything but tensors, numbers, strings and containers of them: unpickling it could run code."


def test_file_with_pickled_objects_is_refused(tmp_path):
    sd = build_model('tiny_cnn', softmax_output=True).state_dict()
    torch.save({'model_state_dict': sd, 'args': Payload()}, tmp_path / 'epoch_0_checkpoints.pth.tar')
    with pytest.raises(UnsafeFileError, match='refusing to load it'):
        load_official_checkpoint(tmp_path / 'epoch_0_checkpoints.pth.tar')
