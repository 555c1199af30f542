"""Every paper-scale configuration, run briefly on the CPU on full-resolution Waterbirds- and CelebA-format fixtures:
ImageNet weights read from SM_WEIGHTS (ResNet-50 and ViT-S/16), ERM with both presets, Stage I tracing with both
presets' candidate sets and gradient rules, Stage II fine-tuning with both presets, JTT and DFR. Only the epoch
counts and batch sizes are shortened; everything else is the paper config (224 x 224 inputs, augmentation,
architectures, losses, masks)."""
import os
import pytest
import torch
import torchvision
from silent_majority.data import waterbirds_fixture, celeba_fixture
from silent_majority.models import vit_s16
from silent_majority.neurons import CANDIDATE_PRESETS, preset_candidates
from silent_majority.train import erm_config, cached_erm
from silent_majority.tracing import TracingEngine, unstructured_tracing
from silent_majority.finetune import finetune_config, cached_finetune, erm_of
from silent_majority.baselines import jtt_config, cached_jtt, dfr

SHORT = dict(epochs=1, batch_size=4, keep_epochs=(0, 1))     # the only change to each paper ERM config


@pytest.fixture(scope='module')
def paper_env(tmp_path_factory):
    "SM_DATA with both fixtures at full resolution, SM_WEIGHTS with ImageNet-format weight files, an empty run cache."
    tmp = tmp_path_factory.mktemp('paper')
    waterbirds_fixture(tmp / 'data' / 'waterbird_complete95_forest2water2', n_per_group=(2, 1, 1))
    celeba_fixture(tmp / 'data' / 'celeba', n_per_group=(2, 1, 1))
    (tmp / 'weights').mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), tmp / 'weights' / 'resnet50-11ad3fa6.pth')   # torchvision format
    torch.save({'model': vit_s16(n_classes=1000, seed=0).state_dict()}, tmp / 'weights' / 'deit_small_patch16_224-cd65a155.pth')
    keys = ('SM_DATA', 'SM_WEIGHTS', 'SM_CACHE', 'SM_PROGRESS')
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(SM_DATA=str(tmp / 'data'), SM_WEIGHTS=str(tmp / 'weights'), SM_CACHE=str(tmp / 'cache'), SM_PROGRESS='0')
    yield tmp
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


@pytest.mark.parametrize('dataset,preset,arch', [('waterbirds', 'paper', 'resnet50'), ('celeba', 'official_code', 'resnet50'),
                                                 ('waterbirds', 'paper', 'vit_s16')])
def test_erm_paper_config_trains_an_epoch(paper_env, dataset, preset, arch):
    cfg = erm_config(dataset, scale='paper', preset=preset, seed=0, arch=arch, **SHORT)
    full = erm_config(dataset, scale='paper', preset=preset, seed=0, arch=arch)
    assert (cfg.image_size, cfg.augment, cfg.init, cfg.lr) == (224, True, full.init, full.lr)
    erm = cached_erm(cfg)
    sp = erm.splits()
    assert sp['train'].x.shape[1:] == (3, 224, 224) and len(sp['train']) == 8 and min(sp['val'].group_counts()) == 1
    assert [r['epoch'] for r in erm.run.metrics()] == [0, 1]
    assert set(erm.run.checkpoints()) >= {'best', 'epoch_0', 'epoch_1', 'last'}
    assert 'optimizer' not in erm.run.load_checkpoint('last')                 # a finished run keeps weights only
    m = erm.model('last')
    assert m.training is False and 0.0 <= erm.result['last']['test']['wga'] <= 1.0
    if preset == 'official_code': assert torch.allclose(m(sp['test'].x[:2].float()).sum(1), torch.ones(2))  # softmax outputs


