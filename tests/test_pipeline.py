"""End to end at smoke scale: data -> ERM -> cache -> reload, determinism across fresh processes,
and resumption after the training process is killed."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import torch
import pytest
from silent_majority.core import Run, load_torch
from silent_majority.train import erm_config, cached_erm, evaluate

TRAIN = """
import sys, json
from silent_majority.train import erm_config, cached_erm
cfg = erm_config(scale='smoke', seed=int(sys.argv[1]), epochs=int(sys.argv[2]))
r = cached_erm(cfg)
print(json.dumps({'dir': str(r.run.dir), 'result': r.result}))
"""


def _timeless(o):
    "A result without its wall-clock fields, which are the only thing allowed to differ between runs."
    if isinstance(o, dict): return {k: _timeless(v) for k, v in o.items() if k != 'seconds'}
    return o


def _train_in_subprocess(seed, epochs, env):
    out = subprocess.run([sys.executable, '-c', TRAIN, str(seed), str(epochs)], env=env, capture_output=True,
                         text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_same_config_same_numbers_in_fresh_processes(tmp_path):
    "Two fresh processes, two empty caches, one config: bit-identical metrics and weights."
    outs = []
    for i in range(2):
        env = dict(os.environ, SM_CACHE=str(tmp_path / f'cache{i}'), SM_PROGRESS='0')
        outs.append(_train_in_subprocess(seed=5, epochs=2, env=env))
    assert _timeless(outs[0]['result']) == _timeless(outs[1]['result'])
    a, b = (load_torch(Path(o['dir']) / 'last.pt')['model'] for o in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_erm_loads_instead_of_retraining(fresh_cache):
    cfg = erm_config(scale='smoke', seed=2)
    r1 = cached_erm(cfg)
    mtime = (r1.run.dir / 'last.pt').stat().st_mtime_ns
    r2 = cached_erm(cfg)
    assert (r2.run.dir / 'last.pt').stat().st_mtime_ns == mtime and r2.result == r1.result   # loaded, not retrained
    assert evaluate(r2.model('best'), r2.splits()['val'])['wga'] == r1.result['best']['val']['wga']
    assert cached_erm(erm_config(scale='smoke', seed=3)).run.dir != r1.run.dir


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    "Kill a training process mid-run; a rerun resumes from the last complete epoch and matches an uninterrupted run."
    epochs = 20
    env_ref = dict(os.environ, SM_CACHE=str(tmp_path / 'ref'), SM_PROGRESS='0')
    ref = _train_in_subprocess(seed=7, epochs=epochs, env=env_ref)

    env = dict(os.environ, SM_CACHE=str(tmp_path / 'killed'), SM_PROGRESS='0')
    run_dir = Run(erm_config(scale='smoke', seed=7, epochs=epochs), kind='erm', root=tmp_path / 'killed' / 'runs').dir
    proc = subprocess.Popen([sys.executable, '-c', TRAIN, '7', str(epochs)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:                 # wait until at least two epochs are complete
        lines = (run_dir / 'metrics.jsonl').read_text().splitlines() if (run_dir / 'metrics.jsonl').exists() else []
        if len(lines) >= 3 and (run_dir / 'last.pt').exists(): break
        if proc.poll() is not None: break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert not (run_dir / 'done.json').exists(), 'the process finished before it could be killed; raise epochs'
    done_before = load_torch(run_dir / 'last.pt')['epoch']
    assert 1 <= done_before < epochs

    resumed = _train_in_subprocess(seed=7, epochs=epochs, env=env)
    assert _timeless(resumed['result']) == _timeless(ref['result'])
    a, b = (load_torch(Path(o['dir']) / 'last.pt')['model'] for o in (ref, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs_logged = [json.loads(l)['epoch'] for l in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert epochs_logged == list(range(epochs + 1))     # no epoch logged twice after the resume
