"""The paper-scale training path on small models: mixed precision (bfloat16 autocast on the CPU), the
checkpoint policy (weights-only `last` once a run is finished, the resume state kept on request), and
multi-process training through torchrun and DistributedDataParallel (gloo on the CPU)."""
import json, math, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from silent_majority.core import Run, load_torch
from silent_majority.baselines import cached_jtt, jtt_config
from silent_majority.train import (cached_erm, erm_config, grad_scaler, load_splits, make_model, train_epoch, train_erm,
                                   train_weights)

ROOT = Path(__file__).resolve().parents[1]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_step_on_cpu_changes_the_weights_and_stays_finite():
    cfg = erm_config(scale='smoke', amp='bf16')
    train = load_splits(cfg)['train']
    torch.manual_seed(0); model = make_model(cfg); before = train_weights(model)
    seen = []; model.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss = train_epoch(model, opt, train, cfg, 1, 'cpu', indices=torch.arange(4))       # one step on a batch of 4
    after = train_weights(model)
    assert seen == [torch.bfloat16]                                  # the forward pass ran under autocast
    assert math.isfinite(loss) and all(torch.isfinite(v.float()).all() for v in after.values())
    assert model.conv1.weight.dtype == torch.float32                 # the weights stay fp32
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_fp16_is_refused_on_the_cpu_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"amp='fp16' needs a CUDA device .* use amp='bf16'"):
        grad_scaler('fp16', 'cpu')
    cfg = erm_config(scale='smoke', amp='fp16', epochs=1)
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        train_erm(cfg, Run(cfg, kind='erm', root=tmp_path), device='cpu')


def test_bf16_run_evaluates_in_fp32_and_finishes(fresh_cache):
    r = cached_erm(erm_config(scale='smoke', amp='bf16', epochs=1))
    rows = r.run.metrics()
    assert [row['epoch'] for row in rows] == [0, 1] and math.isfinite(rows[1]['train_loss'])
    assert r.run.dir.name != cached_erm(erm_config(scale='smoke', epochs=1)).run.dir.name   # amp names another run


def test_a_finished_run_keeps_weights_only_and_loads_either_form(fresh_cache):
    r = cached_erm(erm_config(scale='smoke', seed=4))
    last = load_torch(r.run.ckpt_path('last'))
    assert sorted(last) == ['best', 'epoch', 'model'] and last['epoch'] == r.cfg.epochs
    model = r.model('last').state_dict()
    full = cached_erm(erm_config(scale='smoke', seed=4, keep_resume_state=True))
    assert sorted(load_torch(full.run.ckpt_path('last'))) == ['best', 'epoch', 'model', 'optimizer', 'scheduler']
    assert _same_weights(full.model('last').state_dict(), model)                 # the same training, both forms load
    assert r.run.ckpt_path('last').stat().st_size < full.run.ckpt_path('last').stat().st_size
    r.run.save_checkpoint('last', last['model'])                                  # a bare state dict loads too
    assert _same_weights(r.model('last').state_dict(), model)
    assert sorted(r.run.checkpoints()) == ['best', 'epoch_0', 'epoch_1', 'last']


def test_keep_resume_state_lets_a_finished_run_continue_exactly(tmp_path, fresh_cache):
    short = cached_erm(erm_config(scale='smoke', seed=6, epochs=1, keep_resume_state=True))
    long_cfg = erm_config(scale='smoke', seed=6, epochs=2, keep_resume_state=True)
    train_erm(long_cfg, short.run)                                                # continues from epoch 1 ...
    ref = Run(long_cfg, kind='erm', root=tmp_path); train_erm(long_cfg, ref)       # ... like an uninterrupted run
    assert _same_weights(load_torch(short.run.ckpt_path('last'))['model'], load_torch(ref.ckpt_path('last'))['model'])
    assert short.run.metrics()[-1]['test'] == ref.metrics()[-1]['test']
    assert [row['epoch'] for row in short.run.metrics()] == [0, 1, 2]
    done = cached_erm(erm_config(scale='smoke', seed=6, epochs=1))               # weights only: continuing is refused
    with pytest.raises(ValueError, match='cannot be resumed to epoch 2.*keep_resume_state=True'):
        train_erm(erm_config(scale='smoke', seed=6, epochs=2), done.run)


def test_gradient_scaler_state_is_saved_and_restored(tmp_path, monkeypatch):
    "float16 needs CUDA; on the CPU a GradScaler around fp32 training exercises the same path (powers of 2: same weights)."
    import silent_majority.train as T
    plain_cfg = erm_config(scale='smoke', seed=8)
    plain = Run(plain_cfg, kind='erm', root=tmp_path / 'plain'); train_erm(plain_cfg, plain)
    scalers = []
    def cpu_scaler(amp, device):
        scalers.append(torch.amp.GradScaler('cpu', init_scale=2.0 ** 10, growth_interval=3)); return scalers[-1]
    monkeypatch.setattr(T, 'grad_scaler', cpu_scaler)
    scaled = Run(plain_cfg, kind='erm', root=tmp_path / 'scaled')
    train_erm(erm_config(scale='smoke', seed=8, epochs=1), scaled)                   # stops after epoch 1 ...
    saved = load_torch(scaled.ckpt_path('last'))['scaler']
    assert saved['scale'] == 2.0 ** 11 and saved['_growth_tracker'] == 1            # 4 steps: grew once after 3
    train_erm(plain_cfg, scaled)                                                      # ... resumes with that scaler state
    st = scalers[-1].state_dict()                    # 8 steps in all: grew at steps 3 and 6 (a fresh scaler: once)
    assert (st['scale'], st['_growth_tracker']) == (2.0 ** 12, 2)
    assert _same_weights(load_torch(scaled.ckpt_path('last'))['model'], load_torch(plain.ckpt_path('last'))['model'])


