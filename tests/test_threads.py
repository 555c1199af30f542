"""Stage I as people run it: in an ordinary process or kernel with torch's default thread count (several threads),
not only under `sm-regenerate`, which pins one thread per kernel. torch 2.14's CPU weight gradient of a channels-last
convolution with two threads and an odd batch crashes the process (segfault or `munmap_chunk(): invalid pointer`), so
these tests run in a child process (a crash fails the test instead of killing pytest) or a fresh papermill kernel."""
import os, subprocess, sys, textwrap
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

TRACING_WITH_TWO_THREADS = textwrap.dedent('''
    import copy, torch
    torch.set_num_threads(2)
    from silent_majority.data import spurious_mnist
    from silent_majority.models import small_resnet
    from silent_majority.neurons import gradient_scores
    from silent_majority.tracing import TracingEngine
    from silent_majority.data import to_float
    assert torch.get_num_threads() == 2
    splits = {'train': spurious_mnist('train', preset='waterbirds_like', seed=0, n_train=240, n_eval_per_group=16)}
    model = small_resnet(n_classes=2, in_ch=3, widths=(8, 16, 32), seed=0)
    ref = copy.deepcopy(model).eval()
    eng = TracingEngine(model, splits, channels_last=CHANNELS_LAST)      # channels-last (the default) or the standard layout
    for g in range(4):
        for seed in range(3): scores = eng.scores('gradient', g, 'train', seed)
    # the engine's last scores equal those of a plain contiguous copy on the same examples, bit for bit
    from silent_majority.neurons import gradient_samples
    ds = splits['train']; idx = gradient_samples(ref, ds, 3, 'paper', seed=2)
    want = gradient_scores(ref, to_float(ds.x[idx], ds.mean, ds.std), ds.y[idx], eng.candidates['gradient'])
    assert all(torch.equal(want[n], scores[n]) for n in want), 'scores differ from the contiguous model'
    print('ok', len(idx))
''')


@pytest.mark.parametrize('channels_last', [True, False])
def test_gradient_tracing_with_two_threads(channels_last, tmp_path):
    "The TracingEngine's gradient scores in a process with two torch threads, channels-last (the default) or standard weights."
    code = TRACING_WITH_TWO_THREADS.replace('CHANNELS_LAST', repr(channels_last))
    env = {**os.environ, 'SM_PROGRESS': '0', 'SM_CACHE': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '2'}
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f'exit {r.returncode} (a negative code is a signal: -11 is a segfault)\n{r.stderr[-3000:]}'
    assert r.stdout.startswith('ok')


def test_stage_one_notebook_in_an_ordinary_kernel(tmp_path):
    "fig2 through papermill called directly (no sm-regenerate), in a kernel with two threads, on the cpu scale's ResNet."
    import papermill as pm
    nb = ROOT / 'nbs' / 'paper' / 'fig2_zero_topk.ipynb'
    env = dict(SM_PROGRESS='0', SM_CACHE=str(tmp_path / 'cache'), OMP_NUM_THREADS='2', MKL_NUM_THREADS='2')
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        pm.execute_notebook(str(nb), str(tmp_path / 'fig2.ipynb'), kernel_name='python3', cwd=str(nb.parent),
                            parameters=dict(scale='smoke', arch='small_resnet', out_dir=str(tmp_path / 'figures')),
                            progress_bar=False, log_output=False)
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    assert (tmp_path / 'figures' / 'fig2_zero_topk.csv').exists()
