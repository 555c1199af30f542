"""The run cache cannot be fooled: a damaged or unrecorded file is never loaded, a full disk never leaves an epoch
logged twice, a config that fails its checks never makes a run folder, and `sm-train` reports a bad device, an
unwritable cache and a damaged run plainly. Training does not depend on the caller's torch thread count."""
import errno, json, os, shutil, subprocess, sys, warnings
from pathlib import Path
import pytest
import torch
import silent_majority.core as core
from silent_majority.core import (CacheWriteError, CorruptFileError, DamagedRunWarning, Run, check_file, config_hash,
                                  load_torch)
from silent_majority.train import ERMConfig, cached_erm, erm_config, main as sm_train, train_erm
from silent_majority.finetune import FinetuneConfig, cached_finetune, erm_of, finetune, finetune_config
from silent_majority.baselines import JTTConfig, cached_jtt, jtt_config
from silent_majority.classify import CourseConfig, course_config, course_model
from silent_majority.contrastive import ContrastiveConfig, contrastive_config, train_contrastive

ROOT = Path(__file__).resolve().parents[1]
SMOKE = dict(scale='smoke', seed=4, epochs=2)


def _weights(st):
    "The tensors of a checkpoint, whatever its layout (`last` with its state, or weights alone)."
    for k in ('model', 'weights'):
        if isinstance(st, dict) and isinstance(st.get(k), dict): return st[k]
    return st


def _same(a, b): return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _timeless(o):
    "A result without its wall-clock fields, which are the only thing allowed to differ between runs."
    if isinstance(o, dict): return {k: _timeless(v) for k, v in o.items() if k != 'seconds'}
    return o


# ---------------------------------------------------------------------------------------------------------------
# Training threads

def _train_erm(tmp, tag):
    cfg = erm_config(scale='smoke', seed=0, epochs=1)
    run = Run(cfg, kind='erm', root=tmp / tag); res = train_erm(cfg, run)
    return res, _weights(run.load_checkpoint('last'))

def _train_finetune(tmp, tag):
    cfg = finetune_config(scale='smoke', seed=0)
    res = finetune(cfg, Run(cfg, kind='finetune', root=tmp / tag))      # the ERM run (pinned itself) is shared
    return res, _weights(Run(cfg, kind='finetune', root=tmp / tag).load_checkpoint('last'))

def _train_jtt(tmp, tag):
    os.environ['SM_CACHE'] = str(tmp / tag); r = cached_jtt(jtt_config(scale='smoke', seed=0))
    return r.result, _weights(r.run.load_checkpoint('last'))

def _train_contrastive(tmp, tag):
    os.environ['SM_CACHE'] = str(tmp / tag); r = train_contrastive(contrastive_config('smoke', epochs=1, n_per_digit=10))
    return r.result, r.run.load_checkpoint('net')

def _train_course(tmp, tag):
    os.environ['SM_CACHE'] = str(tmp / tag)
    r = course_model(course_config('smoke', epochs=1, n_per_class=40, n_eval_per_class=5, strength=0.6))
    return r.result, r.run.load_checkpoint('final')

TRAINERS = {'erm': _train_erm, 'finetune': _train_finetune, 'jtt': _train_jtt, 'contrastive': _train_contrastive,
            'course': _train_course}


@pytest.fixture
def threads_restored():
    n = torch.get_num_threads(); yield; torch.set_num_threads(n)


@pytest.mark.parametrize('trainer', list(TRAINERS))
def test_trained_weights_do_not_depend_on_the_callers_thread_count(trainer, tmp_path, fresh_cache, threads_restored):
    out = {}
    for n in (2, 1):
        torch.set_num_threads(n)
        out[n] = TRAINERS[trainer](tmp_path, f'threads{n}')
        assert torch.get_num_threads() == n                       # the caller's count is back afterwards
    assert _same(out[1][1], out[2][1]), 'the weights depend on the thread count the trainer was called with'
    assert out[1][0]['torch_threads'] == out[2][0]['torch_threads'] == core.TRAINING_THREADS   # recorded in done.json


def test_the_thread_count_matters_without_pinning(tmp_path, threads_restored, monkeypatch):
    "The config above is one where the thread count changes the weights: without the pinning the test would fail."
    monkeypatch.setattr(core, 'TRAINING_THREADS', None)          # pinned_threads(None): the caller's count is used
    out = {}
    for n in (2, 1):
        torch.set_num_threads(n); out[n] = _train_erm(tmp_path, f'threads{n}')
    assert not _same(out[1][1], out[2][1])


