"""`sm-regenerate` when things go wrong: folders it cannot write, found before anything runs; bad seeds and worker
counts; figure sidecars that are missing or damaged; warnings a kernel prints; a kernel that dies part-way; and the
machine recorded in every sidecar. Each notebook run is a smoke-scale one, or a tiny notebook written here."""
import contextlib, io, json, os, shutil, warnings
from pathlib import Path
import nbformat
import pytest
from silent_majority.regenerate import (SidecarWarning, format_table, gallery, kernel_warnings, main, read_sidecars,
                                        regenerate, results_table)

ROOT = Path(__file__).resolve().parents[1]
FIG = 'fig1_group_gap'          # the cheapest figure notebook that trains a run (about 10 s at smoke scale)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    "Private cache and figures folders, and a regular file to put paths under."
    monkeypatch.setenv('SM_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('SM_FIGURES', str(tmp_path / 'figures'))
    monkeypatch.setenv('SM_PROGRESS', '0')
    (tmp_path / 'afile').write_text('a file, not a folder')
    return tmp_path


def _main(*argv)->tuple:
    "Run `sm-regenerate` in this process: (exit status, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


# Folders that cannot be written are found before any notebook runs: (arguments, environment, expected message).
# Root ignores permission bits, so the portable cases put the folder under (or at) a regular file.
UNWRITABLE = {
    '--out-dir under a file': (['--out-dir', '{t}/afile/sub'], {},
                               'cannot write figures to {t}/afile/sub: {t}/afile is a file, not a folder'),
    '--out-dir is a file': (['--out-dir', '{t}/afile'], {}, 'cannot write figures to {t}/afile: {t}/afile is a file, not a folder'),
    'SM_FIGURES under a file': ([], {'SM_FIGURES': '{t}/afile/figures'},
                                'cannot write figures to {t}/afile/figures/smoke: {t}/afile is a file, not a folder'),
    'SM_CACHE under a file': ([], {'SM_CACHE': '{t}/afile/cache'},
                              'cannot write the run cache (SM_CACHE) to {t}/afile/cache: {t}/afile is a file, not a folder'),
    'SM_CACHE is a file': ([], {'SM_CACHE': '{t}/afile'}, 'cannot write the run cache (SM_CACHE) to {t}/afile: {t}/afile is a file'),
    'SM_CACHE read-only': ([], {'SM_CACHE': '{t}/ro'}, 'cannot write the run cache (SM_CACHE) to {t}/ro: Permission denied'),
}
ROOT_SKIPS = {'SM_CACHE read-only'}   # root ignores permission bits


@pytest.mark.parametrize('case', [
    pytest.param(k, marks=pytest.mark.skipif(os.geteuid() == 0, reason='permission bits do not stop root')) if k in ROOT_SKIPS
    else k for k in UNWRITABLE])
def test_unwritable_folder_is_refused_before_anything_runs(sandbox, monkeypatch, case):
    argv, env, message = UNWRITABLE[case]
    t = str(sandbox)
    (sandbox / 'ro').mkdir(); (sandbox / 'ro').chmod(0o555)
    for k, v in env.items(): monkeypatch.setenv(k, v.format(t=t))
    rc, out, err = _main('--scale', 'smoke', '--only', FIG, *[a.format(t=t) for a in argv])
    assert rc == 2, out + err
    assert err.startswith(f'sm-regenerate: {message.format(t=t)}') and err.count('\n') == 1, err
    assert 'Traceback' not in err and out == ''
    cache = Path(os.environ['SM_CACHE'])
    assert not (cache / 'executed').exists() and not (cache / 'runs').exists()   # no notebook ran, nothing trained
    (sandbox / 'ro').chmod(0o755)


# Seeds and worker counts are checked before anything runs: (arguments, message).
BAD_ARGS = {
    '--seed -1': (['--seed', '-1'], '--seed must be a non-negative int, got -1'),
    '-p seed=-1': (['-p', 'seed=-1'], 'seed must be a non-negative int, got -1'),
    '--workers 0': (['--workers', '0'], '--workers must be a positive int, got 0'),
    '--workers -2': (['--workers', '-2'], '--workers must be a positive int, got -2'),
    '--dry-run --seed -1': (['--dry-run', '--seed', '-1'], '--seed must be a non-negative int, got -1'),
    '--dry-run -p seed=-1': (['--dry-run', '-p', 'seed=-1'], 'seed must be a non-negative int, got -1'),
}


@pytest.mark.parametrize('case', list(BAD_ARGS))
def test_bad_seed_or_workers_is_refused_before_anything_runs(sandbox, case):
    argv, message = BAD_ARGS[case]
    rc, out, err = _main('--scale', 'smoke', '--only', FIG, '--out-dir', str(sandbox / 'out'), *argv)
    assert (rc, err) == (2, f'sm-regenerate: {message}\n'), out + err
    assert not (sandbox / 'cache' / 'executed').exists() and not (sandbox / 'out').exists()


def test_seed_zero_is_accepted(sandbox):
    rc, out, err = _main('--scale', 'smoke', '--only', FIG, '--dry-run', '--seed', '0')
    assert rc != 2 and f'{FIG}: 2 run(s)' in out and 'seed 0 ' in out, out + err   # fig1 reads two ERM seeds at smoke scale


# A figure whose sidecar was deleted or damaged: the gallery names the file, warns, and shows the others.
DAMAGE = {
    'deleted': (lambda p: p.unlink(), 'is missing: regenerate this figure'),
    'truncated': (lambda p: p.write_text(p.read_text()[:60]), 'is damaged (JSONDecodeError: '),
    'emptied': (lambda p: p.write_text(''), 'is damaged (JSONDecodeError: '),
    'not a sidecar': (lambda p: p.write_text('[]'), "is not a figure sidecar (it lacks 'id' or 'summary')"),
}


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_missing_or_damaged_sidecar_is_named_in_the_gallery(tmp_path, damage):
    fig = tmp_path / 'figures'; fig.mkdir()
    for i in (FIG, 'c1_spuco_jtt'):
        for ext in ('png', 'json'): shutil.copy(ROOT / 'figures' / f'{i}.{ext}', fig / f'{i}.{ext}')
    hurt, what = DAMAGE[damage]
    hurt(fig / f'{FIG}.json')
    name = str(fig / f'{FIG}.json')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        sides = read_sidecars(fig)
    assert list(sides) == ['c1_spuco_jtt']
    assert [(w.category, str(w.message).split(' is ')[0]) for w in caught] == [(SidecarWarning, name)]
    assert what in str(caught[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        text = gallery(fig, ROOT / 'nbs')
        results_table([FIG, 'c1_spuco_jtt'], fig, ROOT / 'nbs')        # the README's tables carry on too
    assert any(name in str(w.message) for w in caught)
    assert f'**{name} {what}' in text and f'(`sm-regenerate --only {FIG}`)' in text
    assert f'Not regenerated yet: run `sm-regenerate --only {FIG}`' not in text
    assert '![c1_spuco_jtt](c1_spuco_jtt.png)' in text and 'Provenance: scale `cpu`' in text   # the others are still shown


@pytest.fixture(scope='module')
def fig1_run(tmp_path_factory):
    "One smoke run of fig1 through `sm-regenerate`, in a private cache and figures folder."
    tmp = tmp_path_factory.mktemp('fig1')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('SM_CACHE', str(tmp / 'cache')); mp.setenv('SM_FIGURES', str(tmp / 'figures')); mp.setenv('SM_PROGRESS', '0')
        rc, out, err = _main('--scale', 'smoke', '--only', FIG, '--out-dir', str(tmp / 'out'))
    assert rc == 0, out + err
    return tmp, err


def test_sidecar_records_the_machine(fig1_run):
    import torch
    from silent_majority.plots import MACHINE_ENV, machine_info
    tmp, _ = fig1_run
    side = json.loads((tmp / 'out' / f'{FIG}.json').read_text())
    m = side['machine']
    assert set(m) == set(machine_info())
    assert m['cpu_model'] and m['cpu_cores'] >= 1 and m['torch_cpu_capability'] == torch.backends.cpu.get_cpu_capability()
    assert m['torch_threads'] == 1                                  # the kernel ran with the one thread regenerate gives it
    assert set(m['env']) == set(MACHINE_ENV) and m['env']['OMP_NUM_THREADS'] == '1'
    assert m['platform'] and 'blas' in m and 'onednn_version' in m
    text = (tmp / 'out' / 'README.md').read_text()
    assert f"CPU {m['cpu_model']} ({m['torch_cpu_capability']}, 1 torch thread(s))" in text


def test_damaged_run_warning_reaches_the_terminal(fig1_run, monkeypatch):
    tmp, first_err = fig1_run
    assert 'damaged' not in first_err
    runs = tmp / 'cache' / 'runs'
    pt = sorted(runs.glob('*/*.pt'))[0]
    pt.write_bytes(pt.read_bytes()[:100])                           # truncate a checkpoint the notebook will load
    monkeypatch.setenv('SM_CACHE', str(tmp / 'cache')); monkeypatch.setenv('SM_FIGURES', str(tmp / 'figures'))
    monkeypatch.setenv('SM_PROGRESS', '0')
    rc, out, err = _main('--scale', 'smoke', '--only', FIG, '--out-dir', str(tmp / 'out'))
    assert rc == 0, out + err
    # core warns with a UserWarning (or its subclass DamagedRunWarning) naming the run's folder and the damaged file
    lines = [l for l in err.splitlines() if 'Warning: ' in l and pt.parent.name in l]
    assert len(lines) == 1, err                                    # printed once
    assert lines[0].startswith(f'{FIG}: ') and 'damaged' in lines[0] and str(pt) in lines[0], lines[0]
    executed = tmp / 'cache' / 'executed' / 'smoke' / f'{FIG}.ipynb'
    assert [w for w in kernel_warnings(executed) if pt.parent.name in w] == [lines[0][len(FIG) + 2:]]


def _write_nb(path, sources):
    path.parent.mkdir(parents=True, exist_ok=True)
    cells = [nbformat.v4.new_code_cell("scale = 'cpu'\nout_dir = None", metadata={'tags': ['parameters']})]
    cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={'kernelspec': {
        'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}}), str(path))


# Kernels that die part-way: (cells after the parameters cell, the index of the last cell that ran).
DYING = {
    'after a first cell': (["import warnings\nwarnings.warn('the tiny notebook warns')\nx = 1", 'import os\nos._exit(1)', 'y = 2'], 2),
    # (a warning raised in the cell that kills the kernel may die with it, unsent: only an earlier cell's warning is asserted)
    'in the first cell': (["import os\nos._exit(3)", 'y = 2'], 1),
}


@pytest.mark.parametrize('case', list(DYING))
def test_kernel_that_dies_is_reported_with_the_last_cell_that_ran(sandbox, case, capsys):
    sources, last = DYING[case]
    _write_nb(sandbox / 'nbs' / 'paper' / 'dies.ipynb', sources)
    [r] = regenerate('smoke', nbs=sandbox / 'nbs', out_dir=sandbox / 'out')
    assert (r['status'], r['cell'], r['last_cell']) == ('failed', None, last), r
    assert r['error'].startswith('DeadKernelError'), r['error']
    first = sources[last - 1].splitlines()[0]
    fail = [l for l in format_table([r]).splitlines() if l.startswith('FAILED')]
    assert fail == [f"FAILED {r['notebook']}: cell {last} ({first!r}) was the last cell that ran: {r['error']}"], fail
    if 'warnings.warn' in sources[0]:
        assert [w.split(' (')[0] for w in r['warnings']] == ['UserWarning: the tiny notebook warns']
        assert 'dies: UserWarning: the tiny notebook warns' in capsys.readouterr().err


def test_kernel_that_dies_is_reported_by_the_command(sandbox):
    _write_nb(sandbox / 'nbs' / 'paper' / 'dies.ipynb', ['x = 1', 'import os\nos._exit(1)'])
    rc, out, err = _main('--scale', 'smoke', '--nbs', str(sandbox / 'nbs'), '--out-dir', str(sandbox / 'out'))
    assert rc == 1, out + err
    assert "dies.ipynb: cell 2 ('import os') was the last cell that ran: DeadKernelError" in out, out
    assert 'before any cell ran' not in out
