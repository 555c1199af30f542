"""Every figure notebook, run through papermill at smoke scale in fresh kernels (the only place
parameter injection is exercised), and the regeneration command's failure reporting."""
import importlib.util, json, os, subprocess, sys
from pathlib import Path
import nbformat
import pandas as pd
import pytest
from silent_majority.regenerate import figure_notebooks, natural_key, regenerate, format_table

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = figure_notebooks(ROOT / 'nbs')
SM_REGENERATE = str(Path(sys.executable).parent / 'sm-regenerate')   # the console script of this venv


NONET = ROOT / 'tests' / 'nonet'    # its sitecustomize.py disables networking in every process that starts with it


def _nonet_module():
    spec = importlib.util.spec_from_file_location('sm_nonet', NONET / 'sitecustomize.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); return mod


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
    "The smoke regeneration of every figure notebook, with networking disabled in this process and every child."
    tmp = tmp_path_factory.mktemp('smoke')
    keys = ('SM_CACHE', 'SM_PROGRESS', 'PYTHONPATH', 'SM_NONET', 'SM_NONET_LOG')
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(SM_CACHE=str(tmp / 'cache'), SM_PROGRESS='0', SM_NONET='1', SM_NONET_LOG=str(tmp / 'network.log'),
                      PYTHONPATH=os.pathsep.join([str(NONET)] + ([old['PYTHONPATH']] if old['PYTHONPATH'] else [])))
    nonet = _nonet_module(); nonet.install()
    try:
        results = regenerate('smoke', workers=2, out_dir=tmp / 'figures', executed_dir=tmp / 'executed')
    finally:
        nonet.uninstall()
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    return tmp, {r['id']: r for r in results}


def test_smoke_regeneration_never_reached_the_network(smoke_run):
    tmp, results = smoke_run
    assert all(r['status'] == 'ok' for r in results.values())
    log = tmp / 'network.log'
    assert not log.exists(), f'network access attempted during the smoke regeneration:\n{log.read_text()}'


def test_the_network_guard_works_in_child_processes(tmp_path):
    "The guard the smoke run relies on: a child process started like the kernels cannot connect out, but can use loopback."
    env = dict(os.environ, SM_NONET='1', SM_NONET_LOG=str(tmp_path / 'net.log'), PYTHONPATH=str(NONET))
    code = ("import socket, urllib.request\n"
            "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(); socket.create_connection(srv.getsockname()).close()\n"
            "try: urllib.request.urlopen('http://example.com', timeout=5)\n"
            "except OSError as e: print('blocked:', e)\n")
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=60)
    assert 'blocked: <urlopen error network access is disabled' in out.stdout, out.stdout + out.stderr
    assert "connect ('example.com', 80)" in (tmp_path / 'net.log').read_text()


def test_there_are_figure_notebooks():
    paper = [p.stem for p in NOTEBOOKS if p.parent.name == 'paper']
    course = [p.stem for p in NOTEBOOKS if p.parent.name == 'course']
    assert {'fig1_group_gap', 'fig2_zero_topk', 'fig6_finetune_wga'} <= set(paper) and len(course) == 4
    assert paper == sorted(paper, key=natural_key) and course == sorted(course, key=natural_key)   # a stable order
    assert paper.index('fig2_zero_topk') < paper.index('fig10_gradcam')


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_smoke_scale(smoke_run, nb):
    tmp, results = smoke_run
    r = results[nb.stem]
    assert r['status'] == 'ok', format_table([r])
    out = tmp / 'figures'
    for ext in ('png', 'pdf', 'csv', 'json'):
        assert (out / f'{nb.stem}.{ext}').stat().st_size > 0, f'{nb.stem}.{ext} missing or empty'
    side = json.loads((out / f'{nb.stem}.json').read_text())
    assert side['scale'] == 'smoke'                         # the injected parameter reached the notebook
    assert side['params']['scale'] == 'smoke' and side['params']['out_dir'] == str(out)
    for key in ('seeds', 'data_source', 'git', 'versions', 'wall_time_s', 'summary', 'configs'):
        assert key in side, key
    assert side['data_source'] and side['versions']['torch']
    assert not pd.read_csv(out / f'{nb.stem}.csv').empty
    executed = nbformat.read(r['executed'], as_version=4)
    assert any('injected-parameters' in c.metadata.get('tags', []) for c in executed.cells)


def test_gallery_of_the_smoke_figures(smoke_run):
    from silent_majority.regenerate import write_gallery
    tmp, results = smoke_run
    text = write_gallery(tmp / 'figures', ROOT / 'nbs').read_text()
    assert text.startswith('# Figure gallery (smoke scale)') and 'Not regenerated yet' not in text
    for i in results:
        assert f'![{i}]({i}.png)' in text and f'[csv]({i}.csv)' in text
    assert text.count('Provenance: scale `smoke`') == len(results)


def test_plan_lists_exactly_the_runs_the_notebooks_ask_for(smoke_run):
    "`sm-regenerate --dry-run` and the training phase are only as good as the plan: each notebook must open exactly the runs its plan lists."
    from silent_majority.plan import FIGURE_RUNS, figure_runs, run_name
    tmp, results = smoke_run
    assert set(results) == set(FIGURE_RUNS)
    for fig, r in results.items():
        planned = {run_name(k, c) for k, c in figure_runs(fig, 'smoke')}
        pre = {run_name(k, c) for k, c in figure_runs(fig, 'smoke') if k == 'pretrain'}   # opened only while an ERM run trains
        assert r['unplanned'] == [] and set(r['runs']) == planned - pre, (fig, sorted(set(r['runs']) ^ (planned - pre)))
    trained = {p.name for p in (tmp / 'cache' / 'runs').iterdir() if (p / 'done.json').exists()}
    assert trained == {run_name(k, c) for f in FIGURE_RUNS for k, c in figure_runs(f, 'smoke')}