def test_threads_are_restored_when_training_fails(tmp_path, threads_restored, monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setattr('silent_majority.train.train_epoch', lambda *a, **k: (_ for _ in ()).throw(KeyError('inside')))
    with pytest.raises(KeyError, match='inside'): _train_erm(tmp_path, 'fails')
    assert torch.get_num_threads() == 2


def test_paper_scale_leaves_the_thread_count_alone(threads_restored):
    torch.set_num_threads(2)
    with core.training_threads(erm_config('waterbirds', 'paper')) as n: assert n == torch.get_num_threads() == 2
    with core.training_threads(erm_config(scale='cpu')) as n: assert n == torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


# ---------------------------------------------------------------------------------------------------------------
# Damaged files

@pytest.fixture(scope='module')
def stored(tmp_path_factory):
    "One finished smoke ERM run in a cache of its own; each test works on a copy."
    cache = tmp_path_factory.mktemp('stored') / 'cache'
    old = {k: os.environ.get(k) for k in ('SM_CACHE', 'SM_PROGRESS')}
    os.environ.update(SM_CACHE=str(cache), SM_PROGRESS='0')
    try: r = cached_erm(erm_config(**SMOKE))
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    return cache, r.run.dir.name, r.result, _weights(r.run.load_checkpoint('last'))


@pytest.fixture
def copy(stored, tmp_path, monkeypatch):
    "A copy of the stored cache as this test's SM_CACHE: (run folder, result, last weights)."
    cache, name, result, last = stored
    shutil.copytree(cache, tmp_path / 'cache')
    monkeypatch.setenv('SM_CACHE', str(tmp_path / 'cache')); monkeypatch.setenv('SM_PROGRESS', '0')
    return tmp_path / 'cache' / 'runs' / name, result, last


def _flip(p):
    b = bytearray(p.read_bytes()); b[len(b) // 2] ^= 0x01; p.write_bytes(bytes(b))

def _edit_result(d):
    res = json.loads((d / 'done.json').read_text()); res['best']['test']['wga'] = 0.99
    (d / 'done.json').write_text(json.dumps(res, indent=1))

def _edit_metrics(d):
    rows = [json.loads(l) for l in (d / 'metrics.jsonl').read_text().splitlines()]
    rows[-1]['test']['wga'] = 0.99
    (d / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))

DAMAGES = {  # what is done to the stored run -> the file reported
    'last.pt flipped, digest deleted': (lambda d: (_flip(d / 'last.pt'), (d / 'last.pt.sha256').unlink()), 'last.pt'),
    'last.pt digest deleted':          (lambda d: (d / 'last.pt.sha256').unlink(), 'last.pt'),
    'best.pt truncated':               (lambda d: (d / 'best.pt').write_bytes((d / 'best.pt').read_bytes()[:500]), 'best.pt'),
    'epoch_1.pt flipped':              (lambda d: _flip(d / 'epoch_1.pt'), 'epoch_1.pt'),
    'done.json edited':                (_edit_result, 'done.json'),
    'done.json digest deleted':        (lambda d: (d / 'done.json.sha256').unlink(), 'done.json'),
    'done.json torn':                  (lambda d: (d / 'done.json').write_text('{"best_epoch": 2, "be'), 'done.json'),
    'metrics.jsonl edited':            (_edit_metrics, 'metrics.jsonl'),
    'metrics.jsonl row appended':      (lambda d: open(d / 'metrics.jsonl', 'a').write('{"epoch": 3}\n'), 'metrics.jsonl'),
    'metrics.jsonl digest deleted':    (lambda d: (d / 'metrics.jsonl.sha256').unlink(), 'metrics.jsonl'),
}


@pytest.mark.parametrize('damage', list(DAMAGES))
def test_a_damaged_or_unrecorded_file_is_never_loaded(copy, damage):
    d, result, last = copy
    how, name = DAMAGES[damage]; how(d)
    assert list(Run(erm_config(**SMOKE), kind='erm').damaged()) == [name]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        again = cached_erm(erm_config(**SMOKE))
    damaged = [x for x in w if issubclass(x.category, DamagedRunWarning)]
    assert len(damaged) == 1 and name in str(damaged[0].message), [str(x.message) for x in w]
    assert str(damaged[0].message).startswith(f'damaged run {d}: ')
    assert _timeless(again.result) == _timeless(result) and again.result['best']['test']['wga'] != 0.99   # recomputed
    assert again.run.damaged() == {} and _same(_weights(again.run.load_checkpoint('last')), last)
    assert [r['epoch'] for r in again.run.metrics()] == [0, 1, 2]


def test_every_file_a_run_relies_on_has_a_digest(copy):
    d, _, _ = copy
    relied = sorted(p.name for p in d.iterdir() if p.suffix in ('.pt', '.json', '.jsonl') and p.name != 'config.json')
    assert relied == ['best.pt', 'done.json', 'epoch_0.pt', 'epoch_1.pt', 'last.pt', 'metrics.jsonl']
    assert all(check_file(d / n, require_digest=True) is None for n in relied)


@pytest.mark.parametrize('read', ['result', 'metrics', 'checkpoint'])
def test_files_are_checked_on_every_read_too(copy, read):
    "Altered after the run was loaded: reading the result, the metrics or a checkpoint again refuses it."
    d, _, _ = copy
    r = cached_erm(erm_config(**SMOKE))
    if read == 'result': _edit_result(d); fn = r.run.result
    elif read == 'metrics': _edit_metrics(d); fn = r.metrics
    else: (d / 'best.pt.sha256').unlink(); fn = lambda: r.model('best')
    with pytest.raises(CorruptFileError): fn()


def test_the_metrics_digest_is_recorded_after_every_epoch(fresh_cache, monkeypatch):
    seen = []; log = Run.log
    def checked_log(self, **row):
        log(self, **row); seen.append((row['epoch'], check_file(self.metrics_path, require_digest=True)))
    monkeypatch.setattr(Run, 'log', checked_log)
    cached_erm(erm_config(scale='smoke', seed=9, epochs=3))
    assert seen == [(e, None) for e in range(4)]


def test_sm_train_reports_the_damage_once_and_never_the_edited_number(copy):
    d, result, _ = copy
    _edit_result(d)
    out = subprocess.run([sys.executable, '-m', 'silent_majority.train', '--scale', 'smoke', '--seed', str(SMOKE['seed']),
                          '--epochs', str(SMOKE['epochs'])], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert printed['test_wga'] == result['best']['test']['wga'] != 0.99 and printed['torch_threads'] == 1
    assert out.stderr.count('DamagedRunWarning') == 1 and 'done.json' in out.stderr, out.stderr


# ---------------------------------------------------------------------------------------------------------------
# A full disk during training: the rerun never logs an epoch twice

@pytest.fixture
def full_disk(monkeypatch):
    "full_disk(n): the n-th `torch.save` from now on raises OSError(ENOSPC), as on a full disk."
    real = torch.save
    def arm(n):
        calls = []
        def save(*a, **k):
            calls.append(1)
            if len(calls) == n: raise OSError(errno.ENOSPC, 'No space left on device')
            return real(*a, **k)
        monkeypatch.setattr(torch, 'save', save)
    yield arm
    monkeypatch.setattr(torch, 'save', real)


def _erm(): return cached_erm(erm_config(scale='smoke', seed=6, epochs=3))
def _ft(): return cached_finetune(finetune_config(scale='smoke', seed=6, epochs=2))
def _jtt(): return cached_jtt(jtt_config(scale='smoke', seed=6, epochs=3))
def _con(): return train_contrastive(contrastive_config('smoke', seed=6, n_per_digit=10))

LOGGING = {  # trainer, what must exist before (not counted), the torch.save calls that fail, the epochs logged
    'erm':         (_erm, None, (1, 2, 4, 6), [0, 1, 2, 3]),
    'finetune':    (_ft, lambda: cached_erm(erm_of(finetune_config(scale='smoke', seed=6))), (1, 2, 3), [0, 1, 2]),
    'jtt':         (_jtt, lambda: cached_erm(erm_of(jtt_config(scale='smoke', seed=6))), (1, 2, 4), [0, 1, 2, 3]),
    'contrastive': (_con, None, (1,), [1, 2]),
}


@pytest.mark.parametrize('trainer,fail_at', [(t, n) for t, (_, _, ns, _) in LOGGING.items() for n in ns])
def test_a_full_disk_never_leaves_an_epoch_logged_twice(trainer, fail_at, fresh_cache, full_disk):
    train, before, _, epochs = LOGGING[trainer]
    if before: before()
    full_disk(fail_at)
    with pytest.raises(OSError, match='No space left'): train()
    full_disk(0)                                                     # the disk has room again
    r = train()
    logged = [row['epoch'] for row in r.run.metrics()]
    assert logged == epochs, f'after the rerun the log holds epochs {logged}'
    assert r.run.damaged() == {}


def test_course_training_logs_no_rows_and_reruns_after_a_full_disk(fresh_cache, full_disk):
    cfg = course_config('smoke', epochs=1, n_per_class=40, n_eval_per_class=5, strength=0.6)
    full_disk(1)
    with pytest.raises(OSError, match='No space left'): course_model(cfg)
    full_disk(0)
    r = course_model(cfg)
    assert r.run.metrics() == [] and r.run.checkpoints() == ['final'] and r.run.damaged() == {}


# ---------------------------------------------------------------------------------------------------------------
# Configs are checked when they are built; sm-train never leaves an orphan run folder

BAD_CONFIGS = {
    'ERMConfig lr':             (lambda: ERMConfig(lr='abc'), TypeError, "ERMConfig.lr must be a number (float or int), got str 'abc'"),
    'ERMConfig epochs':         (lambda: ERMConfig(epochs=2.0), TypeError, 'ERMConfig.epochs must be an int, got float 2.0'),
    'ERMConfig augment':        (lambda: ERMConfig(augment=1), TypeError, 'ERMConfig.augment must be a bool (True or False), got int 1'),
    'ERMConfig seed':           (lambda: ERMConfig(seed=-1), ValueError, 'ERMConfig.seed must be a non-negative int, got -1'),
    'ERMConfig n_train':        (lambda: ERMConfig(n_train=0), ValueError, 'ERMConfig.n_train must be a positive int or None, got 0'),
    'ERMConfig arch_kwargs':    (lambda: ERMConfig(arch_kwargs=[8]), TypeError, 'ERMConfig.arch_kwargs must be a dict'),
    'FinetuneConfig lr':        (lambda: FinetuneConfig(lr='abc'), TypeError, 'FinetuneConfig.lr must be a number'),
    'FinetuneConfig frac':      (lambda: FinetuneConfig(frac=0.0), ValueError, 'FinetuneConfig.frac must be a number in (0, 1], got 0.0'),
    'FinetuneConfig overrides': (lambda: FinetuneConfig(erm_overrides={'epochs': True}), TypeError, 'ERMConfig.epochs must be an int, got bool'),
    'JTTConfig upweight':       (lambda: JTTConfig(upweight=1.5), TypeError, 'JTTConfig.upweight must be an int, got float 1.5'),
    'CourseConfig lr':          (lambda: CourseConfig(lr=None), TypeError, 'CourseConfig.lr must be a number (float or int), got NoneType None'),
    'CourseConfig strength':    (lambda: CourseConfig(strength=1.5), ValueError, 'CourseConfig.strength must be a number in [0, 1], got 1.5'),
    'ContrastiveConfig lr':     (lambda: ContrastiveConfig(lr='x'), TypeError, "ContrastiveConfig.lr must be a number (float or int), got str 'x'"),
    'ContrastiveConfig temp':   (lambda: ContrastiveConfig(temperature=0), ValueError, 'ContrastiveConfig.temperature must be a positive number'),
}


@pytest.mark.parametrize('what', list(BAD_CONFIGS))
def test_a_bad_config_field_names_the_field_and_the_expected_type(what):
    fn, err, message = BAD_CONFIGS[what]
    with pytest.raises(err) as e: fn()
    assert message in str(e.value), str(e.value)


def test_existing_configs_keep_their_hashes():
    "The checks change no value: every cached run keeps its folder (hashes of the configs as they were)."
    # the regime before calibration ('scratch', the smoke default) files runs where they always were
    old = lambda s: {} if s == 'paper' else {'regime': 'scratch'}
    assert [config_hash(erm_config(scale=s, **old(s))) for s in ('smoke', 'cpu', 'paper')] == ['f0f6a8dbb888', 'ce0a1f0a1e9e', 'bcbbfefcfaf6']
    assert [config_hash(finetune_config(scale=s, erm_overrides=old(s))) for s in ('smoke', 'cpu', 'paper')] == ['da9be101d3a5', 'b15c6488abde', 'da999dda8abe']
    assert [config_hash(jtt_config(scale=s, erm_overrides=old(s))) for s in ('smoke', 'cpu', 'paper')] == ['50c6256274ec', '0bee439f547e', 'b9643fb50d95']
    assert config_hash(finetune_config(scale='smoke')) == 'da9be101d3a5'                 # smoke's default regime is 'scratch'
    assert config_hash(finetune_config(scale='cpu')) != 'b15c6488abde'                   # cpu's is not: new runs
    assert [config_hash(contrastive_config(s, **({'strength': 0.9} if s == 'cpu' else {}))) for s in ('smoke', 'cpu', 'paper')] == \
        ['40faa5c07871', 'bf30c1f857f2', '75292f1fa590']                                   # cpu's correlation moved to 0.6 (calibration)
    assert contrastive_config('cpu').strength == 0.6
    # course models moved once, on purpose: `data_version=2` files models of SpuCo's SpuCoMNIST rules apart from earlier ones
    # cpu course models moved again with the calibrated difficulty; the SpuCo default difficulty keeps the folders of before
    assert [config_hash(course_config('cpu', m, difficulty='magnitude_large')) for m in ('erm', 'jtt')] == ['60a32d41ed43', 'b9cb7851e686']
    assert [config_hash(course_config('paper', m)) for m in ('erm', 'jtt')] == ['0a56e473bfb8', 'f38c77a47283']
    assert course_config('cpu').difficulty == 'variance_low'


BAD_ARGS = {
    'lr=abc':        (['--set', 'lr=abc'], "sm-train: ERMConfig.lr must be a number (float or int), got str 'abc'"),
    'epochs=2.5':    (['--set', 'epochs=2.5'], 'sm-train: ERMConfig.epochs must be an int, got float 2.5'),
    'augment=1':     (['--set', 'augment=1'], 'sm-train: ERMConfig.augment must be a bool (True or False), got int 1'),
    'seed -1':       (['--seed', '-1'], 'sm-train: ERMConfig.seed must be a non-negative int, got -1'),
    'weight_decay':  (['--set', 'weight_decay=-0.1'], 'sm-train: ERMConfig.weight_decay must be a non-negative number, got -0.1'),
    'jtt upweight':  (['--method', 'jtt', '--jtt-set', 'upweight=abc'], "sm-train: JTTConfig.upweight must be an int, got str 'abc'"),
    'amp fp16 on the CPU': (['--amp', 'fp16', '--device', 'cpu'], "sm-train: amp='fp16' needs a CUDA device"),
}


@pytest.mark.parametrize('what', list(BAD_ARGS))
def test_sm_train_refuses_a_bad_config_before_making_a_run_folder(what, fresh_cache, capsys):
    args, message = BAD_ARGS[what]
    assert sm_train(['--scale', 'smoke', *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count('\n') == 1, err
    assert not (fresh_cache / 'runs').exists() or not any((fresh_cache / 'runs').iterdir())   # no orphan folder


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_sm_train_refuses_cuda_without_a_gpu_even_for_a_cached_run(copy, capsys):
    args = ['--scale', 'smoke', '--seed', str(SMOKE['seed']), '--epochs', str(SMOKE['epochs'])]
    assert sm_train(args) == 0; capsys.readouterr()                  # the cached run is there ...
    assert sm_train(args + ['--device', 'cuda']) == 2                 # ... and is not loaded on the CPU instead
    out = capsys.readouterr()
    assert out.out == '' and out.err.startswith("sm-train: device 'cuda' was asked for but torch sees no CUDA device"), out


def test_sm_train_reports_a_read_only_cache(tmp_path, monkeypatch, capsys):
    ro = tmp_path / 'readonly'; ro.mkdir(); ro.chmod(0o555)
    monkeypatch.setenv('SM_CACHE', str(ro)); monkeypatch.setenv('SM_PROGRESS', '0')
    if os.geteuid() == 0:                      # root writes anywhere: make the folder refuse it as it refuses others
        mkdir = os.mkdir
        def refuse(path, *a, **k):
            if Path(path).is_relative_to(ro): raise PermissionError(errno.EACCES, 'Permission denied', str(path))
            return mkdir(path, *a, **k)
        monkeypatch.setattr(os, 'mkdir', refuse)
    try:
        assert sm_train(['--scale', 'smoke', '--seed', '0']) == 2
    finally: ro.chmod(0o755)
    assert capsys.readouterr().err == f'sm-train: cannot write the run cache at {ro}/runs: permission denied\n'
    with pytest.raises(CacheWriteError, match='permission denied'): Run({'a': 1})
