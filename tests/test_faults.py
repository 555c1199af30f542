"""Bad input and damaged files: every unknown option names what was expected, a checkpoint of another architecture
or carrying pickled objects is refused, and a damaged cache entry is reported and computed again, never loaded."""
import json, warnings
import pytest
import torch
from silent_majority.core import CorruptFileError, UnsafeFileError, load_torch, record_sha256
from silent_majority.data import spurious_mnist, spuco_mnist
from silent_majority.models import small_resnet, tiny_cnn
from silent_majority.neurons import candidate_layers, gradient_samples, modify
from silent_majority.train import erm_config, cached_erm
from silent_majority.finetune import finetune_config, supervised_loss
from silent_majority.baselines import jtt_config
from silent_majority.classify import course_config
from silent_majority.contrastive import contrastive_config
from silent_majority.tracing import unstructured_tracing
from silent_majority.regenerate import regenerate
from silent_majority.core import get_device

BAD_OPTIONS = {
    'dataset': (lambda: erm_config('imagenet'), "unknown dataset 'imagenet': expected one of ['waterbirds_like'"),
    'scale': (lambda: erm_config(scale='huge'), "unknown scale 'huge': expected one of ['smoke', 'cpu', 'paper']"),
    'preset': (lambda: erm_config(preset='authors'), "unknown preset 'authors': expected one of ['paper', 'official_code']"),
    'finetune preset': (lambda: finetune_config(preset='authors'), "expected one of ['paper', 'official_code']"),
    'mask criterion': (lambda: finetune_config(criterion='random'), "unknown criterion 'random': expected one of ['gradient'"),
    'jtt scale': (lambda: jtt_config(scale='huge'), "expected one of ['smoke', 'cpu', 'paper']"),
    'course scale': (lambda: course_config(scale='huge'), "expected one of ['smoke', 'cpu', 'paper']"),
    'contrastive scale': (lambda: contrastive_config(scale='huge'), "expected one of ['smoke', 'cpu', 'paper']"),
    'regenerate scale': (lambda: regenerate('huge'), "expected one of ['smoke', 'cpu', 'paper']"),
    'modification mode': (lambda: modify(tiny_cnn(seed=0), [], mode='flip').__enter__(), "unknown mode 'flip': expected one of ['zero'"),
    'tracing mode': (lambda: unstructured_tracing(None, ks=(1,), mode='flip'), "unknown mode 'flip': expected one of"),
    'candidate set': (lambda: candidate_layers(tiny_cnn(seed=0), 'dense'), "unknown candidate set 'dense': expected one of"),
    'gradient rule': (lambda: gradient_samples(tiny_cnn(seed=0), None, rule='mine'), "unknown rule 'mine': expected one of"),
    'supervised loss': (lambda: supervised_loss(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), kind='hinge'),
                        "unknown supervised loss 'hinge': expected one of ['mse', 'ce']"),
    'split': (lambda: spurious_mnist('dev'), "unknown split 'dev': expected 'train', 'val' or 'test'"),
    'spuco difficulty': (lambda: spuco_mnist('train', difficulty='hard'), "unknown difficulty 'hard': expected one of"),
    'device': (lambda: get_device('tpu'), "unknown device 'tpu': expected 'cpu', 'cuda' or 'cuda:N'"),
}


@pytest.mark.parametrize('what', list(BAD_OPTIONS))
def test_unknown_option_names_what_was_expected(what):
    fn, message = BAD_OPTIONS[what]
    with pytest.raises(ValueError) as e: fn()
    assert message in str(e.value), str(e.value)


@pytest.fixture
def trained(fresh_cache):
    return cached_erm(erm_config(scale='smoke', seed=11, epochs=3))


def test_checkpoint_of_another_architecture_is_refused(trained):
    trained.run.save_checkpoint('best', small_resnet(seed=0).state_dict())
    with pytest.raises(ValueError, match=r'best.pt \(expected tiny_cnn weights\) is for another architecture than this Sequential: .*missing keys'):
        trained.model('best')


class Payload:
    "Anything but tensors, numbers, strings and containers of them: unpickling it could run code."


def test_checkpoint_carrying_pickled_objects_is_refused(trained):
    path = trained.run.ckpt_path('best')
    torch.save({'weights': trained.model('best').state_dict(), 'extra': Payload()}, path)
    path.with_name('best.pt.sha256').unlink()
    with pytest.raises(CorruptFileError, match='no recorded SHA-256'):      # a run's file without its digest
        trained.model('best')
    record_sha256(path)                                  # even with a matching digest, pickled objects are refused
    with pytest.raises(UnsafeFileError, match='refusing to load it'):
        trained.model('best')


@pytest.mark.parametrize('damage', ['truncate', 'flip', 'torn_result'])
def test_damaged_cache_entry_is_reported_and_recomputed(trained, damage):
    before = trained.model('last').state_dict(); result = trained.result
    ckpt = trained.run.ckpt_path('epoch_3' if (trained.run.dir / 'epoch_3.pt').exists() else 'best')
    if damage == 'truncate': ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif damage == 'flip':
        b = bytearray(ckpt.read_bytes()); b[len(b) // 2] ^= 0xFF; ckpt.write_bytes(bytes(b))
    else: (trained.run.dir / 'done.json').write_text('{"best_epoch": 2, "be')
    if damage != 'torn_result':
        with pytest.raises(CorruptFileError, match='truncated or altered'): load_torch(ckpt)   # never loaded
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        again = cached_erm(trained.cfg)
    msgs = [str(x.message) for x in w if 'damaged' in str(x.message)]
    assert msgs and (ckpt.name if damage != 'torn_result' else 'done.json') in msgs[0], [str(x.message) for x in w]
    assert again.run.damaged() == {}
    after = again.model('last').state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)            # recomputed to the same weights
    assert again.result['best_epoch'] == result['best_epoch'] and again.result['last']['test'] == result['last']['test']