@pytest.mark.parametrize('preset', ['paper', 'official_code'])
def test_stage1_paper_config_traces(paper_env, preset):
    erm = cached_erm(erm_config('waterbirds', scale='paper', preset=preset, seed=0, **SHORT))
    sp = erm.splits()
    eng = TracingEngine(erm.model(1), {s: sp[s] for s in ('train', 'test')}, candidates=CANDIDATE_PRESETS[preset],
                        rule=preset, dataset='waterbirds')
    n = {c: sum(len(v) for v in eng.scores(c, group=0).values()) for c in ('magnitude', 'gradient')}
    assert n == ({'magnitude': 26560, 'gradient': 26560} if preset == 'paper' else {'magnitude': 22720, 'gradient': 26560})
    df = unstructured_tracing(eng, ks=(1, 2), criteria=('gradient', 'magnitude'), eval_splits=('train',), progress=False)
    assert set(df.k) == {1, 2} and df.acc_after.between(0, 1).all() and len(df) == 2 * (4 * 4 + 4)


def test_stage1_vit_traces_linear_neurons(paper_env):
    "ViT-S/16: the paper's neurons are the output neurons of its linear layers, not the patch embedding's channels."
    erm = cached_erm(erm_config('waterbirds', scale='paper', seed=0, arch='vit_s16', **SHORT))
    sp = erm.splits()
    eng = TracingEngine(erm.model(1), {'train': sp['train']}, candidates=preset_candidates('paper', 'vit_s16'), dataset='waterbirds')
    sc = eng.scores('magnitude')
    assert len(sc) == 36 and 'conv_proj' not in sc and 'heads.head' not in sc
    assert sum(len(v) for v in sc.values()) == 12 * (384 + 1536 + 384)
    df = unstructured_tracing(eng, ks=(1,), criteria=('gradient', 'magnitude'), eval_splits=('train',), progress=False)
    assert df.acc_after.between(0, 1).all() and df.neurons.str.contains('encoder.layers').all()


def test_stage2_vit_finetunes(paper_env):
    cfg = finetune_config('waterbirds', 'paper', 'paper', 0, kick_in=1, epochs=1, batch_size=4,
                          erm_overrides=dict(SHORT, arch='vit_s16'))
    assert cfg.candidates == 'linear' and erm_of(cfg).arch == 'vit_s16' and erm_of(cfg).channels_last is False
    ft = cached_finetune(cfg)
    assert ft.result['best']['epoch'] == 1 and ft.metrics()[1]['mask']['n_masked'] > 0


@pytest.mark.parametrize('preset', ['paper', 'official_code'])
def test_stage2_paper_config_finetunes(paper_env, preset):
    cfg = finetune_config('waterbirds_like', 'paper', preset, 0, kick_in=1, epochs=1, batch_size=4, erm_overrides=SHORT)
    full = finetune_config('waterbirds', 'paper', preset, 0)
    assert cfg.dataset == 'waterbirds' and (cfg.criterion, cfg.forwards, cfg.sup_loss, cfg.frac) == \
        (full.criterion, full.forwards, full.sup_loss, full.frac)
    assert erm_of(cfg).arch == 'resnet50'
    ft = cached_finetune(cfg)
    assert ft.result['best']['epoch'] == 1 and ft.metrics()[1]['mask']['n_masked'] > 0
    assert 0.0 <= ft.result['best']['test']['wga'] <= 1.0


def test_jtt_and_dfr_paper_config(paper_env):
    j = cached_jtt(jtt_config('waterbirds', 'paper', seed=0, id_epoch=1, epochs=1, upweight=3, erm_overrides=SHORT))
    assert j.result['error_set_size'] >= 0 and j.cfg.arch == 'resnet50'
    erm = cached_erm(erm_config('waterbirds', scale='paper', seed=0, **SHORT))
    d = dfr(erm.model('best'), erm.splits(), seed=0)
    assert 0.0 <= d['test']['wga'] <= 1.0


def test_missing_weights_name_the_file(paper_env, monkeypatch, tmp_path):
    monkeypatch.setenv('SM_WEIGHTS', str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"no resnet50-11ad3fa6.pth in SM_WEIGHTS={tmp_path}"):
        cached_erm(erm_config('waterbirds', scale='paper', seed=1, **SHORT))
