"""`sm-gpu-check` without a GPU: with CUDA hidden it says so in one line, writes nothing and exits 0; with
`--device cpu --tiny` every check that can run on the CPU runs (ERM for both architectures in fp32, the Stage I
engine against the bare model, Stage I on 1 thread against several, one Stage II epoch, torchrun with one process)
and the report says they passed; a failing check makes the exit code 1 without stopping the others."""
import dataclasses, json, os, subprocess, sys
from pathlib import Path
import pytest
from silent_majority import gpucheck
from silent_majority.gpucheck import CHECKS, ENGINE_RATIO_BOUND, TINY, main

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / 'sm-gpu-check'          # the console script `pip install -e .` made


def _env(tmp_path, **kw):
    "The environment of a child: progress bars off, figures and temporary files in `tmp_path`."
    env = {k: v for k, v in os.environ.items() if k not in ('SM_DEVICE', 'SM_DATA', 'SM_CACHE')}
    (tmp_path / 'tmp').mkdir(exist_ok=True)
    return {**env, 'SM_PROGRESS': '0', 'SM_FIGURES': str(tmp_path / 'figures'), 'TMPDIR': str(tmp_path / 'tmp'), **kw}


def test_without_cuda_one_line_nothing_written(tmp_path):
    r = subprocess.run([str(EXE)], env=_env(tmp_path, CUDA_VISIBLE_DEVICES=''), cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.splitlines()) == 1 and r.stdout.startswith('no CUDA device: ') and 'nothing to check' in r.stdout
    assert not (tmp_path / 'figures').exists() and not any((tmp_path / 'tmp').iterdir())   # no report, no scratch folder


def test_cpu_tiny_runs_every_check_that_can_run_on_the_cpu(tmp_path):
    out = tmp_path / 'bench_gpu.json'
    r = subprocess.run([str(EXE), '--device', 'cpu', '--tiny', '--out', str(out)], env=_env(tmp_path), cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert len(lines) == len(CHECKS) + 1 and lines[-1].startswith('every check passed (2 skipped)') and str(out) in lines[-1]
    rep = json.loads(out.read_text())
    assert {'passed', 'device', 'device_info', 'torch', 'cuda', 'seconds', 'sizes', 'checks', 'throughputs', 'ratios',
            'failed', 'skipped', 'git', 'versions', 'machine', 'command'} <= set(rep)
    assert rep['passed'] is True and rep['failed'] == [] and rep['device_info']['type'] == 'cpu'
    assert rep['sizes'] == json.loads(json.dumps(dataclasses.asdict(TINY)))
    checks = rep['checks']
    assert list(checks) == list(CHECKS)
    assert rep['skipped'] == ['erm_resnet50_bf16', 'erm_vit_s16_bf16']                     # never silently
    assert all('GPU only' in checks[n]['skipped'] for n in rep['skipped'])
    assert all(c['passed'] is True for n, c in checks.items() if n not in rep['skipped'])
    for key in ('erm_resnet50_fp32.train', 'erm_vit_s16_fp32.train', 'stage1_engine.engine', 'stage1_engine.model',
                'stage2_epoch.finetune', 'torchrun.train_epoch', 'fixtures.decode'):
        assert rep['throughputs'][key] > 0, key
    assert 0 < rep['ratios']['stage1_engine.engine_over_model'] <= ENGINE_RATIO_BOUND
    assert checks['erm_vit_s16_fp32']['image_size'] == 224 and checks['erm_resnet50_fp32']['steps'] == 2
    ag = checks['stage1_agreement']
    assert ag['compared_devices'][0] == 'cpu, 1 thread' and ag['same_neurons'] and ag['max_abs_acc_diff'] == 0.0
    assert checks['stage2_epoch']['n_masked'] > 0 and checks['torchrun']['world_size'] == 1
    assert not any((tmp_path / 'tmp').iterdir())                                           # the scratch folder is gone


@pytest.mark.parametrize('how', ['raises', 'fails'])
def test_a_failing_check_exits_1_and_the_others_still_run(tmp_path, monkeypatch, capsys, how):
    def broken(ctx):
        if how == 'raises': raise RuntimeError('injected')
        return dict(passed=False, summary='injected')
    monkeypatch.setitem(CHECKS, 'stage2_epoch', broken)
    monkeypatch.setitem(CHECKS, 'torchrun', lambda ctx: dict(passed=True, summary='stand-in'))
    monkeypatch.setenv('SM_CACHE', str(tmp_path / 'mine')); monkeypatch.delenv('SM_DATA', raising=False)
    monkeypatch.setenv('SM_PROGRESS', '0'); monkeypatch.setenv('TMPDIR', str(tmp_path))
    out = tmp_path / 'bench_gpu.json'
    assert main(['--device', 'cpu', '--tiny', '--only', 'stage2_epoch', 'torchrun', '--out', str(out)]) == 1
    rep = json.loads(out.read_text())
    assert rep['passed'] is False and rep['failed'] == ['stage2_epoch'] and list(rep['checks']) == ['fixtures', 'stage2_epoch', 'torchrun']
    assert rep['checks']['torchrun']['passed'] is True                                    # ran after the failure
    if how == 'raises': assert rep['checks']['stage2_epoch']['error'] == 'RuntimeError: injected'
    lines = capsys.readouterr().out.splitlines()
    assert 'FAILED' in lines[1] and lines[-1].startswith('FAILED: stage2_epoch')
    assert os.environ['SM_CACHE'] == str(tmp_path / 'mine') and 'SM_DATA' not in os.environ   # given back


def test_device_cuda_without_cuda_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(gpucheck.torch.cuda, 'is_available', lambda: False)
    assert main(['--device', 'cuda']) == 2 and 'sees no CUDA device' in capsys.readouterr().err
    assert main([]) == 0 and capsys.readouterr().out.startswith('no CUDA device: ')
