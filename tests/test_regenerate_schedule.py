"""`sm-regenerate` trains the planned runs first, in parallel, then runs the notebooks: the figures are the same
as when each notebook trains what it needs, the terminal shows only progress, the table and real warnings, and a
notebook that asks the run cache for a run the plan does not list is named."""
import json, os, subprocess, sys
from pathlib import Path
import nbformat
import pytest
from silent_majority.core import run_name
from silent_majority.plan import figure_runs
from silent_majority.regenerate import KERNEL_NOISE, regenerate, train_planned

ROOT = Path(__file__).resolve().parents[1]
SM_REGENERATE = str(Path(sys.executable).parent / 'sm-regenerate')


def _cli(tmp, *args, cache='cache'):
    env = dict(os.environ, SM_CACHE=str(tmp / cache), SM_PROGRESS='1')
    return subprocess.run([SM_REGENERATE, '--scale', 'smoke', *args], capture_output=True, text=True, timeout=900, env=env)


def test_cli_trains_first_with_a_clean_terminal(tmp_path):
    "The command line: a training phase in 2 processes, then the notebooks; the terminal shows the bars and the table only."
    par = _cli(tmp_path, '--workers', '2', '--only', 'c1_spuco_jtt', '--out-dir', str(tmp_path / 'par'))
    assert par.returncode == 0, par.stdout + par.stderr
    planned = {run_name(k, c) for k, c in figure_runs('c1_spuco_jtt', 'smoke')}
    assert f'{len(planned)} run(s) trained with 2 process(es); 0 of {len(planned)} planned runs were cached' in par.stdout, par.stdout
    assert 'training (smoke)' in par.stderr and 'figures (smoke)' in par.stderr          # the two progress bars
    for noise in KERNEL_NOISE + ('IPKernelApp', 'Traceback', 'Warning'):                # no kernel log lines, warnings, tracebacks
        assert noise not in par.stderr, par.stderr
    assert {p.name for p in (tmp_path / 'cache' / 'runs').iterdir() if (p / 'done.json').exists()} == planned


def _notebook(path, code):
    path.parent.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("scale = 'cpu'\ndataset = 'waterbirds_like'\nseed = 0\nout_dir = None\narch = None",
                                  metadata={'tags': ['parameters']}),
        nbformat.v4.new_code_cell(code)],
        metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}})
    nbformat.write(nb, str(path))


def test_a_run_outside_the_plan_is_named(tmp_path):
    "A notebook with a figure's id that opens a run its plan does not list: the run is named on the terminal and in the table."
    _notebook(tmp_path / 'nbs' / 'paper' / 'fig1_group_gap.ipynb',
              "from silent_majority.core import Run\nRun({'lr': 0.5}, kind='toy')\nRun({'lr': 0.5}, kind='toy')")
    p = _cli(tmp_path, '--nbs', str(tmp_path / 'nbs'), '--out-dir', str(tmp_path / 'figs'), '--no-pretrain')
    name = run_name('toy', {'lr': 0.5})
    assert p.returncode == 0, p.stdout + p.stderr
    assert f'NOT IN THE PLAN fig1_group_gap: asked the run cache for {name}' in p.stdout, p.stdout
    assert p.stderr.count(f'asked the run cache for 1 run(s) the plan does not list (so --dry-run and the training phase miss them): {name}') == 1


def test_kernel_stderr_is_shown_once_without_the_noise(tmp_path):
    "What a kernel writes to its own stderr (a native library's message) is shown, once; the log lines every kernel prints are not."
    for n in ('a', 'b'):
        _notebook(tmp_path / 'nbs' / 'paper' / f'{n}.ipynb', "import os\nos.write(2, b'libfoo: falling back to slow path\\n')")
    p = _cli(tmp_path, '--nbs', str(tmp_path / 'nbs'), '--out-dir', str(tmp_path / 'figs'))
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stderr.count('kernel stderr: libfoo: falling back to slow path') == 1, p.stderr
    assert not any(n in p.stderr for n in KERNEL_NOISE), p.stderr


def test_training_phase_on_a_dask_local_cluster(fresh_cache, tmp_path):
    "The training phase through Dask (a LocalCluster of 2 workers started here), then the notebook only loads."
    training = {}
    res = regenerate('smoke', only=['c1_spuco_jtt'], workers=2, out_dir=tmp_path / 'figs', executed_dir=tmp_path / 'ex',
                     backend='dask', training=training)
    planned = {run_name(k, c) for k, c in figure_runs('c1_spuco_jtt', 'smoke')}
    assert [r['status'] for r in res] == ['ok'] and res[0]['unplanned'] == []
    assert (training['backend'], training['trained'], training['failed']) == ('dask', len(planned), {})
    assert all(r['pid'] != os.getpid() for r in training['records'])
    assert set(res[0]['runs']) == planned
    again = train_planned('smoke', ['c1_spuco_jtt'], workers=2)                    # now everything is cached
    assert (again['trained'], again['cached'], again['planned'], again['processes']) == (0, len(planned), len(planned), 0)


def test_bad_backend_arguments_are_refused(tmp_path):
    p = _cli(tmp_path, '--address', 'tcp://127.0.0.1:9', '--only', 'fig1_group_gap', '--out-dir', str(tmp_path / 'f'))
    assert p.returncode == 2 and "address applies to the 'dask' backend" in p.stderr, p.stderr


def test_a_plan_that_cannot_take_the_parameters_is_left_to_the_notebook(fresh_cache, capsys):
    "A parameter one notebook's runs cannot take (the course has one dataset): the others' runs are trained, that notebook reports its own error."
    rec = train_planned('smoke', ['c1_spuco_jtt', 'fig1_group_gap'], {'dataset': 'celeba_like'})
    assert (rec['planned'], rec['trained'], rec['failed']) == (2, 2, {})        # fig1's two ERM runs on celeba_like
    assert "no plan for c1_spuco_jtt with {'dataset': 'celeba_like'}: unknown dataset 'celeba_like'" in capsys.readouterr().err