def _torchrun(cache, *args, nproc=2):
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(SM_CACHE=str(cache), SM_PROGRESS='0', OMP_NUM_THREADS='1', SM_DEVICE='cpu')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc),
           '-m', 'silent_majority.train', '--scale', 'smoke', *args]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [json.loads(l) for l in out.stdout.splitlines() if l.startswith('{')]
    assert len(lines) == 1, out.stdout                                           # rank 0 alone reports
    return lines[0]


def test_torchrun_two_processes_train_one_run_written_once(tmp_path):
    res = _torchrun(tmp_path / 'cache', '--dataset', 'waterbirds_like', '--seed', '0')
    assert res['world_size'] == 2
    runs = list((tmp_path / 'cache' / 'runs').iterdir())
    assert [p.name for p in runs] == [Path(res['run']).name]                    # one run folder
    d = runs[0]
    assert sorted(p.name for p in d.glob('*.pt')) == ['best.pt', 'epoch_0.pt', 'epoch_1.pt', 'last.pt']
    assert not [p.name for p in d.iterdir() if p.name.endswith('.tmp')]          # no torn or duplicate writes
    epochs = [json.loads(l)['epoch'] for l in (d / 'metrics.jsonl').read_text().splitlines()]
    assert epochs == [0, 1, 2]                                                  # one row per epoch, not one per rank
    assert (d / 'done.json').exists()
    assert sorted(load_torch(d / 'last.pt')) == ['best', 'epoch', 'model']        # finished: weights only
    again = _torchrun(tmp_path / 'cache', '--dataset', 'waterbirds_like', '--seed', '0')   # cached: loaded, not retrained
    assert again['run'] == res['run'] and len((d / 'metrics.jsonl').read_text().splitlines()) == 3


def test_torchrun_matches_one_process_without_batchnorm(tmp_path, monkeypatch):
    "LeNet has no BatchNorm: two ranks with uneven and empty shards follow the gradient of one process."
    # 240 examples in global batches of 239: one batch split 120 / 119, then one of a single example (rank 1 empty)
    args = ('--dataset', 'waterbirds_like', '--seed', '2', '--arch', 'lenet', '--batch-size', '239')
    res = _torchrun(tmp_path / 'ddp', *args)
    monkeypatch.setenv('SM_CACHE', str(tmp_path / 'one')); monkeypatch.setenv('SM_PROGRESS', '0')
    one = cached_erm(erm_config('waterbirds_like', 'smoke', seed=2, arch='lenet', batch_size=239))
    assert Path(res['run']).name == one.run.dir.name                            # the same config, the same run name
    a = load_torch(Path(res['run']) / 'last.pt')['model']; b = load_torch(one.run.ckpt_path('last'))['model']
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    ddp_rows = [json.loads(l) for l in (Path(res['run']) / 'metrics.jsonl').read_text().splitlines()]
    for r1, r2 in zip(ddp_rows, one.run.metrics()):
        assert r1['epoch'] == r2['epoch'] and r1['test']['group_acc'] == r2['test']['group_acc']
        assert math.isnan(r1['train_loss']) and math.isnan(r2['train_loss']) or abs(r1['train_loss'] - r2['train_loss']) < 1e-4


def test_torchrun_jtt_matches_one_process_and_writes_once(tmp_path, monkeypatch):
    "`--method jtt` under torchrun: the ERM run it starts from, then JTT's error set and final model, as in one process (LeNet)."
    args = ('--method', 'jtt', '--dataset', 'waterbirds_like', '--seed', '2', '--arch', 'lenet', '--batch-size', '239')
    res = _torchrun(tmp_path / 'ddp', *args)
    assert (res['method'], res['world_size']) == ('jtt', 2)
    assert sorted(p.name.split('-')[0] for p in (tmp_path / 'ddp' / 'runs').iterdir()) == ['erm', 'jtt']
    d = Path(res['run'])
    epochs = [json.loads(l)['epoch'] for l in (d / 'metrics.jsonl').read_text().splitlines()]
    assert epochs == [0, 1, 2] and (d / 'done.json').exists()                   # one row per epoch, rank 0 alone wrote
    assert sorted(load_torch(d / 'last.pt')) == ['best', 'epoch', 'model']
    monkeypatch.setenv('SM_CACHE', str(tmp_path / 'one')); monkeypatch.setenv('SM_PROGRESS', '0')
    one = cached_jtt(jtt_config('waterbirds_like', 'smoke', seed=2, erm_overrides=dict(arch='lenet', batch_size=239)))
    assert d.name == one.run.dir.name                                           # the same config, the same run name
    assert res['error_set_size'] == one.result['error_set_size'] > 0             # the same error set
    a = load_torch(d / 'last.pt')['model']; b = load_torch(one.run.ckpt_path('last'))['model']
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