def test_serial_path_gives_the_same_figures(smoke_run, tmp_path):
    "Each notebook training what it needs (`--no-pretrain`, a fresh cache) gives the CSVs the training phase's runs gave, byte for byte."
    smoke, _ = smoke_run
    figs = ['fig6_finetune_wga', 'c1_spuco_jtt']   # paper runs with dependencies (ERM -> fine-tunings, JTT), and course runs
    old = os.environ.get('SM_CACHE'); os.environ['SM_CACHE'] = str(tmp_path / 'cache')
    try: res = regenerate('smoke', only=figs, workers=2, out_dir=tmp_path / 'figs', executed_dir=tmp_path / 'ex', pretrain=False)
    finally:
        if old is None: os.environ.pop('SM_CACHE')
        else: os.environ['SM_CACHE'] = old
    assert [r['status'] for r in res] == ['ok', 'ok']
    for f in figs:
        assert (tmp_path / 'figs' / f'{f}.csv').read_bytes() == (smoke / 'figures' / f'{f}.csv').read_bytes(), f


def test_dry_run_names_what_is_missing(tmp_path):
    env = dict(os.environ, SM_DATA=str(tmp_path / 'data'), SM_CACHE=str(tmp_path / 'cache'))
    env.pop('SM_WEIGHTS', None)
    proc = subprocess.run([SM_REGENERATE, '--scale', 'paper', '--dry-run', '--only', 'fig1_group_gap', 'fig6_finetune_wga'],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert 'fig1_group_gap: 3 run(s)' in out and 'fig6_finetune_wga: 40 run(s)' in out   # fig1's seeds are fig6's first three
    assert f"MISSING  {tmp_path / 'data' / 'waterbird_complete95_forest2water2' / 'metadata.csv'}" in out
    assert 'MISSING  $SM_WEIGHTS (unset)/resnet50-11ad3fa6.pth' in out
    assert '40 distinct runs, 40 still to train' in out
    assert not (tmp_path / 'cache' / 'runs').exists()          # a dry run creates nothing


def test_fig1_outputs(smoke_run):
    tmp, _ = smoke_run
    df = pd.read_csv(tmp / 'figures' / 'fig1_group_gap.csv')
    assert set(df.split) == {'train', 'test'} and sorted(df.group.unique()) == [0, 1, 2, 3]
    assert df.acc.between(0, 1).all()
    assert sorted(df.seed.unique()) == [0, 1]                                   # two seeds at smoke scale
    assert all(g.sort_values('group').minority.tolist() == [False, True, True, False] for _, g in df[df.split == 'train'].groupby('seed'))
    side = json.loads((tmp / 'figures' / 'fig1_group_gap.json').read_text())
    assert isinstance(side['summary']['claim_holds'], bool) and len(side['summary']['holds_per_seed']) == 2
    assert side['summary']['regime'] == side['params']['regime'] == 'scratch'   # smoke's regime, recorded
    assert side['configs'][0]['scale'] == 'smoke' and side['configs'][0]['arch'] == 'tiny_cnn'


def _write_nb(path, cells):
    path.parent.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook(cells=cells, metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}})
    nbformat.write(nb, str(path))


def test_failing_notebook_is_reported_and_others_finish(tmp_path, fresh_cache):
    nbs = tmp_path / 'nbs'
    params = nbformat.v4.new_code_cell("scale = 'cpu'\nout_dir = None", metadata={'tags': ['parameters']})
    _write_nb(nbs / 'paper' / 'a_good.ipynb', [params, nbformat.v4.new_code_cell("assert scale == 'smoke'")])
    _write_nb(nbs / 'paper' / 'b_bad.ipynb', [params, nbformat.v4.new_code_cell('x = 1'),
                                              nbformat.v4.new_code_cell("raise ValueError('no such column: wga')")])
    proc = subprocess.run([SM_REGENERATE, '--scale', 'smoke', '--nbs', str(nbs),
                           '--workers', '2', '--out-dir', str(tmp_path / 'out')],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    table = proc.stdout
    assert 'a_good' in table and 'b_bad' in table
    fail = [l for l in table.splitlines() if l.startswith('FAILED')]
    assert len(fail) == 1, table
    assert "b_bad.ipynb: cell 2 (\"raise ValueError('no such column: wga')\")" in fail[0], fail[0]
    assert fail[0].endswith('ValueError: no such column: wga'), fail[0]
    kept = fresh_cache / 'executed' / 'smoke' / 'b_bad.ipynb'
    assert kept.exists()                                   # the executed failing notebook is kept for inspection


def test_parameters_of_the_wrong_type_are_refused_before_anything_runs(tmp_path):
    proc = subprocess.run([SM_REGENERATE, '--scale', 'smoke', '--only', 'fig1_group_gap', 'c1_spuco_jtt', '-p', 'seed=abc',
                           '--out-dir', str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "fig1_group_gap: parameter seed must be int, got 'abc' (str)" in proc.stderr
    proc = subprocess.run([SM_REGENERATE, '--scale', 'smoke', '--only', 'fig1_group_gap', '-p', 'sede=1',
                           '--out-dir', str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "fig1_group_gap has no parameter(s) ['sede']" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())                   # nothing ran


def test_unknown_figure_id_is_an_error():
    proc = subprocess.run([SM_REGENERATE, '--scale', 'smoke', '--only', 'fig99'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown figure ids ['fig99']" in proc.stderr
